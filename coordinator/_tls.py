"""Self-signed TLS material for the registry (``coordinator init``), made with ``cryptography``."""

from __future__ import annotations

import contextlib
import datetime as _dt
import ipaddress
from collections.abc import Sequence
from pathlib import Path

from protocols.bundle import atomic_write

__all__ = ["make_self_signed", "subject_alt_names", "tls_server_name", "DEFAULT_TLS_NAMES"]

DEFAULT_TLS_NAMES: tuple[str, ...] = ("localhost", "127.0.0.1")


def subject_alt_names(names: Sequence[str]) -> list:
    """The certificate's subjectAltName entries: an IP address entry for each name that parses
    as one, a DNS name entry otherwise."""
    from cryptography import x509

    sans: list[x509.GeneralName] = []
    for n in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            sans.append(x509.DNSName(n))
    return sans


def make_self_signed(
    cert_path: Path,
    key_path: Path,
    *,
    names: tuple[str, ...] = DEFAULT_TLS_NAMES,
    common_name: str = "scarches-fl coordinator",
    days: int = 825,
) -> bytes:
    """Write an ECDSA P-256 key (mode 0600) and a self-signed certificate valid for ``names``
    (DNS names or IP addresses). Returns the certificate PEM, which sites pin via trust.json."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if not names:
        raise ValueError("at least one TLS name is needed")
    key = ec.generate_private_key(ec.SECP256R1())
    sans = subject_alt_names(names)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _dt.datetime.now(_dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5))
        .not_valid_after(now + _dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        # A self-signed leaf that is its own trust anchor: CA:TRUE so that TLS stacks that
        # insist on a CA anchor (BoringSSL in gRPC) accept it when pinned as the root.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    atomic_write(Path(key_path), key_pem, mode=0o600)
    atomic_write(Path(cert_path), cert_pem, mode=0o644)
    return cert_pem


def tls_server_name(trust: object, address: str) -> str | None:
    """The name to check the server certificate against when ``address``'s host is not one of
    the certificate's names (e.g. ``127.0.0.1`` for a certificate made for ``coordinator``)."""
    pem = trust.get("tls_root_pem") if isinstance(trust, dict) else None
    if not pem:
        return None
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(pem.encode("ascii"))
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    names = [str(n) for n in san.get_values_for_type(x509.DNSName)]
    ips = [str(i) for i in san.get_values_for_type(x509.IPAddress)]
    host = address.rsplit(":", 1)[0].strip("[]")
    if host in names or host in ips:
        return None
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(host)
    return names[0] if names else (ips[0] if ips else None)
