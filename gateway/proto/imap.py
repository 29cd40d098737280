"""Sans-IO IMAP4rev1 / IMAP4rev2 client protocol (RFC 3501, RFC 9051).

Bytes in, events out; commands in, bytes out. No I/O, no clocks, no logging: the trio shell owns the
socket and feeds this core.

Reading (``ResponseParser``, also reachable through ``Client``)::

    client.receive_data(data)            # b"" means the server closed the connection
    while not isinstance(event := client.next_event(), NeedData):
        ...                              # Tagged, UntaggedStatus, Fetch, FetchBodyChunk, ...

Invariants of the reader:

- A response is read segment by segment: a segment is the non-literal text up to LF (a CR before the LF
  is dropped; a bare LF is tolerated). A segment that ends in ``{n}``, ``{n+}`` or ``~{n}`` in a value
  position is followed by exactly n bytes of literal that are never searched, then by the next segment
  of the same response. Status lines (``OK``/``NO``/``BAD``/``BYE``/``PREAUTH``) and ``+`` lines are text:
  a ``{5}`` at their end is not a literal.
- Nothing is parsed ahead of ``next_event()``: events come out in the same order and with the same
  values however the bytes were split across ``receive_data`` calls, except that one streamed body
  literal may arrive as more or fewer ``FetchBodyChunk`` events.
- Every buffer is capped: the non-literal bytes of one response (``max_line_length``), the buffered
  literal bytes of one response (``max_literal_size``), list nesting (``max_depth``) and the number of
  values in one response (``max_items``). The LF search resumes where the previous one stopped, so a
  long line is scanned once. Only streamed message bodies are unbounded, and they are never buffered.
- Streaming: inside ``* n FETCH (...)``, the value of a ``BODY[...]``, ``BINARY[...]``, ``RFC822``,
  ``RFC822.TEXT`` or ``RFC822.HEADER`` item is delivered as ``FetchBodyStart(seq, item, size)``, then
  ``FetchBodyChunk`` events (each at most the bytes buffered at that moment), then ``FetchBodyEnd()``.
  A quoted-string body gets the same three events (one chunk, none when empty) so a consumer has one
  path; a ``NIL`` body gets none. In the final ``Fetch`` event the streamed item's value is
  ``Streamed(size)`` (``None`` for NIL). The other items (UID may come before or after the body) are
  in ``Fetch.items``.
- Any peer mistake raises ``ImapProtocolError`` (a ``common.RemoteProtocolError``); after that the
  reader stays failed. Our own misuse raises ``common.LocalProtocolError``. ``NEED_DATA``/``NeedData``
  are ``common``'s, re-exported here.

Writing (``Client``)::

    tag, data = client.send_command("UID FETCH", sequence_set(uids), Raw("(UID RFC822.SIZE)"))

``str``/``bytes`` arguments are always sent as IMAP strings, never as atoms: a quoted string when every
byte is printable ASCII, else a literal. With LITERAL+ (or LITERAL- and at most 4096 bytes) literals
are ``{n+}`` and ``data`` is the whole command. Otherwise the command is cut after each synchronising
``{n}``: ``send_command`` returns the first part, ``client.awaiting_continuation`` is true, and once
``next_event()`` has returned the server's ``Continuation`` the caller writes
``client.continue_command()``, once per literal. A tagged reply to that command instead of ``+`` (NO or
BAD) drops the rest of it. NUL cannot be sent in a string: such a value raises ``LocalProtocolError``
(as does a ``str`` that is not valid Unicode). AUTHENTICATE challenges are answered with
``client.authenticate_response(base64)``. LOGIN is refused once the server announced LOGINDISABLED. On
STARTTLS's OK the plaintext capabilities are forgotten, and bytes already buffered behind that OK (an
injection before the handshake) are an ``ImapProtocolError``.

Which command is legal in which ``State`` is the table ``_LEGAL_STATES`` below; the state moves only on
the server's replies, so commands that depend on a state change (SELECT after LOGIN) wait for its reply.
"""

from __future__ import annotations

import base64
import enum
import re
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final, TypeAlias, assert_never

from gateway.proto.common import NEED_DATA as NEED_DATA
from gateway.proto.common import LocalProtocolError as LocalProtocolError
from gateway.proto.common import NeedData as NeedData
from gateway.proto.common import RemoteProtocolError

DEFAULT_MAX_LINE_LENGTH: Final = 64 * 1024
DEFAULT_MAX_LITERAL_SIZE: Final = 1024 * 1024
DEFAULT_MAX_DEPTH: Final = 64
DEFAULT_MAX_ITEMS: Final = 20_000
MAX_UID: Final = 0xFFFFFFFF  # UIDs and UIDVALIDITY are nz-number: 1 .. 2**32-1 (RFC 9051 section 9)
LITERAL_MINUS_MAX: Final = 4096  # RFC 7888: LITERAL- allows {n+} only up to this size


class ImapProtocolError(RemoteProtocolError):
    """The server broke the protocol (malformed response, a cap exceeded, a reply to an unsent tag).

    The connection is unusable afterwards. ``str(exc)`` is for logs only, never for a client.
    """


# --------------------------------------------------------------------------------------------------
# Values


