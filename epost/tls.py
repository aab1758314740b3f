"""The server's TLS identity: the operator's certificate, or a self-signed one made once.

STARTTLS must work on first start, so with no `tls_cert`/`tls_key` configured a
self-signed certificate is generated in `<spool>/tls/` and then reused, so
clients that pin it keep working across restarts (SPEC §2, §4).
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import crypto
from twisted.internet.ssl import CertificateOptions, TLSVersion

from epost.fsutil import write_atomically

if TYPE_CHECKING:
    from epost.config import Config

CERT_NAME = "cert.pem"
KEY_NAME = "key.pem"
_VALIDITY = datetime.timedelta(days=3650)
_CLOCK_SKEW = datetime.timedelta(days=1)
_PEM_CERT = b"-----BEGIN CERTIFICATE-----"


class TLSConfigError(Exception):
    """Certificate or key unusable; str() is one line naming the file."""


def ensure_self_signed(tls_dir: Path, hostname: str) -> tuple[Path, Path]:
    """Return (cert, key) in `tls_dir`, generating a self-signed pair for `hostname` if either is missing.

    The key is written (0600) before the certificate, each atomically, so a
    crash never leaves a certificate without its key.
    """
    cert_path, key_path = tls_dir / CERT_NAME, tls_dir / KEY_NAME
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path
    tls_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    cert_pem = _self_signed(key, hostname).public_bytes(serialization.Encoding.PEM)
    write_atomically(key_path, key_pem, mode=0o600)
    write_atomically(cert_path, cert_pem, mode=0o644)
    return cert_path, key_path


def _self_signed(key: ec.EllipticCurvePrivateKey, hostname: str) -> x509.Certificate:
    # A CN is limited to 64 characters; the SAN is what clients check anyway.
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)] if len(hostname) <= 64 else [])
    try:
        alt_name: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(hostname))
    except ValueError:
        alt_name = x509.DNSName(hostname)
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.SubjectAlternativeName([alt_name]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )


def server_context(cert_path: Path, key_path: Path) -> CertificateOptions:
    """TLS 1.2+ server options from PEM files; certificates after the first in `cert_path` are the chain.

    Everything is checked now (not at the first handshake) so a bad file stops
    start-up with TLSConfigError instead of failing every STARTTLS.
    """
    certs = _load_certificates(cert_path)
    key = _load_key(key_path)
    if _public_der(key.public_key()) != _public_der(certs[0].public_key()):
        raise TLSConfigError(f"{key_path}: private key does not match certificate {cert_path}")
    return CertificateOptions(
        privateKey=crypto.PKey.from_cryptography_key(key),
        certificate=crypto.X509.from_cryptography(certs[0]),
        extraCertChain=[crypto.X509.from_cryptography(cert) for cert in certs[1:]],
        raiseMinimumTo=TLSVersion.TLSv1_2,
    )


def context_for(config: Config) -> CertificateOptions:
    """The configured certificate and key, else the self-signed pair under `<spool>/tls/`."""
    server = config.server
    if server.tls_cert is not None and server.tls_key is not None:
        return server_context(server.tls_cert, server.tls_key)
    return server_context(*ensure_self_signed(server.spool / "tls", server.hostname))


def client_context() -> CertificateOptions:
    """Outbound opportunistic STARTTLS: encrypt when offered, verify nothing
    (Postfix's `smtp_tls_security_level = may`; MX certificates rarely match)."""
    return CertificateOptions(verify=False)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise TLSConfigError(f"{path}: cannot read {what}: {error.strerror or error}") from None


def _load_certificates(path: Path) -> list[x509.Certificate]:
    data = _read(path, "certificate")
    # Only the CERTIFICATE blocks, so a combined cert+key file also works.
    blocks = [_PEM_CERT + part for part in data.split(_PEM_CERT)[1:]]
    try:
        certs = [cert for block in blocks for cert in x509.load_pem_x509_certificates(block)]
    except ValueError:
        raise TLSConfigError(f"{path}: not a valid PEM certificate") from None
    if not certs:
        raise TLSConfigError(f"{path}: no PEM certificate found")
    return certs


def _load_key(path: Path) -> PrivateKeyTypes:
    data = _read(path, "private key")
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:  # encrypted key: twistd cannot prompt for a passphrase
        raise TLSConfigError(f"{path}: private key is encrypted; give an unencrypted key") from None
    except (ValueError, UnsupportedAlgorithm):
        raise TLSConfigError(f"{path}: not a valid PEM private key") from None


def _public_der(public_key: PublicKeyTypes) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
