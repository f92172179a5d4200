"""A self-signed certificate for the relay (``mailtally init --tls``), made with cryptography.

Mail clients will ask the user to trust it once; for production put a real certificate's
paths in ``relay.tls_cert`` / ``relay.tls_key``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def generate_self_signed(cert_path: Path, key_path: Path, hostname: str, days: int = 825) -> None:
    """Write a P-256 key (0600) and a certificate for ``hostname``, localhost and 127.0.0.1."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = dt.datetime.now(dt.UTC)
    names: list[x509.GeneralName] = [x509.DNSName(hostname)]
    if hostname != "localhost":
        names.append(x509.DNSName("localhost"))
    names.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_bytes = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key_bytes)
    os.chmod(key_path, 0o600)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def enable_in_config(config_path: Path, hostname: str) -> tuple[Path, Path]:
    """Generate ``relay.crt``/``relay.key`` next to the config and point ``[relay]`` at them."""
    import tomllib

    import config

    directory = config_path.parent
    cert, key = directory / "relay.crt", directory / "relay.key"
    generate_self_signed(cert, key, hostname)
    raw = tomllib.loads(config_path.read_text(encoding="utf-8"))
    raw.setdefault("relay", {}).update({"tls_cert": cert.name, "tls_key": key.name})
    fd = os.open(config_path, os.O_WRONLY | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(config.render(raw))
    return cert, key
