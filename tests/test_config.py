"""epost.config: defaults <- TOML <- flags, and one-line errors naming the culprit."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from epost.queue.receivers import Limits, ThrottleRule
from epost.config import (
    Config,
    ConfigError,
    HostPort,
    load_config,
    normalize_domain,
    parse_duration,
    parse_host_port,
)

ROOT = Path(__file__).resolve().parent.parent


def load(tmp_path: Path, toml: str | None = None, **flags) -> Config:
    path = None
    if toml is not None:
        path = tmp_path / "epost.toml"
        path.write_text(toml, encoding="utf-8")
    return load_config(path, flags, default_hostname="mx.example.test")


def config_error(tmp_path: Path, toml: str | None = None, **flags) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, toml, **flags)
    message = str(info.value)
    assert "\n" not in message and "\r" not in message
    return message


# --- defaults, precedence --------------------------------------------------


def test_defaults_match_spec(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load(tmp_path)
    server, routing, delivery, retry = config.server, config.routing, config.delivery, config.retry
    assert server.hostname == "mx.example.test"
    assert server.relay == ("tcp:25",)
    assert server.submission == ("tcp:587",)
    assert server.smtps == () and server.admin == ()
    assert server.spool == tmp_path / "var/spool"
    assert server.tls_cert is None and server.tls_key is None
    assert server.max_message_size == 26214400
    assert server.max_recipients == 100
    assert server.relay_networks == (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    assert server.allow_plaintext_auth is False
    assert routing.local_domains == () and routing.relay_domains == ()
    assert routing.aliases == tmp_path / "etc/aliases"
    assert routing.users == tmp_path / "etc/users"
    assert routing.gateway_table == tmp_path / "etc/gateway.dat"
    assert routing.smtp_gateway is None
    assert routing.forward_all_to_gateway is False
    assert routing.dns_servers == ()
    assert (delivery.connect_timeout, delivery.greeting_timeout) == (30, 300)
    assert (delivery.max_connections, delivery.max_per_destination) == (100, 10)
    assert (retry.interval, retry.fixed_interval, retry.max_interval) == (120, False, 3600)
    assert (retry.count_5xx, retry.period_4xx, retry.period_noanswer) == (9, 8 * 3600, 24 * 3600)
    assert config.source is None


def test_hostname_defaults_to_fqdn(monkeypatch):
    monkeypatch.setattr("socket.getfqdn", lambda: "host.fqdn.test")
    assert load_config(None, {}).server.hostname == "host.fqdn.test"


FULL = """
[server]
hostname = "mail.example.jp"
relay = ["tcp:2525"]
submission = ["tcp:2587", "tcp6:2587"]
smtps = ["tcp:2465"]
admin = ["tcp:8025:interface=127.0.0.1"]
spool = "spool"
tls_cert = "cert.pem"
tls_key = "key.pem"
max_message_size = 1000
max_recipients = 5
relay_networks = ["10.1.2.3/8"]
allow_plaintext_auth = true
command_timeout = 60
session_deadline = 120
max_connections_per_client = 3
admin_users = ["Root@Example.jp"]

[routing]
local_domains = ["Example.JP.", "bücher.example"]
relay_domains = ["partner.jp"]
aliases = "a"
users = "u"
gateway_table = "/abs/gateway.dat"
smtp_gateway = "smtp.isp.example:2525"
forward_all_to_gateway = true
dns_servers = ["192.0.2.53", "[2001:db8::53]:5353"]

[delivery]
connect_timeout = 5
greeting_timeout = 6
max_connections = 7
max_per_destination = 8
delay_warning = "30m"
local_transport = "lmtp:unix:/run/dovecot/lmtp"
receiver_aware = false

[delivery.destinations."*.Google.com"]
max_connections = 5
messages_per_connection = 50
messages_per_minute = 120

[[delivery.throttle_rules]]
code = 421
enhanced = "4.7.0"
text = "slow down"
action = "slow"
seconds = "10m"
messages_per_minute = 30

