"""Who the client is, and what a PROXY header may claim: it grants no privilege (issue 9, weakness 6)."""

from __future__ import annotations

import socket
import ssl
from ipaddress import ip_address

import pytest
import trio
import trio.testing

from gateway.limits import PlaintextAuthPolicy, TrustedNetworks
from gateway.proto.proxy import Address, format_v1, format_v2
from gateway.proxied import (
    IN_PROCESS_PEER,
    UNKNOWN_KEY,
    UNKNOWN_PEER,
    Peer,
    PrefixedStream,
    Refused,
    read_prelude,
    socket_peer,
)

BALANCER = Peer("127.0.0.1", "127.0.0.1:40000")  # a balancer on the gateway's own host
TRUSTED = TrustedNetworks(["127.0.0.1/32"])
DEFAULT = PlaintextAuthPolicy()  # loopback only
LAN = PlaintextAuthPolicy(networks=TrustedNetworks(["192.0.2.0/24"]))


def addr(ip: str, port: int) -> Address:
    return Address(ip_address(ip), port)


def v4(source: str) -> tuple[Address, Address]:
    return addr(source, 5555), addr("192.0.2.1", 110)


def v6(source: str) -> tuple[Address, Address]:
    return addr(source, 5555), addr("2001:db8::1", 110)


def allowed(policy: PlaintextAuthPolicy, peer: Peer) -> bool:
    """The decision the shell hands the POP3 core as ``Settings.allow_plaintext_auth``."""
    return policy.allows(peer.ip, proxied=peer.proxied)


async def through_prelude(header: bytes, via: Peer = BALANCER) -> Peer:
    """Send ``header`` and a first command over an in-process stream; return the client's Peer."""
    client, server = trio.testing.memory_stream_pair()
    await client.send_all(header + b"CAPA\r\n")
    result = await read_prelude(server, via, trusted=TRUSTED, deadline=trio.current_time() + 10)
    assert not isinstance(result, Refused), result
    stream, peer = result
    assert await stream.receive_some() == b"CAPA\r\n"  # the client's bytes, untouched
    return peer


# ---------------------------------------------------------------- headers that claim loopback


@pytest.mark.parametrize(
    "header",
    [
        format_v1(*v4("127.0.0.1")),
        format_v2(*v4("127.0.0.1")),
        format_v2(*v6("::ffff:127.0.0.1")),
        format_v1(*v6("::ffff:127.0.0.1")),
        format_v2(*v6("::1")),
        format_v1(*v4("127.8.9.10")),
    ],
    ids=["v1-127.0.0.1", "v2-127.0.0.1", "v2-mapped", "v1-mapped", "v2-::1", "v1-127/8"],
)
async def test_a_header_claiming_loopback_gets_no_plaintext_auth(header: bytes) -> None:
    peer = await through_prelude(header)
    assert peer.proxied
    assert not peer.is_loopback
    assert not allowed(DEFAULT, peer)
    assert not allowed(LAN, peer)


async def test_a_proxied_loopback_address_still_matches_a_network_listed_on_purpose() -> None:
    peer = await through_prelude(format_v1(*v4("127.0.0.1")))
    assert allowed(PlaintextAuthPolicy(networks=TrustedNetworks(["127.0.0.0/8"])), peer)


# ---------------------------------------------------------------- headers that name no client


@pytest.mark.parametrize(
    ("header", "text"),
    [
        (format_v2(None, None, local=True), "local@127.0.0.1:40000"),
        (format_v2(*v4("192.0.2.9"), local=True), "local@127.0.0.1:40000"),  # LOCAL ignores addresses
        (format_v1(None, None), "unknown@127.0.0.1:40000"),
        (b"PROXY UNKNOWN 192.0.2.9 192.0.2.1 1 2\r\n", "unknown@127.0.0.1:40000"),
        (format_v2(None, None), "unknown@127.0.0.1:40000"),  # v2 PROXY over AF_UNSPEC
    ],
    ids=["v2-local", "v2-local-with-addresses", "v1-unknown", "v1-unknown-with-addresses", "v2-unspec"],
)
async def test_local_and_unknown_headers_are_an_unknown_client_not_the_balancer(
    header: bytes, text: str
) -> None:
    peer = await through_prelude(header)
    assert peer.ip is None
    assert peer.text == text
    assert not peer.is_loopback
    assert not allowed(DEFAULT, peer)
    assert not allowed(PlaintextAuthPolicy(networks=TrustedNetworks(["0.0.0.0/0", "::/0"])), peer)
    assert peer.key == UNKNOWN_KEY  # one shared bucket for the limits and the throttle
    assert allowed(PlaintextAuthPolicy(everywhere=True), peer)


