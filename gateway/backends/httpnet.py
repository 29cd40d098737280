"""The network layer under httpx for HTTP mailboxes (JMAP): trio sockets that acknowledge at once.

Some HTTP servers (Cyrus httpd among them) write a response in small pieces without TCP_NODELAY, so the last
piece waits, by Nagle's rule, for the acknowledgement of the previous one, which Linux delays by up to
40 ms. Measured on this project's benchmark: 44 ms for every 10 KiB message. Setting TCP_QUICKACK before
each read (Linux clears it again after each acknowledgement) makes that 2 ms. Elsewhere it is a no-op.
"""

from __future__ import annotations

import socket
import ssl
import typing

import httpcore
import httpx
from httpcore._backends.trio import TrioBackend

_QUICKACK = getattr(socket, "TCP_QUICKACK", None)


class _QuickAckStream(httpcore.AsyncNetworkStream):
    def __init__(self, inner: httpcore.AsyncNetworkStream) -> None:
        self._inner = inner
        sock = inner.get_extra_info("socket")  # a trio socket on the trio backend
        self._sock = sock if hasattr(sock, "setsockopt") else None

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        if self._sock is not None and _QUICKACK is not None:
            try:
                self._sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
            except OSError:
                self._sock = None
        return await self._inner.read(max_bytes, timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        await self._inner.write(buffer, timeout)

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.AsyncNetworkStream:
        tls = await self._inner.start_tls(ssl_context, server_hostname, timeout)
        wrapped = _QuickAckStream(tls)
        wrapped._sock = self._sock  # the same TCP socket under the TLS layer
        return wrapped

    def get_extra_info(self, info: str) -> typing.Any:
        return self._inner.get_extra_info(info)


class QuickAckBackend(httpcore.AsyncNetworkBackend):
    def __init__(self) -> None:
        self._inner = TrioBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: typing.Iterable[typing.Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        inner = await self._inner.connect_tcp(host, port, timeout, local_address, socket_options)
        return _QuickAckStream(inner)

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: typing.Iterable[typing.Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        return await self._inner.connect_unix_socket(path, timeout, socket_options)

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


def transport(verify: ssl.SSLContext, limits: httpx.Limits) -> httpx.AsyncBaseTransport:
    """httpx's own transport, with its connection pool on the quick-ack network backend.

    httpx has no public hook for the network backend, so the pool is swapped in; should a future httpx
    lay itself out differently, the stock transport is used as it is (correct, just slower on such servers).
    """
    t = httpx.AsyncHTTPTransport(verify=verify, limits=limits, trust_env=False)
    if isinstance(getattr(t, "_pool", None), httpcore.AsyncConnectionPool):
        t._pool = httpcore.AsyncConnectionPool(
            ssl_context=verify,
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            http1=True,
            http2=False,
            network_backend=QuickAckBackend(),
        )
    return t
