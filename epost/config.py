"""One frozen Config from built-in defaults <- TOML file <- command-line flags.

All validation happens here, so the rest of epost can trust every value.
A problem raises ConfigError whose message is one line naming the flag
(`--retry-interval`) or the `file:key` (`epost.toml:retry.interval`).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import socket
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from epost.queue.receivers import Limits, ThrottleRule
from epost.address import normalize_domain
from epost.smtp.dnsbl import DnsblSite, parse_dnsbl_site

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class ConfigError(Exception):
    """A bad config value; str(error) is the one line shown to the operator."""


@dataclass(frozen=True)
class HostPort:
    host: str
    port: int = 25

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class ServerConfig:
    hostname: str
    relay: tuple[str, ...] = ("tcp:25",)
    submission: tuple[str, ...] = ("tcp:587",)
    smtps: tuple[str, ...] = ()
    admin: tuple[str, ...] = ()
    spool: Path = Path("var/spool")
    tls_cert: Path | None = None
    tls_key: Path | None = None
    max_message_size: int = 26214400
    max_recipients: int = 100
    relay_networks: tuple[IPNetwork, ...] = (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    allow_plaintext_auth: bool = False
    # Balancers allowed to send a PROXY header to a `haproxy:` listener (SPEC §1).
    proxy_networks: tuple[IPNetwork, ...] = (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    # Not in E-Post; Postfix-like defaults (smtpd_timeout, smtpd_hard_error_limit,
    # smtpd_client_connection_count_limit).
    command_timeout: int = 300
    # MAIL within this of the connection or of the end of the previous message
    # (a trickle of NOOPs cannot hold a session open forever).
    session_deadline: int = 300
    data_timeout: int = 600
    max_bad_commands: int = 20
    max_connections: int = 2000
    max_connections_per_client: int = 50
    # Submission: an authenticated user may use only their own address or
    # an alias of it as MAIL FROM (Postfix: reject_sender_login_mismatch).
    check_sender_ownership: bool = True
    auth_failures_before_cutoff: int = 5  # per client (throttle.client_key) within 5 minutes; then 421 4.7.0
    # Accounts of the users file that may log in to Mail Control (--admin).
    admin_users: tuple[str, ...] = ()
    # Screening on the relay port (SPEC §5, epost/smtp/screen.py), off by default:
    # postscreen_greet_wait, postscreen_dnsbl_sites, postscreen_dnsbl_threshold.
    greet_wait: int = 0
    dnsbl: tuple[DnsblSite, ...] = ()
    dnsbl_threshold: int = 1
    # Addresses mail leaves from, as the world sees them (SPEC §9, `epost check-dns`):
    # empty means "the addresses `hostname` resolves to".
    public_addresses: tuple[IPAddress, ...] = ()
    # SPEC §9: an Authentication-Results header (SPF, DKIM, DMARC) on mail from
    # the relay port's untrusted, unauthenticated clients; seconds its lookups may take.
    authentication_results: bool = True
    authentication_results_timeout: int = 4


@dataclass(frozen=True)
class RoutingConfig:
    local_domains: tuple[str, ...] = ()
    relay_domains: tuple[str, ...] = ()
    aliases: Path = Path("etc/aliases")
    users: Path = Path("etc/users")
    gateway_table: Path = Path("etc/gateway.dat")
    smtp_gateway: HostPort | None = None
    forward_all_to_gateway: bool = False
    dns_servers: tuple[HostPort, ...] = ()
    # A users, aliases or gateway.dat file that had entries and now has none is
    # refused until SIGHUP (docs/routing.md); true applies it like any edit.
    allow_empty_tables: bool = False
    # SPEC §3.5: valid addresses of operated domains (a missing file: verify by probe).
    relay_recipients: Path = Path("etc/relay_recipients")
    verify_recipients: bool = True


@dataclass(frozen=True)
class DeliveryConfig:
    connect_timeout: int = 30
    greeting_timeout: int = 300
    max_connections: int = 100
    max_per_destination: int = 10
    # A "still trying" DSN (Action: delayed) once per message still queued
    # after this long; 0 turns it off (Postfix: delay_warning_time).
    delay_warning: int = 4 * 3600
    # "maildir" (epost writes the Maildirs) or "lmtp:unix:/PATH" / "lmtp:tcp:HOST:PORT" (Dovecot LMTP).
    local_transport: str = "maildir"
    # Receiver-aware delivery (issue 14): throttle rules, greylisting, grouping
    # by MX hosts. false: E-Post's behaviour alone (the baseline of bench/bulk.py).
    receiver_aware: bool = True
    # [delivery.destinations."pattern"]: (pattern, limits) in file order.
    destinations: tuple[tuple[str, Limits], ...] = ()
    # [[delivery.throttle_rules]]: tried before the shipped ones (receivers.DEFAULT_THROTTLE_RULES).
    throttle_rules: tuple[ThrottleRule, ...] = ()


@dataclass(frozen=True)
class RetryConfig:
    interval: int = 120
    fixed_interval: bool = False
    max_interval: int = 3600
    count_5xx: int = 9
    period_4xx: int = 8 * 3600
    period_noanswer: int = 24 * 3600


@dataclass(frozen=True)
class DkimKeySpec:
    """One [[dkim.keys]] entry (issue 15); the key file is read by epost.delivery.signing.load_keys."""

    domain: str
    selector: str
    key: Path


@dataclass(frozen=True)
class DkimConfig:
    keys: tuple[DkimKeySpec, ...] = ()


@dataclass(frozen=True)
class Config:
    server: ServerConfig
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    source: Path | None = None  # the TOML file, if any
    dkim: DkimConfig = field(default_factory=DkimConfig)


# --- value parsers ---------------------------------------------------------

_DURATION = re.compile(r"([0-9]+)([smhd]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str | int) -> int:
    """Seconds from `120`, `30s`, `15m`, `8h` or `2d` (E-Post style); ValueError otherwise."""
    if isinstance(text, bool):
        raise ValueError(f"not a duration: {text!r}")
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"negative duration: {text!r}")
        return text
    match = _DURATION.fullmatch(text.strip().lower())
    if match is None:
        raise ValueError(f"not a duration: {text!r}")
    return int(match[1]) * _UNITS[match[2]]


def parse_host_port(text: str, default_port: int = 25) -> HostPort:
    """`host`, `host:port`, `[v6]`, `[v6]:port`, `1.2.3.4[:port]` or a bare IPv6
    address. IP addresses are stored in canonical form, names as normalize_domain."""
    text = text.strip()
    port_text = None
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"not host[:port]: {text!r}")
        port_text = rest[1:] if rest else None
        try:
            host = str(ipaddress.ip_address(host))
        except ValueError:
            raise ValueError(f"not an IP address in brackets: {text!r}") from None
    elif text.count(":") > 1:  # bare IPv6, no port possible
        try:
            host = str(ipaddress.ip_address(text))
        except ValueError:
            raise ValueError(f"not host[:port]: {text!r}") from None
    else:
        host, sep, port_text = text.partition(":")
        port_text = port_text if sep else None
        try:
            host = str(ipaddress.IPv4Address(host))
        except ValueError:
            host = normalize_domain(host)
    if port_text is None:
        return HostPort(host, default_port)
    if not re.fullmatch(r"[0-9]{1,5}", port_text) or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"bad port in {text!r}")
    return HostPort(host, int(port_text))


# --- converters: raw TOML/flag value -> checked value, or ValueError("must be ...")

Converter = Callable[[Any], Any]


def _integer(minimum: int) -> Converter:
    what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"

    def convert(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"must be {what}, got {value!r}")
        return value

    return convert


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, got {value!r}")
    return value


def _duration(value: Any) -> int:
    try:
        return parse_duration(value)
    except (ValueError, TypeError, AttributeError):
        raise ValueError(
            f"must be a duration (seconds, or a number with s, m, h or d), got {value!r}"
        ) from None


def _string(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"must be a non-empty string, got {value!r}")
    return value.strip()


def _path(value: Any) -> Path:
    return Path(_string(value))


def _optional_path(value: Any) -> Path | None:
    if value == "":
        return None
    return _path(value)


def _domain(value: Any) -> str:
    return normalize_domain(_string(value))


def _host_port(default_port: int, ip_only: bool = False) -> Converter:
    def convert(value: Any) -> HostPort | None:
        if value == "" and not ip_only:
            return None
        what = "IP[:PORT]" if ip_only else "HOST[:PORT]"
        try:
            result = parse_host_port(_string(value), default_port)
            if ip_only:
                ipaddress.ip_address(result.host)
        except ValueError:
            raise ValueError(f"must be {what}, got {value!r}") from None
        return result

    return convert


def _network(value: Any) -> IPNetwork:
    try:
        return ipaddress.ip_network(_string(value), strict=False)
    except ValueError:
        raise ValueError(f"must be an IP network (CIDR), got {value!r}") from None


def _address(value: Any) -> IPAddress:
    try:
        return ipaddress.ip_address(_string(value))
    except ValueError:
        raise ValueError(f"must be an IP address, got {value!r}") from None


_CHECKED_ENDPOINTS = {"tcp", "tcp6", "ssl", "tls", "unix"}


def _endpoint(value: Any) -> str:
    """A Twisted server endpoint string, test-built on a MemoryReactor (nothing
    listens) so typos fail at start-up, not at bind. Types that need their
    environment to build (systemd:, plugins) only have to be known types."""
    text = _string(value)
    kind, _, rest = text.partition(":")
    if kind == "haproxy" and rest.partition(":")[0] in ("ssl", "tls"):
        raise ValueError(f"{text!r} cannot work: HAProxy sends the PROXY header in clear before TLS; "
                         f"for implicit TLS use smtps = [\"haproxy:tcp:...\"] (docs/scaling.md)")
    # Imported here: loading Twisted's endpoint parsers costs the admin command a third of a second.
    from twisted.internet.endpoints import serverFromString
    from twisted.internet.testing import MemoryReactor

    try:
        serverFromString(MemoryReactor(), text)
    except Exception as e:
        if kind in _CHECKED_ENDPOINTS or str(e).startswith("Unknown endpoint type"):
            raise ValueError(
                f"must be a server endpoint like 'tcp:25', got {text!r}: {e}"
            ) from None
    if kind not in _CHECKED_ENDPOINTS:
        return text
    if kind != "unix":
        port = rest.split(":")[0].removeprefix("port=")
        if port.isdigit() and int(port) > 65535:
            raise ValueError(f"port must be 0..65535, got {text!r}")
    return text


def _list(item: Converter) -> Converter:
    def convert(value: Any) -> tuple[Any, ...]:
        if not isinstance(value, list):
            raise ValueError(f"must be a list, got {value!r}")
        return tuple(item(each) for each in value)

    return convert


_POSITIVE = _integer(1)


class _SubKeyError(ValueError):
    """A value inside a table or array of tables: `path` is appended to file:section.key."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(message)
        self.path = path


