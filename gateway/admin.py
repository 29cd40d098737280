"""The admin HTTP endpoint: health, readiness and Prometheus metrics, served by h11 on trio.

Routes (GET and HEAD only; other methods on these paths get 405, other paths 404):

- ``/healthz``: 200 ``ok`` while the process can serve HTTP at all (the liveness probe).
- ``/readyz``: 200 ``ready`` when ``ready_check()`` returns true; else 503 ``not ready: <reason>``. The
  reason is the text of a ``NotReady`` the check raised, or a fixed text (a false result, a check that
  took longer than ``ready_timeout``, any other exception: logged, never shown).
- ``/metrics``: the process's ``Metrics`` in Prometheus text, or OpenMetrics when the Accept header asks.

Rules:

- One lockstep loop per connection: read one request (headers and body) within ``read_timeout``, answer,
  then keep the connection for the next request unless either side asked to close. An idle keep-alive
  connection is closed after ``read_timeout``; a request begun and not finished in time gets 408.
- Bounded: request line and headers at most ``max_request_bytes`` (else 431), a body at most
  ``max_body_bytes`` (else 413), at most ``max_connections`` connections served at once (the next ones
  wait in the listen backlog). Malformed HTTP gets h11's status hint (400) and a close; nothing a client
  sends ends the server. ``except Exception`` only at the connection boundary; ``Cancelled`` propagates.
- Response bodies are fixed texts or the metrics exposition: no exception text, no request echo.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http
import logging
from collections.abc import Awaitable, Callable
from typing import Final, NoReturn

import h11
import trio

from gateway.config import parse_host_port
from gateway.metrics import Metrics

log = logging.getLogger("gateway.admin")

READ_SIZE: Final = 4096
LINGER_SECONDS: Final = 1.0
LINGER_BYTES: Final = 65536
ReadyCheck = Callable[[], Awaitable[bool]]


class NotReady(Exception):
    """Raised by a readiness check: the text is shown to the prober (keep it free of secrets)."""


@dataclasses.dataclass(frozen=True, slots=True)
class AdminSettings:
    read_timeout: float = 10.0  # for one request, and for an idle keep-alive connection
    max_request_bytes: int = 8192  # request line and headers
    max_body_bytes: int = 1024
    max_connections: int = 32
    ready_timeout: float = 5.0  # how long /readyz waits for the check


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

    ``task_status.started`` reports the bound (host, port) pairs. A bind failure raises OSError.
    """
    host, port = parse_host_port(address)
    listeners = await trio.open_tcp_listeners(port, host=host)
    app = _Admin(metrics, ready_check, settings)
    limiter = trio.CapacityLimiter(settings.max_connections)
    try:
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(app.accept_loop, listener, limiter, nursery)
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

    async def accept_loop(
        self, listener: trio.SocketListener, limiter: trio.CapacityLimiter, nursery: trio.Nursery
    ) -> NoReturn:
        while True:
            token = object()
            await limiter.acquire_on_behalf_of(token)
            try:
                stream = await listener.accept()
            except OSError as exc:  # EMFILE and friends: back off instead of spinning
                limiter.release_on_behalf_of(token)
                log.warning("admin accept failed: %s", exc)
                await trio.sleep(0.1)
                continue
            except BaseException:
                limiter.release_on_behalf_of(token)
                raise
            nursery.start_soon(self.connection, stream, limiter, token)

    async def connection(
        self, stream: trio.SocketStream, limiter: trio.CapacityLimiter, token: object
    ) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.settings.max_request_bytes)
        try:
            await self._serve(stream, conn)
        except h11.RemoteProtocolError as exc:
            await self._refuse(stream, conn, exc.error_status_hint)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
            pass
        except Exception:
            log.exception("admin connection failed")
        finally:
            limiter.release_on_behalf_of(token)
            await trio.aclose_forcefully(stream)

    async def _serve(self, stream: trio.SocketStream, conn: h11.Connection) -> None:
        while True:
            request = await self._receive_request(stream, conn)
            if request is None:
                return
            answer = await self._route(request)
            log.debug("admin %s %s -> %d", request.method.decode(), request.target.decode(), answer.status)
            await self._send_answer(stream, conn, answer, head=request.method == b"HEAD")
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return  # one side asked to close (Connection: close, HTTP/1.0)
            conn.start_next_cycle()

    async def _receive_request(self, stream: trio.SocketStream, conn: h11.Connection) -> h11.Request | None:
        """One whole request (the body read and dropped), or None when the client closed or went idle."""
        request: h11.Request | None = None
        body = 0
        begun = bool(conn.trailing_data[0])
        with trio.move_on_after(self.settings.read_timeout):
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(READ_SIZE)
                    begun = begun or bool(data)
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
        if path == b"/readyz":
            ready, reason = await self._readiness()
            return _Answer(200, b"ready\n") if ready else _Answer(503, f"not ready: {reason}\n".encode())
        accept = next((v for k, v in request.headers if k == b"accept"), b"").decode("latin-1")
        body, content_type = self.metrics.render(accept)
        return _Answer(200, body, content_type)

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
