"""The TLS client context every upstream uses: verified by default, an extra CA file, or (labs only) none."""

from __future__ import annotations

import ssl


def client_tls_context(ca_file: str = "", insecure: bool = False) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ca_file or None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx
