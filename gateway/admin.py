"""The admin HTTP endpoint: health, readiness and Prometheus metrics, served by h11 on trio.

Routes (GET and HEAD only; other methods on these paths get 405, other paths 404):

- ``/healthz``: 200 ``ok`` while the process can serve HTTP at all (the liveness probe). Always open.
- ``/readyz``: 200 ``ready`` when ``ready_check()`` returns true; else 503 ``not ready: <reason>``. The
  reason is the text of a ``NotReady`` the check raised, or a fixed text (a false result, a check that
  took longer than ``ready_timeout``, any other exception: logged, never shown). Open to probes; with a
  token configured, a request without it gets the status and ``not ready`` only, never the reason.
- ``/metrics``: the process's ``Metrics`` in Prometheus text, or OpenMetrics when the Accept header asks.
  With a token configured, it wants ``Authorization: Bearer <token>`` (else 401).

Rules:

- One lockstep loop per connection: read one request (headers and body) within ``read_timeout``, answer,
  then keep the connection for the next request unless either side asked to close. A connection with no
  request begun (new, or kept alive after one) is closed silently after ``idle_timeout``; a request begun
  and not finished within ``read_timeout`` gets 408.
- Probes always get through: at most ``max_connections`` connections at once, at most
  ``max_connections_per_ip`` from one address. A new connection over either cap closes the oldest idle
  connection (of that address, for the per-address cap), else the oldest one still sending its request;
  only when every connection is being answered does it wait (the total cap) or get closed (the per-address
  cap). So idle or trickling sockets can never keep ``/healthz`` from answering.
- Bounded: request line and headers at most ``max_request_bytes`` (else 431), a body at most
  ``max_body_bytes`` (else 413). Malformed HTTP gets h11's status hint (400) and a close; nothing a client
  sends ends the server. ``except Exception`` only at the connection boundary; ``Cancelled`` propagates.
- Response bodies are fixed texts or the metrics exposition: no exception text, no request echo. The
  token is kept as a SHA-256 digest only, compared in constant time, and never logged or shown.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import hashlib
import hmac
import http
import logging
import os
import stat
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Final, NoReturn

import h11
import trio

from gateway.config import ADMIN_TOKEN_ENV, AdminConfig, ConfigError
from gateway.errors import open_tcp_listeners
from gateway.fdlimit import ResilientListener
from gateway.limits import client_key
from gateway.metrics import Metrics

log = logging.getLogger("gateway.admin")

READ_SIZE: Final = 4096
LINGER_SECONDS: Final = 1.0
LINGER_BYTES: Final = 65536
ReadyCheck = Callable[[], Awaitable[bool]]


class NotReady(Exception):
    """Raised by a readiness check: the text is shown to the prober (keep it free of secrets)."""


TOKEN_MIN_LENGTH: Final = 16
TOKEN_MAX_LENGTH: Final = 4096


class AdminToken:
    """The admin bearer token: only its SHA-256 digest is kept, compared in constant time, never shown."""

    __slots__ = ("_digest",)

    def __init__(self, token: str) -> None:
        if not TOKEN_MIN_LENGTH <= len(token) <= TOKEN_MAX_LENGTH:
            raise ValueError(f"must be {TOKEN_MIN_LENGTH} to {TOKEN_MAX_LENGTH} characters long")
        if not all("!" <= c <= "~" for c in token):
            raise ValueError("must be visible ASCII characters only (no spaces)")
        self._digest = hashlib.sha256(token.encode("ascii")).digest()

    def matches(self, presented: bytes) -> bool:
        # Digests of equal length: the comparison takes the same time whatever was presented.
        return hmac.compare_digest(self._digest, hashlib.sha256(presented).digest())

    def __repr__(self) -> str:
        return "AdminToken(<hidden>)"


def load_token(admin: AdminConfig, environ: Mapping[str, str] = os.environ) -> AdminToken | None:
    """The token from ``admin.token_file`` (mode 0600 or stricter), else from the environment, else None.

    Raises ``ConfigError`` naming ``admin.token_file`` (or the variable); the message never holds the token.
    """
    if admin.token_file:
        key, path = "admin.token_file", Path(admin.token_file)
        try:
            info = path.stat()
            if not stat.S_ISREG(info.st_mode):
                raise ConfigError(f"{path} is not a regular file", key=key)
            if info.st_mode & 0o077:
                raise ConfigError(
                    f"{path} is readable or writable by group or others "
                    f"(mode {stat.S_IMODE(info.st_mode):04o}): chmod 600 it",
                    key=key,
                )
            text = path.read_text(encoding="ascii").strip()
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror}", key=key) from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path} holds non-ASCII characters", key=key) from None
    elif ADMIN_TOKEN_ENV in environ:
        key, text = ADMIN_TOKEN_ENV, environ[ADMIN_TOKEN_ENV].strip()
    else:
        return None
    try:
        return AdminToken(text)
    except ValueError as exc:
        raise ConfigError(f"the admin token {exc}", key=key) from None


@dataclasses.dataclass(frozen=True, slots=True)
class AdminSettings:
    read_timeout: float = 10.0  # for one request
    idle_timeout: float = 5.0  # for a connection with no request begun (new, or kept alive)
    max_request_bytes: int = 8192  # request line and headers
    max_body_bytes: int = 1024
    max_connections: int = 32
    max_connections_per_ip: int = 8
    ready_timeout: float = 5.0  # how long /readyz waits for the check
    token: AdminToken | None = dataclasses.field(default=None, repr=False)

    @classmethod
    def from_config(cls, admin: AdminConfig, token: AdminToken | None = None) -> AdminSettings:
        return cls(
            read_timeout=admin.read_timeout,
            idle_timeout=admin.idle_timeout,
            max_connections=admin.max_connections,
            max_connections_per_ip=admin.max_connections_per_ip,
            token=token,
        )


class _State(enum.Enum):
    IDLE = "idle"  # no request begun: new, or kept alive after an answer
    READING = "reading"  # a request begun and not yet whole
    BUSY = "busy"  # being answered


@dataclasses.dataclass(eq=False, slots=True)
class _Slot:
    """One connection served now: whose it is, what it does since when, and how to close it."""

    ip: str
    since: float
    state: _State = _State.IDLE
    scope: trio.CancelScope = dataclasses.field(default_factory=trio.CancelScope)

    def mark(self, state: _State) -> None:
        self.state, self.since = state, trio.current_time()


class _Slots:
    """The connection caps, enforced in one place: who is served, and who makes room for a newcomer."""

    def __init__(self, total: int, per_ip: int) -> None:
        self.total = total
        self.per_ip = per_ip
        self._slots: list[_Slot] = []
        self._freed = trio.Event()

    def __len__(self) -> int:
        return len(self._slots)

    async def admit(self, ip: str) -> _Slot | None:
        """A slot for a new connection from ``ip``, made by closing another if need be; None: refuse it."""
        while True:
            same = [s for s in self._slots if s.ip == ip]
            if len(same) >= self.per_ip:
                victim = _victim(same)
                if victim is None:
                    return None  # that address's connections are all being answered
                self._evict(victim, "per-ip")
                continue
            if len(self._slots) >= self.total:
                victim = _victim(self._slots)
                if victim is None:
                    await self._freed.wait()  # every one is being answered: soon one is free
                else:
                    self._evict(victim, "total")
                continue
            slot = _Slot(ip, trio.current_time())
            self._slots.append(slot)
            return slot

    def release(self, slot: _Slot) -> None:
        if slot in self._slots:
            self._slots.remove(slot)
            self._freed.set()
            self._freed = trio.Event()

    def _evict(self, slot: _Slot, cap: str) -> None:
        log.debug(
            "admin: closing a %s connection from %s for a new one (%s cap)", slot.state.value, slot.ip, cap
        )
        slot.scope.cancel()
        self.release(slot)


def _victim(slots: list[_Slot]) -> _Slot | None:
    """The connection to close for a newcomer: the longest idle, else the longest still sending."""
    for state in (_State.IDLE, _State.READING):
        candidates = [s for s in slots if s.state is state]
        if candidates:
            return min(candidates, key=lambda s: s.since)
    return None


@dataclasses.dataclass(frozen=True, slots=True)
class _Answer:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    extra: tuple[tuple[str, str], ...] = ()


_ROUTES: Final = (b"/healthz", b"/readyz", b"/metrics")
_REASONS: Final = {
    400: "bad request",
    408: "request timeout",
    413: "request too large",
    431: "headers too large",
}


async def serve_admin(
    address: str,
    metrics: Metrics,
    ready_check: ReadyCheck,
    *,
    settings: AdminSettings = AdminSettings(),  # frozen: one shared default is safe
    task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Listen on ``address`` (HOST:PORT; port 0 picks one) and serve until cancelled.

    ``task_status.started`` reports the bound (host, port) pairs. A bind failure raises
    ``gateway.errors.ListenError`` (an OSError) naming the address and ``admin``.
    """
    listeners = await open_tcp_listeners(address, "admin")
    app = _Admin(metrics, ready_check, settings)
    try:
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                resilient = ResilientListener(listener, name=f"{address} (admin)")
                nursery.start_soon(app.accept_loop, resilient, nursery)
            task_status.started(
                [(str(s.socket.getsockname()[0]), int(s.socket.getsockname()[1])) for s in listeners]
            )
    finally:
        with trio.CancelScope(shield=True):
            for listener in listeners:
                await listener.aclose()
    raise AssertionError("the accept loops never return")  # pragma: no cover


