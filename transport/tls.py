"""TLS for the transport: pyOpenSSL contexts built once, certificates, peer checks.

Everything here runs in the transport process only; SSL objects never
leave it (workers get plain facts: version, cipher, SNI, peer subject).

* :func:`build_contexts` makes the server context (certificate chain and
  key, optional client-certificate verification for mutual TLS, TLS 1.2
  minimum, no renegotiation, no compression, AEAD ciphers with forward
  secrecy) and the client context (CA bundle, peer verification on).
* :func:`ensure_dev_certificate` generates a self-signed development
  certificate (ECDSA P-256: its handshakes cost a fraction of RSA-2048's)
  on first start, key file mode 0600.
* :func:`verify_server_name` checks an outbound peer's certificate against
  the name we meant to reach (OpenSSL verifies the chain; pyOpenSSL has no
  public hostname check, so it is done here, per RFC 6125 / RFC 5922).
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL

from sipwire.config import Settings
from sipwire.errors import ConfigurationError, TlsError
from sipwire.statedir import private_directory, write_private
from sipwire.transport.tlsinfo import TlsInfo

log = logging.getLogger("sipwire.tls")

#: TLS 1.2 suites: ECDHE only (forward secrecy), AEAD only. TLS 1.3 suites are all AEAD.
CIPHERS_TLS12: Final = b"ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL:!MD5:!SHA1:!DSS"
SESSION_ID_CONTEXT: Final = b"sipwire"
DEV_CERT_DAYS: Final = 825
#: Longest failure reason kept: ``tls_handshake_failed.`` and 35 characters fill a stats block counter name (56 bytes).
MAX_REASON_CHARS: Final = 35


class TlsConfigError(ConfigurationError, TlsError):
    """The TLS configuration cannot be used (missing file, key not matching the certificate...)."""


class TlsVerifyError(TlsError):
    """An outbound peer's certificate does not match the name we meant to reach."""


@dataclass(frozen=True, slots=True)
class TlsContexts:
    server: SSL.Context
    client: SSL.Context
    certificate_path: Path
    fingerprint: str


def ensure_dev_certificate(directory: Path) -> tuple[Path, Path]:
    """Return (certificate, key) paths, generating a self-signed ECDSA P-256 pair if missing."""
    cert_path = directory / "dev-cert.pem"
    key_path = directory / "dev-key.pem"
    private_directory(directory)  # a key is only reused from (or written to) a directory no one else controls
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sipwire development certificate")])
    now = datetime.datetime.now(datetime.UTC)
    alt_names = x509.SubjectAlternativeName(
        [
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("::1")),
        ]
    )
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=DEV_CERT_DAYS))
        .add_extension(alt_names, critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_bytes = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write_private(key_path, key_bytes)
    write_private(cert_path, certificate.public_bytes(serialization.Encoding.PEM))
    log.info("generated a self-signed development certificate %s (key %s, mode 0600)", cert_path, key_path)
    return cert_path, key_path


def fingerprint(cert_path: Path) -> str:
    certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
    digest = certificate.fingerprint(hashes.SHA256()).hex().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def build_contexts(settings: Settings) -> TlsContexts:
    """Build the server and client contexts once; raise :class:`TlsConfigError` with the cause."""
    if settings.tls_cert or settings.tls_key:
        if not (settings.tls_cert and settings.tls_key):
            raise TlsConfigError("tls_cert and tls_key must be set together")
        cert_path, key_path = Path(settings.tls_cert), Path(settings.tls_key)
    else:
        cert_path, key_path = ensure_dev_certificate(settings.runtime_dir / "tls")
    server = _base_context()
    _check_readable(cert_path, "the certificate chain")
    _check_readable(key_path, "the private key")
    try:
        server.use_certificate_chain_file(str(cert_path))
    except (OSError, SSL.Error) as error:
        raise TlsConfigError(f"cannot load the certificate chain {cert_path}: {_describe(error)}") from error
    try:
        server.use_privatekey_file(str(key_path))
    except (OSError, SSL.Error) as error:
        if isinstance(error, SSL.Error) and _describe(error) == "key values mismatch":
            # OpenSSL checks a key of the certificate's type as it loads it; one of another type is
            # caught by check_privatekey below. Both are the same operator error: say so, once.
            raise TlsConfigError(f"private key {key_path} does not match certificate {cert_path}") from error
        raise TlsConfigError(f"cannot load the private key {key_path}: {_describe(error)}") from error
    try:
        server.check_privatekey()
    except SSL.Error as error:
        raise TlsConfigError(f"private key {key_path} does not match certificate {cert_path}") from error
    server.set_session_id(SESSION_ID_CONTEXT)
    server.set_options(SSL.OP_CIPHER_SERVER_PREFERENCE)
    if settings.tls_verify_clients != "none":
        if not settings.tls_ca:
            raise TlsConfigError(f"tls_verify_clients={settings.tls_verify_clients!r} needs tls_ca (the client CAs)")
        _load_ca(server, settings.tls_ca)
        mode = SSL.VERIFY_PEER
        if settings.tls_verify_clients == "require":
            mode |= SSL.VERIFY_FAIL_IF_NO_PEER_CERT
        server.set_verify(mode, None)
    client = _base_context()
    if settings.tls_ca:
        _load_ca(client, settings.tls_ca)
    else:
        client.set_default_verify_paths()
    client.set_verify(SSL.VERIFY_PEER, None)
    return TlsContexts(server, client, cert_path, fingerprint(cert_path))


def _base_context() -> SSL.Context:
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    context.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION)
    context.set_cipher_list(CIPHERS_TLS12)
    # Free a connection's read/write buffers (~34 KiB) while it is idle: most SIP
    # connections are idle most of the time, and thousands of them are held open.
    context.set_mode(SSL.MODE_RELEASE_BUFFERS)
    return context


