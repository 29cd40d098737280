"""Sans-IO receiver for the PROXY protocol, versions 1 and 2 (HAProxy's ``proxy-protocol.txt``).

A load balancer that terminates nothing but TCP puts one PROXY header in front of the client's bytes, so
the server learns the real client address. Use::

    parser = ProxyParser()
    parser.receive_data(data)              # b"" means the peer closed
    event = parser.next_event()            # raises ProxyProtocolError on a bad header
    NEED_DATA -> read more (the shell bounds the wait)
    Proxied   -> the real client is ``event.source``
    Local | Unknown -> no client address (a health check, or a family we do not carry): the shell
                       (``gateway.proxied``) treats the client as unknown, never as the proxy itself
    first_pop3_bytes = parser.trailing_data

Invariants:

- The header is consumed exactly: ``trailing_data`` is every byte received after it, untouched (the
  client's first POP3 bytes). Nothing after the header is parsed or searched.
- Which version is decided from the first byte (``P`` or CR); a byte that can start neither is an error
  at once, and a prefix that stops matching ``PROXY `` or the v2 signature is an error at once.
- Bounded: a v1 line is at most 107 octets including CRLF (the spec's maximum); a v2 header is 16 octets
  plus at most ``max_v2_length`` (the 16-bit length field is checked before its bytes are awaited).
  The LF search of v1 resumes where it stopped: the buffer is never rescanned.
- Whether a peer may send a header at all (trusted networks) is the shell's decision, not this core's.
- Every malformed input raises ``ProxyProtocolError`` (a ``common.RemoteProtocolError``); its text is
  for logs, never for a client. After an error the parser stays failed. Calling ``next_event()`` again
  after the header was returned is our own misuse: ``common.LocalProtocolError``.
- A v2 header that carries a CRC32C TLV is checked against it (the spec's MUST for receivers that
  support it).
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
from typing import Final

from gateway.proto.common import NEED_DATA as NEED_DATA
from gateway.proto.common import LocalProtocolError as LocalProtocolError
from gateway.proto.common import NeedData as NeedData
from gateway.proto.common import RemoteProtocolError

V1_PREFIX: Final = b"PROXY "
V1_MAX_LENGTH: Final = 107  # "PROXY UNKNOWN ffff:...:ffff ffff:...:ffff 65535 65535\r\n"
V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED_LENGTH: Final = 16  # signature, version/command, family/transport, 2-octet length
DEFAULT_MAX_V2_LENGTH: Final = 1024  # octets after the fixed 16: addresses (at most 216) plus TLVs

# TLV types (section 2.2)
PP2_TYPE_ALPN: Final = 0x01
PP2_TYPE_AUTHORITY: Final = 0x02
PP2_TYPE_CRC32C: Final = 0x03
PP2_TYPE_NOOP: Final = 0x04
PP2_TYPE_UNIQUE_ID: Final = 0x05
PP2_TYPE_SSL: Final = 0x20
PP2_TYPE_NETNS: Final = 0x30

_CMD_LOCAL: Final = 0x0
_CMD_PROXY: Final = 0x1
_AF_UNSPEC, _AF_INET, _AF_INET6, _AF_UNIX = 0x0, 0x1, 0x2, 0x3
_STREAM: Final = 0x1
_ADDRESS_LENGTH: Final = {_AF_UNSPEC: 0, _AF_INET: 12, _AF_INET6: 36, _AF_UNIX: 216}


class ProxyProtocolError(RemoteProtocolError):
    """The peer sent no valid PROXY header. The connection must be closed without a reply."""


class Family(enum.Enum):
    TCP4 = "TCP4"
    TCP6 = "TCP6"


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclasses.dataclass(frozen=True, slots=True)
class Address:
    ip: IPAddress
    port: int

    def __str__(self) -> str:
        return f"[{self.ip}]:{self.port}" if self.ip.version == 6 else f"{self.ip}:{self.port}"


@dataclasses.dataclass(frozen=True, slots=True)
class Tlv:
    type: int
    value: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class Proxied:
    """A proxied TCP connection: ``source`` is the real client, ``destination`` the address it dialled."""

    version: int
    family: Family
    source: Address
    destination: Address
    tlvs: tuple[Tlv, ...] = ()

    def tlv(self, type_: int) -> bytes | None:
        return next((t.value for t in self.tlvs if t.type == type_), None)


@dataclasses.dataclass(frozen=True, slots=True)
class Local:
    """v2 LOCAL: the proxy speaks for itself (a health check). The client's address is unknown."""

    version: int = 2


@dataclasses.dataclass(frozen=True, slots=True)
class Unknown:
    """v1 UNKNOWN, or v2 PROXY over a family we do not carry (UNSPEC, UNIX): the address is unknown."""

    version: int
    tlvs: tuple[Tlv, ...] = ()


Header = Proxied | Local | Unknown


