"""The JMAP backend's HTTP client runs on the quick-ack network backend, and it really sets TCP_QUICKACK."""

from __future__ import annotations

import socket

import httpcore
import trio

from gateway.backends import httpnet
from gateway.backends.jmap import JmapBackend, JmapSettings


def test_the_jmap_client_uses_the_quick_ack_pool() -> None:
    backend = JmapBackend(JmapSettings.from_url("jmap+http://127.0.0.1:1/"))
    transport = backend._api.client._transport
    pool = getattr(transport, "_pool", None)
    assert isinstance(pool, httpcore.AsyncConnectionPool)
    assert isinstance(pool._network_backend, httpnet.QuickAckBackend)


async def test_reads_set_tcp_quickack(nursery: trio.Nursery) -> None:
    seen: list[int] = []

    async def serve(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await stream.aclose()

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    nursery.start_soon(trio.serve_listeners, serve, listeners)

    class Spy(httpnet.QuickAckBackend):
        async def connect_tcp(self, *args, **kwargs):  # type: ignore[no-untyped-def,override]
            stream = await super().connect_tcp(*args, **kwargs)
            real = stream._sock  # type: ignore[attr-defined]

            class Recorder:
                def setsockopt(self, level: int, opt: int, value: int) -> None:
                    seen.append(opt)
                    real.setsockopt(level, opt, value)

            stream._sock = Recorder()  # type: ignore[attr-defined]
            return stream

    pool = httpcore.AsyncConnectionPool(network_backend=Spy())
    response = await pool.request("GET", f"http://127.0.0.1:{port}/")
    assert response.content == b"ok"
    await pool.aclose()
    assert seen and all(opt == socket.TCP_QUICKACK for opt in seen)
