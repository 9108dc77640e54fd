"""A throwaway certificate authority for local and test environments (``albert local up``).

``make_test_ca(folder, names)`` writes ``ca.pem`` (what clients trust: ``curl --cacert``,
``SSL_CERT_FILE``) and a server certificate for ``names`` signed by it: ``server.crt``,
``server.key`` (0600) and ``server.pem`` (certificate + key, HAProxy's ``crt`` format, 0600).
An existing CA in the folder is reused, so clients configured once keep working.
``ensure_test_ca`` also keeps the server certificate while it still fits (same CA, every name,
more than a month left): a second ``albert local up`` finds nothing to change.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

PEM = serialization.Encoding.PEM


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _write(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    path.chmod(mode)


def _ca(folder: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path, key_path = folder / "ca.pem", folder / "ca.key"
    if cert_path.exists() and key_path.exists():
        key = serialization.load_pem_private_key(key_path.read_bytes(), None)
        return x509.load_pem_x509_certificate(cert_path.read_bytes()), key  # type: ignore[return-value]
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Albert test CA")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                           critical=True)
            .sign(key, hashes.SHA256()))
    _write(key_path, _key_pem(key), 0o600)
    _write(cert_path, cert.public_bytes(PEM), 0o644)
    return cert, key


def _general_names(names: tuple[str, ...]) -> list[x509.GeneralName]:
    alt: list[x509.GeneralName] = []
    for n in names:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            alt.append(x509.DNSName(n))
    return alt


def make_test_ca(folder: Path, names: tuple[str, ...] = ("localhost", "127.0.0.1"),
                 days: int = 825) -> Path:
    """The CA (reused when present) and a fresh server certificate for ``names``; returns folder."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = _ca(folder)
    key = ec.generate_private_key(ec.SECP256R1())
    alt = _general_names(names)
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    cert_pem, key_pem = cert.public_bytes(PEM), _key_pem(key)
    _write(folder / "server.crt", cert_pem, 0o644)
    _write(folder / "server.key", key_pem, 0o600)
    _write(folder / "server.pem", cert_pem + key_pem, 0o600)
    return folder


def server_cert_fits(folder: Path, names: tuple[str, ...], min_days_left: int = 30) -> bool:
    """``folder``'s server certificate was signed by its CA, names every one of ``names`` and is
    valid for more than ``min_days_left`` days (its key beside it)."""
    paths = [folder / n for n in ("ca.pem", "ca.key", "server.crt", "server.key", "server.pem")]
    if not all(p.exists() for p in paths):
        return False
    ca = x509.load_pem_x509_certificate((folder / "ca.pem").read_bytes())
    cert = x509.load_pem_x509_certificate((folder / "server.crt").read_bytes())
    try:
        cert.verify_directly_issued_by(ca)
        alt = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):
        return False
    left = cert.not_valid_after_utc - dt.datetime.now(dt.timezone.utc)
    return set(_general_names(names)) <= set(alt) and left > dt.timedelta(days=min_days_left)


def ensure_test_ca(folder: Path, names: tuple[str, ...]) -> list[str]:
    """The CA and a server certificate for ``names`` in ``folder``, made only when missing or no
    longer fitting (:func:`server_cert_fits`); returns what was made ([]: nothing changed)."""
    if server_cert_fits(folder, names):
        return []
    had_ca = (folder / "ca.pem").exists() and (folder / "ca.key").exists()
    make_test_ca(folder, names)
    return ["server certificate"] if had_ca else ["test CA", "server certificate"]
