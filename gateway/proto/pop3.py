"""Sans-IO POP3 server protocol (RFC 1939, RFC 2449 CAPA, RFC 3206 codes, RFC 5034 AUTH, RFC 2595 STLS).

Use (bytes leave the core one way only, as they leave h11 through ``send()``: ``data_to_send()``):
    conn = Connection(settings, apop_timestamp="<...@...>" or None)   # queues the greeting
    loop:
        write every conn.data_to_send() piece until it returns b""
        conn.receive_data(data)            # b"" means the client closed
        event = conn.next_event()
            NEED_DATA -> write what is queued, read more.
            Authenticate -> ask the login gate; then auth_succeeded(...) or auth_failed(Refusal...).
            Fetch -> get the first chunk; fetch_failed(...) or begin_body(), body(chunk)..., end_body().
            StartTls -> write what is queued, wrap the stream, tls_started().
            Commit -> apply the deletions, update_finished(ok).
            Close -> write what is queued and close.  ConnectionClosed -> close.

Invariants:
- The core never raises on anything a client sends: every input becomes a reply or a close. Only misuse
  by the caller (a result for a request it was not asked) raises LocalProtocolError.
- Every reply text is written here; the shell composes none. Session refusals, autologout and internal
  errors are core methods too (``refuse``, ``autologout``, ``internal_error``).
- Lockstep: after an event that needs the caller (Authenticate, Fetch, StartTls, Commit) no further
  command is parsed until the caller reports back.
- Output is bounded per piece: multi-line listings (LIST, UIDL) are produced lazily in slices of at most
  ``LISTING_SLICE`` octets, so a 1M-message maildrop never builds its 23 MB listing in one step; the
  encoded full listings are cached for the session while the deletion marks stay the same.
- Commands are at most ``max_line`` octets including CRLF (RFC 2449: 255). A longer line is discarded
  as it arrives, without buffering it, and answered with one -ERR. AUTH continuation lines may be
  longer (``max_auth_line``), since SASL responses are base64; an over-long one cancels the exchange.
- Before login: at most ``max_bad_commands`` unknown, malformed or out-of-state commands, then -ERR and
  Close. User names are at most ``max_username`` octets.
- Only a refusal of the credentials themselves (``Refusal.AUTH``) counts toward ``max_auth_failures``;
  [IN-USE], [LOGIN-DELAY] and [SYS/...] refusals do not.
- APOP is offered (a timestamp in the greeting) only when the caller gives one: where APOP can succeed.
- Which command is legal in which state is the one table ``_ALLOWED`` below.
- Message numbers are 1-based and fixed for the session; deletion marks live in ``SessionMaildrop``.
- Nothing is deleted unless QUIT is received in TRANSACTION: then Commit carries the marked indexes.
  A closed connection or an autologout gives ConnectionClosed/Close, never Commit.
- After STLS, bytes the client pipelined behind it in plaintext are refused: -ERR and Close.
- Reply text never contains exception text or secrets; secrets never reach a repr.
"""

from __future__ import annotations

import base64
import binascii
import collections
import dataclasses
import enum
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Final, assert_never

from gateway.proto.body import BodyEncoder
from gateway.proto.common import NEED_DATA as NEED_DATA
from gateway.proto.common import LocalProtocolError as LocalProtocolError
from gateway.proto.common import NeedData as NeedData
from gateway.proto.logins import ApopLogin, Login, PasswordLogin
from gateway.proto.maildrop import Listed, Lookup, SessionMaildrop

CRLF: Final = b"\r\n"
LISTING_SLICE: Final = 65536  # octets a queued lazy listing counts for
COMMANDS_PER_TURN: Final = 64  # pipelined commands answered before a Flush
_COALESCE: Final = 65536  # queued small replies are joined up to this size; larger pieces pass as they are


class State(enum.Enum):
    AUTHORIZATION = "AUTHORIZATION"
    TRANSACTION = "TRANSACTION"
    UPDATE = "UPDATE"
    CLOSED = "CLOSED"


# ---------------------------------------------------------------- settings


@dataclasses.dataclass(frozen=True, slots=True)
class Settings:
    implementation: str = "pop3-gateway"
    login_delay: int = 0  # seconds; advertised in CAPA when > 0
    expire: str = "NEVER"  # "NEVER", or days as digits
    tls_available: bool = False  # STLS may be offered
    allow_plaintext_auth: bool = True  # USER/PASS/AUTH before TLS
    max_line: int = 255
    max_auth_line: int = 8192
    max_auth_failures: int = 3
    max_bad_commands: int = 20  # before login; 0: no cap
    max_username: int = 255  # octets of UTF-8


