"""The sans-IO PROXY protocol parser: bytes in, one header out, the rest left untouched."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.proto import proxy
from gateway.proto.proxy import (
    NEED_DATA,
    Address,
    Family,
    Local,
    Proxied,
    ProxyParser,
    ProxyProtocolError,
    Tlv,
    Unknown,
)

POP3 = b"USER alice\r\nPASS secret\r\n"
Feed = Callable[[bytes], "tuple[proxy.Header, bytes]"]


def addr(text: str, port: int) -> Address:
    return Address(ipaddress.ip_address(text), port)


def parse_whole(data: bytes, **kw: int) -> tuple[proxy.Header, bytes]:
    parser = ProxyParser(**kw)
    parser.receive_data(data)
    event = parser.next_event()
    assert not isinstance(event, proxy.NeedData), "the header should be complete"
    return event, parser.trailing_data


def parse_bytewise(data: bytes, **kw: int) -> tuple[proxy.Header, bytes]:
    """Feed one byte at a time; once the header is out, the rest arrives as it would from the socket."""
    parser = ProxyParser(**kw)
    for i in range(len(data)):
        parser.receive_data(data[i : i + 1])
        event = parser.next_event()
        if not isinstance(event, proxy.NeedData):
            parser.receive_data(data[i + 1 :])
            return event, parser.trailing_data
    raise AssertionError("the header never completed")


def parse_error(data: bytes, *, eof: bool = False, **kw: int) -> str:
    parser = ProxyParser(**kw)
    parser.receive_data(data)
    if eof:
        parser.receive_data(b"")
    with pytest.raises(ProxyProtocolError) as info:
        parser.next_event()
    return str(info.value)


# ---------------------------------------------------------------- v1


V1_TCP4 = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 110\r\n"
V1_TCP6 = b"PROXY TCP6 2001:db8::1 2001:db8::2 65535 995\r\n"


@pytest.mark.parametrize("feed", [parse_whole, parse_bytewise])
def test_v1_tcp4_gives_the_real_client_and_leaves_the_pop3_bytes(feed: Feed) -> None:
    event, rest = feed(V1_TCP4 + POP3)
    assert event == Proxied(1, Family.TCP4, addr("192.168.0.1", 56324), addr("192.168.0.11", 110))
    assert rest == POP3
    assert str(event.source) == "192.168.0.1:56324"


@pytest.mark.parametrize("feed", [parse_whole, parse_bytewise])
def test_v1_tcp6(feed: Feed) -> None:
    event, rest = feed(V1_TCP6 + POP3)
    assert event == Proxied(1, Family.TCP6, addr("2001:db8::1", 65535), addr("2001:db8::2", 995))
    assert rest == POP3
    assert str(event.destination) == "[2001:db8::2]:995"


def test_v1_header_alone_leaves_nothing() -> None:
    assert parse_whole(V1_TCP4)[1] == b""


def test_v1_unknown_keeps_the_socket_address_and_ignores_the_rest_of_its_line() -> None:
    assert parse_whole(b"PROXY UNKNOWN\r\n" + POP3) == (Unknown(1), POP3)
    assert parse_whole(b"PROXY UNKNOWN whatever the proxy says\r\n+OK") == (Unknown(1), b"+OK")


def test_v1_line_of_exactly_107_octets_is_the_longest_accepted() -> None:
    ffff = ":".join(["ffff"] * 8)
    longest = f"PROXY UNKNOWN {ffff} {ffff} 65535 65535\r\n".encode()
    assert len(longest) == 107
    assert parse_whole(longest + b"x") == (Unknown(1), b"x")
    tcp6 = f"PROXY TCP6 {ffff} {ffff} 65535 65535\r\n".encode()
    assert parse_bytewise(tcp6)[0] == Proxied(1, Family.TCP6, addr(ffff, 65535), addr(ffff, 65535))


def test_v1_line_over_107_octets_is_refused_without_waiting_for_its_end() -> None:
    ffff = ":".join(["ffff"] * 8)
    too_long = f"PROXY UNKNOWN {ffff} {ffff} 65535 6553511".encode()
    assert len(too_long) == 107  # no LF within the first 107 octets
    assert "longer than 107" in parse_error(too_long)
    parser = ProxyParser()
    parser.receive_data(too_long[:106])
    assert parser.next_event() is NEED_DATA
    parser.receive_data(b"5" * 10_000)
    with pytest.raises(ProxyProtocolError):
        parser.next_event()


@pytest.mark.parametrize(
    "line",
    [
        b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 110\n",  # bare LF
        b"PROXY TCP4 192.168.0.1 192.168.0.11 56324\r\n",  # a port missing
        b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 110 7\r\n",  # one field too many
        b"PROXY TCP4  192.168.0.1 192.168.0.11 56324 110\r\n",  # two spaces
        b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 110 \r\n",  # trailing space
        b"PROXY TCP4 2001:db8::1 192.168.0.11 56324 110\r\n",  # family mismatch
        b"PROXY TCP6 192.168.0.1 2001:db8::2 56324 110\r\n",  # family mismatch
        b"PROXY TCP6 fe80::1%eth0 2001:db8::2 56324 110\r\n",  # scoped address
        b"PROXY TCP4 192.168.000.1 192.168.0.11 56324 110\r\n",  # leading zeros in an octet
        b"PROXY TCP4 192.168.0.1 192.168.0.256 56324 110\r\n",
        b"PROXY TCP4 192.168.0.1 192.168.0.11 65536 110\r\n",  # port out of range
        b"PROXY TCP4 192.168.0.1 192.168.0.11 056324 110\r\n",  # leading zero
        b"PROXY TCP4 192.168.0.1 192.168.0.11 0110 110\r\n",
        b"PROXY TCP4 192.168.0.1 192.168.0.11 -1 110\r\n",
        b"PROXY TCP4 192.168.0.1 192.168.0.11 +1 110\r\n",
        b"PROXY TCP4 192.168.0.1 192.168.0.11  110\r\n",  # empty port
        b"PROXY TCP4 \xc3\xa9.0.0.1 192.168.0.11 1 110\r\n",  # not ASCII
        b"PROXY TCP5 192.168.0.1 192.168.0.11 56324 110\r\n",
        b"PROXY tcp4 192.168.0.1 192.168.0.11 56324 110\r\n",
        b"PROXY \r\n",
        b"PROXY\r\n",
        b"proxy TCP4 192.168.0.1 192.168.0.11 56324 110\r\n",
    ],
)
def test_malformed_v1_lines_are_refused(line: bytes) -> None:
    parse_error(line)


def test_v1_port_zero_is_a_port() -> None:
    event, _ = parse_whole(b"PROXY TCP4 10.0.0.1 10.0.0.2 0 110\r\n")
    assert isinstance(event, Proxied) and event.source.port == 0


# ---------------------------------------------------------------- v2


def v2(command: int, family: int, body: bytes, *, version: int = 2) -> bytes:
    return proxy.V2_SIGNATURE + bytes([version << 4 | command, family]) + len(body).to_bytes(2, "big") + body


INET_BLOCK = bytes([10, 0, 0, 1, 10, 0, 0, 2]) + (40000).to_bytes(2, "big") + (110).to_bytes(2, "big")
TLVS = (Tlv(proxy.PP2_TYPE_AUTHORITY, b"mail.example.org"), Tlv(proxy.PP2_TYPE_UNIQUE_ID, b"\x01\x02"))


@pytest.mark.parametrize("feed", [parse_whole, parse_bytewise])
def test_v2_proxy_tcp4_with_tlvs(feed: Feed) -> None:
    header = proxy.format_v2(addr("10.0.0.1", 40000), addr("10.0.0.2", 110), TLVS)
    assert header == v2(1, 0x11, INET_BLOCK + b"\x02\x00\x10mail.example.org\x05\x00\x02\x01\x02")
    event, rest = feed(header + POP3)
    assert event == Proxied(2, Family.TCP4, addr("10.0.0.1", 40000), addr("10.0.0.2", 110), TLVS)
    assert rest == POP3
    assert isinstance(event, Proxied)
    assert event.tlv(proxy.PP2_TYPE_AUTHORITY) == b"mail.example.org"
    assert event.tlv(proxy.PP2_TYPE_ALPN) is None


@pytest.mark.parametrize("feed", [parse_whole, parse_bytewise])
def test_v2_proxy_tcp6(feed: Feed) -> None:
    header = proxy.format_v2(addr("2001:db8::1", 1), addr("::ffff:10.0.0.2", 995))
    assert header[13] == 0x21 and len(header) == 16 + 36
    event, rest = feed(header + POP3)
    assert event == Proxied(2, Family.TCP6, addr("2001:db8::1", 1), addr("::ffff:10.0.0.2", 995))
    assert rest == POP3


@pytest.mark.parametrize("feed", [parse_whole, parse_bytewise])
def test_v2_local_discards_its_address_block_and_tlvs(feed: Feed) -> None:
    header = proxy.format_v2(addr("10.0.0.1", 40000), addr("10.0.0.2", 110), TLVS, local=True)
    assert header[12] == 0x20
    assert feed(header + POP3) == (Local(), POP3)
    # LOCAL ignores the family byte entirely, even one we would refuse for PROXY
    assert feed(v2(0, 0xFF, b"\x00" * 5) + POP3) == (Local(), POP3)


def test_v2_unspec_and_unix_families_keep_the_socket_address() -> None:
    assert parse_whole(proxy.format_v2(None, None) + POP3) == (Unknown(2), POP3)
    unix = v2(
        1, 0x31, b"/run/a.sock".ljust(108, b"\x00") + b"/run/b.sock".ljust(108, b"\x00") + b"\x04\x00\x00"
    )
    assert parse_whole(unix + POP3) == (Unknown(2, (Tlv(proxy.PP2_TYPE_NOOP, b""),)), POP3)


def test_v2_checksum_is_verified() -> None:
    good = proxy.format_v2(addr("10.0.0.1", 40000), addr("10.0.0.2", 110), TLVS, checksum=True)
    event, _ = parse_whole(good)
    assert isinstance(event, Proxied) and event.tlv(proxy.PP2_TYPE_CRC32C) == good[-4:]
    bad = good[:-1] + bytes([good[-1] ^ 1])
    assert "CRC32C" in parse_error(bad)
    tampered = good[:16] + bytes([11]) + good[17:]  # the source address changed in transit
    assert "CRC32C" in parse_error(tampered)
    assert "not 4 octets" in parse_error(v2(1, 0x11, INET_BLOCK + b"\x03\x00\x02\x00\x00"))


def test_crc32c_known_answer() -> None:
    assert proxy.crc32c(b"123456789") == 0xE3069283


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (v2(1, 0x11, INET_BLOCK, version=1), "version"),
        (v2(2, 0x11, INET_BLOCK), "command"),
        (v2(1, 0x41, INET_BLOCK), "family"),
        (v2(1, 0x13, INET_BLOCK), "family"),
        (v2(1, 0x12, INET_BLOCK), "stream"),  # UDP
        (v2(1, 0x10, INET_BLOCK), "stream"),
        (v2(1, 0x11, INET_BLOCK[:11]), "shorter"),
        (v2(1, 0x21, INET_BLOCK), "shorter"),
        (v2(1, 0x11, INET_BLOCK + b"\x02\x00"), "truncated"),
        (v2(1, 0x11, INET_BLOCK + b"\x02\x00\x05abc"), "longer"),
    ],
)
def test_malformed_v2_headers_are_refused(header: bytes, reason: str) -> None:
    assert reason in parse_error(header + POP3)


def test_v2_length_over_the_cap_is_refused_before_its_bytes_arrive() -> None:
    parser = ProxyParser(max_v2_length=64)
    parser.receive_data(proxy.V2_SIGNATURE + b"\x21\x11\x00\x41")  # announces 65 octets
    with pytest.raises(ProxyProtocolError, match="more than 64"):
        parser.next_event()
    at_cap = proxy.format_v2(addr("10.0.0.1", 1), addr("10.0.0.2", 2), (Tlv(0xE0, b"x" * 49),))
    assert len(at_cap) == 16 + 64
    assert parse_whole(at_cap, max_v2_length=64)[0].version == 2


def test_v2_length_cap_must_fit_the_length_field() -> None:
    with pytest.raises(ValueError):
        ProxyParser(max_v2_length=0x10000)
    with pytest.raises(ValueError):
        ProxyParser(max_v2_length=-1)


# ---------------------------------------------------------------- neither, truncation, misuse


@pytest.mark.parametrize(
    "data",
    [
        b"USER alice\r\n",
        b"\x16\x03\x01\x02\x00",  # a TLS ClientHello
        b"GET / HTTP/1.1\r\n",
        b"PROXZ",
        b"\r\n\r\n\x00\r\nQUIX",
        b"\r\r",
        b"\x00",
    ],
)
def test_bytes_that_are_no_proxy_header_are_refused_at_once(data: bytes) -> None:
    assert "not a PROXY protocol header" in parse_error(data)


@pytest.mark.parametrize(
    "data",
    [
        b"P",
        b"PRO",
        b"PROXY TCP4 192.168.0.1",
        V1_TCP4[:-1],
        proxy.V2_SIGNATURE[:5],
        proxy.V2_SIGNATURE + b"\x21\x11",
        proxy.format_v2(addr("10.0.0.1", 1), addr("10.0.0.2", 2))[:-1],
    ],
)
def test_truncated_headers_need_data_then_fail_at_eof(data: bytes) -> None:
    parser = ProxyParser()
    parser.receive_data(data)
    assert parser.next_event() is NEED_DATA
    assert repr(NEED_DATA) == "NEED_DATA"
    assert parser.header is None
    with pytest.raises(proxy.LocalProtocolError):
        _ = parser.trailing_data
    parser.receive_data(b"")
    with pytest.raises(ProxyProtocolError, match="closed before"):
        parser.next_event()


def test_a_peer_that_closes_at_once_sent_no_header() -> None:
    assert "closed before" in parse_error(b"", eof=True)


def test_errors_are_sticky() -> None:
    parser = ProxyParser()
    parser.receive_data(b"GET /")
    with pytest.raises(ProxyProtocolError):
        parser.next_event()
    parser.receive_data(V1_TCP4)
    with pytest.raises(ProxyProtocolError):
        parser.next_event()


def test_asking_twice_is_our_own_misuse_and_later_bytes_stay_trailing() -> None:
    parser = ProxyParser()
    parser.receive_data(V1_TCP4 + b"CAPA\r\n")
    header = parser.next_event()
    assert parser.header == header
    with pytest.raises(proxy.LocalProtocolError):
        parser.next_event()
    parser.receive_data(b"QUIT\r\n")
    assert parser.trailing_data == b"CAPA\r\nQUIT\r\n"


def test_formatters_refuse_mixed_families() -> None:
    with pytest.raises(ValueError):
        proxy.format_v1(addr("10.0.0.1", 1), addr("::1", 2))
    with pytest.raises(ValueError):
        proxy.format_v2(addr("10.0.0.1", 1), addr("::1", 2))
    assert proxy.format_v1(None, None) == b"PROXY UNKNOWN\r\n"


# ---------------------------------------------------------------- properties

ipv4 = st.builds(ipaddress.IPv4Address, st.integers(0, 2**32 - 1))
ipv6 = st.builds(ipaddress.IPv6Address, st.integers(0, 2**128 - 1))
ports = st.integers(0, 65535)
tlv_lists = st.lists(
    st.builds(Tlv, st.integers(0, 255).filter(lambda t: t != proxy.PP2_TYPE_CRC32C), st.binary(max_size=40)),
    max_size=5,
).map(tuple)


@st.composite
def endpoints(draw: st.DrawFn) -> tuple[Address, Address]:
    ips = draw(st.one_of(st.tuples(ipv4, ipv4), st.tuples(ipv6, ipv6)))
    return Address(ips[0], draw(ports)), Address(ips[1], draw(ports))


@given(endpoints(), st.binary(max_size=50), st.integers(0, 200))
def test_v1_format_parse_round_trip_split_anywhere(
    ends: tuple[Address, Address], rest: bytes, cut: int
) -> None:
    source, destination = ends
    data = proxy.format_v1(source, destination) + rest
    parser = ProxyParser()
    if data[:cut]:  # receive_data(b"") would mean the peer closed
        parser.receive_data(data[:cut])
    event = parser.next_event()
    if event is NEED_DATA:
        parser.receive_data(data[cut:])
        event = parser.next_event()
    elif data[cut:]:
        parser.receive_data(data[cut:])
    family = Family.TCP4 if source.ip.version == 4 else Family.TCP6
    assert event == Proxied(1, family, source, destination)
    assert parser.trailing_data == rest


@given(endpoints(), tlv_lists, st.booleans(), st.binary(max_size=50), st.integers(0, 400))
def test_v2_format_parse_round_trip_split_anywhere(
    ends: tuple[Address, Address], tlvs: tuple[Tlv, ...], checksum: bool, rest: bytes, cut: int
) -> None:
    source, destination = ends
    header = proxy.format_v2(source, destination, tlvs, checksum=checksum)
    data = header + rest
    parser = ProxyParser()
    if data[:cut]:  # receive_data(b"") would mean the peer closed
        parser.receive_data(data[:cut])
    event = parser.next_event()
    if event is NEED_DATA:
        parser.receive_data(data[cut:])
        event = parser.next_event()
    elif data[cut:]:
        parser.receive_data(data[cut:])
    assert isinstance(event, Proxied)
    assert (event.source, event.destination) == (source, destination)
    expected = tlvs + ((Tlv(proxy.PP2_TYPE_CRC32C, header[-4:]),) if checksum else ())
    assert event.tlvs == expected
    assert parser.trailing_data == rest


def _run_to_result(chunks: list[bytes], eof: bool) -> None:
    parser = ProxyParser(max_v2_length=300)
    for chunk in chunks:
        if chunk:
            parser.receive_data(chunk)
        try:
            event = parser.next_event()
        except ProxyProtocolError:
            return
        if event is not NEED_DATA:
            assert isinstance(event, Proxied | Local | Unknown)
            assert isinstance(parser.trailing_data, bytes)
            return
    if eof:
        parser.receive_data(b"")
        with pytest.raises(ProxyProtocolError):
            parser.next_event()


@given(st.lists(st.binary(max_size=120), max_size=6), st.booleans())
def test_any_bytes_give_a_header_or_our_error(chunks: list[bytes], eof: bool) -> None:
    _run_to_result(chunks, eof)


@given(
    st.sampled_from([b"PROXY ", b"PROXY TCP4 ", b"PROXY TCP6 ", proxy.V2_SIGNATURE + b"\x21"]),
    st.lists(st.binary(max_size=120), max_size=6),
    st.booleans(),
)
def test_any_bytes_after_a_valid_start_give_a_header_or_our_error(
    start: bytes, chunks: list[bytes], eof: bool
) -> None:
    _run_to_result([start, *chunks], eof)


@given(st.sampled_from([0x11, 0x21, 0x31, 0x00, 0x12]), st.binary(max_size=260))
def test_any_v2_body_gives_a_header_or_our_error(family: int, body: bytes) -> None:
    _run_to_result([v2(1, family, body)], True)