# ---------------------------------------------------------------- the socket's own peer


class _GoneSocket:
    """A socket whose client is already gone: getpeername() fails with ENOTCONN."""

    def getpeername(self) -> tuple[str, int]:
        raise OSError(107, "Transport endpoint is not connected")


class _Wrapper(trio.abc.Stream):
    """Some stream without a socket attribute that is not an in-process pair."""

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return b""  # pragma: no cover

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        pass  # pragma: no cover

    async def wait_send_all_might_not_block(self) -> None:
        pass  # pragma: no cover

    async def send_eof(self) -> None:
        pass  # pragma: no cover

    async def aclose(self) -> None:
        pass  # pragma: no cover


class _GoneSocketStream(_Wrapper):
    """A stream with a real-looking socket attribute, like a trio.SocketStream."""

    socket = _GoneSocket()


def test_a_failed_getpeername_is_an_unknown_peer_not_loopback() -> None:
    peer = socket_peer(_GoneSocketStream())
    assert peer == UNKNOWN_PEER
    assert peer.ip is None and not peer.is_loopback
    assert not allowed(DEFAULT, peer)
    assert peer.key == UNKNOWN_KEY


async def test_an_unknown_socket_peer_may_not_send_a_proxy_header() -> None:
    _, server = trio.testing.memory_stream_pair()
    everyone = TrustedNetworks(["0.0.0.0/0", "::/0"])
    result = await read_prelude(server, UNKNOWN_PEER, trusted=everyone, deadline=trio.current_time() + 1)
    assert result == Refused("not a trusted proxy")


def test_an_in_process_stream_counts_as_local() -> None:
    """Server.serve_stream and the shell tests feed trio memory streams: they stay local, as before."""
    _, server = trio.testing.memory_stream_pair()
    assert socket_peer(server) == IN_PROCESS_PEER
    assert IN_PROCESS_PEER.is_loopback and allowed(DEFAULT, IN_PROCESS_PEER)
    lockstep, _ = trio.testing.lockstep_stream_pair()
    assert socket_peer(lockstep) == IN_PROCESS_PEER


def test_an_ssl_stream_is_looked_through_to_its_transport() -> None:
    _, server = trio.testing.memory_stream_pair()
    wrapped = trio.SSLStream(server, ssl.create_default_context(), server_side=False, server_hostname="x")
    assert socket_peer(wrapped) == IN_PROCESS_PEER
    gone = trio.SSLStream(_GoneSocketStream(), ssl.create_default_context(), server_hostname="x")
    assert socket_peer(gone) == UNKNOWN_PEER


def test_any_other_stream_without_a_socket_fails_closed() -> None:
    assert socket_peer(_Wrapper()) == UNKNOWN_PEER
    _, server = trio.testing.memory_stream_pair()
    assert socket_peer(PrefixedStream(server, b"")) == UNKNOWN_PEER  # its socket is None, never absent


async def test_a_real_loopback_socket_is_loopback_and_a_unix_socket_is_unknown() -> None:
    [listener] = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with listener:
        port = listener.socket.getsockname()[1]
        client = await trio.open_tcp_stream("127.0.0.1", port)
        async with client, await listener.accept() as accepted:
            peer = socket_peer(accepted)
            assert peer.ip == "127.0.0.1" and not peer.proxied
            assert peer.text == f"127.0.0.1:{client.socket.getsockname()[1]}"
            assert peer.is_loopback and allowed(DEFAULT, peer)
    left, right = trio.socket.socketpair(socket.AF_UNIX)
    async with trio.SocketStream(left) as unix, trio.SocketStream(right):
        assert socket_peer(unix) == UNKNOWN_PEER


# ---------------------------------------------------------------- proxied clients that may


async def test_a_proxied_lan_client_in_plaintext_networks_is_still_allowed() -> None:
    peer = await through_prelude(format_v2(*v4("192.0.2.9")))
    assert peer == Peer("192.0.2.9", "192.0.2.9:5555", proxied=True)
    assert allowed(LAN, peer)
    assert peer.key == "192.0.2.9"
    mapped = await through_prelude(format_v2(*v6("::ffff:192.0.2.9")))
    assert allowed(LAN, mapped)  # an IPv4-mapped address counts as its IPv4 address
    outsider = await through_prelude(format_v1(*v4("198.51.100.1")))
    assert not allowed(LAN, outsider)


