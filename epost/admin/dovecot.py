"""`epost dovecot-conf`: a complete Dovecot 2.3 configuration serving epost's Maildirs (docs/mailboxes.md).

Dovecot reads epost's users file itself (its passwd-file format is a superset
of `user@domain:HASH`), so there is one set of accounts and nothing to sync.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from epost.config import Config


class DovecotConfError(Exception):
    """A reason the configuration cannot be written, for the operator to fix."""


@dataclass(frozen=True)
class Listener:
    address: str  # "*" for every address
    port: int


def parse_listener(text: str, default_port: int) -> Listener:
    """`PORT`, `ADDRESS:PORT` or `[IPv6]:PORT` -> Listener; ValueError saying what is wrong."""
    text = text.strip()
    address, _, port = text.rpartition(":") if ":" in text else ("*", "", text)
    address = address.strip("[]") or "*"
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad port in {text!r}")
    return Listener(address, int(port))


def parse_lmtp_endpoint(text: str) -> tuple[str, str]:
    """`unix:/path` or `tcp:[HOST:]PORT` (as in local_transport) -> ("unix", path) or ("tcp", "host:port")."""
    kind, _, rest = text.partition(":")
    if kind == "unix" and rest.startswith("/"):
        return "unix", rest
    if kind == "tcp" and rest:
        listener = parse_listener(rest, 24)
        return "tcp", f"{listener.address}:{listener.port}"
    raise ValueError(f"LMTP endpoint must be unix:/PATH or tcp:[HOST:]PORT, not {text!r}")


def mail_owner(mailboxes: Path) -> tuple[int, int]:
    """(uid, gid) owning `<spool>/mailboxes`: the account Dovecot reads and writes the Maildirs as."""
    try:
        st = mailboxes.stat()
    except OSError as error:
        raise DovecotConfError(
            f"{mailboxes}: {error.strerror or error}; create it for the mail account first, "
            f"e.g. `install -d -o vmail -g vmail {mailboxes}`") from None
    if st.st_uid == 0:
        raise DovecotConfError(
            f"{mailboxes} is owned by root, and Dovecot will not use uid 0 for mail; give the Maildirs "
            f"to the mail account, e.g. `chown -R vmail:vmail {mailboxes}` (docs/mailboxes.md)")
    return st.st_uid, st.st_gid


def dovecot_conf(
    config: Config,
    *,
    cert: Path,
    key: Path,
    imap: Listener | None,
    pop3: Listener | None,
    lmtp: tuple[str, str] | None,
    base_dir: Path | None = None,
) -> str:
    """The configuration text; raises DovecotConfError when the Maildirs' owner is unusable."""
    spool = config.server.spool.absolute()
    mailboxes = spool / "mailboxes"
    users = config.routing.users.absolute()
    uid, gid = mail_owner(mailboxes)
    protocols = [name for name, on in (("imap", imap), ("pop3", pop3), ("lmtp", lmtp)) if on]
    out: list[str] = [
        "# Dovecot 2.3 configuration for epost's mailboxes, written by `epost dovecot-conf`.",
        "# Start it with `dovecot -c THIS_FILE` (as root: Dovecot itself drops to the mail account).",
        "# See docs/mailboxes.md.",
        "",
        f"protocols = {' '.join(protocols) or 'none'}",
    ]
    if base_dir is not None:
        out += [
            "# A private instance: its sockets, pid file and state away from the system Dovecot's.",
            f"base_dir = {base_dir.absolute()}",
            f"state_dir = {base_dir.absolute() / 'state'}",
        ]
    out += [
        "",
        "# Accounts: epost's users file, read as it is (user@domain:{ARGON2ID}...).",
        "# Dovecot re-reads it when it changes, so `epost passwd` applies at once here too.",
        "# Old $scrypt$ hashes are not checkable by Dovecot: `epost passwd` replaces them.",
        "auth_mechanisms = plain login",
        "passdb {",
        "  driver = passwd-file",
        f"  args = scheme=CRYPT username_format=%Lu {users}",
        "}",
        "# Every account is the one mail owner; allow_all_users=no asks the passdb whether a user",
        "# exists (LMTP rejects unknown recipients).",
        "userdb {",
        "  driver = static",
        f"  args = uid={uid} gid={gid} home={mailboxes}/%Ld/%Ln allow_all_users=no",
        "}",
        "# The auth process reads the users file, which epost keeps readable by root only.",
        "service auth {",
        "  user = root",
        "}",
        "",
        "# Mail: the Maildirs epost delivers into, <spool>/mailboxes/<domain>/<user>;",
        "# folders are Maildir++ subfolders (.Sent/), which epost never touches.",
        f"mail_location = maildir:{mailboxes}/%Ld/%Ln",
        f"# The owner of {mailboxes} (Dovecot refuses uid 0); epost, also when run as root,",
        "# gives every Maildir file and folder it makes this owner.",
        f"mail_uid = {uid}",
        f"mail_gid = {gid}",
        f"first_valid_uid = {uid}",
        f"last_valid_uid = {uid}",
        f"first_valid_gid = {gid}",
        f"last_valid_gid = {gid}",
        "namespace inbox {",
        "  inbox = yes",
        "  separator = /",
        "  mailbox Sent {",
        "    special_use = \\Sent",
        "    auto = subscribe",
        "  }",
        "  mailbox Drafts {",
        "    special_use = \\Drafts",
        "    auto = subscribe",
        "  }",
        "  mailbox Trash {",
        "    special_use = \\Trash",
        "    auto = subscribe",
        "  }",
        "  mailbox Junk {",
        "    special_use = \\Junk",
        "    auto = subscribe",
        "  }",
        "}",
        "pop3_uidl_format = %08Xu%08Xv",
        "",
        "# TLS: epost's own certificate; passwords only over TLS (or from this host).",
        "ssl = yes",
        f"ssl_cert = <{cert.absolute()}",
        f"ssl_key = <{key.absolute()}",
        "ssl_min_protocol = TLSv1.2",
        "disable_plaintext_auth = yes",
        "",
        "# Listeners: STARTTLS on the plain ports; the implicit-TLS ports are off.",
    ]
    out += _service("imap-login", "imap", imap, "imaps")
    out += _service("pop3-login", "pop3", pop3, "pop3s")
    if lmtp is not None:
        kind, where = lmtp
        out += ["", "# LMTP for epost's [delivery] local_transport = \"lmtp:...\": Sieve filters and quotas apply."]
        if kind == "unix":
            out += ["service lmtp {", f"  unix_listener {where} {{", "    mode = 0600", "    user = root", "  }", "}"]
        else:
            address, _, port = where.rpartition(":")
            out += ["service lmtp {", "  inet_listener lmtp {", f"    address = {address}", f"    port = {port}",
                    "  }", "}"]
        out += [
            "protocol lmtp {",
            "  mail_plugins = $mail_plugins sieve",
            "  postmaster_address = postmaster@" + config.server.hostname,
            "}",
            "plugin {",
            "  # Each user's Sieve script, e.g. written over ManageSieve or by hand.",
            "  sieve = file:~/sieve;active=~/.dovecot.sieve",
            "}",
        ]
    return "\n".join(out) + "\n"


def _service(service: str, name: str, listener: Listener | None, tls_name: str) -> list[str]:
    if listener is None:
        return []
    return [
        f"service {service} {{",
        f"  inet_listener {name} {{",
        f"    address = {'*, ::' if listener.address == '*' else listener.address}",
        f"    port = {listener.port}",
        "  }",
        f"  inet_listener {tls_name} {{",
        "    port = 0",
        "  }",
        "}",
    ]


__all__ = ["DovecotConfError", "Listener", "dovecot_conf", "mail_owner", "parse_listener", "parse_lmtp_endpoint"]
