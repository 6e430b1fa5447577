"""Throwaway credentials for a local cluster (`hotslot up --tls`) and for tests: a CA, a certificate the services
present both as servers and as clients of each other, a client certificate for the user, and bearer tokens. Not
for production: the keys sit unencrypted in the state directory (readable by the owner only)."""
from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID_DAYS = 30


@dataclass(frozen=True)
class LocalCredentials:
    """Paths of what `generate` wrote, and the tokens."""

    directory: Path
    ca: Path
    service_cert: Path
    service_key: Path
    client_cert: Path
    client_key: Path
    tokens_file: Path  # every valid token with its scope, read by the services
    service_token_file: Path  # the admin token the services send to each other
    admin_token: str  # the user's: may generate and administer
    generate_token: str  # may only generate and read


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert(subject: str, key, issuer_name: x509.Name, issuer_key, *, ca: bool, sans: list[x509.GeneralName],
          usages: list) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False),
            critical=True)
    else:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _sans(hosts: list[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host.strip("[]"))))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def generate(directory: Path, hosts: list[str] | None = None, admin_token: str | None = None) -> LocalCredentials:
    """Writes a fresh CA, a service certificate valid for `hosts` (plus localhost, 127.0.0.1 and ::1), a user
    client certificate and tokens (the user's admin token `admin_token` when given) into `directory`, replacing what
    is there, and returns their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    ca_key = _key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hotslot local CA")])
    ca_cert = _cert("hotslot local CA", ca_key, ca_name, ca_key, ca=True, sans=[], usages=[])

    all_hosts = [*(hosts or []), "localhost", "127.0.0.1", "::1"]
    all_hosts = [h for h in all_hosts if h]
    service_key = _key()
    service_cert = _cert("hotslot service", service_key, ca_name, ca_key, ca=False, sans=_sans(all_hosts),
                         usages=[ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
    client_key = _key()
    client_cert = _cert("hotslot user", client_key, ca_name, ca_key, ca=False, sans=[],
                        usages=[ExtendedKeyUsageOID.CLIENT_AUTH])

    creds = LocalCredentials(
        directory=directory, ca=directory / "ca.pem",
        service_cert=directory / "service.pem", service_key=directory / "service-key.pem",
        client_cert=directory / "client.pem", client_key=directory / "client-key.pem",
        tokens_file=directory / "tokens", service_token_file=directory / "service-token",
        admin_token=admin_token or secrets.token_urlsafe(32), generate_token=secrets.token_urlsafe(32),
    )
    service_token = secrets.token_urlsafe(32)
    creds.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    creds.service_cert.write_bytes(service_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(creds.service_key, _key_pem(service_key))
    creds.client_cert.write_bytes(client_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(creds.client_key, _key_pem(client_key))
    _write_private(creds.tokens_file, (
        "# TOKEN SCOPE (generate or admin); written by `hotslot up --tls`\n"
        f"{service_token} admin\n{creds.admin_token} admin\n{creds.generate_token} generate\n"
    ).encode())
    _write_private(creds.service_token_file, (service_token + "\n").encode())
    _write_private(directory / "admin-token", (creds.admin_token + "\n").encode())
    _write_private(directory / "generate-token", (creds.generate_token + "\n").encode())
    return creds