@dataclass(frozen=True, slots=True)
class Atom:
    """An IMAP atom: a parsed one (``\\Seen``, ``BODY[]``), or one to send verbatim (``1:*``)."""

    value: str

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True, slots=True)
class Raw:
    """Command text sent verbatim, e.g. ``Raw("(UID RFC822.SIZE)")``: printable ASCII, no ``{``."""

    value: str


@dataclass(frozen=True, slots=True)
class Streamed:
    """Stands in ``Fetch.items`` for a body that was delivered as FetchBody* events."""

    size: int


# A parsed value: number -> int, quoted string or literal -> bytes, NIL -> None, list -> tuple.
Value: TypeAlias = "int | bytes | Atom | Streamed | tuple[Value, ...] | None"
# A command argument: str/bytes are sent as IMAP strings, lists as parenthesised lists, None as NIL.
Arg: TypeAlias = "str | bytes | int | Atom | Raw | list[Arg] | tuple[Arg, ...] | None"


class Condition(enum.Enum):
    OK = "OK"
    NO = "NO"
    BAD = "BAD"
    BYE = "BYE"
    PREAUTH = "PREAUTH"


@dataclass(frozen=True, slots=True)
class ResponseCode:
    """``[NAME raw]`` of a status response; ``name`` is upper-case, ``raw`` the bytes after it."""

    name: str
    raw: bytes = b""

    def int_value(self) -> int:
        """The number of ``[UIDVALIDITY n]``, ``[UIDNEXT n]``, ``[UNSEEN n]``, ``[HIGHESTMODSEQ n]``."""
        if _NUMBER_RE.fullmatch(self.raw) is None:
            raise ImapProtocolError(f"response code {self.name} does not carry a number")
        return int(self.raw)

    def values(self) -> tuple[Value, ...]:
        """The arguments parsed as values, e.g. ``[PERMANENTFLAGS (\\Seen \\*)]``, ``[APPENDUID 1 5]``."""
        builder = _Builder(
            fetch_seq=None, sink=deque(), max_depth=DEFAULT_MAX_DEPTH, max_items=DEFAULT_MAX_ITEMS
        )
        if builder.feed(self.raw, 0) is not None:
            raise ImapProtocolError("a literal inside a response code")
        return builder.result()


# --------------------------------------------------------------------------------------------------
# Events


@dataclass(frozen=True, slots=True)
class Tagged:
    tag: str
    condition: Condition  # OK, NO or BAD
    code: ResponseCode | None
    text: str


@dataclass(frozen=True, slots=True)
class UntaggedStatus:
    condition: Condition
    code: ResponseCode | None
    text: str


@dataclass(frozen=True, slots=True)
class Continuation:
    data: bytes  # the text after "+ " (a base64 challenge during AUTHENTICATE)


@dataclass(frozen=True, slots=True)
class Capability:
    capabilities: frozenset[str]  # upper-case


@dataclass(frozen=True, slots=True)
class Exists:
    count: int


@dataclass(frozen=True, slots=True)
class Search:
    numbers: tuple[int, ...]
    modseq: int | None


@dataclass(frozen=True, slots=True)
class Fetch:
    seq: int
    items: dict[str, Value]  # upper-case item names; a streamed body maps to Streamed(size)

    @property
    def uid(self) -> int | None:
        value = self.items.get("UID")
        return value if isinstance(value, int) else None

    @property
    def rfc822_size(self) -> int | None:
        value = self.items.get("RFC822.SIZE")
        return value if isinstance(value, int) else None

    @property
    def flags(self) -> tuple[str, ...] | None:
        value = self.items.get("FLAGS")
        return _atoms(value, "FLAGS") if isinstance(value, tuple) else None


@dataclass(frozen=True, slots=True)
class FetchBodyStart:
    seq: int
    item: str  # upper-case, e.g. "BODY[]", "BODY[HEADER]", "RFC822", "BINARY[1]<0>"
    size: int
    # The UID when the response named it before the body (as servers do when asked for "(UID BODY[])"),
    # so that a consumer can drop another message's body at once. None when it comes after.
    uid: int | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class FetchBodyChunk:
    data: bytes


@dataclass(frozen=True, slots=True)
class FetchBodyEnd:
    pass


