"""End to end: recipient verification for operated domains (SPEC §3.5) through the real `twistd -n epost`.

The daemon is the Internet-facing gateway: gateway.dat sends `verify.test`
to an internal server on loopback (`UserSink`) that knows a few users. Our
test client is 127.0.0.1, outside `relay_networks` (set to 192.0.2.0/24
here, plus 127.0.0.2 where a trusted client is wanted).
"""

from __future__ import annotations

import smtplib
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from e2e_support import VENV_BIN, queued, wait_for
from sinks import UserSink, closed_port

ALICE = "alice@verify.test"
SENDER = "forged@elsewhere.example"
CONTENT = b"From: <forged@elsewhere.example>\r\nSubject: verify\r\n\r\nhello\r\n"


def gateway_daemon(daemon, port: int, relay_networks: str = '["192.0.2.0/24"]', extra: str = "", delivery: str = ""):
    d = daemon(server=f"relay_networks = {relay_networks}", start=False,
               toml=f'gateway_table = "gateway.dat"\n{extra}\n[delivery]\n{delivery}\n')
    (d.folder / "gateway.dat").write_text(f"verify.test,127.0.0.1,{port}\n")
    return d


def rcpt(d, address: str, source: str = "127.0.0.1") -> tuple[int, str]:
    with smtplib.SMTP("127.0.0.1", d.relay_port, local_hostname="client.example.org", timeout=30,
                      source_address=(source, 0)) as client:
        client.ehlo()
        client.mail(SENDER)
        code, text = client.rcpt(address)
    return code, text.decode()


def send(d, recipients: list[str]) -> dict[str, int]:
    """One message; the RCPT code per recipient (DATA only when one was accepted)."""
    codes = {}
    with smtplib.SMTP("127.0.0.1", d.relay_port, local_hostname="client.example.org", timeout=30) as client:
        client.ehlo()
        client.mail(SENDER)
        for recipient in recipients:
            codes[recipient] = client.rcpt(recipient)[0]
        if 250 in codes.values():
            assert client.data(CONTENT)[0] == 250
    return codes


def epost(d, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "epost"), "--config", str(d.config), *args],
                          capture_output=True, text=True, timeout=30)


def test_unknown_address_refused_at_rcpt_valid_one_delivered_no_bounce(daemon) -> None:
    with UserSink({ALICE}) as sink:
        d = gateway_daemon(daemon, sink.port).start()
        code, text = rcpt(d, "nobody@verify.test")
        assert code == 550 and text.startswith("5.1.1 "), text
        assert "User unknown in local recipient table" in text  # the next hop's own words
        assert send(d, [ALICE, "nobody@verify.test"]) == {ALICE: 250, "nobody@verify.test": 550}
        sink.wait_for_messages(1)
        assert sink.messages[0].recipients == (ALICE,)
        assert sink.messages[0].sender == SENDER
        wait_for(lambda: not queued(d.spool, "incoming") and not queued(d.spool, "deferred"), message="an empty queue")
        # One probe per address, the second time from the cache; never DATA for a probe.
        assert sink.probe_rcpts == {"nobody@verify.test": 1, ALICE: 1}
        assert len(sink.messages) == 1
        log = d.log.read_text()
        assert "verify: from=<forged@elsewhere.example> to=<nobody@verify.test>" in log
        assert "status=refused source=probe" in log and "status=refused source=cache" in log


def test_cache_survives_restart_and_epost_route_and_verify_show_it(daemon) -> None:
    with UserSink({ALICE}) as sink:
        d = gateway_daemon(daemon, sink.port).start()
        assert rcpt(d, "nobody@verify.test")[0] == 550
        assert rcpt(d, ALICE)[0] == 250
        d.stop()
        assert (d.spool / "verify.cache").exists()
        d.start()
        assert rcpt(d, "nobody@verify.test")[0] == 550
        assert rcpt(d, ALICE)[0] == 250
        assert sink.probe_rcpts == {"nobody@verify.test": 1, ALICE: 1}  # nothing probed again
        route = epost(d, "route", "nobody@verify.test")
        assert route.stdout.splitlines()[-1].startswith("nobody@verify.test: verify via cache -> refused until "), route
        # The user now exists on the internal server: `epost verify` asks again and the daemon's cache follows.
        sink.users.add("nobody@verify.test")
        verify = epost(d, "verify", "nobody@verify.test")
        assert verify.returncode == 0 and "nobody@verify.test: accepted:" in verify.stdout, verify
        assert rcpt(d, "nobody@verify.test")[0] == 250
        assert sink.probe_rcpts["nobody@verify.test"] == 2


@pytest.mark.parametrize("mode", ["garbage", "close"])
def test_broken_next_hop_gives_450_quickly(daemon, mode: str) -> None:
    with UserSink({ALICE}, rcpt_mode=mode) as sink:
        d = gateway_daemon(daemon, sink.port).start()
        started = time.monotonic()
        code, text = rcpt(d, ALICE)
        assert (code, text[:5]) == (450, "4.1.1"), text
        assert time.monotonic() - started < 8
        wait_for(lambda: sink.open_connections == 0, timeout=5, message="the probe session closed")
        assert rcpt(d, ALICE)[0] == 450 and sink.probe_rcpts[ALICE] == 2  # temporary: not cached


def test_internal_server_down_gives_450(daemon) -> None:
    d = gateway_daemon(daemon, closed_port()).start()
    started = time.monotonic()
    code, text = rcpt(d, ALICE)
    assert (code, text[:5]) == (450, "4.1.1") and time.monotonic() - started < 8