[retry]
interval = 60
fixed_interval = true
max_interval = 600
count_5xx = 0
period_4xx = "15m"
period_noanswer = 7200
"""


def test_file_overrides_every_default(tmp_path):
    config = load(tmp_path, FULL)
    server, routing = config.server, config.routing
    assert server.hostname == "mail.example.jp"
    assert server.relay == ("tcp:2525",)
    assert server.submission == ("tcp:2587", "tcp6:2587")
    assert server.smtps == ("tcp:2465",)
    assert server.admin == ("tcp:8025:interface=127.0.0.1",)
    assert server.spool == tmp_path / "spool"
    assert (server.tls_cert, server.tls_key) == (tmp_path / "cert.pem", tmp_path / "key.pem")
    assert (server.max_message_size, server.max_recipients) == (1000, 5)
    assert server.relay_networks == (ipaddress.ip_network("10.0.0.0/8"),)
    assert server.allow_plaintext_auth is True
    assert (server.command_timeout, server.max_connections_per_client) == (60, 3)
    assert server.session_deadline == 120
    assert server.admin_users == ("root@example.jp",)
    assert routing.local_domains == ("example.jp", "xn--bcher-kva.example")
    assert routing.relay_domains == ("partner.jp",)
    assert (routing.aliases, routing.users) == (tmp_path / "a", tmp_path / "u")
    assert routing.gateway_table == Path("/abs/gateway.dat")
    assert routing.smtp_gateway == HostPort("smtp.isp.example", 2525)
    assert routing.forward_all_to_gateway is True
    assert routing.dns_servers == (HostPort("192.0.2.53", 53), HostPort("2001:db8::53", 5353))
    assert config.delivery.__dict__ == dict(
        connect_timeout=5, greeting_timeout=6, max_connections=7, max_per_destination=8, delay_warning=1800,
        local_transport="lmtp:unix:/run/dovecot/lmtp", receiver_aware=False,
        destinations=(("*.google.com", Limits(5, 50, 120.0)),),
        throttle_rules=(ThrottleRule("slow", 600.0, 421, "4.7.0", "slow down", 30.0),),
    )
    assert config.retry.__dict__ == dict(
        interval=60, fixed_interval=True, max_interval=600, count_5xx=0,
        period_4xx=900, period_noanswer=7200,
    )
    assert config.source == tmp_path / "epost.toml"


def test_flags_override_file(tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    config = load(
        tmp_path, FULL,
        hostname="flag.example.jp", spool="s", gateway_table="g.dat",
        smtp_gateway="[192.0.2.1]", forward_all=False, retry_fixed=False,
        retry_interval="30", retry_count_5xx="3", retry_period_4xx="2h",
        retry_period_noanswer="1d", connect_timeout="9", greeting_timeout="10",
        dns_server=["::1"],
    )
    assert config.server.hostname == "flag.example.jp"
    assert config.server.spool == cwd / "s"  # flags are relative to the working folder
    assert config.routing.gateway_table == cwd / "g.dat"
    assert config.routing.smtp_gateway == HostPort("192.0.2.1", 25)
    assert config.routing.forward_all_to_gateway is True  # False flag = not given
    assert config.routing.dns_servers == (HostPort("::1", 53),)
    assert (config.retry.interval, config.retry.count_5xx) == (30, 3)
    assert (config.retry.period_4xx, config.retry.period_noanswer) == (7200, 86400)
    assert (config.delivery.connect_timeout, config.delivery.greeting_timeout) == (9, 10)


def test_bool_flags_switch_on(tmp_path):
    config = load(tmp_path, forward_all=True, retry_fixed=1)
    assert config.routing.forward_all_to_gateway is True
    assert config.retry.fixed_interval is True


def test_repeatable_flags_replace_file_lists(tmp_path):
    config = load(
        tmp_path, FULL,
        relay=["tcp:1025", "tcp:1026"], submission=["tcp:1587"], smtps=["tcp:1465"],
        admin=["tcp:1080"], local_domain=["one.test", "TWO.test"],
        relay_network=["192.0.2.0/24"],
    )
    assert config.server.relay == ("tcp:1025", "tcp:1026")
    assert config.server.submission == ("tcp:1587",)
    assert config.server.smtps == ("tcp:1465",)
    assert config.server.admin == ("tcp:1080",)
    assert config.routing.local_domains == ("one.test", "two.test")
    assert config.server.relay_networks == (ipaddress.ip_network("192.0.2.0/24"),)


def test_empty_and_none_flags_mean_not_given(tmp_path):
    config = load(tmp_path, FULL, relay=[], local_domain=[], hostname=None, retry_fixed=False)
    assert config.server.relay == ("tcp:2525",)
    assert config.routing.local_domains == ("example.jp", "xn--bcher-kva.example")
    assert config.server.hostname == "mail.example.jp"


def test_unknown_flag_name_is_a_programming_error(tmp_path):
    with pytest.raises(TypeError):
        load(tmp_path, relays=["tcp:25"])


# --- paths -----------------------------------------------------------------


def test_relative_paths_follow_config_folder_not_cwd(tmp_path, monkeypatch):
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "epost.toml").write_text('[server]\nspool = "../var/spool"\n[routing]\naliases = "aliases"\n')
    monkeypatch.chdir(tmp_path)
    config = load_config(Path("etc/epost.toml"), {}, default_hostname="h.test")
    assert config.server.spool == tmp_path / "var/spool"
    assert config.routing.aliases == etc / "aliases"
    assert config.routing.users == etc / "etc/users"  # built-in default, same anchor
    assert config.source == etc / "epost.toml"


def test_without_config_file_paths_follow_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(None, {"spool": "spool"}, default_hostname="h.test")
    assert config.server.spool == tmp_path / "spool"
    assert config.routing.gateway_table == tmp_path / "etc/gateway.dat"


def test_empty_tls_strings_mean_none(tmp_path):
    config = load(tmp_path, '[server]\ntls_cert = ""\ntls_key = ""\n')
    assert config.server.tls_cert is None and config.server.tls_key is None


@pytest.mark.parametrize("given_key, missing", [("tls_cert", "tls_key"), ("tls_key", "tls_cert")])
def test_tls_cert_and_key_come_together(tmp_path, given_key, missing):
    message = config_error(tmp_path, f'[server]\n{given_key} = "x.pem"\n')
    assert f"epost.toml:server.{given_key}:" in message and missing in message


def test_empty_smtp_gateway_means_none(tmp_path):
    assert load(tmp_path, '[routing]\nsmtp_gateway = ""\n').routing.smtp_gateway is None


# --- errors ----------------------------------------------------------------

BAD_FILE_VALUES = [
    ("server", "hostname", '""'),
    ("server", "hostname", '"bad host"'),
    ("server", "relay", '"tcp:25"'),  # not a list
    ("server", "relay", '["tcp:abc"]'),
    ("server", "relay", '["tcp:99999"]'),
    ("server", "submission", '["nosuchtype:1"]'),
    ("server", "smtps", '[""]'),
    ("server", "admin", '["tcp:80:bogus=1"]'),
    ("server", "spool", '""'),
    ("server", "spool", "5"),
    ("server", "max_message_size", "0"),
    ("server", "max_message_size", '"big"'),
    ("server", "max_recipients", "0"),
    ("server", "max_recipients", "true"),
    ("server", "relay_networks", '["10.0.0.0/33"]'),
    ("server", "relay_networks", '["example.jp"]'),
    ("server", "allow_plaintext_auth", '"yes"'),
    ("server", "allow_plaintext_auth", "1"),
    ("server", "command_timeout", "-1"),
    ("server", "session_deadline", "0"),
    ("server", "session_deadline", '"5m"'),
    ("routing", "local_domains", '["a..b"]'),
    ("routing", "local_domains", '["user@example.jp"]'),
    ("routing", "relay_domains", "[1]"),
    ("routing", "smtp_gateway", '"host:0"'),
    ("routing", "smtp_gateway", '"host:70000"'),
    ("routing", "smtp_gateway", '"[not-an-ip]:25"'),
    ("routing", "dns_servers", '["dns.example.jp"]'),
    ("routing", "forward_all_to_gateway", '"true"'),
    ("delivery", "connect_timeout", "0"),
    ("delivery", "greeting_timeout", "1.5"),
    ("delivery", "max_per_destination", "0"),
    ("retry", "interval", '"120"'),
    ("retry", "interval", "false"),
    ("retry", "count_5xx", "-1"),
    ("retry", "period_4xx", '"8 hours"'),
    ("retry", "period_4xx", "-5"),
    ("retry", "period_noanswer", "true"),
    ("retry", "max_interval", "0"),
]


@pytest.mark.parametrize("section, key, value", BAD_FILE_VALUES)
def test_bad_file_value_names_file_and_key(tmp_path, section, key, value):
    message = config_error(tmp_path, f"[{section}]\n{key} = {value}\n")
    assert message.startswith(f"{tmp_path / 'epost.toml'}:{section}.{key}: ")


BAD_FLAGS = [
    ("relay", ["tcp:25", "tcp:x"]),
    ("submission", ["unix"]),
    ("hostname", ""),
    ("hostname", "-bad-.example"),
    ("spool", ""),
    ("smtp_gateway", "host:port"),
    ("local_domain", ["ok.test", "bad domain"]),
    ("relay_network", ["300.1.1.1/8"]),
    ("dns_server", ["192.0.2.1:0"]),
    ("retry_interval", "abc"),
    ("retry_interval", "0"),
    ("retry_interval", "2m"),
    ("retry_count_5xx", "-1"),
    ("retry_period_4xx", "8x"),
    ("retry_period_noanswer", ""),
    ("connect_timeout", "1.5"),
    ("greeting_timeout", "-300"),
]


@pytest.mark.parametrize("name, value", BAD_FLAGS)
def test_bad_flag_value_names_flag(tmp_path, name, value):
    message = config_error(tmp_path, **{name: value})
    assert message.startswith(f"--{name.replace('_', '-')}: ")


def test_bad_flag_message_shows_value(tmp_path):
    message = config_error(tmp_path, retry_interval="abc")
    assert message == "--retry-interval: must be a positive integer, got 'abc'"


def test_unknown_key(tmp_path):
    message = config_error(tmp_path, '[server]\nhostnme = "x"\n')
    assert message == f"{tmp_path / 'epost.toml'}:server.hostnme: unknown key"


def test_unknown_section(tmp_path):
    message = config_error(tmp_path, "[srever]\n")
    assert message == f"{tmp_path / 'epost.toml'}:srever: unknown section"


def test_section_must_be_a_table(tmp_path):
    assert "epost.toml:retry: " in config_error(tmp_path, "retry = 5\n")


def test_toml_syntax_error_is_one_line(tmp_path):
    message = config_error(tmp_path, '[server]\nhostname = "unterminated\nrelay = [\n')
    assert message.startswith(f"{tmp_path / 'epost.toml'}: TOML syntax error: ")


def test_file_path_is_reported_as_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("my.toml").write_text("[retry]\ninterval = 0\n")
    with pytest.raises(ConfigError, match=r"^my\.toml:retry\.interval: "):
        load_config(Path("my.toml"), {}, default_hostname="h.test")


def test_missing_config_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="nope.toml: cannot read config file"):
        load_config(tmp_path / "nope.toml", {}, default_hostname="h.test")


def test_non_utf8_config_file_is_an_error(tmp_path):
    path = tmp_path / "epost.toml"
    path.write_bytes(b'[server]\nhostname = "\xff"\n')
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(path, {}, default_hostname="h.test")


# --- durations -------------------------------------------------------------


@pytest.mark.parametrize(
    "text, seconds",
    [("0", 0), ("120", 120), (120, 120), ("30s", 30), ("15m", 900), ("8h", 28800),
     ("2d", 172800), (" 8H ", 28800)],
)
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "abc", "-5", -5, "1.5h", "5 m", "h", "5w", "1h30m", True])
def test_parse_duration_rejects(text):
    with pytest.raises(ValueError):
        parse_duration(text)


@given(st.integers(min_value=0, max_value=10**9), st.sampled_from([("", 1), ("s", 1), ("m", 60), ("h", 3600), ("d", 86400)]))
def test_parse_duration_round_trip(n, unit):
    suffix, factor = unit
    assert parse_duration(f"{n}{suffix}") == n * factor
    assert parse_duration(n) == n


@given(st.text(max_size=12))
def test_parse_duration_only_raises_value_error(text):
    try:
        assert parse_duration(text) >= 0
    except ValueError:
        pass


# --- host:port -------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("smtp.example.jp", HostPort("smtp.example.jp", 25)),
        ("SMTP.Example.JP.:587", HostPort("smtp.example.jp", 587)),
        ("[2001:db8::1]", HostPort("2001:db8::1", 25)),
        ("[2001:DB8:0::1]:2525", HostPort("2001:db8::1", 2525)),
        ("2001:db8::1", HostPort("2001:db8::1", 25)),
        ("192.0.2.1", HostPort("192.0.2.1", 25)),
        ("192.0.2.1:53", HostPort("192.0.2.1", 53)),
        ("[192.0.2.1]:26", HostPort("192.0.2.1", 26)),
        ("bücher.example", HostPort("xn--bcher-kva.example", 25)),
    ],
)
def test_parse_host_port(text, expected):
    assert parse_host_port(text) == expected


def test_parse_host_port_default_port():
    assert parse_host_port("192.0.2.53", default_port=53) == HostPort("192.0.2.53", 53)


@pytest.mark.parametrize(
    "text",
    ["", ":25", "host:", "host:0", "host:65536", "host:-1", "host:x", "[::1", "[::1]x",
     "[::1]:", "[host]:25", "a b", "host:25:26", "999.1.1.1", "[]", "host:\u0661\u0662"],
)
def test_parse_host_port_rejects(text):
    with pytest.raises(ValueError):
        parse_host_port(text)


hostnames = st.lists(
    st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True), min_size=1, max_size=4
).map(".".join).filter(lambda name: not name.split(".")[-1].isdigit())
hosts = st.one_of(hostnames, st.ip_addresses().map(str))
ports = st.integers(min_value=1, max_value=65535)


@given(hosts, ports)
def test_host_port_str_round_trips(host, port):
    hp = parse_host_port(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    assert hp == HostPort(host, port)
    assert parse_host_port(str(hp)) == hp


@given(hosts)
def test_host_without_port_gets_default(host):
    assert parse_host_port(host, default_port=53) == HostPort(host, 53)


@given(st.text(max_size=30))
def test_parse_host_port_only_raises_value_error(text):
    try:
        hp = parse_host_port(text)
    except ValueError:
        return
    assert 1 <= hp.port <= 65535 and hp.host


def test_normalize_domain():
    assert normalize_domain("Example.JP.") == "example.jp"
    assert normalize_domain("münchen.example") == "xn--mnchen-3ya.example"
    for bad in ["", ".", "a..b", "-a.jp", "a_b c.jp", "x" * 64 + ".jp", "1.2.3.4"]:
        with pytest.raises(ValueError):
            normalize_domain(bad)


# --- the sample config -----------------------------------------------------


def test_sample_config_loads(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # its paths must not depend on the working folder
    config = load_config(ROOT / "etc/epost.toml", {}, default_hostname="h.test")
    assert config.server.relay == ("tcp:2525:interface=127.0.0.1",)
    assert config.server.submission == ("tcp:2587:interface=127.0.0.1",)
    assert config.server.spool == ROOT / "var/spool"
    assert config.routing.local_domains == ("example.test",)
    assert config.routing.aliases == ROOT / "etc/aliases"
    assert config.routing.users == ROOT / "etc/users"
    assert config.routing.gateway_table == ROOT / "etc/gateway.dat"
    for table in (config.routing.aliases, config.routing.users, config.routing.gateway_table):
        assert table.is_file()


def test_allow_empty_tables_is_off_unless_the_routing_section_says_so(tmp_path):
    from epost.config import load_config

    path = tmp_path / "epost.toml"
    path.write_text('[server]\nhostname = "mx.example.test"\n')
    assert load_config(path, {}).routing.allow_empty_tables is False
    path.write_text('[server]\nhostname = "mx.example.test"\n[routing]\nallow_empty_tables = true\n')
    assert load_config(path, {}).routing.allow_empty_tables is True


@pytest.mark.parametrize("value", ["lmtp", "lmtp:/run/dovecot/lmtp", "smtp:tcp:localhost:25", "", 1, "lmtp:tcp:", "lmtp:tcp:dovecot.example"])
def test_local_transport_must_be_maildir_or_an_lmtp_endpoint(tmp_path, value):
    path = tmp_path / "epost.toml"
    path.write_text(f"[delivery]\nlocal_transport = {value!r}\n".replace("'", '"'))
    with pytest.raises(ConfigError, match="local_transport"):
        load_config(path, {})


def test_proxy_networks_default_to_loopback_and_are_read_as_networks(tmp_path):
    assert load(tmp_path).server.proxy_networks == (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
    server = load(tmp_path, '[server]\nhostname = "mx.example.test"\nproxy_networks = ["10.0.0.5/24"]\n').server
    assert server.proxy_networks == (ipaddress.ip_network("10.0.0.0/24"),)
    assert "proxy_networks" in config_error(tmp_path, '[server]\nhostname = "mx.example.test"\nproxy_networks = ["nonsense"]\n')


def test_public_addresses_default_to_none_given_and_are_read_as_addresses(tmp_path):
    assert load(tmp_path).server.public_addresses == ()  # check-dns then resolves the hostname
    config = load(tmp_path, '[server]\npublic_addresses = ["192.0.2.25", "2001:DB8::25"]\n')
    assert config.server.public_addresses == (ipaddress.ip_address("192.0.2.25"), ipaddress.ip_address("2001:db8::25"))


@pytest.mark.parametrize("value", ['["192.0.2.0/24"]', '["mail.example.test"]', '"192.0.2.25"', "[25]"])
def test_a_bad_public_address_is_one_line_naming_file_and_key(tmp_path, value):
    message = config_error(tmp_path, f"[server]\npublic_addresses = {value}\n")
    assert message.startswith(f"{tmp_path / 'epost.toml'}:server.public_addresses: must be ")


# --- receiver-aware delivery (issue 14) ------------------------------------


def test_receiver_aware_is_on_by_default_with_no_extra_rules(tmp_path):
    delivery = load(tmp_path).delivery
    assert (delivery.receiver_aware, delivery.destinations, delivery.throttle_rules) == (True, (), ())


@pytest.mark.parametrize(
    "toml, where, says",
    [
        ('[delivery.destinations."*.google.com"]\nmax_conections = 5\n',
         'delivery.destinations."*.google.com".max_conections', "unknown key"),
        ('[delivery.destinations."gmail.com"]\nmessages_per_minute = 0\n',
         'delivery.destinations."gmail.com".messages_per_minute', "must be a positive number"),
        ('[delivery.destinations."bad name!"]\nmax_connections = 1\n',
         'delivery.destinations."bad name!"', "must be a domain or host name"),
        ("[[delivery.throttle_rules]]\ncode = 421\n[[delivery.throttle_rules]]\ncode = 550\n",
         "delivery.throttle_rules[2].code", "must be a 4xx reply code"),
        ('[[delivery.throttle_rules]]\ntext = "x"\naction = "stop"\n',
         "delivery.throttle_rules[1].action", 'must be "pause", "slow" or "ignore"'),
        ('[[delivery.throttle_rules]]\nenhanced = "5.7.1"\n',
         "delivery.throttle_rules[1].enhanced", "temporary enhanced status code"),
        ('[[delivery.throttle_rules]]\naction = "pause"\n',
         "delivery.throttle_rules[1]", "needs at least one of code, enhanced, text"),
        ('[[delivery.throttle_rules]]\ncode = 421\nseconds = "soon"\n',
         "delivery.throttle_rules[1].seconds", "must be a duration"),
        ('[[delivery.throttle_rules]]\ncode = 421\nwhen = 1\n',
         "delivery.throttle_rules[1].when", "unknown key"),
        ("[delivery]\nthrottle_rules = 5\n", "delivery.throttle_rules", "must be an array of tables"),
    ],
)
def test_receiver_settings_errors_are_one_line_naming_file_and_key(tmp_path, toml, where, says):
    message = config_error(tmp_path, toml)
    assert message.startswith(f"{tmp_path / 'epost.toml'}:{where}: ")
    assert says in message