# ---------------------------------------------------------------- commands (parsed client lines)


@dataclasses.dataclass(frozen=True, slots=True)
class User:
    name: str


@dataclasses.dataclass(frozen=True, slots=True)
class Pass:
    password: str = dataclasses.field(repr=False)


@dataclasses.dataclass(frozen=True, slots=True)
class Apop:
    name: str
    digest: str = dataclasses.field(repr=False)


@dataclasses.dataclass(frozen=True, slots=True)
class Auth:
    mechanism: str | None
    initial_response: str | None = dataclasses.field(repr=False, default=None)


@dataclasses.dataclass(frozen=True, slots=True)
class Quit:
    pass


@dataclasses.dataclass(frozen=True, slots=True)
class Stat:
    pass


@dataclasses.dataclass(frozen=True, slots=True)
class List:
    msg_num: int | None


@dataclasses.dataclass(frozen=True, slots=True)
class Retr:
    msg_num: int


@dataclasses.dataclass(frozen=True, slots=True)
class Dele:
    msg_num: int


@dataclasses.dataclass(frozen=True, slots=True)
class Noop:
    pass


@dataclasses.dataclass(frozen=True, slots=True)
class Rset:
    pass


@dataclasses.dataclass(frozen=True, slots=True)
class Top:
    msg_num: int
    lines: int


@dataclasses.dataclass(frozen=True, slots=True)
class Uidl:
    msg_num: int | None


@dataclasses.dataclass(frozen=True, slots=True)
class Capa:
    pass


@dataclasses.dataclass(frozen=True, slots=True)
class Stls:
    pass


Command = (
    User | Pass | Apop | Auth | Quit | Stat | List | Retr | Dele | Noop | Rset | Top | Uidl | Capa | Stls
)

A, T = State.AUTHORIZATION, State.TRANSACTION
# The one table of which command is legal in which state (RFC 1939 sections 4-7, RFC 2449, 2595, 5034).
_ALLOWED: Final[dict[type[Command], frozenset[State]]] = {
    User: frozenset({A}),
    Pass: frozenset({A}),
    Apop: frozenset({A}),
    Auth: frozenset({A}),
    Stls: frozenset({A}),
    Capa: frozenset({A, T}),
    Quit: frozenset({A, T}),
    Noop: frozenset({T}),
    Stat: frozenset({T}),
    List: frozenset({T}),
    Retr: frozenset({T}),
    Dele: frozenset({T}),
    Rset: frozenset({T}),
    Top: frozenset({T}),
    Uidl: frozenset({T}),
}


class BadCommand(Exception):
    """A line that is not a well-formed command; the text is a safe reply."""


# ---------------------------------------------------------------- events (what the caller must do)


@dataclasses.dataclass(frozen=True, slots=True)
class Authenticate:
    """Check these credentials; then call auth_succeeded() or auth_failed()."""

    login: Login


@dataclasses.dataclass(frozen=True, slots=True)
class Fetch:
    """Stream the message at 0-based ``index`` (``top_lines`` for TOP): begin_body(), body(chunk)...,
    end_body(). If it cannot be had before anything was sent, fetch_failed() instead. If it fails after
    begin_body(), body_broken(): the connection must close without the terminator."""

    msg_num: int
    index: int
    top_lines: int | None
    size: int


@dataclasses.dataclass(frozen=True, slots=True)
class StartTls:
    """Write what is queued (the +OK), run the TLS handshake as server, then call tls_started()."""


