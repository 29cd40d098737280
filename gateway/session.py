"""One POP3 connection: the lockstep loop between a client stream, the POP3 core and the backend.

All POP3 rules and every reply text live in ``gateway.proto.pop3``; the login policy lives in
``gateway.login``. This module moves bytes, keeps time and calls the backend:

- Time before login is one deadline from accept (``login_timeout``): the PROXY header, the TLS handshake,
  every read and every write before a successful login share it, so a client sending a byte a minute
  cannot hold a slot. After login each read may take ``idle_timeout``; a write that makes no progress for
  as long counts as idle too. Either way the client gets the core's autologout and nothing is deleted.
- Every backend call is bounded by ``upstream_timeout``; a timeout is a [SYS/TEMP] reply.
- The core says ``Flush`` after a run of pipelined commands or a long listing: the output is written, a
  slice at a time, and other sessions get a turn before the next command is handled.
- ``except Exception`` only at the session boundary: the client gets the core's generic -ERR, never a
  traceback. ``trio.Cancelled`` always propagates.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import math
import secrets
import ssl
from collections.abc import AsyncIterator, Callable
from typing import Final

import trio

from gateway import durable, proxied
from gateway.backends.base import Backend, BackendError, Maildrop, SizeChanged
from gateway.config import ListenConfig, ServerConfig
from gateway.limits import Limit, PlaintextAuthPolicy, SessionLimits, TrustedNetworks
from gateway.login import Admitted, LoginGate
from gateway.metrics import Metrics
from gateway.proto import pop3
from gateway.proto.logins import Login
from gateway.proto.uidl import Fingerprinter
from gateway.proxied import Peer, socket_peer
from gateway.sessionlog import SessionStats, escape, log_session_end

log = logging.getLogger("gateway.session")

READ_SIZE: Final = 65536
WRITE_BATCH: Final = 65536
DELETE_SHIELD_SECONDS: Final = 60.0  # how long an UPDATE already under way may outlive a drain or a timeout


class Occupancy:
    """Sessions open, and how many of them have not logged in yet (the pre-login cap)."""

    __slots__ = ("_idle", "active", "total", "unauthenticated")

    def __init__(self) -> None:
        self.active = 0
        self.unauthenticated = 0
        self.total = 0  # sessions that got a greeting
        self._idle = trio.Event()
        self._idle.set()

    def opened(self) -> None:
        self.active += 1
        if self.active == 1:
            self._idle = trio.Event()

    def closed(self) -> None:
        self.active -= 1
        if self.active == 0:
            self._idle.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()


@dataclasses.dataclass(frozen=True, slots=True)
class SessionEnv:
    """What a session needs from the server, fixed when it starts (a reload affects later sessions)."""

    config: ServerConfig
    backend: Backend
    gate: LoginGate
    limits: SessionLimits
    metrics: Metrics
    occupancy: Occupancy
    plaintext: PlaintextAuthPolicy
    trusted_proxies: TrustedNetworks
    apop: bool  # offer APOP (a timestamp in the greeting) where the backend can check it


def greeting_timestamp() -> str:
    """An APOP timestamp (RFC 1939 section 7) that tells nothing: no pid, clock or host name."""
    return f"<{secrets.token_hex(16)}@pop3-gateway>"


async def run_session(
    env: SessionEnv, raw: trio.abc.Stream, listener: ListenConfig, tls: ssl.SSLContext | None
) -> None:
    """Serve one accepted connection to its end. The caller has counted it in ``env.occupancy``."""
    stats = SessionStats()
    started = trio.current_time()
    deadline = started + env.config.login_timeout
    peer = socket_peer(raw)
    stream: trio.abc.Stream = raw
    conn: pop3.Connection | None = None
    counted_ip: str | None = None
    unauthenticated = False
    greeted = False
    occupancy = env.occupancy
    try:
        if listener.proxy_protocol:
            prelude = await proxied.read_prelude(raw, peer, trusted=env.trusted_proxies, deadline=deadline)
            if isinstance(prelude, proxied.Refused):
                env.metrics.error("proxy-header")
                log.warning("PROXY header from %s refused: %s", peer.text, prelude.reason)
                stats.result = "proxy-refused"
                return
            stream, peer = prelude
        refusal = _refusal(env)
        if refusal is None:
            refused_by = env.limits.acquire_connection(peer.key)
            if refused_by is not None:
                refusal = pop3.SessionRefusal.TOO_MANY_FROM_ADDRESS, refused_by
            else:
                counted_ip = peer.key
        cfg = env.config
        apop = refusal is None and cfg.apop and await env.backend.apop_available()
        conn = pop3.Connection(
            pop3.Settings(
                implementation=cfg.implementation,
                login_delay=cfg.login_delay,
                expire=cfg.expire,
                tls_available=listener.tls == "starttls",
                allow_plaintext_auth=env.plaintext.allows(peer.ip, proxied=peer.proxied),
                max_auth_failures=cfg.max_auth_failures,
                max_bad_commands=cfg.max_bad_commands,
            ),
            apop_timestamp=greeting_timestamp() if apop else None,
            tls_active=listener.tls == "implicit",
        )
        if refusal is not None:
            why, limit = refusal
            stats.result = f"refused-{limit.value}"
            env.metrics.session_refused(limit)
            log.warning("session refused peer=%s limit=%s", peer.text, limit.value)
            if listener.tls != "implicit":  # no TLS handshake is spent on a refused connection
                conn.refuse(why)
                with trio.move_on_after(5), contextlib.suppress(trio.BrokenResourceError, OSError):
                    while data := conn.data_to_send():
                        await stream.send_all(data)
            return
        occupancy.total += 1
        occupancy.unauthenticated += 1
        unauthenticated = True
        greeted = True
        env.metrics.session_started()

        def logged_in() -> None:
            nonlocal unauthenticated
            if unauthenticated:
                unauthenticated = False
                occupancy.unauthenticated -= 1

        session = _Session(env, stream, conn, listener, tls, peer, stats, deadline, logged_in)
        try:
            await session.run()
        finally:
            stream = session.stream
    except trio.Cancelled:
        stats.result = "cancelled"
        raise
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        stats.ended("disconnected")
        log.debug("session %s: connection lost: %r", peer.text, exc)
    except trio.TooSlowError:
        stats.ended("timeout")
    except Exception:
        stats.result = "internal-error"
        env.metrics.error("internal")
        log.exception("session %s: internal error", peer.text)
        if conn is not None:
            conn.internal_error()
            with trio.move_on_after(1), contextlib.suppress(Exception):
                while data := conn.data_to_send():
                    await stream.send_all(data)
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            await trio.aclose_forcefully(stream)
        if counted_ip is not None:
            env.limits.release_connection(counted_ip)
        if unauthenticated:
            occupancy.unauthenticated -= 1
        if greeted:
            env.metrics.session_ended()
        log_session_end(peer.text, stats, trio.current_time() - started)


def _refusal(env: SessionEnv) -> tuple[pop3.SessionRefusal, Limit] | None:
    cfg = env.config
    occupancy = env.occupancy
    if occupancy.active > cfg.max_sessions:
        return pop3.SessionRefusal.TOO_MANY, Limit.TOTAL
    if occupancy.unauthenticated >= cfg.unauthenticated_cap:
        return pop3.SessionRefusal.TOO_MANY_UNAUTHENTICATED, Limit.UNAUTHENTICATED
    return None


class _Session:
    def __init__(
        self,
        env: SessionEnv,
        stream: trio.abc.Stream,
        conn: pop3.Connection,
        listener: ListenConfig,
        tls: ssl.SSLContext | None,
        peer: Peer,
        stats: SessionStats,
        deadline: float,
        logged_in: Callable[[], None],
    ) -> None:
        self.env = env
        self.config = env.config
        self.metrics = env.metrics
        self.stream = stream
        self.conn = conn
        self.listener = listener
        self.tls = tls
        self.peer = peer
        self.stats = stats
        self.login_deadline = deadline
        self._logged_in = logged_in
        self.drop: Maildrop | None = None

    # -- time

    def _deadline(self) -> float:
        """When the current wait for the client must end."""
        if self.conn.state is pop3.State.AUTHORIZATION:
            return self.login_deadline
        return trio.current_time() + self.config.idle_timeout

    async def _send(self, data: bytes | bytearray) -> None:
        with trio.fail_at(self._deadline()):
            await self.stream.send_all(data)
        self.metrics.sent(len(data))

    async def flush(self) -> None:
        while data := self.conn.data_to_send():
            await self._send(data)

    # -- the loop

    async def run(self) -> None:
        conn = self.conn
        async with contextlib.AsyncExitStack() as stack:
            if self.listener.tls == "implicit":
                await self._start_tls()
            while True:
                event = conn.next_event()
                if event is pop3.NEED_DATA:
                    self._count_verbs()
                    await self.flush()
                    with trio.move_on_at(self._deadline()) as waited:
                        data = await self.stream.receive_some(READ_SIZE)
                    if waited.cancelled_caught:
                        self.stats.result = "autologout"
                        conn.autologout()
                        with trio.move_on_after(5), contextlib.suppress(trio.BrokenResourceError):
                            while data := conn.data_to_send():  # its own short bound: the deadline is gone
                                await self.stream.send_all(data)
                        return
                    conn.receive_data(bytes(data))
                    continue
                match event:
                    case pop3.Flush():
                        self._count_verbs()
                        await self.flush()
                        await trio.lowlevel.checkpoint()
                    case pop3.Authenticate(login):
                        await self.flush()
                        await self._authenticate(login, stack)
                    case pop3.Fetch():
                        await self._fetch(event)
                    case pop3.StartTls():
                        await self.flush()
                        await self._start_tls()
                        conn.tls_started()
                    case pop3.Commit(indexes):
                        await self.flush()
                        ok = await self._commit(indexes)
                        # Release the maildrop (upstream closed, [IN-USE] lock freed, fingerprints stored)
                        # before the client hears +OK: a client that reconnects at once must get in.
                        with trio.CancelScope(shield=True), trio.move_on_after(DELETE_SHIELD_SECONDS):
                            await stack.aclose()
                        conn.update_finished(ok)
                    case pop3.Close(refused):
                        self.stats.ended("refused" if refused else "quit")
                        self._count_verbs()
                        await self.flush()
                        return
                    case pop3.ConnectionClosed():
                        self.stats.result = "client-closed"
                        return
                    case _:  # pragma: no cover
                        raise AssertionError(event)

    def _count_verbs(self) -> None:
        verbs = self.conn.verbs
        if len(verbs) == 1:  # lockstep clients: one command per read
            self.metrics.command(verbs[0])
            verbs.clear()
        elif verbs:
            for verb, n in collections.Counter(verbs).items():
                self.metrics.command(verb, n)
            verbs.clear()

    async def _start_tls(self) -> None:
        assert self.tls is not None
        tls = trio.SSLStream(self.stream, self.tls, server_side=True)
        try:
            with trio.fail_at(self.login_deadline):
                await tls.do_handshake()
        except (trio.BrokenResourceError, trio.TooSlowError):
            self.metrics.error("tls-handshake")
            self.stats.result = "tls-failed"
            raise
        self.stream = tls

    async def _authenticate(self, login: Login, stack: contextlib.AsyncExitStack) -> None:
        gate = self.env.gate
        attempt = contextlib.AsyncExitStack()
        try:
            result = await gate.login(login, ip=self.peer.key, peer=self.peer.text, stack=attempt)
        except BaseException:
            with trio.CancelScope(shield=True):
                await attempt.aclose()
            raise
        if isinstance(result, Admitted):
            stack.push_async_exit(attempt)
            self.drop = result.drop
            self.stats.user = result.username
            if isinstance(result.drop, durable.DurableMaildrop):
                self.stats.drift = result.drop.drift
            self.conn.auth_succeeded(result.drop.entries, result.username)
            self._logged_in()
            log.info(
                "login peer=%s user=%s messages=%d",
                self.peer.text,
                escape(result.username),
                len(result.drop.entries),
            )
            return
        with trio.CancelScope(shield=True):
            await attempt.aclose()
        self.conn.auth_failed(result.outcome.refusal, login_delay=result.login_delay)

    async def _fetch(self, event: pop3.Fetch) -> None:
        drop = self.drop
        conn = self.conn
        assert drop is not None
        timeout = self.config.upstream_timeout
        fingerprint = Fingerprinter() if isinstance(drop, durable.DurableMaildrop) else None
        chunks = drop.stream(event.index, top_lines=event.top_lines)
        async with contextlib.aclosing(chunks):
            try:
                with trio.fail_after(timeout), self.metrics.time_upstream(self.env.backend.name, "fetch"):
                    first = await _first(chunks)
            except (BackendError, trio.TooSlowError) as exc:
                log.warning(
                    "fetch failed before sending peer=%s msg=%d: %r", self.peer.text, event.msg_num, exc
                )
                conn.fetch_failed(
                    pop3.FetchFailure.SIZE_CHANGED
                    if isinstance(exc, SizeChanged)
                    else pop3.FetchFailure.UNAVAILABLE
                )
                return
            conn.begin_body(event, sink=fingerprint.feed if fingerprint else None)
            if first is not None:
                conn.body(first)
            try:
                # one cancel scope for the whole body, its deadline moved before each upstream read: a new
                # fail_after per chunk cost more than the chunk's encoding on small messages
                with trio.CancelScope() as watch:
                    while not conn.body_done:
                        if conn.pending_output >= WRITE_BATCH:
                            watch.deadline = math.inf  # the client's write has its own bound
                            await self.flush()
                        watch.deadline = trio.current_time() + timeout
                        chunk = await _first(chunks)
                        if chunk is None:
                            break
                        conn.body(chunk)
                if watch.cancelled_caught:
                    raise trio.TooSlowError("upstream read timed out mid-message")
            except (BackendError, trio.TooSlowError) as exc:
                # The status line may be out already: the only honest thing left is to drop the connection,
                # so the client never sees a truncated message that ends like a complete one.
                log.error(
                    "upstream failed mid-message peer=%s msg=%d: %r", self.peer.text, event.msg_num, exc
                )
                self.metrics.error("upstream-mid-message")
                conn.body_broken()
                self.stats.result = "upstream-failed-mid-message"
                raise trio.BrokenResourceError("upstream failed mid-message") from exc
        sent = conn.end_body()
        if fingerprint is not None:
            assert isinstance(drop, durable.DurableMaildrop)
            if sent.whole:
                fingerprint.finish()
            drop.note_fingerprint(
                event.index, fingerprint.header_sha1(), fingerprint.body_sha1() if sent.whole else None
            )
        if event.top_lines is None:
            self.stats.retr += 1
            self.stats.retr_octets += sent.octets
            if sent.octets != event.size:
                log.warning(
                    "size mismatch peer=%s msg=%d listed=%d sent=%d; later sessions list the sent size",
                    self.peer.text,
                    event.msg_num,
                    event.size,
                    sent.octets,
                )
                drop.note_size(event.index, sent.octets)
        else:
            self.stats.top += 1
            self.stats.top_octets += sent.octets

    async def _commit(self, indexes: tuple[int, ...]) -> bool:
        drop = self.drop
        assert drop is not None
        self.stats.dele = len(indexes)
        self.stats.dele_octets = sum(drop.entries[i].size for i in indexes)
        ok = True
        if indexes:
            # An UPDATE under way finishes even if a drain cancels the session meanwhile (bounded).
            with trio.CancelScope(shield=True):
                try:
                    with (
                        trio.fail_after(max(self.config.upstream_timeout, DELETE_SHIELD_SECONDS)),
                        self.metrics.time_upstream(self.env.backend.name, "delete"),
                    ):
                        await drop.apply_deletions(indexes)
                except (BackendError, trio.TooSlowError) as exc:
                    log.error(
                        "deletions failed peer=%s user=%s: %r",
                        self.peer.text,
                        escape(self.stats.user or ""),
                        exc,
                    )
                    self.metrics.error("update-failed")
                    ok = False
        self.stats.result = "quit" if ok else "update-failed"
        return ok


async def _first(chunks: AsyncIterator[bytes]) -> bytes | None:
    try:
        return await chunks.__anext__()
    except StopAsyncIteration:
        return None