@dataclass(frozen=True, slots=True)
class Untagged:
    """Any other untagged response, e.g. ``* NAMESPACE ...``, ``* 3 XFOO bar``."""

    name: str
    number: int | None
    values: tuple[Value, ...]


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The server closed the connection between two responses."""


Event: TypeAlias = (
    Tagged
    | UntaggedStatus
    | Continuation
    | Capability
    | Exists
    | Search
    | Fetch
    | FetchBodyStart
    | FetchBodyChunk
    | FetchBodyEnd
    | Untagged
    | ConnectionClosed
)


# --------------------------------------------------------------------------------------------------
# Lexical rules

_NUMBER_RE = re.compile(rb"0|[1-9][0-9]{0,19}")
_QUOTED_RE = re.compile(rb'"((?:[^"\\\r\n\x00]++|\\["\\])*+)"')
_UNESCAPE_RE = re.compile(rb'\\(["\\])')
_LITERAL_RE = re.compile(rb"~?\{([0-9]{1,20})\+?\}")
# Atom characters, read leniently (``%``, ``*``, ``\``, ``]`` included for flags and mailbox patterns),
# plus bracketed sections that may hold spaces and parens: BODY[HEADER.FIELDS (FROM)]<0>.
_ATOM_RE = re.compile(rb"(?:[!#-'*-Z\\\]-z|-~]++|\[[ -\\\^-~]*+\])++")
_TAGGED_RE = re.compile(rb"([^\x00-\x20\x7f-\xff(){%*\"\\+]+) (OK|NO|BAD)(?: |\Z)", re.IGNORECASE)
_SIZE_LINE = rb"\* [1-9][0-9]{0,9} FETCH \(UID ([1-9][0-9]{0,9}) RFC822\.SIZE ([0-9]{1,15})\)\r?\n"
_SIZE_FETCH_RE = re.compile(_SIZE_LINE)
_SIZE_FETCH_RUN_RE = re.compile(rb"(?:" + _SIZE_LINE.replace(b"([", b"[").replace(b"})", b"}") + rb")+")
_UNTAGGED_RE = re.compile(rb"(?:(0|[1-9][0-9]{0,19}) )?([A-Za-z][A-Za-z0-9._-]*)(?: |\Z)")
_CODE_RE = re.compile(rb"([A-Za-z0-9][A-Za-z0-9._-]*)(?: (.*))?", re.DOTALL)
_BODY_ITEM_RE = re.compile(r"(?:BODY|BINARY)(?:\.PEEK)?\[.*|RFC822(?:\.TEXT|\.HEADER)?", re.DOTALL)
_SEQUENCE_SET_RE = re.compile(r"[0-9]{1,10}(?::[0-9]{1,10})?(?:,[0-9]{1,10}(?::[0-9]{1,10})?)*")
_CONDITIONS: Final = frozenset(c.value for c in Condition)

# Sending: atoms may not hold SP, CTL, 8-bit, ( ) { or "; Raw text may not hold CTL, 8-bit or {.
_SEND_ATOM_RE = re.compile(r"[!#-'*-z|-~]+")
_SEND_RAW_RE = re.compile(r"[ -z|-~]+")
_QUOTABLE_RE = re.compile(rb"[ -~]*")
_COMMAND_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9.-]*(?: [A-Za-z][A-Za-z0-9.-]*)*")
_BASE64_LINE_RE = re.compile(rb"[A-Za-z0-9+/]*={0,2}|\*")


def _atom_value(raw: bytes) -> Value:
    if _NUMBER_RE.fullmatch(raw):
        return int(raw)
    if raw.upper() == b"NIL":
        return None
    return Atom(raw.decode("ascii"))


class _Builder:
    """Turns the segments of one response into nested values, with the depth and count caps."""

    __slots__ = ("_fetch_seq", "_items", "_max_depth", "_max_items", "_sink", "_stack")

    def __init__(self, *, fetch_seq: int | None, sink: deque[Event], max_depth: int, max_items: int):
        self._fetch_seq = fetch_seq
        self._sink = sink
        self._max_depth = max_depth
        self._max_items = max_items
        self._items = 0
        self._stack: list[list[Value]] = [[]]

    def feed(self, seg: bytes, i: int) -> int | None:
        """Read values from ``seg[i:]``; return a literal's size if it ends in a literal marker."""
        n = len(seg)
        while True:
            while i < n and seg[i] == 0x20:
                i += 1
            if i == n:
                if len(self._stack) > 1:
                    raise ImapProtocolError("unbalanced '(' at the end of a response")
                return None
            c = seg[i]
            if c == 0x28:  # (
                self._count()
                if len(self._stack) > self._max_depth:
                    raise ImapProtocolError("lists nested too deep")
                self._stack.append([])
                i += 1
            elif c == 0x29:  # )
                if len(self._stack) == 1:
                    raise ImapProtocolError("unbalanced ')'")
                done = self._stack.pop()
                self._stack[-1].append(tuple(done))
                i += 1
            elif c == 0x22:  # "
                m = _QUOTED_RE.match(seg, i)
                if m is None:
                    raise ImapProtocolError("malformed quoted string")
                self._string(_UNESCAPE_RE.sub(rb"\1", m[1]))
                i = m.end()
            elif m := _LITERAL_RE.match(seg, i):
                if m.end() != n:
                    raise ImapProtocolError("a literal marker must end the line")
                return int(m[1])
            elif m := _ATOM_RE.match(seg, i):
                self.append(_atom_value(m[0]))
                i = m.end()
            else:
                raise ImapProtocolError(f"unexpected byte {seg[i : i + 1]!r} in a response")

    def body_item(self) -> tuple[int, str] | None:
        """(seq, item name) when the next value is the body of a FETCH item that is streamed."""
        if self._fetch_seq is None or len(self._stack) != 2 or self._stack[0]:
            return None
        attrs = self._stack[1]
        if len(attrs) % 2 == 0:
            return None
        key = attrs[-1]
        if isinstance(key, Atom) and _BODY_ITEM_RE.fullmatch(name := key.value.upper()):
            return self._fetch_seq, name
        return None

    def uid_so_far(self) -> int | None:
        """The UID item of the FETCH response being read, if it came before the body ``body_item`` found."""
        attrs = self._stack[1]
        for key, value in zip(attrs[0:-1:2], attrs[1::2], strict=False):
            if isinstance(key, Atom) and key.value.upper() == "UID" and isinstance(value, int):
                return value
        return None

    def append(self, value: Value) -> None:
        self._count()
        self._stack[-1].append(value)

    def result(self) -> tuple[Value, ...]:
        return tuple(self._stack[0])

    def _string(self, value: bytes) -> None:
        body = self.body_item()
        if body is None:
            self.append(value)
            return
        self._sink.append(FetchBodyStart(body[0], body[1], len(value), self.uid_so_far()))
        if value:
            self._sink.append(FetchBodyChunk(value))
        self._sink.append(FetchBodyEnd())
        self.append(Streamed(len(value)))

    def _count(self) -> None:
        self._items += 1
        if self._items > self._max_items:
            raise ImapProtocolError("too many values in one response")


