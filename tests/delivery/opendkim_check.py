"""OpenDKIM as the independent judge of epost's signatures (tests/delivery, tests/e2e).

opendkim runs in test mode (-t) with its own config. Debian's opendkim does not
follow a ResolverConfiguration to a non-53 port (tried: no query reached
dnsmasq), so the public keys reach it through TestPublicKeys, in the exact
form `txt_record` tells operators to publish.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from epost.delivery import signing

OPENDKIM = shutil.which("opendkim", path="/usr/sbin:/usr/local/sbin")


def opendkim_verify(message: bytes, keys, workdir: Path) -> str:
    published = workdir / "keys.txt"
    lines = []
    for key in keys:
        name, _, record = signing.txt_record(key).partition(". IN TXT ")
        value = "".join(part.strip('"') for part in record.split('" "'))
        lines.append(f"{name} {value}\n")
    published.write_text("".join(lines))
    conf = workdir / "opendkim.conf"
    conf.write_text(
        f"Mode v\nTestPublicKeys {published}\nPidFile {workdir}/opendkim.pid\n"
        "Syslog no\nLogResults yes\nAlwaysAddARHeader yes\n"
    )
    msg = workdir / "msg.eml"
    msg.write_bytes(message)
    result = subprocess.run(
        [OPENDKIM, "-x", str(conf), "-t", str(msg), "-vvv"],
        capture_output=True, timeout=30,
    )
    return (result.stdout + result.stderr).decode(errors="replace")


def passing_selectors(out: str) -> set[str]:
    """The selectors whose signature OpenDKIM's Authentication-Results say passed."""
    return set(re.findall(r"dkim=pass[^;]*?header\.s=([\w.-]+)", out.replace("\n\t", " ")))
