"""Every TLS context the gateway builds, with one set of minimums: TLS 1.2 or later, no renegotiation.

- ``server_context(cert_file, key_file)``: the POP3 listeners (implicit TLS and STLS). A bad file raises
  ``TlsFileError`` naming which of the two is at fault (``which`` is ``"cert_file"`` or ``"key_file"``);
  an encrypted key is refused rather than prompted for on the terminal.
- ``client_context(ca_file, insecure)``: the upstreams (IMAP, JMAP) and the old server of ``uidl import``.
  Verified against the system CAs by default, or against ``ca_file``; ``insecure`` (labs only) verifies
  nothing.

``OP_NO_RENEGOTIATION`` matters for TLS 1.2 only (1.3 has no renegotiation): a client-initiated
renegotiation costs the server a handshake each time, for free to the client.
"""

from __future__ import annotations

import ssl
from typing import Literal, NoReturn

MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2


class TlsFileError(ValueError):
    """A certificate or key file that cannot be used; ``which`` names the config key at fault."""

    def __init__(self, message: str, which: Literal["cert_file", "key_file"]) -> None:
        super().__init__(message)
        self.which: Literal["cert_file", "key_file"] = which


def _harden(ctx: ssl.SSLContext) -> ssl.SSLContext:
    ctx.minimum_version = MINIMUM_VERSION
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    return ctx


def _no_passphrase() -> NoReturn:
    raise TlsFileError("the key is encrypted; give an unencrypted key (mode 0600)", "key_file")


def _read(path: str, which: Literal["cert_file", "key_file"]) -> bytes:
    if not path:
        raise TlsFileError("is empty", which)
    try:
        with open(path, "rb") as f:
            return f.read(1 << 20)
    except OSError as exc:
        raise TlsFileError(f"cannot read {path}: {exc.strerror or exc}", which) from None


def server_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """The context of a TLS listener, loaded from PEM files."""
    ctx = _harden(ssl.create_default_context(ssl.Purpose.CLIENT_AUTH))
    cert = _read(cert_file, "cert_file")
    key = _read(key_file, "key_file")
    if b"-----BEGIN CERTIFICATE-----" not in cert:
        raise TlsFileError(f"{cert_file} holds no PEM certificate", "cert_file")
    if b"PRIVATE KEY-----" not in key:
        raise TlsFileError(f"{key_file} holds no PEM private key", "key_file")
    try:
        ctx.load_cert_chain(cert_file, key_file, password=_no_passphrase)
    except OSError as exc:  # ssl.SSLError included
        reason = getattr(exc, "reason", None) or exc.strerror or str(exc)
        raise TlsFileError(
            f"{key_file} cannot be used with {cert_file} (does the key match the certificate?): {reason}",
            "key_file",
        ) from None
    return ctx


def client_context(ca_file: str = "", insecure: bool = False) -> ssl.SSLContext:
    """The context for a connection to an upstream or an old POP3 server."""
    ctx = _harden(ssl.create_default_context(cafile=ca_file or None))
    if insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


__all__ = ["MINIMUM_VERSION", "TlsFileError", "client_context", "server_context"]
