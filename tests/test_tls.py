"""The server always has a usable TLS identity, and a bad one stops start-up with a clear line."""

from __future__ import annotations

import datetime
import socket
import ssl
import stat
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import deferToThread
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial import unittest

from epost.config import Config, ServerConfig
from epost.tls import TLSConfigError, context_for, ensure_self_signed, server_context

HOST = "mail.example.jp"


def pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def issue(cn: str, key, issuer_cn: str, issuer_key, *, ca: bool) -> bytes:
    """A PEM certificate for `cn` signed by `issuer_key`: enough of a CA to test chains."""
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_cn)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
    else:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(cn)]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


class Echo(Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)


class SelfSignedTests(unittest.TestCase):
    def test_generates_key_0600_cert_0644_in_a_0700_folder(self) -> None:
        tls_dir = Path(self.mktemp()) / "spool" / "tls"
        cert_path, key_path = ensure_self_signed(tls_dir, HOST)
        self.assertEqual((cert_path, key_path), (tls_dir / "cert.pem", tls_dir / "key.pem"))
        self.assertEqual(stat.S_IMODE(tls_dir.stat().st_mode), 0o700)
        self.assertEqual(stat.S_IMODE(key_path.stat().st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(cert_path.stat().st_mode), 0o644)
        # No temp files left behind.
        self.assertEqual(sorted(p.name for p in tls_dir.iterdir()), ["cert.pem", "key.pem"])

    def test_second_call_reuses_the_same_files(self) -> None:
        tls_dir = Path(self.mktemp())
        cert_path, key_path = ensure_self_signed(tls_dir, HOST)
        before = cert_path.read_bytes(), key_path.read_bytes()
        self.assertEqual(ensure_self_signed(tls_dir, "other.example.jp"), (cert_path, key_path))
        self.assertEqual((cert_path.read_bytes(), key_path.read_bytes()), before)

    def test_missing_key_regenerates_both(self) -> None:
        tls_dir = Path(self.mktemp())
        cert_path, key_path = ensure_self_signed(tls_dir, HOST)
        old_cert = cert_path.read_bytes()
        key_path.unlink()
        ensure_self_signed(tls_dir, HOST)
        self.assertNotEqual(cert_path.read_bytes(), old_cert)
        server_context(cert_path, key_path)  # the new pair matches

    def test_cert_names_the_hostname_in_cn_and_san_and_lasts_ten_years(self) -> None:
        cert_path, _ = ensure_self_signed(Path(self.mktemp()), HOST)
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        self.assertEqual(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value, HOST)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(san.get_values_for_type(x509.DNSName), [HOST])
        now = datetime.datetime.now(datetime.timezone.utc)
        self.assertLess(cert.not_valid_before_utc, now - datetime.timedelta(hours=23))
        self.assertGreater(cert.not_valid_after_utc, now + datetime.timedelta(days=3649))

    def test_hostname_too_long_for_a_cn_still_gets_a_san(self) -> None:
        long_host = ".".join(["a" * 60, "b" * 60, "example.jp"])
        cert_path, key_path = ensure_self_signed(Path(self.mktemp()), long_host)
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(san.get_values_for_type(x509.DNSName), [long_host])
        server_context(cert_path, key_path)


class ServerContextErrorTests(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        self.cert_path, self.key_path = ensure_self_signed(self.dir, HOST)

    def assert_error_names(self, path: Path, cert_path: Path, key_path: Path) -> str:
        with self.assertRaises(TLSConfigError) as caught:
            server_context(cert_path, key_path)
        message = str(caught.exception)
        self.assertTrue(message.startswith(f"{path}:"), message)
        self.assertNotIn("\n", message)
        return message

    def test_bad_pem_certificate_names_the_file(self) -> None:
        bad = self.dir / "bad.pem"
        bad.write_bytes(b"-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n")
        self.assert_error_names(bad, bad, self.key_path)

    def test_file_with_no_certificate_names_the_file(self) -> None:
        self.assert_error_names(self.key_path, self.key_path, self.key_path)

    def test_bad_pem_key_names_the_file(self) -> None:
        bad = self.dir / "bad.key"
        bad.write_bytes(b"garbage\n")
        self.assert_error_names(bad, self.cert_path, bad)

    def test_missing_file_names_the_file(self) -> None:
        missing = self.dir / "nope.pem"
        self.assert_error_names(missing, missing, self.key_path)
        self.assert_error_names(missing, self.cert_path, missing)

    def test_key_not_matching_cert_names_the_key(self) -> None:
        other = self.dir / "other.key"
        other.write_bytes(pem_key(ec.generate_private_key(ec.SECP256R1())))
        self.assertIn("does not match", self.assert_error_names(other, self.cert_path, other))

    def test_encrypted_key_names_the_file(self) -> None:
        key = serialization.load_pem_private_key(self.key_path.read_bytes(), None)
        encrypted = self.dir / "encrypted.key"
        encrypted.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"secret"),
            )
        )
        self.assertIn("encrypted", self.assert_error_names(encrypted, self.cert_path, encrypted))