def test_mute_next_hop_gives_450_within_the_budget_and_leaves_no_session(daemon) -> None:
    with UserSink({ALICE}, rcpt_mode="mute") as sink:
        d = gateway_daemon(daemon, sink.port).start()
        started = time.monotonic()
        code, text = rcpt(d, ALICE)
        elapsed = time.monotonic() - started
        assert (code, text[:5]) == (450, "4.1.1"), text
        assert 7.5 <= elapsed < 9.5, elapsed
        wait_for(lambda: sink.open_connections == 0, timeout=3, message="the probe session closed")


def test_slow_next_hop_within_the_budget_is_waited_for(daemon) -> None:
    with UserSink({ALICE}, rcpt_mode="slow", delay=1.5) as sink:
        d = gateway_daemon(daemon, sink.port).start()
        started = time.monotonic()
        assert rcpt(d, ALICE)[0] == 250
        assert time.monotonic() - started >= 1.5


def test_relay_recipients_file_decides_without_probe_and_reloads(daemon) -> None:
    with UserSink({ALICE, "bob@verify.test"}) as sink:
        d = gateway_daemon(daemon, sink.port, extra='relay_recipients = "relay_recipients"')
        (d.folder / "relay_recipients").write_text(f"# valid\n{ALICE}\n")
        d.start()
        code, text = rcpt(d, "bob@verify.test")
        assert code == 550 and text.startswith("5.1.1 ")
        assert rcpt(d, ALICE)[0] == 250
        (d.folder / "relay_recipients").write_text(f"{ALICE}\nbob@verify.test\n")
        wait_for(lambda: rcpt(d, "bob@verify.test")[0] == 250, timeout=5, interval=0.3, message="the reload")
        assert sink.probe_rcpts == {}
        check = epost(d, "check-config")
        assert check.returncode == 0, check
        (d.folder / "relay_recipients").write_text("not an address\n")
        check = epost(d, "check-config")
        assert check.returncode == 1 and "relay_recipients:1: " in check.stdout


def test_trusted_client_is_never_probed(daemon) -> None:
    with UserSink({ALICE}) as sink:
        d = gateway_daemon(daemon, sink.port, relay_networks='["127.0.0.2/32"]').start()
        assert rcpt(d, "nobody@verify.test", source="127.0.0.2")[0] == 250
        assert sink.probe_rcpts == {}


def test_flood_of_random_addresses_costs_one_probe_each_within_the_connection_limit(daemon) -> None:
    with UserSink({ALICE}, rcpt_mode="slow", delay=0.05) as sink:
        d = gateway_daemon(daemon, sink.port, delivery="max_per_destination = 3").start()
        addresses = [f"r{n}@verify.test" for n in range(60)]
        codes: list[int] = []

        def client(part: list[str]) -> None:
            with smtplib.SMTP("127.0.0.1", d.relay_port, timeout=30) as c:
                c.ehlo()
                c.mail(SENDER)
                for address in part:
                    codes.append(c.rcpt(address)[0])
                    codes.append(c.rcpt(address)[0])  # asked twice: still one probe

        threads = [threading.Thread(target=client, args=(addresses[n::10],)) for n in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert set(codes) == {550} and len(codes) == 120
        assert sink.probe_rcpts == {a: 1 for a in addresses}
        assert sink.most_at_once <= 3


def test_epost_verify_with_the_daemon_down_probes_from_the_command(daemon) -> None:
    with UserSink({ALICE}) as sink:
        d = gateway_daemon(daemon, sink.port)
        d.spool.mkdir()
        ok = epost(d, "verify", ALICE)
        assert ok.returncode == 0 and ok.stdout.startswith(f"{ALICE}: accepted: 127.0.0.1[127.0.0.1]:") and "not cached" in ok.stdout, ok
        refused = epost(d, "verify", "nobody@verify.test")
        assert refused.returncode == 1 and "refused" in refused.stdout and "5.1.1" in refused.stdout, refused
        assert sink.probe_rcpts == {ALICE: 1, "nobody@verify.test": 1}
    down = epost(d, "verify", ALICE)
    assert down.returncode == 2 and "temporary" in down.stdout, down
    local = epost(d, "verify", "alice@example.test")
    assert local.returncode == 1 and "not verified" in local.stderr, local


def test_mx_routed_operated_domain_is_verified_at_its_mx_hosts(daemon) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "routing"))
    from dnsmasq import DNSMASQ, Dnsmasq

    if DNSMASQ is None:
        pytest.skip("dnsmasq is not installed")
    dns = Dnsmasq([  # the first MX refuses connections: the probe moves on to the second
        "--mx-host=mxop.test,mx1.mxop.test,10",
        "--mx-host=mxop.test,mx2.mxop.test,20",
        "--host-record=mx1.mxop.test,127.0.13.2",
        "--host-record=mx2.mxop.test,127.0.13.3",
    ])
    dns.start()
    try:
        with UserSink({"carol@mxop.test"}, host="127.0.13.3", port=25) as sink:
            d = daemon(server='relay_networks = ["192.0.2.0/24"]', start=False,
                       toml=f'gateway_table = "gateway.dat"\ndns_servers = ["127.0.0.1:{dns.port}"]\n')
            (d.folder / "gateway.dat").write_text("mxop.test,mx\n*,127.0.0.1,9\n")
            d.start()
            code, text = rcpt(d, "nobody@mxop.test")
            assert code == 550 and "mx2.mxop.test[127.0.13.3]:25 said: 550 5.1.1" in text, text
            assert rcpt(d, "carol@mxop.test")[0] == 250
            assert sink.probe_rcpts == {"nobody@mxop.test": 1, "carol@mxop.test": 1}
    finally:
        dns.cleanup()
