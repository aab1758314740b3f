"""DKIM signing (RFC 6376, Ed25519 per RFC 8463) through dkimpy.

Pure-ish helpers: load and check keys, pick the keys of the closest matching
domain, sign a message's bytes once (every key of that domain: RSA + Ed25519
gives two signatures), make a key and the TXT record to publish. The caller
decides *where* signing runs (off the reactor, once, where the message is final).
"""

from __future__ import annotations

import base64
import datetime
import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from epost.headers import from_domain

def _openssl_rsa_sign(hash, private_key, _cache={}):
    """dkimpy's RSA is pure Python (~6 ms for 2048 bits); the same PKCS#1 v1.5
    signature (deterministic, so byte-identical) from OpenSSL costs ~0.3 ms."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding, utils

    n = private_key["modulus"]
    key = _cache.get(n)
    if key is None:
        key = rsa.RSAPrivateNumbers(
            p=private_key["prime1"], q=private_key["prime2"], d=private_key["privateExponent"],
            dmp1=private_key["exponent1"], dmq1=private_key["exponent2"], iqmp=private_key["coefficient"],
            public_numbers=rsa.RSAPublicNumbers(private_key["publicExponent"], n),
        ).private_key()
        _cache[n] = key
    algorithm = {"sha256": hashes.SHA256(), "sha1": hashes.SHA1()}[hash.name]
    return key.sign(hash.digest(), padding.PKCS1v15(), utils.Prehashed(algorithm))


# dkim/__init__.py calls the name it imported from dkim.crypto.
dkim.RSASSA_PKCS1_v1_5_sign = _openssl_rsa_sign
# dkimpy parses the PEM (ASN.1 in pure Python, ~0.15 ms) at every signature;
# our keys are a handful of fixed byte strings, so each is parsed once.
dkim.parse_pem_private_key = functools.lru_cache(maxsize=64)(dkim.parse_pem_private_key)


class _RelaxedBody(bytes):
    """A body already in relaxed canonical form (RFC 6376 §3.4.4)."""


_relaxed_body = dkim.canonicalization.Relaxed.canonicalize_body


def _canonicalize_body_once(body: bytes) -> bytes:
    """dkimpy canonicalizes and hashes the whole body again in every sign(): for
    RSA + Ed25519 that is twice the same regex passes over the body (~0.13 ms
    for 4 KiB, a sixth of the pair's cost). `sign` canonicalizes it once and
    hands dkimpy the result marked as done; anything else (verification,
    other callers) is canonicalized as before. Relaxed canonicalization is
    idempotent, so even a marked body canonicalized again would hash the same."""
    return body if type(body) is _RelaxedBody else _relaxed_body(body)


dkim.canonicalization.Relaxed.canonicalize_body = staticmethod(_canonicalize_body_once)

# RFC 6376 §5.4.1 plus the headers Gmail/Yahoo bulk-sender rules name.
SIGNED_HEADERS = (
    b"from", b"to", b"cc", b"subject", b"date", b"message-id", b"reply-to",
    b"mime-version", b"content-type", b"content-transfer-encoding",
    b"list-unsubscribe", b"list-unsubscribe-post",
)


class DkimKeyError(ValueError):
    """A key that cannot sign: missing, unreadable, or not what it claims; one line naming it."""


@dataclass(frozen=True)
class DkimKey:
    domain: str
    selector: str
    algorithm: str  # "rsa" | "ed25519"
    private: bytes  # what dkimpy takes: PEM for RSA, base64 seed for Ed25519
    public_b64: str  # the p= value


def _public_b64(private_key) -> str:
    if isinstance(private_key, ed25519.Ed25519PrivateKey):
        raw = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return base64.b64encode(raw).decode()
    der = private_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(der).decode()


MIN_RSA_BITS = 2048  # SPEC §9; Gmail and Yahoo ask for at least 1024, RFC 8301 for 2048 at least to be usable


def _check_name(domain: str, selector: str, path: Path, algorithm: str) -> None:
    """A file named the way `keygen` names them (<domain>.<selector>.<type>.pem)
    must hold that type and be configured under that domain and selector: a
    key under the wrong selector signs with a key nobody published.

    The name is read as keygen's only when it starts with the configured
    domain or ends with the configured selector; any other name (e.g.
    `mail.example.com.rsa.pem` for mail.example.com/s2026) is the operator's
    own and is taken as it is."""
    name = path.name.lower()
    for named in ("rsa", "ed25519"):
        suffix = f".{named}.pem"
        if not name.endswith(suffix):
            continue
        if named != algorithm:
            raise DkimKeyError(f"dkim key {domain}/{selector}: {path} holds an {algorithm} key but is named {named}")
        stem = name[: -len(suffix)]
        lower_domain, lower_selector = domain.lower().rstrip("."), selector.lower()
        wanted = f"{lower_domain}.{lower_selector}"
        if stem != wanted and (stem.startswith(f"{lower_domain}.") or stem.endswith(f".{lower_selector}")):
            raise DkimKeyError(
                f"dkim key {domain}/{selector}: {path} was made for {stem} (<domain>.<selector>), not {wanted}")


def load_key(domain: str, selector: str, path: str | os.PathLike) -> DkimKey:
    """Read a PEM private key (RSA or Ed25519); DkimKeyError naming the file otherwise."""
    path = Path(path)
    try:
        pem = path.read_bytes()
    except OSError as e:
        raise DkimKeyError(f"dkim key {domain}/{selector}: cannot read {path}: {e.strerror}") from None
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as e:
        raise DkimKeyError(f"dkim key {domain}/{selector}: {path} is not a PEM private key ({e})") from None
    _check_name(domain, selector, path, "ed25519" if isinstance(key, ed25519.Ed25519PrivateKey) else "rsa")
    if isinstance(key, ed25519.Ed25519PrivateKey):
        seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                 serialization.NoEncryption())
        return DkimKey(domain.lower(), selector, "ed25519", base64.b64encode(seed), _public_b64(key))
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise DkimKeyError(f"dkim key {domain}/{selector}: {path} is RSA-{key.key_size}, need >= {MIN_RSA_BITS} bits")
        pkcs1 = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                  serialization.NoEncryption())
        return DkimKey(domain.lower(), selector, "rsa", pkcs1, _public_b64(key))
    raise DkimKeyError(f"dkim key {domain}/{selector}: {path} is neither RSA nor Ed25519")


def zone_txt(name: str, value: str) -> str:
    """`NAME. IN TXT "..."` as published in a zone file, split into 255-octet
    strings (the most one TXT string holds: long RSA keys, SPF records)."""
    chunks = " ".join(f'"{value[i:i + 255]}"' for i in range(0, len(value), 255)) or '""'
    return f"{name}. IN TXT {chunks}"


def txt_record(key: DkimKey) -> str:
    """The record to publish, in zone-file form."""
    return zone_txt(f"{key.selector}._domainkey.{key.domain}", f"v=DKIM1; k={key.algorithm}; p={key.public_b64}")


def default_selector(today: datetime.date | None = None) -> str:
    """Names the month, e.g. e202612 (a new selector per rotation)."""
    today = today or datetime.date.today()
    return f"e{today:%Y%m}"


def keygen(domain: str, directory: str | os.PathLike, selector: str | None = None,
           key_type: str = "rsa") -> tuple[Path, DkimKey]:
    """Write a new private key, mode 0600, to <directory>/<domain>.<selector>.<type>.pem."""
    selector = selector or default_selector()
    if key_type == "rsa":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    elif key_type == "ed25519":
        key = ed25519.Ed25519PrivateKey.generate()
    else:
        raise ValueError(f"unknown key type {key_type!r} (rsa|ed25519)")
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    directory = Path(directory)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = directory / f"{domain.lower()}.{selector}.{key_type}.pem"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    return path, load_key(domain, selector, path)


def keys_for(domain: str, keys: tuple[DkimKey, ...]) -> tuple[DkimKey, ...]:
    """Every key of the closest matching domain: exact, else the nearest parent."""
    domain = domain.lower().rstrip(".")
    labels = domain.split(".")
    for i in range(len(labels)):
        candidate = ".".join(labels[i:])
        found = tuple(k for k in keys if k.domain == candidate)
        if found:
            return found
    return ()


def sign(message: bytes, keys: tuple[DkimKey, ...], signing_domain: str | None = None) -> bytes:
    """The DKIM-Signature header lines (CRLF-ended) to prepend; b'' if no key matches.

    Domain: the From: domain (DMARC alignment), unless given. relaxed/relaxed,
    From oversigned, only headers present are signed (dkimpy drops absent ones).
    The message is parsed once (dkimpy's parse also gives the names present)
    and its body canonicalized once, whatever the number of keys (dkimpy's
    own sign() redoes the body for each).
    """
    domain = signing_domain or from_domain(message)
    if not domain:
        return b""
    chosen = keys_for(domain, keys)
    if not chosen:
        return b""
    parsed = dkim.DKIM(message, linesep=b"\r\n")  # one parse serves every key (sign() leaves it as it was)
    parsed.body = _RelaxedBody(_relaxed_body(parsed.body))
    names = {name.lower() for name, _ in parsed.headers}
    present = [h for h in SIGNED_HEADERS if h in names] + [b"from"]  # From oversigned
    out = []
    for key in chosen:
        algorithm = b"ed25519-sha256" if key.algorithm == "ed25519" else b"rsa-sha256"
        out.append(parsed.sign(
            key.selector.encode(), key.domain.encode(), key.private, signature_algorithm=algorithm,
            canonicalize=(b"relaxed", b"relaxed"), include_headers=present,
        ))
    return b"".join(out)


def load_keys(specs) -> tuple[DkimKey, ...]:
    """Every configured key (config.dkim.keys), read and checked; DkimKeyError on the first bad one."""
    for problem in repeated_selectors(specs):
        raise DkimKeyError(problem)
    return tuple(load_key(spec.domain, spec.selector, spec.key) for spec in specs)


def repeated_selectors(specs) -> list[str]:
    """A selector names one published key: two entries under one name cannot both verify."""
    seen, problems = set(), []
    for spec in specs:
        name = (spec.domain.lower().rstrip("."), spec.selector.lower())
        if name in seen:
            problems.append(f"dkim key {spec.domain}/{spec.selector}: configured twice (one selector, one key)")
        seen.add(name)
    return problems


def signing_keys(*, trusted: bool, leaves_over_smtp: bool, from_domain: str | None,
                 keys: tuple[DkimKey, ...]) -> tuple[DkimKey, ...]:
    """Which keys sign a message (SPEC §9), from plain facts.

    None unless the message came from a trusted origin (an authenticated
    client, relay_networks, or epost itself) and some recipient leaves over
    SMTP; then every key of the From: domain's closest configured domain.
    Mail epost forwards for others and local deliveries get none."""
    if not (may_sign(trusted=trusted, leaves_over_smtp=leaves_over_smtp, keys=keys) and from_domain):
        return ()
    return keys_for(from_domain, keys)


def may_sign(*, trusted: bool, leaves_over_smtp: bool, keys: tuple[DkimKey, ...]) -> bool:
    """The facts of `signing_keys` that cost nothing: when False, From: need not be parsed."""
    return bool(keys and trusted and leaves_over_smtp)


def commit_signature(message: bytes, chosen: tuple[DkimKey, ...]) -> bytes:
    """The DKIM-Signature header lines to store with a message at commit, made
    with the keys `signing_keys` chose (b"" for none): made once, so retries
    and every destination send the same bytes."""
    if not chosen:
        return b""
    return sign(message, chosen, chosen[0].domain)


def keys_to_json(keys: tuple[DkimKey, ...]) -> bytes:
    """The loaded keys for the spool worker (sent over its private stdin pipe,
    never on a command line): it signs with exactly what start-up checked."""
    return json.dumps([{**vars(k), "private": k.private.decode("ascii")} for k in keys]).encode()


def keys_from_json(data: bytes) -> tuple[DkimKey, ...]:
    return tuple(DkimKey(**{**k, "private": k["private"].encode("ascii")}) for k in json.loads(data))