class ProxyParser:
    def __init__(self, *, max_v2_length: int = DEFAULT_MAX_V2_LENGTH) -> None:
        if not 0 <= max_v2_length <= 0xFFFF:
            raise ValueError("max_v2_length must be within 0..65535")
        self.max_v2_length = max_v2_length
        self._buf = bytearray()
        self._scan_from = 0
        self._eof = False
        self._error: str | None = None
        self._header: Header | None = None

    def receive_data(self, data: bytes) -> None:
        if not data:
            self._eof = True
        else:
            self._buf += data

    @property
    def header(self) -> Header | None:
        """The header once ``next_event()`` has returned it."""
        return self._header

    @property
    def trailing_data(self) -> bytes:
        """The bytes received after the header (only meaningful once the header was returned)."""
        if self._header is None:
            raise LocalProtocolError("no PROXY header parsed yet")
        return bytes(self._buf)

    def next_event(self) -> Header | NeedData:
        if self._error is not None:
            raise ProxyProtocolError(self._error)
        if self._header is not None:
            raise LocalProtocolError("the PROXY header was already returned")
        try:
            event = self._parse()
            if event is NEED_DATA and self._eof:
                raise ProxyProtocolError("connection closed before the PROXY header was complete")
        except ProxyProtocolError as exc:
            self._error = str(exc)
            self._buf.clear()
            raise
        if not isinstance(event, NeedData):
            self._header = event
        return event

    def _parse(self) -> Header | NeedData:
        buf = self._buf
        if not buf:
            return NEED_DATA
        if buf[0] == V1_PREFIX[0]:
            return self._parse_v1()
        if buf[0] == V2_SIGNATURE[0]:
            return self._parse_v2()
        raise ProxyProtocolError("not a PROXY protocol header")

    def _parse_v1(self) -> Header | NeedData:
        buf = self._buf
        n = min(len(buf), len(V1_PREFIX))
        if buf[:n] != V1_PREFIX[:n]:
            raise ProxyProtocolError("not a PROXY protocol header")
        lf = buf.find(b"\n", self._scan_from, V1_MAX_LENGTH)
        if lf < 0:
            if len(buf) >= V1_MAX_LENGTH:
                raise ProxyProtocolError("v1 header longer than 107 octets")
            self._scan_from = len(buf)
            return NEED_DATA
        if buf[lf - 1] != 0x0D:
            raise ProxyProtocolError("v1 header does not end with CRLF")
        line = bytes(buf[: lf - 1])
        del buf[: lf + 1]
        return _parse_v1_line(line)

    def _parse_v2(self) -> Header | NeedData:
        buf = self._buf
        n = min(len(buf), len(V2_SIGNATURE))
        if buf[:n] != V2_SIGNATURE[:n]:
            raise ProxyProtocolError("not a PROXY protocol header")
        if len(buf) < V2_FIXED_LENGTH:
            return NEED_DATA
        version, command = buf[12] >> 4, buf[12] & 0x0F
        if version != 2:
            raise ProxyProtocolError(f"unsupported v2 version nibble {version}")
        if command not in (_CMD_LOCAL, _CMD_PROXY):
            raise ProxyProtocolError(f"unsupported v2 command {command}")
        length = int.from_bytes(buf[14:16], "big")
        if length > self.max_v2_length:
            raise ProxyProtocolError(f"v2 header announces {length} octets, more than {self.max_v2_length}")
        if len(buf) < V2_FIXED_LENGTH + length:
            return NEED_DATA
        header = bytes(buf[: V2_FIXED_LENGTH + length])
        del buf[: V2_FIXED_LENGTH + length]
        if command == _CMD_LOCAL:
            return Local()  # the spec: discard the address block, whatever its family
        return _parse_v2_proxy(header)


def _parse_v1_line(line: bytes) -> Header:
    parts = line.split(b" ")
    protocol = parts[1]  # the prefix check guarantees "PROXY " at the start, so there are >= 2 parts
    if protocol == b"UNKNOWN":
        return Unknown(1)  # the spec: ignore whatever else the line holds
    if protocol not in (b"TCP4", b"TCP6"):
        raise ProxyProtocolError("v1 protocol is not TCP4, TCP6 or UNKNOWN")
    if len(parts) != 6:
        raise ProxyProtocolError("v1 header needs source, destination and two ports, one space apart")
    family = Family(protocol.decode("ascii"))
    source = Address(_v1_ip(parts[2], family), _v1_port(parts[4]))
    destination = Address(_v1_ip(parts[3], family), _v1_port(parts[5]))
    return Proxied(1, family, source, destination)


def _v1_ip(raw: bytes, family: Family) -> IPAddress:
    try:
        text = raw.decode("ascii")
        if family is Family.TCP4:
            return ipaddress.IPv4Address(text)
        if "%" in text:
            raise ValueError("scoped address")
        return ipaddress.IPv6Address(text)
    except ValueError:  # UnicodeDecodeError and AddressValueError are ValueErrors
        raise ProxyProtocolError(f"v1 address is not a valid {family.value} address") from None