@dataclasses.dataclass(frozen=True, slots=True)
class Commit:
    """UPDATE state: apply these deletions as one batch, then call update_finished(ok)."""

    indexes: tuple[int, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class Close:
    """Write what is queued and close the connection. Nothing (more) is deleted. ``refused``: the core
    ends the session (too many failures or bad commands, plaintext after STLS), not the client's QUIT."""

    refused: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The client went away. Nothing is deleted."""


@dataclasses.dataclass(frozen=True, slots=True)
class Flush:
    """Many pipelined commands were answered, or a long listing is queued: write what is queued (other
    sessions get a turn meanwhile), then go on with next_event()."""


Event = Authenticate | Fetch | StartTls | Commit | Close | ConnectionClosed | Flush


class Refusal(enum.Enum):
    """Why a login was refused: the reply code and text, in one place. Only AUTH is a failed guess."""

    AUTH = ("AUTH", "Authentication failed")
    IN_USE = ("IN-USE", "Maildrop is locked by another session")
    ACCOUNT_BUSY = ("IN-USE", "Too many sessions for this account")
    LOGIN_DELAY = ("LOGIN-DELAY", "Logins are too frequent")
    TEMP = ("SYS/TEMP", "Upstream unavailable, try again later")
    PERM = ("SYS/PERM", "Mailbox unavailable")

    @property
    def code(self) -> str:
        return self.value[0]

    @property
    def text(self) -> str:
        return self.value[1]


class SessionRefusal(enum.Enum):
    """Why a connection is turned away before the greeting."""

    TOO_MANY = "Too many sessions, try again later"
    TOO_MANY_FROM_ADDRESS = "Too many sessions from your address, try again later"
    TOO_MANY_UNAUTHENTICATED = "Too many sessions waiting to log in, try again later"


class FetchFailure(enum.Enum):
    """Why a message could not be sent (answered before any of it was)."""

    UNAVAILABLE = "Message is no longer available"
    SIZE_CHANGED = "Message size changed upstream; try again"


@dataclasses.dataclass(frozen=True, slots=True)
class Sent:
    """What end_body() reports: the octets sent (before dot-stuffing) and whether the whole message went."""

    octets: int
    whole: bool


# ---------------------------------------------------------------- reply formatting (pure, private)


def _ok(text: str) -> bytes:
    return b"+OK " + text.encode("ascii", "replace") + CRLF if text else b"+OK" + CRLF


def _err(text: str, code: str | None = None) -> bytes:
    prefix = f"[{code}] " if code else ""
    return b"-ERR " + (prefix + text).encode("ascii", "replace") + CRLF


def _multiline(status: bytes, lines: Sequence[str]) -> bytes:
    """A multi-line reply of short protocol lines (CAPA, AUTH); they never start with '.'."""
    body = "".join(line + "\r\n" for line in lines).encode("ascii", "replace")
    return status + body + b".\r\n"


class _Outbox:
    """Queued output in order: small pieces coalesce (into a buffer handed over without a copy), big ones
    pass as they are, listings are lazy. ``pending`` is O(1)."""

    __slots__ = ("_lazy", "_queue", "_queued", "_small")

    def __init__(self) -> None:
        self._queue: collections.deque[bytes | bytearray | Iterator[bytes]] = collections.deque()
        self._small = bytearray()
        self._queued = 0  # octets of the bytes pieces in _queue
        self._lazy = 0  # lazy listings in _queue

    def add(self, data: bytes) -> None:
        if len(data) >= _COALESCE:
            self._push_small()
            self._queue.append(data)
            self._queued += len(data)
            return
        self._small += data
        if len(self._small) >= _COALESCE:
            self._push_small()

    def add_lazy(self, pieces: Iterator[bytes]) -> None:
        self._push_small()
        self._queue.append(pieces)
        self._lazy += 1

    def _push_small(self) -> None:
        if self._small:
            self._queue.append(self._small)
            self._queued += len(self._small)
            self._small = bytearray()

    def take(self) -> bytes | bytearray:
        queue = self._queue
        while queue:
            head = queue[0]
            if isinstance(head, bytes | bytearray):
                queue.popleft()
                self._queued -= len(head)
                return head
            piece = next(head, None)
            if piece is None:
                queue.popleft()
                self._lazy -= 1
                continue
            return piece
        data, self._small = self._small, bytearray()
        return data

    @property
    def pending(self) -> int:
        """Octets queued; a lazy listing counts as a full slice."""
        return len(self._small) + self._queued + self._lazy * LISTING_SLICE

    def clear(self) -> None:
        self._queue.clear()
        self._small = bytearray()
        self._queued = self._lazy = 0


_DIGITS = re.compile(rb"[0-9]+")
_APOP_DIGEST = re.compile(r"[0-9a-fA-F]{32}")
_MAX_MSG_NUM_DIGITS = 10  # more digits than any real maildrop; avoids converting 10 kB numbers


def _msg_num(arg: bytes) -> int:
    if not _DIGITS.fullmatch(arg):
        raise BadCommand("Invalid message number")
    arg = arg.lstrip(b"0") or b"0"
    if len(arg) > _MAX_MSG_NUM_DIGITS:
        return 0  # out of range for every maildrop; answered "no such message"
    return int(arg)


def _line_count(arg: bytes) -> int:
    if not _DIGITS.fullmatch(arg):
        raise BadCommand("Invalid line count")
    arg = arg.lstrip(b"0") or b"0"
    return int(arg) if len(arg) <= 18 else 10**18


def parse_command(line: bytes) -> Command:
    """One command line without its CRLF. Raises BadCommand with a reply-safe text."""
    if b"\x00" in line:
        raise BadCommand("NUL in command")
    verb, _, rest = line.partition(b" ")
    verb = verb.upper()
    if not line.isascii():
        # Only credentials may carry 8-bit text, and then only as UTF-8 (passwords often do).
        if verb not in (b"USER", b"PASS", b"APOP"):
            raise BadCommand("Non-ASCII command")
        try:
            rest.decode("utf-8")
        except UnicodeDecodeError:
            raise BadCommand("Credentials are not UTF-8") from None
    if verb == b"PASS":
        # The password is the rest of the line, spaces included (as Dovecot and most servers do).
        if not rest:
            raise BadCommand("PASS needs a password")
        return Pass(rest.decode("utf-8"))
    args = rest.split()
    match verb, len(args):
        case b"USER", 1:
            return User(args[0].decode("utf-8"))
        case b"APOP", 2:
            return Apop(args[0].decode("utf-8"), args[1].decode("utf-8"))
        case b"AUTH", 0:
            return Auth(None)
        case b"AUTH", 1:
            return Auth(args[0].decode("ascii").upper())
        case b"AUTH", 2:
            return Auth(args[0].decode("ascii").upper(), args[1].decode("ascii"))
        case b"QUIT", 0:
            return Quit()
        case b"STAT", 0:
            return Stat()
        case b"LIST", 0:
            return List(None)
        case b"LIST", 1:
            return List(_msg_num(args[0]))
        case b"RETR", 1:
            return Retr(_msg_num(args[0]))
        case b"DELE", 1:
            return Dele(_msg_num(args[0]))
        case b"NOOP", 0:
            return Noop()
        case b"RSET", 0:
            return Rset()
        case b"TOP", 2:
            return Top(_msg_num(args[0]), _line_count(args[1]))
        case b"UIDL", 0:
            return Uidl(None)
        case b"UIDL", 1:
            return Uidl(_msg_num(args[0]))
        case b"CAPA", 0:
            return Capa()
        case b"STLS", 0:
            return Stls()
        case (
            b"USER"
            | b"APOP"
            | b"AUTH"
            | b"QUIT"
            | b"STAT"
            | b"LIST"
            | b"RETR"
            | b"DELE"
            | b"NOOP"
            | b"RSET"
            | b"TOP"
            | b"UIDL"
            | b"CAPA"
            | b"STLS",
            _,
        ):
            raise BadCommand("Wrong number of arguments")
        case _:
            raise BadCommand("Unknown command")


# ---------------------------------------------------------------- the connection


class _Sasl(enum.Enum):
    PLAIN = "PLAIN"
    LOGIN_USER = "LOGIN_USER"
    LOGIN_PASS = "LOGIN_PASS"  # noqa: S105 (a state name, not a secret)


_TOP_STATUS: Final = b"+OK Top of message follows\r\n"
_LOGIN_USER_PROMPT: Final = b"+ " + base64.b64encode(b"Username:") + CRLF
_LOGIN_PASS_PROMPT: Final = b"+ " + base64.b64encode(b"Password:") + CRLF
LISTING_BATCH: Final = 2048  # messages per piece of a LIST/UIDL listing


class Connection:
    def __init__(
        self, settings: Settings, *, apop_timestamp: str | None = None, tls_active: bool = False
    ) -> None:
        self.settings = settings
        self.timestamp = apop_timestamp  # None: APOP is not offered
        self.tls_active = tls_active
        self.state = State.AUTHORIZATION
        self.maildrop: SessionMaildrop | None = None
        self.username: str | None = None  # after USER, and the authenticated name after login
        self.auth_failures = 0
        self.bad_commands = 0
        self.login_delay = settings.login_delay  # may grow once a client has to wait (CAPA LOGIN-DELAY)
        self._out = _Outbox()
        self._buf = bytearray()
        self._scan_from = 0  # where the LF search resumes: the buffer is never rescanned
        self._discarding = False  # inside an over-long line
        self._eof = False
        self._waiting: type[Event] | None = None  # the request the caller must answer first
        self._sasl: _Sasl | None = None
        self._sasl_user = ""
        self._close_next: Close | None = None
        self._turn = 0  # commands handled since the output was last written
        self._encoder: BodyEncoder | None = None
        self._fetch_top: int | None = None
        self._listings: dict[str, tuple[int, list[bytes]]] = {}
        self.verbs: list[str] = []  # the verb of every command parsed, for the caller to count and clear
        greeting = "POP3 gateway ready" + (f" {apop_timestamp}" if apop_timestamp else "")
        self._out.add(_ok(greeting))

    # -- output: the one way bytes leave the core

    def data_to_send(self) -> bytes | bytearray:
        """The next piece of output (b"" when nothing is queued). Call until it returns b""."""
        return self._out.take()

    @property
    def pending_output(self) -> int:
        return self._out.pending

    # -- input

    def receive_data(self, data: bytes) -> None:
        if self.state is State.CLOSED:
            return
        if not data:
            self._eof = True
        else:
            self._buf += data

    @property
    def trailing_data(self) -> bool:
        return bool(self._buf)

    def next_event(self) -> Event | NeedData:
        while True:
            # a Flush needs a command handled since the last one: a caller that ignores it still progresses
            turn = self._turn
            if turn and (turn >= COMMANDS_PER_TURN or self._out.pending >= _COALESCE):
                self._turn = 0  # the caller writes now: a new turn begins
                return Flush()
            self._turn = turn + 1
            if self._close_next is not None:
                close, self._close_next = self._close_next, None
                return close
            if self.state is State.CLOSED or self._waiting is not None:
                return NEED_DATA
            line = self._next_line()
            if line is None:
                self._turn = 0  # the caller writes and reads now: a new turn begins
                if self._eof:
                    self.state = State.CLOSED
                    return ConnectionClosed()
                return NEED_DATA
            if self._sasl is not None:
                event = self._sasl_step(line)
            else:  # a command (inlined: this loop runs once per pipelined command)
                try:
                    command = parse_command(line)
                except BadCommand as exc:
                    self.verbs.append("OTHER")
                    event = self._bad_command(str(exc))
                else:
                    kind = type(command)
                    self.verbs.append(kind.__name__.upper())
                    if self.state in _ALLOWED[kind]:
                        event = self._handle(command)
                    else:
                        event = self._bad_command(f"Command not valid in {self.state.value} state")
            if event is not None:
                return event

    def _bad_command(self, text: str, code: str | None = None) -> Close | None:
        self._out.add(_err(text, code))
        if self.state is State.AUTHORIZATION and self.settings.max_bad_commands:
            self.bad_commands += 1
            if self.bad_commands >= self.settings.max_bad_commands:
                self._out.add(_err("Too many bad commands; closing"))
                self.state = State.CLOSED
                return Close(refused=True)
        return None

    def _next_line(self) -> bytes | None:
        """The next complete line (without CRLF), or None. An over-long line is answered here."""
        while True:
            limit = self.settings.max_auth_line if self._sasl is not None else self.settings.max_line
            nl = self._buf.find(b"\n", self._scan_from)
            if nl < 0:
                if self._discarding:
                    self._buf.clear()
                    self._scan_from = 0
                elif len(self._buf) >= limit:
                    # Too long already, and no end in sight: drop it as it arrives.
                    self._discarding = True
                    self._buf.clear()
                    self._scan_from = 0
                else:
                    self._scan_from = len(self._buf)
                return None
            line = bytes(self._buf[:nl])
            del self._buf[: nl + 1]
            self._scan_from = 0
            if self._discarding or nl + 1 > limit:
                self._discarding = False
                if self._sasl is not None:
                    # an over-long SASL response cancels the exchange: the next line is a command again
                    self._sasl = None
                    self._out.add(_err("Line too long; authentication cancelled"))
                else:
                    self._out.add(_err("Line too long"))
                continue
            if line.endswith(b"\r"):
                line = line[:-1]
            return line

    # -- dispatch

    def _handle(self, command: Command) -> Event | None:
        md = self.maildrop
        out = self._out
        match command:
            case Capa():
                out.add(_multiline(_ok("Capability list follows"), self.capabilities()))
            case Quit():
                if self.state is State.TRANSACTION:
                    assert md is not None
                    self.state = State.UPDATE
                    self._waiting = Commit
                    return Commit(md.commit_plan())
                out.add(_ok("Logging out"))
                self.state = State.CLOSED
                return Close()
            case Stls():
                if self.tls_active:
                    out.add(_err("Already in TLS"))
                elif not self.settings.tls_available:
                    out.add(_err("STLS not available", "SYS/PERM"))
                elif self._buf or self._eof:
                    # RFC 2595 / RFC 8314: what was pipelined in plaintext must not be read inside TLS.
                    out.add(_err("Plaintext pipelined after STLS refused"))
                    self.state = State.CLOSED
                    return Close(refused=True)
                else:
                    out.add(_ok("Begin TLS negotiation"))
                    self._waiting = StartTls
                    return StartTls()
            case User(name):
                if self._plaintext_refused():
                    return None
                if len(name.encode()) > self.settings.max_username:
                    return self._bad_command("User name too long")
                self.username = name
                out.add(_ok("Send your password"))
            case Pass(password):
                if self._plaintext_refused():
                    return None
                if self.username is None:
                    out.add(_err("USER first"))
                    return None
                return self._authenticate(PasswordLogin(self.username, password))
            case Apop(name, digest):
                if self.timestamp is None:
                    return self._bad_command("APOP not available")
                if not _APOP_DIGEST.fullmatch(digest):
                    out.add(_err("Invalid APOP digest"))
                    return None
                if len(name.encode()) > self.settings.max_username:
                    return self._bad_command("User name too long")
                return self._authenticate(ApopLogin(name, self.timestamp, digest.lower()))
            case Auth(mechanism, initial):
                return self._auth_start(mechanism, initial)
            case Noop():
                out.add(_ok(""))
            case Stat():
                assert md is not None
                count, octets = md.stat()
                out.add(_ok(f"{count} {octets}"))
            case List(None):
                assert md is not None
                count, octets = md.stat()
                out.add_lazy(self._listing(_ok(f"{count} messages ({octets} octets)"), "size"))
            case List(msg_num):
                assert md is not None and msg_num is not None
                found = md.lookup(msg_num)
                out.add(_lookup_err(found) if isinstance(found, Lookup) else _ok(f"{msg_num} {found.size}"))
            case Uidl(None):
                assert md is not None
                out.add_lazy(self._listing(_ok("Unique-ID listing follows"), "uidl"))
            case Uidl(msg_num):
                assert md is not None and msg_num is not None
                found = md.lookup(msg_num)
                out.add(_lookup_err(found) if isinstance(found, Lookup) else _ok(f"{msg_num} {found.uidl}"))
            case Retr(msg_num) | Top(msg_num):
                assert md is not None
                found = md.lookup(msg_num)
                if isinstance(found, Lookup):
                    out.add(_lookup_err(found))
                    return None
                self._waiting = Fetch
                top = command.lines if isinstance(command, Top) else None
                return Fetch(msg_num, msg_num - 1, top, found.size)
            case Dele(msg_num):
                assert md is not None
                found = md.mark_deleted(msg_num)
                if isinstance(found, Lookup):
                    out.add(_lookup_err(found))
                else:
                    out.add(_ok(f"Message {msg_num} deleted"))
            case Rset():
                assert md is not None
                md.reset()
                count, octets = md.stat()
                out.add(_ok(f"Maildrop has {count} messages ({octets} octets)"))
            case _:
                assert_never(command)
        return None

    def _listing(self, status: bytes, field: str) -> Iterator[bytes]:
        """LIST or UIDL of the messages not marked deleted *now* (later marks do not change it), produced
        a batch at a time; a complete listing is cached for the session while the marks stay the same."""
        md = self.maildrop
        assert md is not None
        generation = md.generation
        cached = self._listings.get(field)
        if cached is not None and cached[0] == generation:
            return iter((status, *cached[1], b".\r\n"))
        return self._build_listing(status, field, generation, *md.frozen())

    def _build_listing(
        self,
        status: bytes,
        field: str,
        generation: int,
        messages: tuple[Listed, ...],
        deleted: frozenset[int],
    ) -> Iterator[bytes]:
        yield status
        built: list[bytes] = []
        for start in range(0, len(messages), LISTING_BATCH):
            batch = messages[start : start + LISTING_BATCH]
            if field == "size":
                text = "".join(
                    f"{n} {m.size}\r\n" for n, m in enumerate(batch, start + 1) if n - 1 not in deleted
                )
            else:
                text = "".join(
                    f"{n} {m.uidl}\r\n" for n, m in enumerate(batch, start + 1) if n - 1 not in deleted
                )
            if text:
                piece = text.encode("ascii", "replace")
                built.append(piece)
                yield piece
        self._listings[field] = (generation, built)
        yield b".\r\n"

    def capabilities(self) -> list[str]:
        caps = ["TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"]
        if self.state is State.AUTHORIZATION:
            if self.settings.allow_plaintext_auth or self.tls_active:
                caps += ["USER", "SASL PLAIN LOGIN"]
            if self.settings.tls_available and not self.tls_active:
                caps.append("STLS")
        if self.login_delay > 0:
            caps.append(f"LOGIN-DELAY {self.login_delay}")
        caps.append(f"EXPIRE {self.settings.expire}")
        caps.append(f"IMPLEMENTATION {self.settings.implementation}")
        return caps

    def _plaintext_refused(self) -> bool:
        if self.settings.allow_plaintext_auth or self.tls_active:
            return False
        self._out.add(_err("Plaintext authentication disallowed on non-secure connections; use STLS", "AUTH"))
        return True

    # -- authentication

    def _authenticate(self, login: Login) -> Authenticate:
        self._waiting = Authenticate
        return Authenticate(login)

    def _auth_start(self, mechanism: str | None, initial: str | None) -> Event | None:
        if mechanism is None:
            # RFC 1734 style mechanism listing, still sent by some old clients.
            self._out.add(_multiline(_ok("Supported mechanisms"), ["PLAIN", "LOGIN"]))
            return None
        if self._plaintext_refused():
            return None
        if mechanism == "PLAIN":
            self._sasl = _Sasl.PLAIN
            if initial is None:
                self._out.add(b"+ " + CRLF)
                return None
            return self._sasl_step(initial.encode("ascii"))
        if mechanism == "LOGIN":
            self._sasl = _Sasl.LOGIN_USER
            if initial is None:
                self._out.add(_LOGIN_USER_PROMPT)
                return None
            return self._sasl_step(initial.encode("ascii"))
        return self._bad_command("Unsupported authentication mechanism")

    def _sasl_step(self, line: bytes) -> Event | None:
        step = self._sasl
        assert step is not None
        out = self._out
        if line == b"*":
            self._sasl = None
            out.add(_err("Authentication cancelled"))
            return None
        try:
            if line != b"=" and len(line) % 4:
                raise binascii.Error("length")
            decoded = b"" if line == b"=" else base64.b64decode(line, validate=True)
        except (binascii.Error, ValueError):
            self._sasl = None
            return self._bad_command("Invalid base64")
        match step:
            case _Sasl.PLAIN:
                self._sasl = None
                parts = decoded.split(b"\x00")
                if len(parts) != 3:
                    return self._bad_command("Malformed PLAIN response")
                authzid, authcid, password = (_utf8(p) for p in parts)
                if authcid is None or password is None or authzid is None:
                    return self._bad_command_auth("Credentials are not UTF-8")
                if authzid and authzid != authcid:
                    return self._bad_command_auth("Proxy authorization not supported")
                if len(authcid.encode()) > self.settings.max_username:
                    return self._bad_command("User name too long")
                return self._authenticate(PasswordLogin(authcid, password))
            case _Sasl.LOGIN_USER:
                user = _utf8(decoded)
                if user is None:
                    self._sasl = None
                    return self._bad_command_auth("Credentials are not UTF-8")
                if len(decoded) > self.settings.max_username:
                    self._sasl = None
                    return self._bad_command("User name too long")
                self._sasl_user = user
                self._sasl = _Sasl.LOGIN_PASS
                out.add(_LOGIN_PASS_PROMPT)
                return None
            case _Sasl.LOGIN_PASS:
                self._sasl = None
                password = _utf8(decoded)
                if password is None:
                    return self._bad_command_auth("Credentials are not UTF-8")
                return self._authenticate(PasswordLogin(self._sasl_user, password))
            case _:
                assert_never(step)

    def _bad_command_auth(self, text: str) -> Close | None:
        """A malformed credential: an [AUTH] refusal that is no guess, but counts as a bad command."""
        return self._bad_command(text, "AUTH")

    def auth_succeeded(self, messages: Sequence[Listed], username: str) -> None:
        self._expect(Authenticate, State.AUTHORIZATION)
        self.maildrop = SessionMaildrop(messages)
        self.username = username
        self.state = State.TRANSACTION
        count, octets = self.maildrop.stat()
        self._out.add(_ok(f"Logged in, {count} messages ({octets} octets)"))

    def auth_failed(self, refusal: Refusal = Refusal.AUTH, *, login_delay: int = 0) -> None:
        """The login was refused. Only ``Refusal.AUTH`` counts toward ``max_auth_failures``.
        ``login_delay``: seconds the client now has to wait, advertised in CAPA from now on."""
        self._expect(Authenticate, State.AUTHORIZATION)
        self.username = None
        self.login_delay = max(self.login_delay, login_delay)
        self._out.add(_err(refusal.text, refusal.code))
        if refusal is Refusal.AUTH:
            self.auth_failures += 1
            if self.auth_failures >= self.settings.max_auth_failures:
                self.state = State.CLOSED
                self._close_next = Close(refused=True)

    # -- results of other events

    def fetch_failed(self, why: FetchFailure = FetchFailure.UNAVAILABLE) -> None:
        """The message could not be read before anything was sent (expunged upstream, size changed)."""
        self._expect(Fetch, State.TRANSACTION)
        self._out.add(_err(why.value, "SYS/TEMP"))

    def begin_body(self, fetch: Fetch, sink: Callable[[bytes], None] | None = None) -> None:
        """Queue the status line; body() then takes the raw message. ``sink`` sees it normalised."""
        if self._waiting is not Fetch or self._encoder is not None:
            raise LocalProtocolError("no pending fetch")
        self._encoder = BodyEncoder(fetch.top_lines, sink=sink)
        self._fetch_top = fetch.top_lines
        self._out.add(b"+OK %d octets\r\n" % fetch.size if fetch.top_lines is None else _TOP_STATUS)

    def body(self, chunk: bytes) -> None:
        encoder = self._encoder
        if encoder is None:
            raise LocalProtocolError("body() before begin_body()")
        data = encoder.feed(chunk)
        if data:
            self._out.add(data)

    @property
    def body_done(self) -> bool:
        """TOP has all it needs: the rest of the message may be skipped."""
        return self._encoder is not None and self._encoder.done

    def end_body(self) -> Sent:
        encoder = self._encoder
        if encoder is None:
            raise LocalProtocolError("end_body() before begin_body()")
        whole = self._fetch_top is None or not encoder.done
        self._out.add(encoder.finish())
        self._encoder = None
        self._waiting = None
        return Sent(encoder.octets, whole)

    def body_broken(self) -> None:
        """The upstream failed mid-message: drop what is queued (it must never look complete); close."""
        self._expect(Fetch, State.TRANSACTION)
        self._encoder = None
        self._out.clear()
        self.state = State.CLOSED

    def tls_started(self) -> None:
        self._expect(StartTls, State.AUTHORIZATION)
        self.tls_active = True
        self._buf.clear()
        self._scan_from = 0
        self.username = None

    def update_finished(self, ok: bool) -> None:
        self._expect(Commit, State.UPDATE)
        self.state = State.CLOSED
        if ok:
            deleted = self.maildrop is not None and self.maildrop.commit_plan()
            self._out.add(_ok("Logging out, messages deleted" if deleted else "Logging out"))
        else:
            self._out.add(_err("Some deleted messages were not removed", "SYS/TEMP"))
        self._close_next = Close()

    def autologout(self) -> None:
        """The idle or login timer fired: close without entering UPDATE."""
        self._closing(_err("Autologout; idle for too long"))

    def refuse(self, why: SessionRefusal) -> None:
        """Turn the connection away before anything else was sent: the refusal replaces the greeting."""
        self._out.clear()
        self._closing(_err(why.value, "SYS/TEMP"))

    def internal_error(self) -> None:
        """Something failed on our side: a generic reply (never the exception's text), then close."""
        self._closing(_err("Internal server error", "SYS/TEMP"))

    def _closing(self, reply: bytes) -> None:
        self.state = State.CLOSED
        self._waiting = None
        self._encoder = None
        self._out.add(reply)

    def _expect(self, request: type[Event], state: State) -> None:
        if self._waiting is not request or self.state is not state:
            raise LocalProtocolError(f"no pending {request.__name__} in {state.value}")
        self._waiting = None


def _lookup_err(found: Lookup) -> bytes:
    return _err("Message is deleted" if found is Lookup.DELETED else "No such message")


def _utf8(raw: bytes) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