_LIMIT_KEYS: dict[str, Converter] = {
    "max_connections": _POSITIVE,
    "messages_per_connection": _POSITIVE,
    "messages_per_minute": lambda value: _positive_number(value),
}
_RULE_KEYS = ("code", "enhanced", "text", "action", "seconds", "messages_per_minute", "max_connections")
_PATTERN = re.compile(r"(\*\.)?[a-z0-9_](?:[a-z0-9_.-]*[a-z0-9_])?")


def _positive_number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise ValueError(f"must be a positive number, got {value!r}")
    return float(value)


def _destinations(value: Any) -> tuple[tuple[str, Limits], ...]:
    """[delivery.destinations."pattern"] tables: a domain or MX host name, or *.name."""
    if not isinstance(value, dict):
        raise ValueError('must be tables: [delivery.destinations."example.com"]')
    table = []
    for pattern, limits in value.items():
        where = f'."{pattern}"'
        name = pattern.strip().lower().rstrip(".")
        if not _PATTERN.fullmatch(name) or ".." in name:
            raise _SubKeyError(where, "must be a domain or host name, or *.name")
        if not isinstance(limits, dict):
            raise _SubKeyError(where, "must be a table")
        checked = {}
        for key, raw in limits.items():
            if key not in _LIMIT_KEYS:
                raise _SubKeyError(f"{where}.{key}", f"unknown key (known: {', '.join(_LIMIT_KEYS)})")
            try:
                checked[key] = _LIMIT_KEYS[key](raw)
            except ValueError as error:
                raise _SubKeyError(f"{where}.{key}", str(error)) from None
        table.append((name, Limits(**checked)))
    return tuple(table)