def _resp_text(rest: bytes) -> tuple[ResponseCode | None, str]:
    code = None
    if rest[:1] == b"[":
        end = rest.find(b"]")
        m = _CODE_RE.fullmatch(rest, 1, end) if end > 0 else None
        if m is not None:  # else: not a code after all, leave it in the text
            code = ResponseCode(m[1].decode("ascii").upper(), m[2] or b"")
            rest = rest[end + 2 :] if rest[end + 1 : end + 2] == b" " else rest[end + 1 :]
    return code, rest.decode("utf-8", "replace")


# --------------------------------------------------------------------------------------------------
# Typed untagged responses


def _malformed(name: str) -> ImapProtocolError:
    return ImapProtocolError(f"malformed {name} response")


def _atoms(values: Iterable[Value], name: str) -> tuple[str, ...]:
    out = []
    for value in values:
        if isinstance(value, Atom):
            out.append(value.value)
        elif isinstance(value, int):
            out.append(str(value))
        else:
            raise _malformed(name)
    return tuple(out)


def _pairs(values: tuple[Value, ...], name: str) -> dict[str, Value]:
    if len(values) % 2:
        raise _malformed(name)
    out: dict[str, Value] = {}
    for key, value in zip(values[::2], values[1::2], strict=True):
        if not isinstance(key, Atom):
            raise _malformed(name)
        out[key.value.upper()] = value
    return out


def _fetch(seq: int, values: tuple[Value, ...]) -> Fetch:
    if len(values) != 1 or not isinstance(values[0], tuple):
        raise _malformed("FETCH")
    items = _pairs(values[0], "FETCH")
    for key in ("UID", "RFC822.SIZE"):
        if key in items and not isinstance(items[key], int):
            raise _malformed("FETCH")
    uid = items.get("UID")
    if isinstance(uid, int) and not 1 <= uid <= MAX_UID:
        raise ImapProtocolError("a UID outside 1 .. 2**32-1")
    flags = items.get("FLAGS", ())
    if not isinstance(flags, tuple):
        raise _malformed("FETCH")
    _atoms(flags, "FETCH")
    return Fetch(seq, items)


def _search(values: tuple[Value, ...]) -> Search:
    modseq = None
    if values and isinstance(values[-1], tuple):
        match values[-1]:
            case (Atom(value=key), int(number)) if key.upper() == "MODSEQ":
                modseq = number
            case _:
                raise _malformed("SEARCH")
        values = values[:-1]
    numbers = tuple(v for v in values if isinstance(v, int))
    if len(numbers) != len(values):
        raise _malformed("SEARCH")
    return Search(numbers, modseq)


def _untagged(name: str, number: int | None, values: tuple[Value, ...]) -> Event:
    match number, name:
        case int(), "EXISTS" if values:
            raise _malformed(name)
        case int(), "EXISTS":
            return Exists(number)
        case int(), "FETCH":
            return _fetch(number, values)
        case None, "CAPABILITY":
            return Capability(frozenset(a.upper() for a in _atoms(values, name)))
        case None, "SEARCH":
            return _search(values)
        case _:
            return Untagged(name, number, values)


# --------------------------------------------------------------------------------------------------
# The reader


class _Read(enum.Enum):
    LINE = enum.auto()  # reading a segment up to LF
    LITERAL = enum.auto()  # buffering a literal that is a value
    BODY = enum.auto()  # streaming a FETCH body literal
    CLOSED = enum.auto()  # the server closed between responses
    ERROR = enum.auto()  # a protocol error was raised


@dataclass(slots=True)
class _Partial:
    """The response being read, while it spans literals."""

    name: str
    number: int | None
    builder: _Builder


