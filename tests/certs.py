"""Certificates made by the tests: a CA and a leaf certificate for 127.0.0.1."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(key, path: Path) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))


def make_certs(folder: Path, expired: bool = False) -> dict[str, str]:
    """Write ca.pem, cert.pem and key.pem (CA-signed, SAN 127.0.0.1/localhost);
    ``expired``: cert.pem's validity ended a day ago (the CA's has not), and valid.pem
    and valid-key.pem are a certificate in date from the same CA."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ends = now - datetime.timedelta(days=1) if expired else now + datetime.timedelta(days=1)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("jupyter-mesh test CA")).issuer_name(_name("jupyter-mesh test CA"))
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    def leaf(ends):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name("127.0.0.1")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=2))
            .not_valid_after(ends)
            .add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        return key, cert

    folder.mkdir(parents=True, exist_ok=True)
    paths = {"ca": folder / "ca.pem", "cert": folder / "cert.pem", "key": folder / "key.pem"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    key, cert = leaf(ends)
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key, paths["key"])
    if expired:  # and one in date, from the same CA
        key, cert = leaf(now + datetime.timedelta(days=1))
        paths["valid_cert"], paths["valid_key"] = folder / "valid.pem", folder / "valid-key.pem"
        paths["valid_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key, paths["valid_key"])
    return {k: str(v) for k, v in paths.items()}
