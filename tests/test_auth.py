"""Password hashes and the twisted.cred checker behind SMTP AUTH."""

from __future__ import annotations

import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, reactor
from twisted.python.threadpool import ThreadPool
from twisted.trial import unittest

from epost import auth
from epost.auth import IAccount, UsersChecker, hash_password, make_portal, verify_password
from epost.routing.users import Users, User, parse_user_line
from epost.address import Address


@pytest.fixture(autouse=True)
def _cheap_scrypt(monkeypatch):
    """n=2**4 keeps the suite fast; the format and code path are the production ones."""
    monkeypatch.setattr(auth, "SCRYPT_LOG2_N", 4)
    monkeypatch.setattr(auth, "ARGON2_TIME_COST", 1)
    monkeypatch.setattr(auth, "ARGON2_MEMORY_KIB", 64)


# --- hash_password / verify_password --------------------------------------------


def test_right_password_verifies():
    assert verify_password("correct horse", hash_password("correct horse"))


def test_wrong_password_does_not_verify():
    assert not verify_password("correct hors", hash_password("correct horse"))


def test_non_ascii_and_bytes_passwords_verify():
    assert verify_password("pässwörd".encode(), hash_password("pässwörd"))


def test_same_password_hashes_differently_each_time():
    assert hash_password("secret") != hash_password("secret")


def test_new_hash_is_argon2id_that_dovecot_reads():
    assert hash_password("secret").startswith("{ARGON2ID}$argon2id$v=19$m=64,t=1,p=1$")


def test_scrypt_hash_describes_its_parameters_and_still_verifies():
    encoded = auth.hash_password_scrypt("secret")
    assert encoded.startswith("$scrypt$ln=4,r=8,p=1$")
    assert verify_password("secret", encoded) and not verify_password("secrets", encoded)
    assert auth.needs_upgrade(encoded) and not auth.needs_upgrade(hash_password("secret"))


@pytest.mark.parametrize("encoded", [
    "{ARGON2ID}",
    "{ARGON2ID}$argon2i$v=19$m=64,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo",
    "{ARGON2ID}$argon2id$v=19$m=64,t=1,p=1$c2FsdHNhbHQ$!!",
    "{ARGON2ID}$argon2id$v=19$m=99999999999,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo",
])
def test_nasty_argon2_hashes_are_false(encoded):
    assert verify_password("secret", encoded) is False


def test_production_cost_is_the_default():
    assert (auth.SCRYPT_R, auth.SCRYPT_P, auth.SALT_BYTES, auth.KEY_BYTES) == (8, 1, 16, 32)


@given(st.text(max_size=40))
def test_hash_has_no_colon_or_whitespace_and_survives_the_users_file(password):
    encoded = hash_password(password)

    assert ":" not in encoded and not any(c.isspace() for c in encoded)
    user = parse_user_line(f"a@b.test:{encoded}")
    assert user.password_hash == encoded
    assert verify_password(password, user.password_hash)


@given(st.text(), st.one_of(st.text(), st.binary()))
def test_malformed_hash_is_false_and_never_raises(encoded, password):
    assert verify_password(password, encoded) is False


@pytest.mark.parametrize("encoded", [
    "",
    "plaintext",
    "$scrypt$",
    "$scrypt$ln=4,r=8,p=1$AAAAAAAAAAAAAAAAAAAAAA",  # no key
    "$scrypt$ln=4,r=8,p=1$AAAAAAAAAAAAAAAAAAAAAA$!!!!",  # not base64
    "$scrypt$ln=4,r=8,p=1$AAAAAAAAAAAAAAAAAAAAAA$AAAAA",  # impossible base64 length
    "$scrypt$ln=4,r=8,p=1$AAAAAAAAAAAAAAAAAAAAAA$AAAA",  # 3-byte key: too easy to hit
    "$scrypt$ln=0,r=8,p=1$AAAAAAAAAAAAAAAAAAAAAA$" + "A" * 43,
    "$scrypt$ln=99,r=8,p=1$AAAAAAAAAAAAAAAAAAAAAA$" + "A" * 43,
    "$scrypt$ln=25,r=999,p=1$AAAAAAAAAAAAAAAAAAAAAA$" + "A" * 43,  # beyond MAXMEM
    "$scrypt$ln=4,r=0,p=1$AAAAAAAAAAAAAAAAAAAAAA$" + "A" * 43,
    "$2b$12$abcdefghijklmnopqrstuuABCDEFGHIJKLMNOPQRSTUVWXYZ01234",  # bcrypt
    None,
])
def test_nasty_hashes_are_false(encoded):
    assert verify_password("secret", encoded) is False


def test_hash_with_trailing_newline_is_refused():
    assert not verify_password("secret", hash_password("secret") + "\n")


# --- UsersChecker ---------------------------------------------------------------


