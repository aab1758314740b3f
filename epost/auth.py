"""Passwords for the users table (SPEC §3.2) and the twisted.cred checker that SMTP AUTH logs in with.

A hash is one self-describing string, `$scrypt$ln=15,r=8,p=1$SALT$KEY`
(standard base64 without padding), so it holds no `:` or whitespace and sits
safely after the address in `user@domain:HASH`. Hashing is slow on purpose
(~50-100 ms) and blocking: the checker runs it in a thread pool.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import os
import re
from typing import Any, Callable

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from zope.interface import implementer

from epost.routing.users import Users
from epost.address import Address, AddressError, parse_mailbox
from epost.smtp.interfaces import IAccount  # the one the SMTP server logs in with

__all__ = ["IAccount", "UsersChecker", "hash_password", "make_portal", "verify_password"]

# Cost of new hashes (read at call time, so tests may lower SCRYPT_LOG2_N).
SCRYPT_LOG2_N = 15
SCRYPT_R = 8
SCRYPT_P = 1
SALT_BYTES = 16
KEY_BYTES = 32
MAXMEM = 64 * 1024 * 1024  # n=2**15, r=8 needs 32 MiB; larger stored costs fail closed

_HASH = re.compile(r"\$scrypt\$ln=([0-9]{1,2}),r=([0-9]{1,3}),p=([0-9]{1,2})\$([A-Za-z0-9+/]+)\$([A-Za-z0-9+/]+)\Z")


def hash_password(password: str | bytes) -> str:
    """A new hash of `password` for the users file: `{ARGON2ID}$argon2id$...`, which Dovecot
    verifies too (docs/mailboxes.md), so one users file serves SMTP AUTH, IMAP and POP3."""
    return hash_password_argon2id(password)


def hash_password_scrypt(password: str | bytes) -> str:
    """A salted scrypt hash, as epost wrote before Dovecot shared the users file (still verified)."""
    salt = os.urandom(SALT_BYTES)
    key = _scrypt(_as_bytes(password), salt, SCRYPT_LOG2_N, SCRYPT_R, SCRYPT_P, KEY_BYTES)
    return _encode(salt, key, SCRYPT_LOG2_N, SCRYPT_R, SCRYPT_P)


def verify_password(password: str | bytes, encoded: str) -> bool:
    """True only if `encoded` is a well-formed hash of `password`; never raises on bad input."""
    if isinstance(encoded, str) and encoded.startswith(ARGON2ID_PREFIX):
        return verify_password_argon2id(password, encoded)
    try:
        match = _HASH.match(encoded)
        if not match:
            return False
        log2_n, r, p = (int(group) for group in match.group(1, 2, 3))
        salt, key = _b64decode(match.group(4)), _b64decode(match.group(5))
        if not (1 <= log2_n <= 30 and r >= 1 and p >= 1 and len(salt) >= 8 and len(key) >= 16):
            return False  # a short key would be easy to hit by chance
        candidate = _scrypt(_as_bytes(password), salt, log2_n, r, p, len(key))
    except (ValueError, TypeError, OverflowError, MemoryError):  # bad base64, cost beyond MAXMEM, unencodable text
        return False
    return hmac.compare_digest(candidate, key)


def _scrypt(password: bytes, salt: bytes, log2_n: int, r: int, p: int, dklen: int) -> bytes:
    return hashlib.scrypt(password, salt=salt, n=2**log2_n, r=r, p=p, dklen=dklen, maxmem=MAXMEM)


def _encode(salt: bytes, key: bytes, log2_n: int, r: int, p: int) -> str:
    return f"$scrypt$ln={log2_n},r={r},p={p}${_b64encode(salt)}${_b64encode(key)}"


def _b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _b64decode(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def _as_bytes(password: str | bytes) -> bytes:
    # surrogateescape: a password read from a non-UTF-8 terminal hashes as the bytes typed.
    return password if isinstance(password, bytes) else password.encode("utf-8", "surrogateescape")


@functools.cache
def _dummy_hash() -> str:
    """A hash of today's kind and cost (Argon2id) of a password nobody knows:
    an unknown user's login costs what a real account's does, so timing does
    not tell which accounts exist. Made once, in the check's thread."""
    return hash_password(os.urandom(32))