def _v1_port(raw: bytes) -> int:
    if not (1 <= len(raw) <= 5 and raw.isdigit()) or (len(raw) > 1 and raw.startswith(b"0")):
        raise ProxyProtocolError("v1 port is not a decimal number without leading zeros")
    port = int(raw)
    if port > 0xFFFF:
        raise ProxyProtocolError("v1 port out of range")
    return port


def _parse_v2_proxy(header: bytes) -> Header:
    family, transport = header[13] >> 4, header[13] & 0x0F
    if family not in _ADDRESS_LENGTH or transport > 2:
        raise ProxyProtocolError(f"unsupported v2 address family/transport 0x{header[13]:02x}")
    address_end = V2_FIXED_LENGTH + _ADDRESS_LENGTH[family]
    if len(header) < address_end:
        raise ProxyProtocolError("v2 address block shorter than its family needs")
    tlvs = _parse_tlvs(header, address_end)
    if family in (_AF_UNSPEC, _AF_UNIX):
        return Unknown(2, tlvs)
    if transport != _STREAM:
        raise ProxyProtocolError("v2 header is not for a stream (TCP) connection")
    block = header[V2_FIXED_LENGTH:address_end]
    size = 4 if family == _AF_INET else 16
    make = ipaddress.IPv4Address if family == _AF_INET else ipaddress.IPv6Address
    source = Address(make(block[:size]), int.from_bytes(block[2 * size : 2 * size + 2], "big"))
    destination = Address(make(block[size : 2 * size]), int.from_bytes(block[2 * size + 2 :], "big"))
    return Proxied(2, Family.TCP4 if family == _AF_INET else Family.TCP6, source, destination, tlvs)


def _parse_tlvs(header: bytes, start: int) -> tuple[Tlv, ...]:
    tlvs: list[Tlv] = []
    pos = start
    while pos < len(header):
        if pos + 3 > len(header):
            raise ProxyProtocolError("v2 TLV truncated")
        length = int.from_bytes(header[pos + 1 : pos + 3], "big")
        if pos + 3 + length > len(header):
            raise ProxyProtocolError("v2 TLV longer than the header")
        tlvs.append(Tlv(header[pos], header[pos + 3 : pos + 3 + length]))
        if header[pos] == PP2_TYPE_CRC32C:
            _check_crc32c(header, pos + 3, length)
        pos += 3 + length
    return tuple(tlvs)


def _check_crc32c(header: bytes, value_at: int, length: int) -> None:
    if length != 4:
        raise ProxyProtocolError("v2 CRC32C TLV is not 4 octets")
    zeroed = header[:value_at] + b"\x00\x00\x00\x00" + header[value_at + 4 :]
    if crc32c(zeroed) != int.from_bytes(header[value_at : value_at + 4], "big"):
        raise ProxyProtocolError("v2 CRC32C checksum mismatch")


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return tuple(table)


_CRC32C_TABLE: Final = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), as the v2 CRC32C TLV carries it."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


# ---------------------------------------------------------------- formatting (what a proxy sends)


def format_v1(source: Address | None, destination: Address | None) -> bytes:
    """A v1 header; with no addresses, ``PROXY UNKNOWN``."""
    if source is None or destination is None:
        return b"PROXY UNKNOWN\r\n"
    if source.ip.version != destination.ip.version:
        raise ValueError("source and destination must be of one family")
    family = "TCP4" if source.ip.version == 4 else "TCP6"
    return f"PROXY {family} {source.ip} {destination.ip} {source.port} {destination.port}\r\n".encode()


def format_v2(
    source: Address | None,
    destination: Address | None,
    tlvs: tuple[Tlv, ...] = (),
    *,
    local: bool = False,
    checksum: bool = False,
) -> bytes:
    """A v2 header: PROXY over TCP4/TCP6 (UNSPEC without addresses), or LOCAL; ``checksum`` adds CRC32C."""
    if source is None or destination is None:
        family, block = _AF_UNSPEC << 4, b""
    else:
        if source.ip.version != destination.ip.version:
            raise ValueError("source and destination must be of one family")
        family = ((_AF_INET if source.ip.version == 4 else _AF_INET6) << 4) | _STREAM
        block = (
            source.ip.packed
            + destination.ip.packed
            + source.port.to_bytes(2, "big")
            + destination.port.to_bytes(2, "big")
        )
    body = block + b"".join(bytes([t.type]) + len(t.value).to_bytes(2, "big") + t.value for t in tlvs)
    if checksum:
        body += bytes([PP2_TYPE_CRC32C]) + (4).to_bytes(2, "big") + b"\x00" * 4
    command = _CMD_LOCAL if local else _CMD_PROXY
    header = V2_SIGNATURE + bytes([0x20 | command, family]) + len(body).to_bytes(2, "big") + body
    if checksum:
        header = header[:-4] + crc32c(header).to_bytes(4, "big")
    return header
