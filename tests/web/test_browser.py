"""Mail Control in a real headless browser (Debian's chromium + chromium-driver, driven by selenium),
against the real daemon (`twistd -n epost --admin ...`) on loopback.

The story of the issue: log in, see a deferred message, flush it (it is
delivered), edit gateway.dat with an error (the error is shown by line, the
old table stays in force), fix it, and see the new route used by the route
box and by a new message.

Chromium is started so that nothing leaves loopback: every non-loopback
request goes to a proxy on 127.0.0.1:9 where nothing listens, host names
other than localhost do not resolve, and background networking is off.
This test never skips: without chromium it fails and says how to install it.
"""

from __future__ import annotations

import os
import shutil
import smtplib
from pathlib import Path

import pytest

from e2e_support import Daemon, free_port, wait_for, write_config
from epost.auth import hash_password
from fakes import queued_ids
from sinks import Sink

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ADMIN = "admin@example.test"
PASSWORD = "s3cret admin pass"

CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-default-apps",
    "--disable-extensions",
    "--dns-prefetch-disable",
    "--disable-domain-reliability",
    "--metrics-recording-only",
    # Everything but loopback goes to a dead proxy; loopback is always direct
    # (Chromium's implicit bypass, spelled out). `<-loopback>` would do the
    # opposite: send loopback through the proxy too.
    "--proxy-server=127.0.0.1:9",
    "--proxy-bypass-list=127.0.0.1;localhost;[::1]",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1",
    "--window-size=1200,900",
)


def _webdriver(profile: Path):
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not shutil.which(path)]
    if missing:
        pytest.fail(
            f"{', '.join(missing)} not found: the browser test needs Debian's chromium and chromium-driver "
            "(`apt-get install chromium chromium-driver`, done by scripts/test.sh)",
            pytrace=False,
        )
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is not installed: pip install -e '.[test]' (scripts/test.sh does)", pytrace=False)
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must never download a driver or a browser
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)


@pytest.fixture
def browser(tmp_path):
    driver = _webdriver(tmp_path / "chromium-profile")
    driver.implicitly_wait(0)
    yield driver
    driver.quit()


@pytest.fixture
def mail_control(tmp_path, request):
    """The real daemon with --admin on a loopback port and gateway.dat sending *.sink.test to a closed port."""
    folder = tmp_path / "daemon"
    folder.mkdir()
    relay, submission, admin = free_port(), free_port(), free_port()
    first_gateway = free_port()  # nothing listens here yet: the first attempt is refused
    gateway = folder / "gateway.dat"
    gateway.write_text(f"# test routes\n*.sink.test,127.0.0.1,{first_gateway}\n")
    config = write_config(
        folder, relay, submission,
        server=f'admin = ["tcp:{admin}:interface=127.0.0.1"]\nadmin_users = ["{ADMIN}"]',
        toml=f'gateway_table = "{gateway}"\n\n[retry]\ninterval = 3600\nfixed_interval = true\n',
    )
    (folder / "users").write_text(f"alice@example.test\n{ADMIN}:{hash_password(PASSWORD)}\n")
    daemon = Daemon(folder, config, relay, submission, [])
    request.node.epost_daemons = [daemon]  # its log in a failure's report (tests/conftest.py)
    daemon.start()
    daemon.admin_url = f"http://127.0.0.1:{admin}"
    daemon.first_gateway = first_gateway
    daemon.gateway = gateway
    try:
        yield daemon
    finally:
        daemon.stop()


def recipients(sink: Sink) -> list[str]:
    return [address for message in sink.messages for address in message.recipients]


def send(daemon, recipient: str, subject: str) -> None:
    with smtplib.SMTP("127.0.0.1", daemon.relay_port, timeout=30) as client:
        client.sendmail("sender@example.org", [recipient], f"From: <sender@example.org>\r\nSubject: {subject}\r\n\r\nhi\r\n")


def deferred(daemon) -> list[str]:
    return queued_ids(daemon.spool)["deferred"]