def _fast_hashes_and_pool(test: unittest.TestCase, name: str) -> ThreadPool:
    """Cheap hash parameters for `test` and a started thread pool, stopped at cleanup."""
    test.patch(auth, "SCRYPT_LOG2_N", 4)
    test.patch(auth, "ARGON2_TIME_COST", 1)
    test.patch(auth, "ARGON2_MEMORY_KIB", 64)
    pool = ThreadPool(minthreads=1, maxthreads=2, name=name)
    pool.start()
    test.addCleanup(pool.stop)
    return pool


class UsersCheckerTests(unittest.TestCase):
    def setUp(self):
        self.pool = _fast_hashes_and_pool(self, "test-auth")
        self.users = Users.of([
            User(Address("alice", "example.test"), hash_password("s3cret")),
            User(Address("bob", "example.test"), None),
        ])
        self.checker = UsersChecker(lambda: self.users, reactor, self.pool)

    def login(self, username, password):
        return self.checker.requestAvatarId(UsernamePassword(username, password))

    async def test_right_password_gives_canonical_address(self):
        self.assertEqual(await self.login("alice@example.test", "s3cret"), "alice@example.test")

    async def test_username_case_is_ignored(self):
        self.assertEqual(await self.login("Alice@Example.TEST", "s3cret"), "alice@example.test")

    async def test_bytes_credentials_as_twisted_mail_sends_them(self):
        self.assertEqual(await self.login(b"alice@example.test", b"s3cret"), "alice@example.test")

    def test_wrong_password_is_refused(self):
        return self.assertFailure(self.login("alice@example.test", "S3cret"), UnauthorizedLogin)

    def test_unknown_user_is_refused(self):
        return self.assertFailure(self.login("mallory@example.test", "s3cret"), UnauthorizedLogin)

    def test_mailbox_without_hash_cannot_log_in(self):
        return self.assertFailure(self.login("bob@example.test", ""), UnauthorizedLogin)

    def test_username_that_is_not_an_address_is_refused(self):
        return self.assertFailure(self.login(b"\xff alice", "s3cret"), UnauthorizedLogin)

    async def test_table_is_read_at_each_login(self):
        self.users = Users({})
        with self.assertRaises(UnauthorizedLogin):
            await self.login("alice@example.test", "s3cret")

    async def test_verification_runs_off_the_reactor_thread(self):
        seen = []
        real = auth.verify_password

        def spy(password, encoded):
            seen.append((threading.current_thread(), encoded))
            return real(password, encoded)

        self.patch(auth, "verify_password", spy)
        await self.login("alice@example.test", "s3cret")
        with self.assertRaises(UnauthorizedLogin):
            await self.login("mallory@example.test", "s3cret")

        self.assertEqual(len(seen), 2)
        self.assertTrue(all(thread is not threading.main_thread() for thread, _ in seen))
        # An unknown user still pays for a hash of today's kind (Argon2id, what new accounts get).
        self.assertTrue(seen[1][1].startswith(auth.ARGON2ID_PREFIX), seen[1][1])

    async def test_portal_gives_the_address_as_avatar(self):
        interface, avatar, logout = await make_portal(self.checker).login(
            UsernamePassword(b"Alice@example.test", b"s3cret"), None, IAccount
        )
        self.assertEqual((interface, avatar, logout()), (IAccount, "alice@example.test", None))


def test_portal_speaks_the_smtp_servers_interface():
    from epost.smtp import interfaces

    assert IAccount is interfaces.IAccount


class OldHashUpgradeTests(unittest.TestCase):
    """UsersChecker tells its on_old_hash hook about a successful login with a scrypt hash only."""

    def setUp(self):
        self.pool = _fast_hashes_and_pool(self, "test-auth-upgrade")

    def _checker(self, told):
        from twisted.internet import reactor
        old, new = auth.hash_password_scrypt("pw"), hash_password("pw")
        users = Users({"alice@example.test": old, "bob@example.test": new})
        return UsersChecker(lambda: users, reactor, self.pool, on_old_hash=lambda *args: told.append(args)), old

    @defer.inlineCallbacks
    def test_scrypt_login_is_reported_with_its_password_and_argon2_login_is_not(self):
        told = []
        checker, old = self._checker(told)
        yield checker.requestAvatarId(UsernamePassword(b"alice@example.test", b"pw"))
        yield checker.requestAvatarId(UsernamePassword(b"bob@example.test", b"pw"))
        self.assertEqual(told, [("alice@example.test", b"pw", old)])

    @defer.inlineCallbacks
    def test_failed_login_is_not_reported(self):
        told = []
        checker, _ = self._checker(told)
        with self.assertRaises(UnauthorizedLogin):
            yield checker.requestAvatarId(UsernamePassword(b"alice@example.test", b"wrong"))
        self.assertEqual(told, [])
