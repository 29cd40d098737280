"""The PROXY protocol prelude and the stream that replays what was read past it (interim: moved from
server.py; the PROXY privilege rules land with the shared toolkit)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import trio

from gateway.limits import TrustedNetworks
from gateway.proto import proxy as proxyproto

log = logging.getLogger("gateway.session")


@dataclasses.dataclass(frozen=True, slots=True)
class Peer:
    ip: str
    text: str
    proxied: bool = False


def socket_peer(stream: trio.abc.Stream) -> Peer:
    sock = getattr(stream, "socket", None)
    try:
        addr = sock.getpeername() if sock is not None else None
    except OSError:
        addr = None
    if not addr or not isinstance(addr, tuple):
        return Peer("127.0.0.1", "-")  # in-process streams (tests) count as local
    return Peer(str(addr[0]), f"{addr[0]}:{addr[1]}")


async def read_prelude(
    raw: trio.abc.Stream,
    peer: Peer,
    *,
    trusted: TrustedNetworks,
    on_error: Callable[[], None] = lambda: None,
) -> tuple[trio.abc.Stream, Peer] | None:
    """A PROXY v1/v2 header, believed only from a trusted proxy. The caller bounds the time."""
    if not trusted.contains(peer.ip):
        on_error()
        log.warning("PROXY listener: %s is not a trusted proxy; connection closed", peer.text)
        return None
    parser = proxyproto.ProxyParser()
    try:
        while True:
            event = parser.next_event()
            if event is not proxyproto.NEED_DATA:
                break
            parser.receive_data(bytes(await raw.receive_some(4096)))
    except (proxyproto.ProxyProtocolError, trio.BrokenResourceError) as exc:
        on_error()
        log.warning("PROXY header from %s refused: %s", peer.text, exc)
        return None
    if isinstance(event, proxyproto.Proxied):
        peer = Peer(str(event.source.ip), f"{event.source.ip}:{event.source.port}", proxied=True)
    return Replay(raw, parser.trailing_data), peer


class Replay(trio.abc.Stream):
    """A stream that first gives back bytes already read past a PROXY header (maybe a TLS hello)."""

    def __init__(self, inner: trio.abc.Stream, prefix: bytes) -> None:
        self.inner = inner
        self._prefix = prefix
        self.socket = getattr(inner, "socket", None)

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._prefix:
            n = len(self._prefix) if max_bytes is None else max_bytes
            data, self._prefix = self._prefix[:n], self._prefix[n:]
            await trio.lowlevel.checkpoint()
            return data
        return await self.inner.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        send_eof = getattr(self.inner, "send_eof", None)
        if send_eof is not None:
            await send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()