# ---------------------------------------------------------------- refusals


async def test_a_peer_outside_trusted_proxies_is_refused_without_a_byte() -> None:
    client, server = trio.testing.memory_stream_pair()
    await client.send_all(format_v1(*v4("192.0.2.9")))
    stranger = Peer("203.0.113.5", "203.0.113.5:1234")
    result = await read_prelude(server, stranger, trusted=TRUSTED, deadline=trio.current_time() + 1)
    assert result == Refused("not a trusted proxy")
    await server.aclose()  # the caller's part
    assert await client.receive_some() == b""  # not a byte was sent


async def test_a_proxied_peer_cannot_send_a_second_header() -> None:
    _, server = trio.testing.memory_stream_pair()
    proxied = Peer("127.0.0.1", "127.0.0.1:5555", proxied=True)
    result = await read_prelude(server, proxied, trusted=TRUSTED, deadline=trio.current_time() + 1)
    assert result == Refused("not a trusted proxy")


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"USER alice\r\n", "not a PROXY protocol header"),
        (b"PROXY TCP4 not-an-ip 1.2.3.4 1 2\r\n", "v1 address is not a valid TCP4 address"),
    ],
)
async def test_a_bad_header_is_refused_with_a_reason_for_the_log(data: bytes, reason: str) -> None:
    client, server = trio.testing.memory_stream_pair()
    await client.send_all(data)
    result = await read_prelude(server, BALANCER, trusted=TRUSTED, deadline=trio.current_time() + 1)
    assert result == Refused(reason)
    await server.aclose()
    assert await client.receive_some() == b""


async def test_a_header_cut_short_by_the_peer_is_refused() -> None:
    client, server = trio.testing.memory_stream_pair()
    await client.send_all(b"PROXY TCP4 192.0.2.9")
    await client.aclose()
    result = await read_prelude(server, BALANCER, trusted=TRUSTED, deadline=trio.current_time() + 1)
    assert result == Refused("connection closed before the PROXY header was complete")


class _Broken(_Wrapper):
    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        raise trio.BrokenResourceError("reset by peer")


async def test_a_broken_connection_is_refused() -> None:
    result = await read_prelude(_Broken(), BALANCER, trusted=TRUSTED, deadline=trio.current_time() + 1)
    assert result == Refused("connection lost before the PROXY header was complete")


async def test_the_deadline_is_total_not_per_byte(autojump_clock: trio.testing.MockClock) -> None:
    client, server = trio.testing.memory_stream_pair()
    header = format_v1(*v4("192.0.2.9"))

    async def dribble() -> None:
        for byte in header:
            await client.send_all(bytes([byte]))
            await trio.sleep(1)

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(dribble)
        result = await read_prelude(server, BALANCER, trusted=TRUSTED, deadline=start + 5)
        nursery.cancel_scope.cancel()
    assert result == Refused("no complete PROXY header before the deadline")
    assert trio.current_time() - start == pytest.approx(5)


# ---------------------------------------------------------------- the replayed stream


async def test_the_prefixed_stream_replays_then_reads_on() -> None:
    client, server = trio.testing.memory_stream_pair()
    stream = PrefixedStream(server, b"abcdef")
    assert stream.socket is None
    assert await stream.receive_some(4) == b"abcd"
    assert await stream.receive_some() == b"ef"
    await client.send_all(b"more")
    assert await stream.receive_some(100) == b"more"
    await stream.send_all(b"+OK\r\n")
    await stream.wait_send_all_might_not_block()
    assert await client.receive_some() == b"+OK\r\n"
    await stream.send_eof()
    assert await client.receive_some() == b""
    await PrefixedStream(_Wrapper(), b"").send_eof()  # passed on to an inner stream that has it
    await stream.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await server.send_all(b"x")


def test_the_policy_gives_loopback_permission_to_the_socket_peer_only() -> None:
    assert DEFAULT.allows("127.0.0.1") and DEFAULT.allows("::ffff:127.0.0.1")
    assert not DEFAULT.allows("127.0.0.1", proxied=True)
    assert not DEFAULT.allows("::ffff:127.0.0.1", proxied=True)
    assert not DEFAULT.allows(None) and not LAN.allows(None)
    assert LAN.allows("192.0.2.9", proxied=True)
    assert PlaintextAuthPolicy(everywhere=True).allows(None, proxied=True)