def _throttle_rules(value: Any) -> tuple[ThrottleRule, ...]:
    """[[delivery.throttle_rules]]: code / enhanced / text (at least one) -> action, seconds."""
    if not isinstance(value, list):
        raise ValueError("must be an array of tables: [[delivery.throttle_rules]]")
    rules = []
    for number, raw in enumerate(value, start=1):
        where = f"[{number}]"
        if not isinstance(raw, dict):
            raise _SubKeyError(where, "must be a table")
        for key in raw:
            if key not in _RULE_KEYS:
                raise _SubKeyError(f"{where}.{key}", f"unknown key (known: {', '.join(_RULE_KEYS)})")

        def check(key: str, convert: Converter) -> Any:
            if key not in raw:
                return None
            try:
                return convert(raw[key])
            except ValueError as error:
                raise _SubKeyError(f"{where}.{key}", str(error)) from None

        code = check("code", _reply_code)
        enhanced = check("enhanced", _enhanced_code)
        text = check("text", _regex)
        if code is None and enhanced is None and text is None:
            raise _SubKeyError(where, "needs at least one of code, enhanced, text")
        action = check("action", _action) or "pause"
        seconds = check("seconds", _duration)
        if seconds is not None and seconds < 1 and action != "ignore":
            raise _SubKeyError(f"{where}.seconds", f"must be at least 1 second, got {raw['seconds']!r}")
        rules.append(ThrottleRule(
            action=action,
            seconds=float(seconds if seconds is not None else 300),
            code=code,
            enhanced=enhanced,
            text=text,
            messages_per_minute=check("messages_per_minute", _positive_number),
            max_connections=check("max_connections", _POSITIVE),
        ))
    return tuple(rules)