class HandshakeTests(unittest.TestCase):
    """Real TLS over loopback: Twisted serves, the standard library's ssl module verifies."""

    @inlineCallbacks
    def handshake(self, options, cafile: Path) -> Deferred:
        endpoint = serverFromString(reactor, "tcp:0:interface=127.0.0.1")
        port = yield endpoint.listen(TLSMemoryBIOFactory(options, False, Factory.forProtocol(Echo)))
        self.addCleanup(port.stopListening)

        def client() -> tuple[str, bytes]:
            context = ssl.create_default_context(cafile=str(cafile))  # verifies chain and hostname
            with socket.create_connection(("127.0.0.1", port.getHost().port), timeout=10) as raw:
                with context.wrap_socket(raw, server_hostname=HOST) as tls:
                    tls.sendall(b"ping")
                    return tls.version(), tls.recv(4)

        version, echoed = yield deferToThread(client)
        self.assertIn(version, ("TLSv1.2", "TLSv1.3"))
        self.assertEqual(echoed, b"ping")

    def test_self_signed_certificate_completes_a_verified_handshake(self) -> Deferred:
        cert_path, key_path = ensure_self_signed(Path(self.mktemp()), HOST)
        return self.handshake(server_context(cert_path, key_path), cert_path)

    def test_extra_certificates_in_the_cert_file_are_sent_as_the_chain(self) -> Deferred:
        folder = Path(self.mktemp())
        folder.mkdir()
        root_key, mid_key, leaf_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
        root = issue("Test Root", root_key, "Test Root", root_key, ca=True)
        mid = issue("Test Intermediate", mid_key, "Test Root", root_key, ca=True)
        leaf = issue(HOST, leaf_key, "Test Intermediate", mid_key, ca=False)
        (folder / "root.pem").write_bytes(root)
        (folder / "fullchain.pem").write_bytes(leaf + mid)
        (folder / "key.pem").write_bytes(pem_key(leaf_key))
        options = server_context(folder / "fullchain.pem", folder / "key.pem")
        return self.handshake(options, folder / "root.pem")  # the client trusts only the root

    def test_combined_cert_and_key_file_is_accepted(self) -> Deferred:
        cert_path, key_path = ensure_self_signed(Path(self.mktemp()), HOST)
        combined = cert_path.parent / "combined.pem"
        combined.write_bytes(key_path.read_bytes() + cert_path.read_bytes())
        return self.handshake(server_context(combined, combined), cert_path)

    def test_context_for_without_configured_cert_uses_spool_tls(self) -> Deferred:
        spool = Path(self.mktemp())
        options = context_for(Config(server=ServerConfig(hostname=HOST, spool=spool)))
        self.assertTrue((spool / "tls" / "key.pem").exists())
        return self.handshake(options, spool / "tls" / "cert.pem")

    def test_context_for_uses_the_configured_cert(self) -> Deferred:
        cert_path, key_path = ensure_self_signed(Path(self.mktemp()), HOST)
        spool = Path(self.mktemp())
        config = Config(server=ServerConfig(hostname=HOST, spool=spool, tls_cert=cert_path, tls_key=key_path))
        options = context_for(config)
        self.assertFalse((spool / "tls").exists())
        return self.handshake(options, cert_path)