class _Admin:
    def __init__(self, metrics: Metrics, ready_check: ReadyCheck, settings: AdminSettings) -> None:
        self.metrics = metrics
        self.ready_check = ready_check
        self.settings = settings
        self.slots = _Slots(settings.max_connections, settings.max_connections_per_ip)

    async def accept_loop(
        self, listener: trio.abc.Listener[trio.SocketStream], nursery: trio.Nursery
    ) -> NoReturn:
        while True:
            # ResilientListener rides out EMFILE and friends, with a bounded rate of log lines
            stream = await listener.accept()
            try:
                ip = client_key(str(stream.socket.getpeername()[0]))
            except OSError:  # gone already
                await trio.aclose_forcefully(stream)
                continue
            try:
                slot = await self.slots.admit(ip)
            except BaseException:
                await trio.aclose_forcefully(stream)
                raise
            if slot is None:
                log.debug("admin: refusing a connection from %s: all of its connections are busy", ip)
                await trio.aclose_forcefully(stream)
                continue
            nursery.start_soon(self.connection, stream, slot)

    async def connection(self, stream: trio.SocketStream, slot: _Slot) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.settings.max_request_bytes)
        try:
            with slot.scope:  # cancelled when a newcomer needs this slot
                try:
                    await self._serve(stream, conn, slot)
                except h11.RemoteProtocolError as exc:
                    await self._refuse(stream, conn, exc.error_status_hint)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
            pass
        except Exception:
            log.exception("admin connection failed")
        finally:
            self.slots.release(slot)
            await trio.aclose_forcefully(stream)

    async def _serve(self, stream: trio.SocketStream, conn: h11.Connection, slot: _Slot) -> None:
        while True:
            request = await self._receive_request(stream, conn, slot)
            if request is None:
                return
            answer = await self._route(request)
            log.debug("admin %s %s -> %d", request.method.decode(), request.target.decode(), answer.status)
            await self._send_answer(stream, conn, answer, head=request.method == b"HEAD")
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return  # one side asked to close (Connection: close, HTTP/1.0)
            conn.start_next_cycle()

    async def _receive_request(
        self, stream: trio.SocketStream, conn: h11.Connection, slot: _Slot
    ) -> h11.Request | None:
        """One whole request (the body read and dropped), or None when the client closed or went idle.

        Until its first byte the wait is ``idle_timeout``; the whole request must come within
        ``read_timeout`` of the start.
        """
        request: h11.Request | None = None
        body = 0
        begun = bool(conn.trailing_data[0])
        slot.mark(_State.READING if begun else _State.IDLE)
        start = trio.current_time()
        timeouts = self.settings.read_timeout, min(self.settings.idle_timeout, self.settings.read_timeout)
        with trio.move_on_after(timeouts[0] if begun else timeouts[1]) as scope:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(READ_SIZE)
                    if data and not begun:
                        begun = True
                        slot.mark(_State.READING)
                        scope.deadline = start + timeouts[0]
                    conn.receive_data(data)
                elif isinstance(event, h11.Request):
                    request = event
                    if conn.they_are_waiting_for_100_continue:
                        await self._send(stream, conn, h11.InformationalResponse(status_code=100, headers=[]))
                elif isinstance(event, h11.Data):
                    body += len(event.data)
                    if body > self.settings.max_body_bytes:
                        await self._refuse(stream, conn, 413)
                        return None
                elif isinstance(event, h11.EndOfMessage):
                    slot.mark(_State.BUSY)
                    return request
                else:  # ConnectionClosed (PAUSED cannot come: a cycle ends with EndOfMessage)
                    return None
        if begun:
            await self._refuse(stream, conn, 408)
        return None

    async def _route(self, request: h11.Request) -> _Answer:
        path = request.target.partition(b"?")[0]
        if path not in _ROUTES:
            return _Answer(404, b"not found\n")
        if request.method not in (b"GET", b"HEAD"):
            return _Answer(405, b"method not allowed\n", extra=(("Allow", "GET, HEAD"),))
        if path == b"/healthz":
            return _Answer(200, b"ok\n")
        authorized = self._authorized(request)
        if path == b"/readyz":
            ready, reason = await self._readiness()
            if ready:
                return _Answer(200, b"ready\n")
            return _Answer(503, f"not ready: {reason}\n".encode() if authorized else b"not ready\n")
        if not authorized:
            return _Answer(
                401, b"unauthorized\n", extra=(("WWW-Authenticate", 'Bearer realm="pop3-gateway"'),)
            )
        accept = next((v for k, v in request.headers if k == b"accept"), b"").decode("latin-1")
        body, content_type = self.metrics.render(accept)
        return _Answer(200, body, content_type)

    def _authorized(self, request: h11.Request) -> bool:
        """No token configured, or exactly one ``Authorization: Bearer <token>`` that matches."""
        token = self.settings.token
        if token is None:
            return True
        values = [v for k, v in request.headers if k == b"authorization"]
        if len(values) != 1:
            return False
        scheme, _, credentials = values[0].partition(b" ")
        return scheme.lower() == b"bearer" and token.matches(credentials.strip())

    async def _readiness(self) -> tuple[bool, str]:
        try:
            with trio.fail_after(self.settings.ready_timeout):
                ready = await self.ready_check()
        except NotReady as exc:
            return False, str(exc) or "not ready"
        except trio.TooSlowError:
            return False, "readiness check timed out"
        except Exception:
            log.exception("readiness check failed")
            return False, "readiness check failed"
        return (True, "") if ready else (False, "not ready")

    async def _send_answer(
        self, stream: trio.SocketStream, conn: h11.Connection, answer: _Answer, *, head: bool = False
    ) -> None:
        headers = [
            ("Content-Type", answer.content_type),
            ("Content-Length", str(len(answer.body))),
            ("Cache-Control", "no-store"),
            *answer.extra,
        ]
        reason = http.HTTPStatus(answer.status).phrase.encode()
        await self._send(
            stream, conn, h11.Response(status_code=answer.status, headers=headers, reason=reason)
        )
        if not head:
            await self._send(stream, conn, h11.Data(data=answer.body))
        await self._send(stream, conn, h11.EndOfMessage())

    async def _refuse(self, stream: trio.SocketStream, conn: h11.Connection, status: int) -> None:
        """Answer a request we cannot serve, then close gracefully (the caller's finally closes)."""
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        reason = _REASONS.get(status, "bad request")
        answer = _Answer(status, reason.encode() + b"\n", extra=(("Connection", "close"),))
        with contextlib.suppress(
            h11.LocalProtocolError, trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError
        ):
            await self._send_answer(stream, conn, answer)
            # Lingering close: closing with unread input makes the kernel send RST, which can destroy
            # the answer before the client reads it. Stop writing, then drain briefly.
            await stream.send_eof()
            drained = 0
            with trio.move_on_after(LINGER_SECONDS):
                while drained < LINGER_BYTES and (data := await stream.receive_some(READ_SIZE)):
                    drained += len(data)

    async def _send(self, stream: trio.SocketStream, conn: h11.Connection, event: h11.Event) -> None:
        data = conn.send(event)
        if data:
            with trio.fail_after(self.settings.read_timeout):
                await stream.send_all(data)
