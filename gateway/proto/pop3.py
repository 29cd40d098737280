"""Sans-IO POP3 server protocol (RFC 1939, RFC 2449 CAPA, RFC 3206 codes, RFC 5034 AUTH, RFC 2595 STLS).

Use:
    conn = Connection(settings, timestamp="<123.456@host>")
    send(conn.greeting())
    loop:
        conn.receive_data(data)            # b"" means the client closed
        while (event := conn.next_event()) is not NEED_DATA:
            Reply -> write it.
            Authenticate -> ask the backend; write conn.auth_succeeded(...) or conn.auth_failed(...).
            Fetch -> stream the message through a BodyEncoder.
            StartTls -> write, wrap the stream, conn.tls_started().
            Commit -> apply the deletions, write conn.update_finished(ok), close.
            Close / ConnectionClosed -> close.

Invariants:
- The core never raises on anything a client sends: every input becomes a reply or a close. Only misuse
  by the caller (a result for a request it was not asked) raises LocalProtocolError.
- Lockstep: after an event that needs the caller (Authenticate, Fetch, StartTls, Commit) no further
  command is parsed until the caller reports back (Fetch needs no report: its reply is the stream).
- Commands are at most ``max_line`` octets including CRLF (RFC 2449: 255). A longer line is discarded
  as it arrives, without buffering it, and answered with one -ERR. AUTH continuation lines may be
  longer (``max_auth_line``), since SASL responses are base64.
- Which command is legal in which state is the one table ``_ALLOWED`` below.
- Message numbers are 1-based and fixed for the session; deletion marks live in ``Maildrop``.
- Nothing is deleted unless QUIT is received in TRANSACTION: then Commit carries the marked indexes.
  A closed connection or an autologout gives ConnectionClosed/Close, never Commit.
- After STLS, bytes the client pipelined behind it in plaintext are refused: -ERR and Close.
- Reply text never contains exception text or secrets; secrets never reach a repr.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import enum
import re
from collections.abc import Sequence
from typing import Final, assert_never

from gateway.proto.logins import ApopLogin, Login, PasswordLogin
from gateway.proto.maildrop import Listed, Lookup, Maildrop

CRLF: Final = b"\r\n"


class State(enum.Enum):
    AUTHORIZATION = "AUTHORIZATION"
    TRANSACTION = "TRANSACTION"
    UPDATE = "UPDATE"
    CLOSED = "CLOSED"


class LocalProtocolError(Exception):
    """Our caller used the core wrongly (a bug on our side, never the client's)."""


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
class Reply:
    """Write these bytes."""

    data: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class Authenticate:
    """Check these credentials upstream; then call auth_succeeded() or auth_failed()."""

    login: Login


@dataclasses.dataclass(frozen=True, slots=True)
class Fetch:
    """Send ``status`` and then the message at 0-based ``index`` through a BodyEncoder(top_lines).

    If the message cannot be had before anything was written, send message_unavailable() instead.
    If it fails after the status line went out, close the connection without the terminator."""

    msg_num: int
    index: int
    top_lines: int | None
    size: int
    status: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class StartTls:
    """Write ``reply``, run the TLS handshake as server, then call tls_started()."""

    reply: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class Commit:
    """UPDATE state: apply these deletions as one batch, then write update_finished(ok) and close."""

    indexes: tuple[int, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class Close:
    """Write ``reply`` (may be empty) and close the connection. Nothing is deleted."""

    reply: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The client went away. Nothing is deleted."""


class _NeedData:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = _NeedData()

Event = Reply | Authenticate | Fetch | StartTls | Commit | Close | ConnectionClosed


# ---------------------------------------------------------------- reply formatting (pure)


def ok(text: str) -> bytes:
    return b"+OK " + text.encode("ascii", "replace") + CRLF if text else b"+OK" + CRLF


def err(text: str, code: str | None = None) -> bytes:
    prefix = f"[{code}] " if code else ""
    return b"-ERR " + (prefix + text).encode("ascii", "replace") + CRLF


def multiline(status: bytes, lines: Sequence[str]) -> bytes:
    """A multi-line reply of short protocol lines (CAPA, LIST, UIDL); they never start with '.'."""
    body = "".join(line + "\r\n" for line in lines).encode("ascii", "replace")
    return status + body + b".\r\n"


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


_LOGIN_USER_PROMPT: Final = b"+ " + base64.b64encode(b"Username:") + CRLF
_LOGIN_PASS_PROMPT: Final = b"+ " + base64.b64encode(b"Password:") + CRLF


class Connection:
    def __init__(self, settings: Settings, *, timestamp: str, tls_active: bool = False) -> None:
        self.settings = settings
        self.timestamp = timestamp
        self.tls_active = tls_active
        self.state = State.AUTHORIZATION
        self.maildrop: Maildrop | None = None
        self.username: str | None = None  # after USER, and the authenticated name after login
        self.auth_failures = 0
        self._buf = bytearray()
        self._scan_from = 0  # where the LF search resumes: the buffer is never rescanned
        self._discarding = False  # inside an over-long line
        self._eof = False
        self._waiting = False  # an event needs the caller's answer before the next command
        self._sasl: _Sasl | None = None
        self._sasl_user = ""
        self._pending: list[Event] = []
        self.verbs: list[str] = []  # the verb of every command parsed, for the caller to count and clear

    # -- input

    def greeting(self) -> bytes:
        return ok(f"POP3 gateway ready {self.timestamp}")

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

    def next_event(self) -> Event | _NeedData:
        if self._pending:
            return self._pending.pop(0)
        if self.state is State.CLOSED or self._waiting:
            return NEED_DATA
        line = self._next_line()
        if line is None:
            if self._eof:
                self.state = State.CLOSED
                return ConnectionClosed()
            return NEED_DATA
        if isinstance(line, Reply):
            return line
        if self._sasl is not None:
            return self._sasl_step(line)
        try:
            command = parse_command(line)
        except BadCommand as exc:
            self.verbs.append("OTHER")
            return Reply(err(str(exc)))
        self.verbs.append(type(command).__name__.upper())
        if self.state not in _ALLOWED[type(command)]:
            return Reply(err(f"Command not valid in {self.state.value} state"))
        return self._handle(command)

    def _next_line(self) -> bytes | Reply | None:
        """The next complete line (without CRLF), a Reply for an over-long one, or None."""
        limit = self.settings.max_auth_line if self._sasl is not None else self.settings.max_line
        while True:
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
            if self._discarding:
                self._discarding = False
                return Reply(err("Line too long"))
            if nl + 1 > limit:
                return Reply(err("Line too long"))
            if line.endswith(b"\r"):
                line = line[:-1]
            return line

    # -- dispatch

    def _handle(self, command: Command) -> Event:
        md = self.maildrop
        match command:
            case Capa():
                return Reply(multiline(ok("Capability list follows"), self.capabilities()))
            case Quit():
                if self.state is State.TRANSACTION:
                    assert md is not None
                    self.state = State.UPDATE
                    self._waiting = True
                    return Commit(md.commit_plan())
                self.state = State.CLOSED
                return Close(ok("Logging out"))
            case Stls():
                if not self.settings.tls_available or self.tls_active:
                    return Reply(
                        err("STLS not available", "SYS/PERM")
                        if not self.tls_active
                        else err("Already in TLS")
                    )
                if self._buf or self._eof:
                    # RFC 2595 / RFC 8314: what was pipelined in plaintext must not be read inside TLS.
                    self.state = State.CLOSED
                    return Close(err("Plaintext pipelined after STLS refused"))
                self._waiting = True
                return StartTls(ok("Begin TLS negotiation"))
            case User(name):
                if refusal := self._plaintext_refusal():
                    return refusal
                self.username = name
                return Reply(ok("Send your password"))
            case Pass(password):
                if refusal := self._plaintext_refusal():
                    return refusal
                if self.username is None:
                    return Reply(err("USER first"))
                return self._authenticate(PasswordLogin(self.username, password))
            case Apop(name, digest):
                if not _APOP_DIGEST.fullmatch(digest):
                    return Reply(err("Invalid APOP digest"))
                return self._authenticate(ApopLogin(name, self.timestamp, digest.lower()))
            case Auth(mechanism, initial):
                return self._auth_start(mechanism, initial)
            case Noop():
                return Reply(ok(""))
            case Stat():
                assert md is not None
                count, octets = md.stat()
                return Reply(ok(f"{count} {octets}"))
            case List(None):
                assert md is not None
                count, octets = md.stat()
                return Reply(multiline(ok(f"{count} messages ({octets} octets)"), md.lines("size")))
            case List(msg_num):
                assert md is not None and msg_num is not None
                found = md.lookup(msg_num)
                if isinstance(found, Lookup):
                    return Reply(_lookup_err(found))
                return Reply(ok(f"{msg_num} {found.size}"))
            case Uidl(None):
                assert md is not None
                return Reply(multiline(ok("Unique-ID listing follows"), md.lines("uidl")))
            case Uidl(msg_num):
                assert md is not None and msg_num is not None
                found = md.lookup(msg_num)
                if isinstance(found, Lookup):
                    return Reply(_lookup_err(found))
                return Reply(ok(f"{msg_num} {found.uidl}"))
            case Retr(msg_num):
                assert md is not None
                found = md.lookup(msg_num)
                if isinstance(found, Lookup):
                    return Reply(_lookup_err(found))
                return Fetch(msg_num, msg_num - 1, None, found.size, ok(f"{found.size} octets"))
            case Top(msg_num, lines):
                assert md is not None
                found = md.lookup(msg_num)
                if isinstance(found, Lookup):
                    return Reply(_lookup_err(found))
                return Fetch(msg_num, msg_num - 1, lines, found.size, ok("Top of message follows"))
            case Dele(msg_num):
                assert md is not None
                found = md.mark_deleted(msg_num)
                if isinstance(found, Lookup):
                    return Reply(_lookup_err(found))
                return Reply(ok(f"Message {msg_num} deleted"))
            case Rset():
                assert md is not None
                md.reset()
                count, octets = md.stat()
                return Reply(ok(f"Maildrop has {count} messages ({octets} octets)"))
            case _:
                assert_never(command)

    def capabilities(self) -> list[str]:
        caps = ["TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"]
        if self.state is State.AUTHORIZATION:
            if self.settings.allow_plaintext_auth or self.tls_active:
                caps += ["USER", "SASL PLAIN LOGIN"]
            if self.settings.tls_available and not self.tls_active:
                caps.append("STLS")
        login_delay = f"LOGIN-DELAY {self.settings.login_delay}" if self.settings.login_delay > 0 else None
        if login_delay:
            caps.append(login_delay)
        caps.append(f"EXPIRE {self.settings.expire}")
        caps.append(f"IMPLEMENTATION {self.settings.implementation}")
        return caps

    def _plaintext_refusal(self) -> Reply | None:
        if self.settings.allow_plaintext_auth or self.tls_active:
            return None
        return Reply(err("Plaintext authentication disallowed on non-secure connections; use STLS", "AUTH"))

    # -- authentication

    def _authenticate(self, login: Login) -> Authenticate:
        self._waiting = True
        return Authenticate(login)

    def _auth_start(self, mechanism: str | None, initial: str | None) -> Event:
        if mechanism is None:
            # RFC 1734 style mechanism listing, still sent by some old clients.
            return Reply(multiline(ok("Supported mechanisms"), ["PLAIN", "LOGIN"]))
        if refusal := self._plaintext_refusal():
            return refusal
        if mechanism == "PLAIN":
            self._sasl = _Sasl.PLAIN
            if initial is None:
                return Reply(b"+ " + CRLF)
            return self._sasl_step(initial.encode("ascii"))
        if mechanism == "LOGIN":
            self._sasl = _Sasl.LOGIN_USER
            if initial is None:
                return Reply(_LOGIN_USER_PROMPT)
            return self._sasl_step(initial.encode("ascii"))
        return Reply(err("Unsupported authentication mechanism"))

    def _sasl_step(self, line: bytes) -> Event:
        step = self._sasl
        assert step is not None
        if line == b"*":
            self._sasl = None
            return Reply(err("Authentication cancelled"))
        try:
            if line != b"=" and len(line) % 4:
                raise binascii.Error("length")
            decoded = b"" if line == b"=" else base64.b64decode(line, validate=True)
        except (binascii.Error, ValueError):
            self._sasl = None
            return Reply(err("Invalid base64"))
        match step:
            case _Sasl.PLAIN:
                self._sasl = None
                parts = decoded.split(b"\x00")
                if len(parts) != 3:
                    return Reply(err("Malformed PLAIN response"))
                authzid, authcid, password = (_utf8(p) for p in parts)
                if authcid is None or password is None or authzid is None:
                    return Reply(err("Credentials are not UTF-8", "AUTH"))
                if authzid and authzid != authcid:
                    return self._auth_failed_reply(err("Proxy authorization not supported", "AUTH"))
                return self._authenticate(PasswordLogin(authcid, password))
            case _Sasl.LOGIN_USER:
                user = _utf8(decoded)
                if user is None:
                    self._sasl = None
                    return Reply(err("Credentials are not UTF-8", "AUTH"))
                self._sasl_user = user
                self._sasl = _Sasl.LOGIN_PASS
                return Reply(_LOGIN_PASS_PROMPT)
            case _Sasl.LOGIN_PASS:
                self._sasl = None
                password = _utf8(decoded)
                if password is None:
                    return Reply(err("Credentials are not UTF-8", "AUTH"))
                return self._authenticate(PasswordLogin(self._sasl_user, password))
            case _:
                assert_never(step)

    def auth_succeeded(self, messages: Sequence[Listed], username: str) -> bytes:
        self._expect_waiting(State.AUTHORIZATION)
        self._waiting = False
        self.maildrop = Maildrop(messages)
        self.username = username
        self.state = State.TRANSACTION
        count, octets = self.maildrop.stat()
        return ok(f"Logged in, {count} messages ({octets} octets)")

    def auth_failed(self, text: str = "Authentication failed", code: str | None = "AUTH") -> bytes:
        """The login was refused. ``code``: AUTH, IN-USE, LOGIN-DELAY, SYS/TEMP or SYS/PERM."""
        self._expect_waiting(State.AUTHORIZATION)
        self._waiting = False
        self.username = None
        reply = self._auth_failed_reply(err(text, code))
        if isinstance(reply, Close):
            self._pending.append(reply)
            return b""
        return reply.data

    def _auth_failed_reply(self, reply: bytes) -> Reply | Close:
        self.auth_failures += 1
        if self.auth_failures >= self.settings.max_auth_failures:
            self.state = State.CLOSED
            return Close(reply)
        return Reply(reply)

    # -- results of other events

    def message_unavailable(self) -> bytes:
        """The message could not be read before anything was sent (e.g. expunged upstream)."""
        return err("Message is no longer available", "SYS/TEMP")

    def tls_started(self) -> None:
        self._expect_waiting(State.AUTHORIZATION)
        self._waiting = False
        self.tls_active = True
        self._buf.clear()
        self._scan_from = 0
        self.username = None

    def update_finished(self, ok_: bool) -> bytes:
        self._expect_waiting(State.UPDATE)
        self._waiting = False
        self.state = State.CLOSED
        if ok_:
            return ok(
                "Logging out, messages deleted"
                if self.maildrop and self.maildrop.commit_plan()
                else "Logging out"
            )
        return err("Some deleted messages were not removed", "SYS/TEMP")

    def autologout(self) -> bytes:
        """The idle timer fired: close without entering UPDATE."""
        self.state = State.CLOSED
        return err("Autologout; idle for too long")

    def _expect_waiting(self, state: State) -> None:
        if not self._waiting or self.state is not state:
            raise LocalProtocolError(f"no pending request in {state.value}")


def _lookup_err(found: Lookup) -> bytes:
    return err("Message is deleted" if found is Lookup.DELETED else "No such message")


def _utf8(raw: bytes) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