def _verify_or_waste(password: str | bytes, stored: str | None) -> bool:
    """verify_password, or the same work against the dummy hash (and False) for an unknown account."""
    if stored is None:
        verify_password(password, _dummy_hash())
        return False
    return verify_password(password, stored)


def _account(username: str | bytes) -> Address | None:
    """The canonical address (lower-case local part, as in the users table) a username names, or None."""
    try:
        text = username.decode("utf-8") if isinstance(username, bytes) else username
        address = parse_mailbox(text)
    except (UnicodeDecodeError, AddressError):
        return None
    return Address(address.local.lower(), address.domain)


@implementer(ICredentialsChecker)
class UsersChecker:
    """Checks IUsernamePassword against the users table; the avatar id is the canonical address string."""

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, users: Callable[[], Users], reactor: Any, threadpool: Any,
                 on_old_hash: Callable[[str, Any, str], object] | None = None) -> None:
        self._users = users  # called per login, so a LiveTable's reloads apply at once
        # Told (address, password, stored hash) after a login whose hash Dovecot cannot check.
        self._on_old_hash = on_old_hash
        self._reactor = reactor
        self._threadpool = threadpool

    def requestAvatarId(self, credentials: IUsernamePassword) -> Deferred[str]:
        """Fires with e.g. "alice@example.jp", or fails with UnauthorizedLogin after about the same time."""
        address = _account(credentials.username)
        stored = self._users().password_hash(address) if address is not None else None
        d = deferToThreadPool(
            self._reactor, self._threadpool, _verify_or_waste, credentials.password, stored or None
        )

        def decide(ok: bool) -> str:
            if ok and stored is not None:
                if self._on_old_hash is not None and needs_upgrade(stored):
                    self._on_old_hash(str(address), credentials.password, stored)
                return str(address)
            raise UnauthorizedLogin()

        return d.addCallback(decide)


@implementer(IRealm)
class _AccountRealm:
    def requestAvatar(self, avatarId: str, mind: object, *interfaces: Any) -> tuple[Any, str, Callable[[], None]]:
        if IAccount not in interfaces:
            raise NotImplementedError("epost accounts only provide IAccount")
        return IAccount, avatarId, lambda: None


def make_portal(checker: ICredentialsChecker) -> Portal:
    """A Portal whose login(credentials, None, IAccount) gives (IAccount, "user@domain", logout)."""
    return Portal(_AccountRealm(), [checker])


# Dovecot 2.3 cannot check scrypt; it checks {ARGON2ID} (libsodium, which supports only
# parallelism 1). Costs are read at call time so tests may lower them.
ARGON2ID_PREFIX = "{ARGON2ID}"
ARGON2_TIME_COST = 3
ARGON2_MEMORY_KIB = 65536  # within Dovecot's default auth vsz_limit (256 MiB)


def hash_password_argon2id(password: str | bytes) -> str:
    """`{ARGON2ID}` + the PHC string argon2-cffi makes: no `:` or whitespace, so a users-file field."""
    from argon2 import PasswordHasher

    hasher = PasswordHasher(time_cost=ARGON2_TIME_COST, memory_cost=ARGON2_MEMORY_KIB, parallelism=1)
    return ARGON2ID_PREFIX + hasher.hash(_as_bytes(password))


def verify_password_argon2id(password: str | bytes, encoded: str) -> bool:
    """True only if `encoded` is `{ARGON2ID}$argon2id$...` of `password`; never raises on bad input."""
    from argon2 import PasswordHasher
    from argon2.exceptions import Argon2Error

    phc = encoded[len(ARGON2ID_PREFIX):]
    if not phc.startswith("$argon2id$"):
        return False
    try:
        return PasswordHasher().verify(phc, _as_bytes(password))
    except (Argon2Error, ValueError, TypeError, MemoryError):
        return False


def needs_upgrade(encoded: str) -> bool:
    """True for a hash Dovecot cannot check (scrypt): `epost passwd` replaces it."""
    return not encoded.startswith(ARGON2ID_PREFIX)