def _check_readable(path: Path | str, what: str) -> None:
    """Name the OS error for a missing or unreadable file (OpenSSL 3 only says "system lib")."""
    try:
        with open(path, "rb"):
            pass
    except OSError as error:
        raise TlsConfigError(f"cannot load {what} {path}: {error.strerror or error}") from error


def _load_ca(context: SSL.Context, ca_path: str) -> None:
    _check_readable(ca_path, "CA bundle")
    try:
        context.load_verify_locations(ca_path)
    except (OSError, SSL.Error) as error:
        raise TlsConfigError(f"cannot load CA bundle {ca_path}: {_describe(error)}") from error


def _describe(error: Exception) -> str:
    if isinstance(error, OSError):
        return error.strerror or str(error)
    reasons = [part[2] for part in error.args[0] if isinstance(part, tuple) and len(part) == 3] if error.args else []
    return ", ".join(str(reason) for reason in reasons) or str(error)


def describe_ssl_error(error: SSL.Error) -> str:
    """A short reason for counters and logs: OpenSSL's first reason string (the cause), or the error class.

    Cut to :data:`MAX_REASON_CHARS`: the counter ``tls_handshake_failed.<reason>`` must fit a stats block
    counter name, or the failure goes uncounted; the reasons a peer can cause are a fixed set, not its text.
    """
    if isinstance(error, SSL.SysCallError):
        return "unexpected_eof" if error.args and error.args[0] == -1 else "syscall_error"
    if isinstance(error, SSL.ZeroReturnError):
        return "closed"
    text = _describe(error).partition(", ")[0]
    return text.replace(" ", "_").lower()[:MAX_REASON_CHARS] if text else type(error).__name__.lower()


def verify_server_name(connection: SSL.Connection, server_name: str) -> None:
    """Check the peer certificate's subjectAltName (or CN) against ``server_name``."""
    certificate = connection.get_peer_certificate(as_cryptography=True)
    if certificate is None:
        raise TlsVerifyError(f"{server_name}: the peer sent no certificate")
    try:
        wanted_ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(server_name)
    except ValueError:
        wanted_ip = None
    try:
        alt_names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        alt_names = None
    if wanted_ip is not None:
        addresses = alt_names.get_values_for_type(x509.IPAddress) if alt_names else []
        if wanted_ip in addresses:
            return
        raise TlsVerifyError(f"certificate is not valid for IP {server_name} (has {addresses})")
    names = alt_names.get_values_for_type(x509.DNSName) if alt_names else []
    if not names:
        names = [str(a.value) for a in certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if any(_dns_match(pattern, server_name) for pattern in names):
        return
    raise TlsVerifyError(f"certificate is not valid for {server_name!r} (names: {', '.join(names) or 'none'})")


def _dns_match(pattern: str, name: str) -> bool:
    """RFC 6125 matching: case-insensitive, one wildcard only as the whole left-most label."""
    pattern_labels = pattern.lower().rstrip(".").split(".")
    name_labels = name.lower().rstrip(".").split(".")
    if len(pattern_labels) != len(name_labels):
        return False
    if pattern_labels[0] == "*" and len(pattern_labels) > 2:
        return pattern_labels[1:] == name_labels[1:]
    return pattern_labels == name_labels


def connection_info(connection: SSL.Connection, handshake_ms: float) -> TlsInfo:
    """Facts about an established connection for the envelope and the stats."""
    server_name = connection.get_servername()
    peer = connection.get_peer_certificate(as_cryptography=True)
    subject = peer.subject.rfc4514_string() if peer is not None else ""
    not_after = peer.not_valid_after_utc.isoformat() if peer is not None else ""
    return TlsInfo(
        version=connection.get_protocol_version_name(),
        cipher=connection.get_cipher_name() or "",
        handshake_ms=handshake_ms,
        server_name=server_name.decode("ascii", "replace") if server_name else "",
        peer_subject=subject.replace("\t", " "),
        peer_not_after=not_after,
    )
