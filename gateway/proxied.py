"""Who the client is: the socket's peer, or the client that a trusted proxy's PROXY header names.

The shell asks ``socket_peer(stream)`` once per accepted connection and, on a ``proxy_protocol``
listener, ``read_prelude(...)`` for the PROXY header (``gateway.proto.proxy`` parses it) and the stream
that replays the bytes read past it. What a ``Peer`` may do is decided elsewhere from its fields: the
plaintext policy (``PlaintextAuthPolicy.allows(peer.ip, proxied=peer.proxied)``), the per-IP limits and
the throttle (``peer.key``).

Rules (a PROXY header grants no privilege):

- ``socket_peer``: the address of the accepted socket. A real socket whose ``getpeername()`` fails
  (the client is gone already) or gives no (host, port) (AF_UNIX) is ``UNKNOWN_PEER``: no address, not
  loopback. Only an in-process stream counts as local (``IN_PROCESS_PEER``, 127.0.0.1): a
  ``trio.StapledStream`` without a ``socket`` attribute, what ``trio.testing.memory_stream_pair`` gives
  to tests and ``Server.serve_stream``. Any other stream without a socket is unknown, so a wrapper added
  later fails closed. A ``trio.SSLStream`` is looked through to its transport.
- ``read_prelude``: a header is read only from a peer in ``trusted_proxies`` (never from an unknown
  one). A PROXY (TCP4/TCP6) header gives ``Peer(source ip, proxied=True)``. LOCAL and UNKNOWN headers
  (and v2 over UNSPEC/UNIX) give an unknown peer (``ip=None``), never the balancer's own address: a
  balancer on loopback would otherwise lend its loopback to every client it health-checks for.
- ``Peer.is_loopback`` is true only for a socket (not proxied) loopback peer or an in-process stream.
  A proxied 127.0.0.1 or ``::ffff:127.0.0.1`` is not loopback; it may still match a configured
  ``plaintext_auth_networks`` entry (an explicit operator choice, applied to proxied clients like any).
- Unknown peers share one key, ``UNKNOWN_KEY``, for the per-IP limit and the throttle: stricter, never
  looser, than giving each its own.
- Bounded: the header is at most 107 octets (v1) or 16 + 1024 (v2); reads are ``RECEIVE_SIZE``, so the
  replayed prefix is under 4096 + 1040 octets. The wait is bounded by the caller's ``deadline`` (the
  session's deadline from accept), not restarted per byte.
- A refusal returns ``Refused(reason)`` having sent nothing; the caller counts
  ``metrics.error("proxy-header")``, logs the reason (our own text, never the peer's bytes) and then
  closes the stream, so a client that sees the close also sees the count.
"""

from __future__ import annotations

import dataclasses
from typing import Final, assert_never

import trio

from gateway.limits import TrustedNetworks, is_loopback
from gateway.proto.proxy import NEED_DATA, Local, Proxied, ProxyParser, ProxyProtocolError, Unknown

__all__ = [
    "IN_PROCESS_PEER",
    "RECEIVE_SIZE",
    "UNKNOWN_KEY",
    "UNKNOWN_PEER",
    "Peer",
    "PrefixedStream",
    "Refused",
    "header_peer",
    "read_prelude",
    "socket_peer",
]

RECEIVE_SIZE: Final = 4096
UNKNOWN_KEY: Final = "unknown"


@dataclasses.dataclass(frozen=True, slots=True)
class Peer:
    """The client as the gateway knows it.

    ``ip``: its address, or None when unknown. ``text``: for logs (``192.0.2.7:5555``, ``-``,
    ``local@10.0.0.5:3333``). ``proxied``: the address came from a PROXY header, not from the socket.
    """

    ip: str | None
    text: str
    proxied: bool = False

    @property
    def is_loopback(self) -> bool:
        """Whether this connection may count as loopback (e.g. for plaintext passwords)."""
        return not self.proxied and self.ip is not None and is_loopback(self.ip)

    @property
    def key(self) -> str:
        """What the per-IP limits and the throttle count against: the address, or ``UNKNOWN_KEY``."""
        return self.ip if self.ip is not None else UNKNOWN_KEY


IN_PROCESS_PEER: Final = Peer("127.0.0.1", "-")
UNKNOWN_PEER: Final = Peer(None, "-")

_NO_ATTRIBUTE: Final = object()


def socket_peer(stream: trio.abc.Stream) -> Peer:
    """The accepted stream's peer; see the module's rules for streams without a usable socket."""
    while isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    sock = getattr(stream, "socket", _NO_ATTRIBUTE)
    if sock is _NO_ATTRIBUTE:
        return IN_PROCESS_PEER if isinstance(stream, trio.StapledStream) else UNKNOWN_PEER
    try:
        addr = sock.getpeername()  # type: ignore[attr-defined]
    except (OSError, AttributeError):  # the peer is gone; or no socket (None) behind a wrapper
        return UNKNOWN_PEER
    if not isinstance(addr, tuple) or len(addr) < 2:
        return UNKNOWN_PEER  # AF_UNIX gives a path, or "" for an unnamed peer
    return Peer(str(addr[0]), f"{addr[0]}:{addr[1]}")


def header_peer(header: Proxied | Local | Unknown, via: Peer) -> Peer:
    """The client a parsed PROXY header names; ``via`` is the proxy (its socket peer)."""
    match header:
        case Proxied(source=source):
            return Peer(str(source.ip), f"{source.ip}:{source.port}", proxied=True)
        case Local():
            return Peer(None, f"local@{via.text}", proxied=True)
        case Unknown():
            return Peer(None, f"unknown@{via.text}", proxied=True)
        case _:  # pragma: no cover (exhaustive)
            assert_never(header)


@dataclasses.dataclass(frozen=True, slots=True)
class Refused:
    """No session: close the stream without a reply. ``reason`` is for the log line."""

    reason: str


async def read_prelude(
    raw: trio.abc.Stream, peer: Peer, *, trusted: TrustedNetworks, deadline: float
) -> tuple[PrefixedStream, Peer] | Refused:
    """Read the PROXY header ``peer`` (a trusted proxy) must send, by ``deadline`` (trio time).

    Returns the stream that replays the client's first bytes and the client's ``Peer``, or ``Refused``
    (then nothing was sent, and closing ``raw`` is the caller's business).
    """
    if peer.proxied or peer.ip is None or not trusted.contains(peer.ip):
        return Refused("not a trusted proxy")
    parser = ProxyParser()
    try:
        with trio.fail_at(deadline):
            while (event := parser.next_event()) is NEED_DATA:
                parser.receive_data(bytes(await raw.receive_some(RECEIVE_SIZE)))
    except ProxyProtocolError as exc:
        reason = str(exc)
    except trio.TooSlowError:
        reason = "no complete PROXY header before the deadline"
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        reason = "connection lost before the PROXY header was complete"
    else:
        return PrefixedStream(raw, parser.trailing_data), header_peer(event, peer)
    return Refused(reason)


class PrefixedStream(trio.abc.Stream):
    """A stream that first gives back the bytes already read past a PROXY header (maybe a TLS hello).

    ``socket`` is the inner stream's, or None: never absent, so ``socket_peer`` never takes it for an
    in-process stream.
    """

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