class ResponseParser:
    """Server responses in, events out. See the module docstring for the invariants."""

    def __init__(
        self,
        *,
        max_line_length: int = DEFAULT_MAX_LINE_LENGTH,
        max_literal_size: int = DEFAULT_MAX_LITERAL_SIZE,
        max_depth: int = DEFAULT_MAX_DEPTH,
        max_items: int = DEFAULT_MAX_ITEMS,
    ) -> None:
        self._max_line = max_line_length
        self._max_literal = max_literal_size
        self._max_depth = max_depth
        self._max_items = max_items
        self._buf = bytearray()
        self._pos = 0  # start of the unread bytes
        self._scan = 0  # where the LF search resumes; never below _pos
        self._eof = False
        self._read = _Read.LINE
        self._events: deque[Event] = deque()
        self._partial: _Partial | None = None
        self._line_used = 0  # non-literal bytes of the current response
        self._literal_used = 0  # buffered literal bytes of the current response
        self._literal = bytearray()
        self._remaining = 0  # bytes still to come of the current literal
        self._body_size = 0
        # Body bytes received while the buffer was empty, passed on as they are: a streamed message body
        # is then not copied into and out of the buffer.
        self._direct = b""

    @property
    def buffered(self) -> int:
        """How many received bytes are not yet consumed."""
        return len(self._buf) - self._pos + len(self._direct)

    def receive_data(self, data: bytes) -> None:
        """Add bytes from the server; ``b""`` means it closed the connection."""
        if self._eof:
            if data:
                raise LocalProtocolError("data received after the end of the stream")
            return
        if not data:
            self._eof = True
            return
        if self._read is _Read.BODY and not self._direct and self._pos == len(self._buf) and self._remaining:
            take = min(self._remaining, len(data))
            self._direct = data[:take] if take < len(data) else data
            data = data[take:]
            if not data:
                return
        if self._pos:
            del self._buf[: self._pos]
            self._scan -= self._pos
            self._pos = 0
        self._buf += data

    def next_event(self) -> Event | NeedData:
        try:
            while not self._events:
                step = self._step()
                if step is not None:
                    return step
            return self._events.popleft()
        except ImapProtocolError:
            self._read = _Read.ERROR
            self._events.clear()
            raise

    def next_size_fetches(self) -> list[tuple[int, int]]:
        """A fast path for big snapshots: consume the complete ``* n FETCH (UID u RFC822.SIZE s)`` lines
        at the front of the buffer and return their (u, s), exactly what ``next_event()`` would have
        turned into ``Fetch`` events one by one. Returns [] when the next response is anything else."""
        if self._read is not _Read.LINE or self._partial is not None or self._events:
            return []
        buf, start = self._buf, self._pos
        run = _SIZE_FETCH_RUN_RE.match(buf, start)
        if run is None:
            return []
        end = run.end()
        self._pos = end
        self._scan = max(self._scan, end)
        rows = [(int(u), int(z)) for u, z in _SIZE_FETCH_RE.findall(buf, start, end)]
        if rows and max(rows)[0] > MAX_UID:  # the general parser refuses it the same way
            self._read = _Read.ERROR
            raise ImapProtocolError("a UID outside 1 .. 2**32-1")
        return rows

    def _step(self) -> Event | NeedData | None:
        """Make progress; None means events may have been queued, call again."""
        match self._read:
            case _Read.LINE:
                return self._read_line()
            case _Read.LITERAL:
                return self._read_literal()
            case _Read.BODY:
                return self._read_body()
            case _Read.CLOSED:
                return ConnectionClosed()
            case _Read.ERROR:
                raise ImapProtocolError("the connection already failed")
            case _:  # pragma: no cover (exhaustive)
                assert_never(self._read)

    def _starved(self) -> ConnectionClosed | NeedData:
        if not self._eof:
            return NEED_DATA
        if self._read is _Read.LINE and self._partial is None and not self.buffered:
            self._read = _Read.CLOSED
            return ConnectionClosed()
        raise ImapProtocolError("connection closed in the middle of a response")

    def _read_line(self) -> ConnectionClosed | NeedData | None:
        lf = self._buf.find(b"\n", self._scan)
        if lf < 0:
            self._scan = len(self._buf)
            if self._line_used + self.buffered > self._max_line:
                raise ImapProtocolError("response line too long")
            return self._starved()
        self._line_used += lf + 1 - self._pos
        if self._line_used > self._max_line:
            raise ImapProtocolError("response line too long")
        seg = bytes(self._buf[self._pos : lf - 1 if lf > self._pos and self._buf[lf - 1] == 0x0D else lf])
        self._pos = self._scan = lf + 1
        if self._partial is None:
            self._begin(seg)
        else:
            self._values(self._partial, seg, 0)
        return None

    def _read_literal(self) -> NeedData | ConnectionClosed | None:
        take = min(self._remaining, self.buffered)
        self._literal += self._buf[self._pos : self._pos + take]
        self._pos += take
        self._remaining -= take
        if self._remaining:
            return self._starved()
        assert self._partial is not None
        self._partial.builder.append(bytes(self._literal))
        self._literal = bytearray()
        self._read = _Read.LINE
        self._scan = self._pos
        return None

    def _read_body(self) -> Event | NeedData:
        if not self._remaining:
            assert self._partial is not None
            self._partial.builder.append(Streamed(self._body_size))
            self._read = _Read.LINE
            self._scan = self._pos
            return FetchBodyEnd()
        if self._direct:
            chunk, self._direct = self._direct, b""
            self._remaining -= len(chunk)
            return FetchBodyChunk(chunk)
        take = min(self._remaining, self.buffered)
        if not take:
            return self._starved()
        chunk = bytes(self._buf[self._pos : self._pos + take])
        self._pos += take
        self._remaining -= take
        return FetchBodyChunk(chunk)

    def _begin(self, seg: bytes) -> None:
        if seg[:1] == b"+":
            self._done(Continuation(seg[2:] if seg[1:2] == b" " else seg[1:]))
            return
        if seg[:2] == b"* ":
            m = _UNTAGGED_RE.match(seg, 2)
            if m is None:
                raise ImapProtocolError("malformed untagged response")
            number = None if m[1] is None else int(m[1])
            name = m[2].decode("ascii").upper()
            if number is None and name in _CONDITIONS:
                code, text = _resp_text(seg[m.end() :])
                self._done(UntaggedStatus(Condition(name), code, text))
                return
            builder = _Builder(
                fetch_seq=number if name == "FETCH" else None,
                sink=self._events,
                max_depth=self._max_depth,
                max_items=self._max_items,
            )
            self._partial = _Partial(name, number, builder)
            self._values(self._partial, seg, m.end())
            return
        m = _TAGGED_RE.match(seg)
        if m is None:
            raise ImapProtocolError("malformed response line")
        code, text = _resp_text(seg[m.end() :])
        self._done(Tagged(m[1].decode("ascii"), Condition(m[2].decode("ascii").upper()), code, text))

    def _values(self, partial: _Partial, seg: bytes, i: int) -> None:
        size = partial.builder.feed(seg, i)
        if size is None:
            self._done(_untagged(partial.name, partial.number, partial.builder.result()))
            return
        self._remaining = size
        body = partial.builder.body_item()
        if body is not None:
            self._events.append(FetchBodyStart(body[0], body[1], size, partial.builder.uid_so_far()))
            self._body_size = size
            self._read = _Read.BODY
            return
        self._literal_used += size
        if self._literal_used > self._max_literal:
            raise ImapProtocolError("literal too large")
        self._read = _Read.LITERAL

    def _done(self, event: Event) -> None:
        self._events.append(event)
        self._partial = None
        self._line_used = 0
        self._literal_used = 0