def test_mail_control_in_a_browser(mail_control, browser):
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    d = mail_control
    wait = WebDriverWait(browser, 15)

    def text(selector: str) -> str:
        return browser.find_element(By.CSS_SELECTOR, selector).text

    # A message for a.sink.test: its gateway refuses the connection, so it is deferred for an hour.
    send(d, "carol@a.sink.test", "first")
    queue_id = wait_for(lambda: deferred(d) and deferred(d)[0], timeout=20, message="a deferred message")

    # Log in (a page without login sends us to the login form).
    browser.get(d.admin_url + "/queue")
    wait.until(EC.presence_of_element_located((By.ID, "password")))
    assert browser.current_url == d.admin_url + "/login"
    browser.find_element(By.ID, "user").send_keys(ADMIN)
    browser.find_element(By.ID, "password").send_keys("wrong password")
    browser.find_element(By.ID, "login").click()
    wait.until(EC.text_to_be_present_in_element((By.CSS_SELECTOR, "main"), "Wrong address or password"))
    browser.find_element(By.ID, "password").send_keys(PASSWORD)
    browser.find_element(By.ID, "login").click()
    wait.until(EC.text_to_be_present_in_element((By.CSS_SELECTOR, "h1"), "Dashboard"))
    assert browser.current_url == d.admin_url + "/"  # no token or anything else in the URL

    # The dashboard: one deferred message, a.sink.test in retry with its Domain.mri fields.
    assert text("#size-deferred") == "1"
    domain = text("#domain-a\\.sink\\.test")
    for key in ("Domain-name", "Last-tried", "Try-number", "Err-text", "Next-try", "First-failure", "Last-host", "Messages"):
        assert key in domain, (key, domain)
    assert str(d.first_gateway) in domain  # Err-text: cannot connect to 127.0.0.1:PORT

    # The queue shows it deferred; flush it once the gateway answers.
    browser.find_element(By.LINK_TEXT, "Queue").click()
    card = wait.until(EC.presence_of_element_located((By.ID, f"msg-{queue_id}")))
    assert "carol@a.sink.test" in card.text and "deferred" in card.text
    with Sink(port=d.first_gateway) as sink:
        card.find_element(By.XPATH, ".//button[text()='flush']").click()
        wait.until(EC.text_to_be_present_in_element((By.CSS_SELECTOR, ".flash"), f"{queue_id}: due now"))
        wait_for(lambda: recipients(sink) == ["carol@a.sink.test"], timeout=20, message="the flushed message at the sink")
    wait_for(lambda: not deferred(d), timeout=10, message="an empty deferred queue")
    browser.get(d.admin_url + "/queue")
    assert "0 messages" in text("#count")

    # gateway.dat with a bad port on line 3: shown by its line, nothing saved, the old table in force.
    second_gateway = free_port()
    old = d.gateway.read_text()
    browser.find_element(By.LINK_TEXT, "gateway.dat").click()
    area = wait.until(EC.presence_of_element_located((By.ID, "gateway-text")))
    area.clear()
    area.send_keys(f"# test routes\n*.sink.test,127.0.0.1,{second_gateway}\n*.bad.test,127.0.0.1,70000\n")
    browser.find_element(By.ID, "gateway-save").click()
    wait.until(EC.presence_of_element_located((By.ID, "not-saved")))
    assert "line 3: bad port '70000'" in text("#problems")
    assert "line 3: bad port" in text("#line-3")
    assert browser.find_element(By.ID, "line-3").get_attribute("class") == "bad"
    assert "bad port" not in text("#line-2")
    assert d.gateway.read_text() == old
    assert f"*.sink.test,127.0.0.1,{d.first_gateway}" in text("#in-force")

    # Fix it (the textarea still holds our text) and save.
    area = browser.find_element(By.ID, "gateway-text")
    area.clear()
    area.send_keys(f"# test routes\n*.sink.test,127.0.0.1,{second_gateway}\n*.bad.test,127.0.0.1,7000\n")
    browser.find_element(By.ID, "gateway-save").click()
    wait.until(EC.text_to_be_present_in_element((By.CSS_SELECTOR, ".flash"), "saved 2 rules"))
    assert d.gateway.read_text() == f"# test routes\n*.sink.test,127.0.0.1,{second_gateway}\n*.bad.test,127.0.0.1,7000\n"

    # The live reload takes it within a second or two: the route box says so ...
    browser.find_element(By.LINK_TEXT, "Route").click()
    wait.until(EC.presence_of_element_located((By.ID, "route-address")))

    def routed_to_second() -> bool:
        try:
            earlier = browser.find_elements(By.ID, "route-result")  # the last try's answer, if any
            box = browser.find_element(By.ID, "route-address")
            box.clear()
            box.send_keys("dave@b.sink.test")
            browser.find_element(By.ID, "route-go").click()
            if earlier:  # read the new page's answer, not the old one while the new page loads
                wait.until(EC.staleness_of(earlier[0]))
            result = wait.until(EC.presence_of_element_located((By.ID, "route-result"))).text
        except WebDriverException:  # a try that met the page mid-navigation: try again
            return False
        return f"dave@b.sink.test: relay via gateway.dat:2 -> 127.0.0.1:{second_gateway}" in result

    # A table is in force once its file has held still for a second (docs/routing.md).
    wait_for(routed_to_second, timeout=15, interval=0.5, message="the route box showing the new gateway")

    # ... and a new message goes there.
    with Sink(port=second_gateway) as sink:
        send(d, "dave@b.sink.test", "second")
        wait_for(lambda: recipients(sink) == ["dave@b.sink.test"], timeout=20, message="the new message at the new gateway")
    browser.find_element(By.LINK_TEXT, "Dashboard").click()
    wait.until(EC.presence_of_element_located((By.ID, "senderlog")))
    assert "to=<dave@b.sink.test>" in text("#senderlog") and f":{second_gateway} " in text("#senderlog")

    # The DNS checks of the local domain (started by the first dashboard view): this daemon's DNS
    # is a loopback port where nothing answers, which the dashboard says, with what to do.
    def dns_checked() -> bool:
        browser.get(d.admin_url + "/")
        return "no answer from the DNS" in text("#dns-example\\.test")

    wait_for(dns_checked, timeout=20, interval=1, message="the dashboard's DNS check of example.test")
    assert "fix: check [routing] dns_servers" in text("#dns-example\\.test")

    # Readable on a phone: nothing wider than the screen.
    browser.set_window_size(390, 844)
    for path in ("/", "/queue", "/gateway", "/route"):
        browser.get(d.admin_url + path)
        overflow = browser.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, (path, overflow)

    # Log out: the pages are closed again.
    browser.find_element(By.XPATH, "//button[text()='Log out']").click()
    wait.until(EC.presence_of_element_located((By.ID, "password")))
    browser.get(d.admin_url + "/")
    assert browser.current_url == d.admin_url + "/login"