def _reply_code(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 400 <= value <= 499:
        raise ValueError(f"must be a 4xx reply code (400-499), got {value!r}")
    return value


def _enhanced_code(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"4\.\d{1,3}\.\d{1,3}", value.strip()):
        raise ValueError(f'must be a temporary enhanced status code such as "4.7.28", got {value!r}')
    return value.strip()


def _regex(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"must be a regular expression, got {value!r}")
    try:
        re.compile(value)
    except re.error as error:
        raise ValueError(f"is not a valid regular expression ({error})") from None
    return value


def _action(value: Any) -> str:
    if value not in ("pause", "slow", "ignore"):
        raise ValueError(f'must be "pause", "slow" or "ignore", got {value!r}')
    return value


def _local_transport(value: Any) -> str:
    """Checked by parsing it as the daemon will (a bad endpoint is one line here, not a traceback at start)."""
    from epost.delivery.lmtp import lmtp_endpoint  # twisted's endpoint parser; imported when used

    text = _string(value)
    if text == "maildir":
        return text
    try:
        if not text.startswith(("lmtp:unix:/", "lmtp:tcp:")):
            raise ValueError(text)
        lmtp_endpoint(None, text)  # parses only: no reactor is touched before connecting
    except (ValueError, TypeError, KeyError):
        raise ValueError(f'must be "maildir", "lmtp:unix:/PATH" or "lmtp:tcp:HOST:PORT", got {value!r}') from None
    return text


SCHEMA: dict[str, dict[str, Converter]] = {
    "server": {
        "hostname": _domain,
        "relay": _list(_endpoint),
        "submission": _list(_endpoint),
        "smtps": _list(_endpoint),
        "admin": _list(_endpoint),
        "spool": _path,
        "tls_cert": _optional_path,
        "tls_key": _optional_path,
        "max_message_size": _POSITIVE,
        "max_recipients": _POSITIVE,
        "relay_networks": _list(_network),
        "proxy_networks": _list(_network),
        "allow_plaintext_auth": _boolean,
        "command_timeout": _POSITIVE,
        "session_deadline": _POSITIVE,
        "data_timeout": _POSITIVE,
        "max_bad_commands": _POSITIVE,
        "max_connections": _POSITIVE,
        "max_connections_per_client": _POSITIVE,
        "check_sender_ownership": _boolean,
        "auth_failures_before_cutoff": _POSITIVE,
        "admin_users": _list(lambda value: _string(value).lower()),
        "greet_wait": _duration,
        "dnsbl": _list(parse_dnsbl_site),
        "dnsbl_threshold": _POSITIVE,
        "public_addresses": _list(_address),
        "authentication_results": _boolean,
        "authentication_results_timeout": _POSITIVE,
    },
    "routing": {
        "local_domains": _list(_domain),
        "relay_domains": _list(_domain),
        "aliases": _path,
        "users": _path,
        "gateway_table": _path,
        "smtp_gateway": _host_port(25),
        "forward_all_to_gateway": _boolean,
        "dns_servers": _list(_host_port(53, ip_only=True)),
        "allow_empty_tables": _boolean,
        "relay_recipients": _path,
        "verify_recipients": _boolean,
    },
    "delivery": {
        "connect_timeout": _POSITIVE,
        "greeting_timeout": _POSITIVE,
        "max_connections": _POSITIVE,
        "max_per_destination": _POSITIVE,
        "delay_warning": _duration,
        "local_transport": _local_transport,
        "receiver_aware": _boolean,
        "destinations": _destinations,
        "throttle_rules": _throttle_rules,
    },
    "retry": {
        "interval": _POSITIVE,
        "fixed_interval": _boolean,
        "max_interval": _POSITIVE,
        "count_5xx": _integer(0),
        "period_4xx": _duration,
        "period_noanswer": _duration,
    },
    "dkim": {
        "keys": lambda value: _list(_dkim_key_spec)(value),
    },
}

# flag name (SPEC §1, dashes as underscores) -> (section, key)
FLAGS: dict[str, tuple[str, str]] = {
    "relay": ("server", "relay"),
    "submission": ("server", "submission"),
    "smtps": ("server", "smtps"),
    "admin": ("server", "admin"),
    "hostname": ("server", "hostname"),
    "spool": ("server", "spool"),
    "relay_network": ("server", "relay_networks"),
    "gateway_table": ("routing", "gateway_table"),
    "smtp_gateway": ("routing", "smtp_gateway"),
    "forward_all": ("routing", "forward_all_to_gateway"),
    "local_domain": ("routing", "local_domains"),
    "dns_server": ("routing", "dns_servers"),
    "retry_interval": ("retry", "interval"),
    "retry_fixed": ("retry", "fixed_interval"),
    "retry_count_5xx": ("retry", "count_5xx"),
    "retry_period_4xx": ("retry", "period_4xx"),
    "retry_period_noanswer": ("retry", "period_noanswer"),
    "connect_timeout": ("delivery", "connect_timeout"),
    "greeting_timeout": ("delivery", "greeting_timeout"),
}
_INT_FLAGS = {"retry_interval", "retry_count_5xx", "connect_timeout", "greeting_timeout"}
_SECTIONS = {
    "server": ServerConfig,
    "routing": RoutingConfig,
    "delivery": DeliveryConfig,
    "retry": RetryConfig,
    "dkim": DkimConfig,
}


# --- loading ---------------------------------------------------------------


def _fail(where: str, message: str) -> ConfigError:
    return ConfigError(f"{where}: {message}".replace("\r", " ").replace("\n", " "))


def _convert(where: str, converter: Converter, raw: Any, base: Path) -> Any:
    """Check one value; relative paths become absolute against `base`."""
    try:
        value = converter(raw)
    except _SubKeyError as e:
        raise _fail(where + e.path, str(e)) from None
    except ValueError as e:
        raise _fail(where, str(e)) from None
    if isinstance(value, Path):
        value = _absolute(value, base)
    return value


def _absolute(path: Path, base: Path) -> Path:
    return Path(os.path.normpath(base / path.expanduser()))


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise _fail(str(path), f"cannot read config file: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise _fail(str(path), "config file is not UTF-8") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise _fail(str(path), f"TOML syntax error: {e}") from None


def _flag_given(value: Any) -> bool:
    """None, [], False and 0 (usage.Options' unset optFlags) mean "not given";
    an empty string was typed, so it is checked."""
    return isinstance(value, str) or bool(value)


def load_config(
    path: Path | None, flags: Mapping[str, Any], *, default_hostname: str | None = None
) -> Config:
    """Built-in defaults <- TOML file <- flags, every value checked.

    Raises ConfigError with one line naming the flag or `file:section.key`.
    Relative paths from the file and the built-in defaults are anchored at the
    file's folder (the working folder when there is no file); paths given as
    flags at the working folder, as a shell user expects.
    """
    cwd = Path.cwd()
    values: dict[str, dict[str, Any]] = {section: {} for section in SCHEMA}
    where_set: dict[tuple[str, str], str] = {}

    base = cwd
    if path is not None:
        base = path.absolute().parent
        for section, table in _read_toml(path).items():
            if section not in SCHEMA:
                raise _fail(f"{path}:{section}", "unknown section")
            if not isinstance(table, dict):
                raise _fail(f"{path}:{section}", "must be a table ([section])")
            for key, raw in table.items():
                where = f"{path}:{section}.{key}"
                if key not in SCHEMA[section]:
                    raise _fail(where, "unknown key")
                values[section][key] = _convert(where, SCHEMA[section][key], raw, base)
                where_set[section, key] = where

    for name, raw in flags.items():
        if name not in FLAGS:
            raise TypeError(f"load_config: unknown flag {name!r}")
        if not _flag_given(raw):
            continue
        section, key = FLAGS[name]
        where = "--" + name.replace("_", "-")
        if isinstance(raw, tuple):
            raw = list(raw)
        if name in _INT_FLAGS and re.fullmatch(r"[+-]?[0-9]+", str(raw).strip()):
            raw = int(raw)  # flags arrive as text; anything else fails with its text shown
        elif SCHEMA[section][key] is _boolean:
            raw = True
        values[section][key] = _convert(where, SCHEMA[section][key], raw, cwd)
        where_set[section, key] = where

    server = values["server"]
    if "hostname" not in server:
        server["hostname"] = default_hostname or socket.getfqdn()
    if (server.get("tls_cert") is None) != (server.get("tls_key") is None):
        given = "tls_cert" if server.get("tls_cert") is not None else "tls_key"
        missing = "tls_key" if given == "tls_cert" else "tls_cert"
        raise _fail(where_set["server", given], f"set without server.{missing}")

    sections = {
        name: _with_absolute_defaults(cls(**values[name]), base)
        for name, cls in _SECTIONS.items()
    }
    sections["dkim"] = DkimConfig(tuple(dataclasses.replace(k, key=_absolute(k.key, base)) for k in sections["dkim"].keys))
    return Config(**sections, source=path.absolute() if path is not None else None)


def _with_absolute_defaults(section: Any, base: Path) -> Any:
    """Built-in default paths are relative; anchor them like the file's own."""
    changes = {
        f.name: _absolute(value, base)
        for f in dataclasses.fields(section)
        if isinstance(value := getattr(section, f.name), Path) and not value.is_absolute()
    }
    return dataclasses.replace(section, **changes)


def _dkim_key_spec(value: Any) -> DkimKeySpec:
    if not isinstance(value, dict) or set(value) != {"domain", "selector", "key"}:
        raise ValueError(f"each [[dkim.keys]] needs exactly domain, selector and key, got {value!r}")
    selector = _string(value["selector"])
    if not re.fullmatch(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9-]+)*", selector):
        raise ValueError(f"bad selector {selector!r}")
    return DkimKeySpec(_domain(value["domain"]), selector, _path(value["key"]))