# --------------------------------------------------------------------------------------------------
# Commands


class State(enum.Enum):
    AWAITING_GREETING = enum.auto()
    NOT_AUTHENTICATED = enum.auto()
    AUTHENTICATED = enum.auto()
    SELECTED = enum.auto()
    LOGOUT = enum.auto()


_ANY: Final = frozenset({State.NOT_AUTHENTICATED, State.AUTHENTICATED, State.SELECTED})
_AUTHENTICATED: Final = frozenset({State.AUTHENTICATED, State.SELECTED})
_SELECTED: Final = frozenset({State.SELECTED})
_NOT_AUTHENTICATED: Final = frozenset({State.NOT_AUTHENTICATED})

# Which command may be sent in which state (RFC 9051 section 6), by its first word. Commands not
# listed (extensions) may be sent in any state between the greeting and LOGOUT.
# fmt: off
_LEGAL_STATES: Final[dict[str, frozenset[State]]] = {
    **dict.fromkeys(("CAPABILITY", "NOOP", "LOGOUT", "ID"), _ANY),
    **dict.fromkeys(("STARTTLS", "AUTHENTICATE", "LOGIN"), _NOT_AUTHENTICATED),
    **dict.fromkeys(
        (
            "ENABLE", "SELECT", "EXAMINE", "CREATE", "DELETE", "RENAME", "SUBSCRIBE", "UNSUBSCRIBE",
            "LIST", "LSUB", "NAMESPACE", "STATUS", "APPEND", "IDLE", "GETQUOTA", "GETQUOTAROOT",
        ),
        _AUTHENTICATED,
    ),
    **dict.fromkeys(
        ("CLOSE", "UNSELECT", "EXPUNGE", "SEARCH", "FETCH", "STORE", "COPY", "MOVE", "UID", "CHECK"),
        _SELECTED,
    ),
}
# fmt: on


class _Encoder:
    """Builds a command, cutting it after each synchronising literal marker."""

    def __init__(self, nonsync_limit: int) -> None:
        self._nonsync_limit = nonsync_limit
        self.parts: list[bytes] = []
        self._current = bytearray()

    def text(self, data: bytes) -> None:
        self._current += data

    def end(self) -> list[bytes]:
        self._current += b"\r\n"
        self.parts.append(bytes(self._current))
        return self.parts

    def arg(self, arg: Arg) -> None:
        match arg:
            case Atom(value=value):
                if not _SEND_ATOM_RE.fullmatch(value):
                    raise LocalProtocolError('an Atom may hold no space, control, 8-bit, ( ) { or "')
                self._current += value.encode("ascii")
            case Raw(value=value):
                if not _SEND_RAW_RE.fullmatch(value):
                    raise LocalProtocolError("Raw text may hold only printable ASCII without {")
                self._current += value.encode("ascii")
            case bool():
                raise LocalProtocolError("a bool is not an IMAP value")
            case int():
                if arg < 0:
                    raise LocalProtocolError("IMAP numbers are not negative")
                self._current += b"%d" % arg
            case str():
                try:
                    data = arg.encode("utf-8")
                except UnicodeEncodeError:  # a lone surrogate
                    raise LocalProtocolError("a string that is not valid Unicode") from None
                self.string(data)
            case bytes():
                self.string(arg)
            case list() | tuple():
                self._current += b"("
                for i, item in enumerate(arg):
                    if i:
                        self._current += b" "
                    self.arg(item)
                self._current += b")"
            case None:
                self._current += b"NIL"
            case _:  # pragma: no cover (exhaustive)
                assert_never(arg)

    def string(self, data: bytes) -> None:
        if b"\x00" in data:
            raise LocalProtocolError("NUL cannot be sent in an IMAP string")  # never echo the value
        if _QUOTABLE_RE.fullmatch(data):
            self._current += b'"' + data.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
        elif len(data) <= self._nonsync_limit:
            self._current += b"{%d+}\r\n" % len(data) + data
        else:
            self._current += b"{%d}\r\n" % len(data)
            self.parts.append(bytes(self._current))
            self._current = bytearray(data)


class Client:
    """An IMAP client connection: the reader, the command encoder, tags, capabilities and state."""

    def __init__(
        self,
        *,
        max_line_length: int = DEFAULT_MAX_LINE_LENGTH,
        max_literal_size: int = DEFAULT_MAX_LITERAL_SIZE,
        max_depth: int = DEFAULT_MAX_DEPTH,
        max_items: int = DEFAULT_MAX_ITEMS,
    ) -> None:
        self._parser = ResponseParser(
            max_line_length=max_line_length,
            max_literal_size=max_literal_size,
            max_depth=max_depth,
            max_items=max_items,
        )
        self.state = State.AWAITING_GREETING
        self.capabilities: frozenset[str] = frozenset()  # upper-case, replaced by each announcement
        self._next_tag = 1
        self._in_flight: dict[str, str] = {}  # tag -> first word of the command
        self._pending: deque[bytes] = deque()  # the parts after synchronising literals
        self._pending_tag: str | None = None
        self._continuation_ready = False
        self._failed = False

    # reading

    def receive_data(self, data: bytes) -> None:
        self._parser.receive_data(data)

    def next_event(self) -> Event | NeedData:
        if self._failed:
            raise ImapProtocolError("the connection already failed")
        event = self._parser.next_event()
        if not isinstance(event, NeedData):
            try:
                self._observe(event)
            except ImapProtocolError:
                self._failed = True
                raise
        return event

    def next_size_fetches(self) -> list[tuple[int, int]]:
        """``ResponseParser.next_size_fetches`` (plain FETCH responses change no client state)."""
        if self._failed or self.state is State.AWAITING_GREETING:
            return []
        return self._parser.next_size_fetches()

    # writing

    @property
    def awaiting_continuation(self) -> bool:
        """True while a command waits for ``+`` before ``continue_command()`` may send its next part."""
        return bool(self._pending)

    def send_command(self, name: str, *args: Arg) -> tuple[str, bytes]:
        """Tag and encode a command; return the tag and the bytes to write now."""
        if self._pending:
            raise LocalProtocolError("the previous command still waits for a continuation")
        if not _COMMAND_NAME_RE.fullmatch(name):
            raise LocalProtocolError(f"bad command name {name!r}")
        verb = name.split(" ", 1)[0].upper()
        if self.state not in _LEGAL_STATES.get(verb, _ANY):
            raise LocalProtocolError(f"{verb} is not allowed in state {self.state.name}")
        if verb == "LOGIN" and "LOGINDISABLED" in self.capabilities:
            raise LocalProtocolError("the server disabled LOGIN on this connection")
        tag = f"A{self._next_tag:04d}"
        encoder = _Encoder(self._nonsync_limit())
        encoder.text(f"{tag} {name}".encode("ascii"))
        for arg in args:
            encoder.text(b" ")
            encoder.arg(arg)
        first, *rest = encoder.end()
        self._next_tag += 1
        self._in_flight[tag] = verb
        if rest:
            self._pending.extend(rest)
            self._pending_tag = tag
            self._continuation_ready = False
        return tag, first

    def continue_command(self) -> bytes:
        """The next part of the command, once ``next_event()`` returned the server's ``Continuation``."""
        if not self._pending:
            raise LocalProtocolError("no command waits for a continuation")
        if not self._continuation_ready:
            raise LocalProtocolError("the server has not sent '+' yet")
        self._continuation_ready = False
        part = self._pending.popleft()
        if not self._pending:
            self._pending_tag = None
        return part

    def authenticate_response(self, data: bytes) -> bytes:
        """The line answering an AUTHENTICATE challenge: base64 text (``*`` cancels), then CRLF."""
        if "AUTHENTICATE" not in self._in_flight.values():
            raise LocalProtocolError("no AUTHENTICATE command is in progress")
        if not _BASE64_LINE_RE.fullmatch(data):
            raise LocalProtocolError("an AUTHENTICATE response must be base64")
        return data + b"\r\n"

    def _nonsync_limit(self) -> int:
        if "LITERAL+" in self.capabilities:
            return 1 << 63
        if "LITERAL-" in self.capabilities:
            return LITERAL_MINUS_MAX
        return -1

    # state

    def _observe(self, event: Event) -> None:
        if self.state is State.AWAITING_GREETING and not isinstance(event, UntaggedStatus | ConnectionClosed):
            raise ImapProtocolError("expected the server greeting")
        match event:
            case Tagged():
                verb = self._in_flight.pop(event.tag, None)
                if verb is None:
                    raise ImapProtocolError("tagged response to a command we did not send")
                if event.tag == self._pending_tag:  # NO/BAD instead of "+": the rest is not sent
                    self._pending.clear()
                    self._pending_tag = None
                self._code(event.code)
                self._completed(verb, event)
            case UntaggedStatus():
                self._code(event.code)
                self._untagged_status(event.condition)
            case Capability():
                self.capabilities = event.capabilities
            case Continuation():
                self._continuation_ready = bool(self._pending)
            case (
                Exists()
                | Search()
                | Fetch()
                | FetchBodyStart()
                | FetchBodyChunk()
                | FetchBodyEnd()
                | Untagged()
                | ConnectionClosed()
            ):
                pass
            case _:  # pragma: no cover (exhaustive)
                assert_never(event)

    def _code(self, code: ResponseCode | None) -> None:
        if code is not None and code.name == "CAPABILITY":
            self.capabilities = frozenset(code.raw.decode("ascii", "replace").upper().split())

    def _untagged_status(self, condition: Condition) -> None:
        if self.state is State.AWAITING_GREETING:
            match condition:
                case Condition.OK:
                    self.state = State.NOT_AUTHENTICATED
                case Condition.PREAUTH:
                    self.state = State.AUTHENTICATED
                case Condition.BYE:
                    self.state = State.LOGOUT
                case Condition.NO | Condition.BAD:
                    raise ImapProtocolError("the greeting must be OK, PREAUTH or BYE")
                case _:  # pragma: no cover (exhaustive)
                    assert_never(condition)
        elif condition is Condition.PREAUTH:
            raise ImapProtocolError("PREAUTH after the greeting")
        elif condition is Condition.BYE:
            self.state = State.LOGOUT

    def _completed(self, verb: str, event: Tagged) -> None:
        if self.state is State.LOGOUT:
            return
        ok = event.condition is Condition.OK
        match verb:
            case "LOGIN" | "AUTHENTICATE" if ok:
                self.state = State.AUTHENTICATED
            case "SELECT" | "EXAMINE" if ok:
                self.state = State.SELECTED
            case "SELECT" | "EXAMINE" if self.state is State.SELECTED:
                self.state = State.AUTHENTICATED  # a failed SELECT leaves no mailbox selected
            case "CLOSE" | "UNSELECT" if ok:
                self.state = State.AUTHENTICATED
            case "LOGOUT" if ok:
                self.state = State.LOGOUT
            case "STARTTLS" if ok:
                if self._parser.buffered:  # bytes injected before the TLS handshake
                    raise ImapProtocolError("data after the STARTTLS reply")
                self.capabilities = frozenset()  # RFC 9051 6.2.1: forget what was said in plaintext
            case _:
                pass


# --------------------------------------------------------------------------------------------------
# Helpers


def encode_authenticate_plain(authzid: str | bytes, user: str | bytes, password: str | bytes) -> bytes:
    """Base64 of the SASL PLAIN message (RFC 4616): ``authzid NUL user NUL password``."""
    parts = [p.encode("utf-8") if isinstance(p, str) else p for p in (authzid, user, password)]
    if any(b"\x00" in p for p in parts):
        raise LocalProtocolError("NUL cannot be sent in SASL PLAIN")  # never echo the value
    return base64.b64encode(b"\x00".join(parts))


def sequence_set(numbers: Iterable[int]) -> Atom:
    """The sequence set naming ``numbers``, runs compressed: [1, 2, 3, 4, 5, 7, 9, 10] -> 1:5,7,9:10."""
    ordered = sorted(set(numbers))
    if not ordered:
        raise LocalProtocolError("an empty sequence set")
    if ordered[0] < 1 or ordered[-1] > 0xFFFFFFFF:
        raise LocalProtocolError("sequence numbers and UIDs are 1 .. 2**32-1")
    runs: list[str] = []
    start = prev = ordered[0]
    for n in [*ordered[1:], None]:
        if n is not None and n == prev + 1:
            prev = n
            continue
        runs.append(str(start) if start == prev else f"{start}:{prev}")
        if n is not None:
            start = prev = n
    return Atom(",".join(runs))


def parse_sequence_set(text: str) -> tuple[tuple[int, int], ...]:
    """Inclusive ranges of a sequence set the server sent ("41,43:116" -> ((41, 41), (43, 116))).

    Raises ValueError when malformed, when it holds 0, or ``*`` (servers never send it).
    """
    if not _SEQUENCE_SET_RE.fullmatch(text):
        raise ValueError("malformed sequence set")
    ranges = []
    for run in text.split(","):
        first, _, last = run.partition(":")
        low, high = sorted((int(first), int(last or first)))
        if low < 1:
            raise ValueError("0 in a sequence set")
        ranges.append((low, high))
    return tuple(ranges)
