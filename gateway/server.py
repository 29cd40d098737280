"""The trio shell: listeners, TLS, one lockstep loop per connection, timeouts, limits and graceful drain.

All POP3 rules live in ``gateway.proto.pop3``; this module only moves bytes and calls the backend.

- ``Server.serve(task_status=...)`` opens every listener, reports the bound addresses through
  ``task_status.started`` and runs until ``drain()`` has been called and the drain has finished.
- Drain: stop accepting at once; live sessions get ``shutdown_grace`` seconds to finish (a session in the
  middle of its UPDATE completes it); then the rest are cancelled, which closes them without UPDATE.
- Timeouts: ``login_timeout`` before a successful login, ``idle_timeout`` after it; both restart at every
  client read, and a write that makes no progress for as long counts as idle too. An autologout closes
  without UPDATE.
- Every backend call is bounded by ``upstream_timeout``; a timeout is a [SYS/TEMP] reply.
- ``except Exception`` only at the session boundary: the client gets a generic -ERR, never a traceback.
  ``trio.Cancelled`` always propagates.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import socket
import ssl
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import trio

from gateway import durable
from gateway.admin import NotReady
from gateway.backends.base import (
    AuthFailed,
    Backend,
    BackendError,
    InUse,
    Maildrop,
    MessageGone,
    PermFailure,
    SizeChanged,
    TempFailure,
)
from gateway.config import Config, ListenConfig
from gateway.limits import (
    AuthThrottle,
    Limit,
    PlaintextAuthPolicy,
    SessionLimits,
    ThrottlePolicy,
    TrustedNetworks,
)
from gateway.metrics import BACKENDS, Metrics, UpstreamOp
from gateway.proto import pop3
from gateway.proto import proxy as proxyproto
from gateway.proto.body import BodyEncoder
from gateway.proto.logins import Login
from gateway.proto.uidl import Fingerprinter
from gateway.store import AsyncUidlStore

log = logging.getLogger("gateway.session")

READ_SIZE = 65536
WRITE_BATCH = 65536
DELETE_SHIELD_SECONDS = 60.0  # how long an UPDATE already under way may outlive a drain or a timeout


def make_server_tls_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert_file, key_file)
    return ctx


@dataclasses.dataclass(frozen=True, slots=True)
class Bound:
    host: str
    port: int
    tls: str


class SessionStats:
    __slots__ = ("dele", "dele_octets", "drift", "result", "retr", "retr_octets", "top", "top_octets")

    def __init__(self) -> None:
        self.retr = self.top = self.dele = 0
        self.retr_octets = self.top_octets = self.dele_octets = 0
        self.result = "closed"
        self.drift: dict[str, object] = {}


class Server:
    def __init__(
        self,
        config: Config,
        backend: Backend,
        *,
        tls_contexts: dict[int, ssl.SSLContext] | None = None,
        store: AsyncUidlStore | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.config = config
        self.backend = backend
        self.store = store
        self._tls = tls_contexts if tls_contexts is not None else self._load_tls(config)
        self._accept_scope = trio.CancelScope()
        self._active = 0
        self._idle = trio.Event()
        self._idle.set()
        self._locks: set[str] = set()
        self._last_login: dict[str, float] = {}
        self._greeting_counter = 0
        self.total_sessions = 0
        self.draining = False
        self.listening = False
        self.drained = trio.Event()  # set when serve() has finished its drain
        self.metrics = metrics if metrics is not None else Metrics()
        self._probe_cache: tuple[float, bool, str] | None = None
        self.apply_policies(config)

    def apply_policies(self, config: Config) -> None:
        """(Re)build what the config decides per connection: limits, throttling, trust, plaintext policy.
        Called at start and on SIGHUP; sessions already running keep what they started with."""
        lim = config.limits
        old = getattr(self, "limits", None)
        self.limits = SessionLimits(
            max_per_ip=lim.max_sessions_per_ip,
            max_per_account=lim.max_sessions_per_account,
            ipv6_prefix=lim.ipv6_prefix,
        )
        if old is not None:  # keep counting the sessions that are already open
            self.limits._by_ip, self.limits._by_account = old._by_ip, old._by_account
        policy = ThrottlePolicy(
            base_delay=lim.auth_delay_base,
            max_delay=lim.auth_delay_max,
            window=lim.auth_failure_window,
            lockout_after=lim.lockout_after,
            lockout_duration=lim.lockout_duration,
        )
        old_throttle = getattr(self, "throttle", None)
        self.throttle = AuthThrottle(policy, trio.current_time, ipv6_prefix=lim.ipv6_prefix)
        if old_throttle is not None:
            self.throttle._records = old_throttle._records
        self.trusted_proxies = TrustedNetworks(config.server.trusted_proxies)
        self.plaintext = PlaintextAuthPolicy(
            everywhere=config.server.allow_plaintext_auth,
            networks=TrustedNetworks(config.server.plaintext_auth_networks),
        )

    def reload(self, config: Config) -> None:
        """SIGHUP: new TLS certificates and reloadable settings for new sessions; nothing is dropped.
        Listener addresses and the upstream are not reloadable (they need a restart)."""
        tls = self._load_tls(config)
        self.apply_policies(config)
        self._tls = tls
        self.config = dataclasses.replace(
            self.config,
            server=config.server,
            limits=config.limits,
            log=config.log,
            listen=tuple(
                dataclasses.replace(old, cert_file=new.cert_file, key_file=new.key_file)
                for old, new in zip(self.config.listen, config.listen, strict=False)
            )
            + self.config.listen[len(config.listen) :],
        )

    async def ready(self) -> bool:
        """/readyz: listening, not draining, the UIDL store open, the upstream reachable (cached 5 s)."""
        if not self.listening or self.draining:
            raise NotReady("draining" if self.draining else "listeners not up")
        if self.store is not None and not self.store.is_open:
            raise NotReady("UIDL store not open")
        now = trio.current_time()
        if self._probe_cache is None or now - self._probe_cache[0] > 5:
            ok, why = await _probe_upstream(self.backend)
            self._probe_cache = (now, ok, why)
        if not self._probe_cache[1]:
            raise NotReady(self._probe_cache[2])
        return True

    @staticmethod
    def _load_tls(config: Config) -> dict[int, ssl.SSLContext]:
        return {
            i: make_server_tls_context(lc.cert_file, lc.key_file)
            for i, lc in enumerate(config.listen)
            if lc.tls != "none"
        }

    @property
    def active_sessions(self) -> int:
        return self._active

    def drain(self) -> None:
        """Stop accepting now; serve() then waits for the sessions up to the grace period."""
        self.draining = True
        self._accept_scope.cancel()

    async def serve(self, *, task_status: trio.TaskStatus[list[Bound]] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until drained. A UIDL store given unopened is opened here and closed at the end."""
        own_store = self.store is not None and not self.store.is_open
        if own_store:
            assert self.store is not None
            await self.store.open()
        try:
            await self._serve(task_status)
        finally:
            self.listening = False
            self.drained.set()
            if own_store and self.store is not None:
                with trio.CancelScope(shield=True):
                    await self.store.aclose()

    async def _serve(self, task_status: trio.TaskStatus[list[Bound]]) -> None:
        listeners: list[tuple[ListenConfig, int, trio.SocketListener]] = []
        try:
            for i, lc in enumerate(self.config.listen):
                host, port = lc.host_port()
                for listener in await trio.open_tcp_listeners(port, host=host):
                    listeners.append((lc, i, listener))
        except OSError:
            for _, _, listener in listeners:
                await listener.aclose()
            raise
        addresses = [
            Bound(str(listener.socket.getsockname()[0]), int(listener.socket.getsockname()[1]), lc.tls)
            for lc, _, listener in listeners
        ]
        async with trio.open_nursery() as sessions:
            try:
                with self._accept_scope:
                    async with trio.open_nursery() as accepting:
                        for lc, i, listener in listeners:
                            accepting.start_soon(self._accept_loop, listener, lc, i, sessions)
                        self.listening = True
                        task_status.started(addresses)
            finally:
                with trio.CancelScope(shield=True):
                    for _, _, listener in listeners:
                        await listener.aclose()
            log.info(
                "draining: %d session(s) open, grace %.0f s", self._active, self.config.server.shutdown_grace
            )
            with trio.move_on_after(self.config.server.shutdown_grace):
                await self._idle.wait()
            sessions.cancel_scope.cancel()

    async def _accept_loop(
        self, listener: trio.SocketListener, lc: ListenConfig, index: int, sessions: trio.Nursery
    ) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:  # EMFILE and friends: back off instead of spinning
                log.warning("accept failed: %s", exc)
                self.metrics.error("accept")
                await trio.sleep(0.1)
                continue
            if self._active >= self.config.server.max_sessions:
                self.metrics.session_refused(Limit.TOTAL)
                log.warning("session refused peer=%s limit=total", _peer(stream))
                sessions.start_soon(self._refuse, stream, "Too many sessions, try again later")
                continue
            self._session_started()
            sessions.start_soon(self._run_session, stream, lc, index)

    async def _refuse(self, stream: trio.abc.Stream, text: str, code: str = "SYS/TEMP") -> None:
        with trio.move_on_after(5):
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                await stream.send_all(pop3.err(text, code))
        await trio.aclose_forcefully(stream)

    def _session_started(self) -> None:
        self._active += 1
        self.total_sessions += 1
        self._idle = trio.Event() if self._active == 1 else self._idle

    def _session_ended(self) -> None:
        self._active -= 1
        if self._active == 0:
            self._idle.set()

    def _timestamp(self) -> str:
        self._greeting_counter += 1
        return f"<{os.getpid()}.{self._greeting_counter}.{time.time_ns()}@{socket.gethostname()}>"

    async def serve_stream(self, stream: trio.abc.Stream, index: int = 0) -> None:
        """Serve one already-accepted connection as if it came from listener ``index`` (tests, PROXY)."""
        self._session_started()
        await self._run_session(stream, self.config.listen[index], index)

    async def _run_session(self, raw: trio.abc.Stream, lc: ListenConfig, index: int) -> None:
        stats = SessionStats()
        started = trio.current_time()
        self.metrics.session_started()
        ip, peer = _peer_address(raw)
        stream: trio.abc.Stream = raw
        session: _Session | None = None
        counted_ip: str | None = None
        try:
            if lc.proxy_protocol:
                proxied = await self._read_proxy_header(raw, ip, peer)
                if proxied is None:
                    stats.result = "proxy-refused"
                    return
                stream, ip, peer = proxied
            refused = self.limits.acquire_connection(ip)
            if refused is not None:
                stats.result = f"refused-{refused.value}"
                self.metrics.session_refused(refused)
                log.warning("session refused peer=%s limit=%s", peer, refused.value)
                await self._refuse(stream, "Too many sessions from your address, try again later")
                return
            counted_ip = ip
            session = _Session(self, stream, lc, index, peer, stats, ip)
            await session.run()
        except trio.Cancelled:
            stats.result = "cancelled"
            raise
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            stats.result = stats.result if stats.result != "closed" else "disconnected"
            log.debug("session %s: connection lost: %s", peer, exc)
        except trio.TooSlowError:
            stats.result = "timeout"
        except Exception:
            stats.result = "internal-error"
            self.metrics.error("internal")
            log.exception("session %s: internal error", peer)
            with trio.move_on_after(1), contextlib.suppress(Exception):
                await (session.stream if session else stream).send_all(
                    pop3.err("Internal server error", "SYS/TEMP")
                )
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await trio.aclose_forcefully(session.stream if session else stream)
            if counted_ip is not None:
                self.limits.release_connection(counted_ip)
            self._session_ended()
            self.metrics.session_ended()
            fields: dict[str, object] = {
                "event": "session_end",
                "peer": peer,
                "user": session.username if session and session.username else "-",
                "result": stats.result,
                "retr": stats.retr,
                "retr_octets": stats.retr_octets,
                "top": stats.top,
                "top_octets": stats.top_octets,
                "dele": stats.dele,
                "dele_octets": stats.dele_octets,
                **stats.drift,
                "duration": round(trio.current_time() - started, 3),
            }
            log.info("session end %s", kv(fields), extra={"fields": fields})

    async def _read_proxy_header(
        self, raw: trio.abc.Stream, ip: str, peer: str
    ) -> tuple[trio.abc.Stream, str, str] | None:
        """A PROXY v1/v2 header, believed only from a trusted proxy: (stream, client ip, client peer)."""
        if not self.trusted_proxies.contains(ip):
            self.metrics.error("proxy-header")
            log.warning("PROXY listener: %s is not a trusted proxy; connection closed", peer)
            await trio.aclose_forcefully(raw)
            return None
        parser = proxyproto.ProxyParser()
        try:
            with trio.fail_after(self.config.server.login_timeout):
                while True:
                    event = parser.next_event()
                    if event is not proxyproto.NEED_DATA:
                        break
                    parser.receive_data(bytes(await raw.receive_some(4096)))
        except (proxyproto.ProxyProtocolError, trio.TooSlowError, trio.BrokenResourceError) as exc:
            self.metrics.error("proxy-header")
            log.warning("PROXY header from %s refused: %s", peer, exc)
            await trio.aclose_forcefully(raw)
            return None
        if isinstance(event, proxyproto.Proxied):
            ip, peer = str(event.source.ip), f"{event.source.ip}:{event.source.port}"
        return _Replay(raw, parser.trailing_data), ip, peer


class _Replay(trio.abc.Stream):
    """A stream that first gives back bytes already read past a PROXY header (maybe a TLS hello)."""

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


def kv(fields: dict[str, object]) -> str:
    return " ".join(f"{k}={v}" for k, v in fields.items() if k != "event")


async def _probe_upstream(backend: Backend) -> tuple[bool, str]:
    """Is the default upstream reachable? A TCP connect for IMAP/JMAP, a readable root for Maildir."""
    settings = getattr(backend, "settings", None)
    host, port = getattr(settings, "host", None), getattr(settings, "port", None)
    url = getattr(settings, "session_url", None)
    if url:
        parts = urllib.parse.urlsplit(url)
        host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    if host and port:
        try:
            with trio.fail_after(3):
                conn = await trio.open_tcp_stream(host, port)
            await conn.aclose()
        except (OSError, trio.TooSlowError) as exc:
            return False, f"upstream {host}:{port} unreachable: {exc.__class__.__name__}"
        return True, ""
    root = getattr(backend, "_root", None)
    if root is not None:
        ok = await trio.to_thread.run_sync(os.access, root, os.R_OK | os.X_OK)
        return (True, "") if ok else (False, "maildir root not readable")
    return True, ""


def _peer_address(stream: trio.abc.Stream) -> tuple[str, str]:
    sock = getattr(stream, "socket", None)
    try:
        addr = sock.getpeername() if sock is not None else None
    except OSError:
        addr = None
    if not addr or not isinstance(addr, tuple):
        return "127.0.0.1", "-"  # in-process streams (tests) count as local
    return str(addr[0]), f"{addr[0]}:{addr[1]}"


def _peer(stream: trio.abc.Stream) -> str:
    sock = getattr(stream, "socket", None)
    try:
        addr = sock.getpeername() if sock is not None else None
    except OSError:
        addr = None
    if not addr or not isinstance(addr, tuple):
        return "-"
    return f"{addr[0]}:{addr[1]}"


class _Session:
    def __init__(
        self,
        server: Server,
        raw: trio.abc.Stream,
        lc: ListenConfig,
        index: int,
        peer: str,
        stats: SessionStats,
        ip: str = "127.0.0.1",
    ) -> None:
        self.server = server
        self.ip = ip
        self.metrics = server.metrics
        self.config = server.config.server
        self.stream: trio.abc.Stream = raw
        self.lc = lc
        self.tls_context = server._tls.get(index)
        self.peer = peer
        self.stats = stats
        self.username: str | None = None
        self.out = bytearray()
        self.conn = pop3.Connection(
            pop3.Settings(
                implementation=self.config.implementation,
                login_delay=self.config.login_delay,
                expire=self.config.expire,
                tls_available=lc.tls == "starttls",
                allow_plaintext_auth=server.plaintext.allows(ip),
                max_auth_failures=self.config.max_auth_failures,
            ),
            timestamp=server._timestamp(),
            tls_active=lc.tls == "implicit",
        )

    def _timeout(self) -> float:
        if self.conn.state is pop3.State.AUTHORIZATION:
            return self.config.login_timeout
        return self.config.idle_timeout

    async def _send(self, data: bytes | bytearray) -> None:
        with trio.fail_after(self._timeout()):
            await self.stream.send_all(data)
        self.metrics.sent(len(data))

    async def flush(self) -> None:
        if self.out:
            data, self.out = self.out, bytearray()
            await self._send(data)

    async def run(self) -> None:
        async with contextlib.AsyncExitStack() as stack:
            if self.lc.tls == "implicit":
                await self._start_tls()
            self.out += self.conn.greeting()
            drop: Maildrop | None = None
            while True:
                event = self.conn.next_event()
                if event is pop3.NEED_DATA:
                    if self.conn.verbs:
                        for verb in self.conn.verbs:
                            self.metrics.command(verb)
                        self.conn.verbs.clear()
                    await self.flush()
                    with trio.move_on_after(self._timeout()) as idle:
                        data = await self.stream.receive_some(READ_SIZE)
                    if idle.cancelled_caught:
                        self.stats.result = "autologout"
                        with contextlib.suppress(trio.TooSlowError):
                            await self._send(self.conn.autologout())
                        return
                    self.conn.receive_data(bytes(data))
                    continue
                match event:
                    case pop3.Reply(data):
                        self.out += data
                        if len(self.out) >= WRITE_BATCH:
                            await self.flush()
                    case pop3.Authenticate(login):
                        await self.flush()
                        drop = await self._authenticate(login, stack)
                    case pop3.Fetch():
                        assert drop is not None
                        await self._fetch(event, drop)
                    case pop3.StartTls(reply):
                        self.out += reply
                        await self.flush()
                        await self._start_tls()
                        self.conn.tls_started()
                    case pop3.Commit(indexes):
                        await self.flush()
                        assert drop is not None
                        reply = await self._commit(drop, indexes)
                        # Release the maildrop (upstream closed, [IN-USE] lock freed, fingerprints stored)
                        # before the client hears +OK: a client that reconnects at once must get in.
                        with trio.CancelScope(shield=True), trio.move_on_after(DELETE_SHIELD_SECONDS):
                            await stack.aclose()
                        self.out += reply
                        await self.flush()
                        return
                    case pop3.Close(reply):
                        self.out += reply
                        self.stats.result = "quit" if not reply.startswith(b"-ERR") else "refused"
                        await self.flush()
                        return
                    case pop3.ConnectionClosed():
                        self.stats.result = "client-closed"
                        return
                    case _:  # pragma: no cover
                        raise AssertionError(event)

    async def _start_tls(self) -> None:
        assert self.tls_context is not None
        tls = trio.SSLStream(self.stream, self.tls_context, server_side=True)
        try:
            with trio.fail_after(self.config.login_timeout):
                await tls.do_handshake()
        except (trio.BrokenResourceError, trio.TooSlowError):
            self.metrics.error("tls-handshake")
            self.stats.result = "tls-failed"
            raise
        self.stream = tls

    async def _authenticate(self, login: Login, stack: contextlib.AsyncExitStack) -> Maildrop | None:
        backend = self.server.backend
        throttle = self.server.throttle
        account = login.username
        code: str | None
        if throttle.locked_out(self.ip, account) is not None:
            # locked out: the upstream is not even asked (no password guessing through us)
            self.metrics.login("locked-out")
            log.warning("login refused peer=%s user=%s: locked out", self.peer, _printable(account))
            self.out += self.conn.auth_failed("Authentication failed", "AUTH")
            return None
        delay = throttle.delay_for(self.ip, account)
        if delay > 0:
            await trio.sleep(delay)
        now = trio.current_time()
        try:
            with trio.fail_after(self.config.upstream_timeout), self._timed("open"):
                drop = await stack.enter_async_context(backend.open_maildrop(login))
        except AuthFailed:
            text, code, result = "Authentication failed", "AUTH", "auth"
            throttle.record_failure(self.ip, account)
            # Tell the client how long to wait (RFC 2449 LOGIN-DELAY in CAPA), now that it has to.
            wait = math.ceil(throttle.delay_for(self.ip, None))
            if wait > self.conn.settings.login_delay:
                self.conn.settings = dataclasses.replace(self.conn.settings, login_delay=wait)
        except InUse:
            text, code, result = "Maildrop is locked by another session", "IN-USE", "in-use"
        except PermFailure:
            text, code, result = "Mailbox unavailable", "SYS/PERM", "sys-perm"
            self.metrics.error("upstream-failed")
        except trio.TooSlowError:
            text, code, result = "Upstream unavailable, try again later", "SYS/TEMP", "sys-temp"
            self.metrics.error("upstream-timeout")
        except (TempFailure, BackendError):
            text, code, result = "Upstream unavailable, try again later", "SYS/TEMP", "sys-temp"
            self.metrics.error("upstream-failed")
        else:
            throttle.record_success(self.ip, account)
            key = backend.lock_key(login.username)
            if self.server.limits.acquire_account(key) is not None:
                await stack.aclose()
                self.metrics.session_refused(Limit.PER_ACCOUNT)
                self.metrics.login("in-use")
                self.out += self.conn.auth_failed("Too many sessions for this account", "IN-USE")
                return None
            stack.callback(self.server.limits.release_account, key)
            last = self.server._last_login.get(key)
            if self.config.login_delay and last is not None and now - last < self.config.login_delay:
                await stack.aclose()
                self.metrics.login("login-delay")
                self.out += self.conn.auth_failed("Logins are too frequent", "LOGIN-DELAY")
                return None
            if self.config.in_use_lock:
                if key in self.server._locks:
                    await stack.aclose()
                    self.metrics.login("in-use")
                    self.out += self.conn.auth_failed("Maildrop is locked by another session", "IN-USE")
                    return None
                self.server._locks.add(key)
                stack.callback(self.server._locks.discard, key)
            if self.server.store is not None:
                try:
                    with trio.fail_after(self.config.upstream_timeout):
                        durable_drop = await durable.attach(
                            drop,
                            self.server.store,
                            name=key,
                            account=login.username,
                            fmt=self.server.config.upstream.uidl_format,
                        )
                except (BackendError, trio.TooSlowError) as exc:
                    log.error("uidl assignment failed peer=%s user=%s: %r", self.peer, login.username, exc)
                    await stack.aclose()
                    self.metrics.login("sys-temp")
                    self.out += self.conn.auth_failed("Upstream unavailable, try again later", "SYS/TEMP")
                    return None
                stack.push_async_callback(_shielded, durable_drop.flush)
                drop = durable_drop
                self.stats.drift = durable_drop.drift
            self.server._last_login[key] = now
            self.username = login.username
            messages = drop.entries  # Entry has what the core needs: size and uidl
            self.out += self.conn.auth_succeeded(messages, login.username)
            self.metrics.login("ok")
            log.info("login peer=%s user=%s messages=%d", self.peer, login.username, len(messages))
            return drop
        log.info("login failed peer=%s user=%s code=%s", self.peer, _printable(login.username), code)
        self.metrics.login(result)  # type: ignore[arg-type]
        self.out += self.conn.auth_failed(text, code)
        return None

    @contextlib.contextmanager
    def _timed(self, op: UpstreamOp) -> Iterator[None]:
        kind = self.server.backend.name
        if kind not in BACKENDS:
            yield
            return
        with self.metrics.time_upstream(kind, op):  # type: ignore[arg-type]
            yield

    async def _fetch(self, event: pop3.Fetch, drop: Maildrop) -> None:
        fingerprint = Fingerprinter() if isinstance(drop, durable.DurableMaildrop) else None
        encoder = BodyEncoder(event.top_lines, sink=fingerprint.feed if fingerprint else None)
        chunks = drop.stream(event.index, top_lines=event.top_lines)
        async with contextlib.aclosing(chunks):
            try:
                with trio.fail_after(self.config.upstream_timeout), self._timed("fetch"):
                    first = await _first(chunks)
            except (BackendError, trio.TooSlowError) as exc:
                log.warning("fetch failed before sending peer=%s msg=%d: %r", self.peer, event.msg_num, exc)
                if isinstance(exc, SizeChanged):
                    self.out += pop3.err("Message size changed upstream; try again", "SYS/TEMP")
                else:
                    self.out += self.conn.message_unavailable()
                return
            self.out += event.status
            if first is not None:
                self.out += encoder.feed(first)
            try:
                while not encoder.done:
                    if len(self.out) >= WRITE_BATCH:
                        await self.flush()
                    with trio.fail_after(self.config.upstream_timeout):
                        chunk = await _first(chunks)
                    if chunk is None:
                        break
                    data = encoder.feed(chunk)
                    if len(data) >= WRITE_BATCH:  # big pieces go out as they are, without another copy
                        await self.flush()
                        await self._send(data)
                    else:
                        self.out += data
            except (BackendError, trio.TooSlowError) as exc:
                # The status line may be out already: the only honest thing left is to drop the connection,
                # so the client never sees a truncated message that ends like a complete one.
                log.error("upstream failed mid-message peer=%s msg=%d: %r", self.peer, event.msg_num, exc)
                self.metrics.error("upstream-mid-message")
                self.out.clear()
                self.stats.result = "upstream-failed-mid-message"
                raise trio.BrokenResourceError("upstream failed mid-message") from exc
        whole = event.top_lines is None or not encoder.done
        self.out += encoder.finish()
        if fingerprint is not None:
            assert isinstance(drop, durable.DurableMaildrop)
            if whole:
                fingerprint.finish()
            drop.note_fingerprint(
                event.index, fingerprint.header_sha1(), fingerprint.body_sha1() if whole else None
            )
        if event.top_lines is None:
            self.stats.retr += 1
            self.stats.retr_octets += encoder.octets
            if encoder.octets != event.size:
                log.warning(
                    "size mismatch peer=%s msg=%d listed=%d sent=%d; later sessions list the sent size",
                    self.peer,
                    event.msg_num,
                    event.size,
                    encoder.octets,
                )
                drop.note_size(event.index, encoder.octets)
        else:
            self.stats.top += 1
            self.stats.top_octets += encoder.octets

    async def _commit(self, drop: Maildrop, indexes: tuple[int, ...]) -> bytes:
        self.stats.dele = len(indexes)
        self.stats.dele_octets = sum(drop.entries[i].size for i in indexes)
        ok = True
        if indexes:
            # An UPDATE under way finishes even if a drain cancels the session meanwhile (bounded).
            with trio.CancelScope(shield=True):
                try:
                    with (
                        trio.fail_after(max(self.config.upstream_timeout, DELETE_SHIELD_SECONDS)),
                        self._timed("delete"),
                    ):
                        await drop.apply_deletions(indexes)
                except (BackendError, trio.TooSlowError) as exc:
                    log.error("deletions failed peer=%s user=%s: %r", self.peer, self.username, exc)
                    self.metrics.error("update-failed")
                    ok = False
        self.stats.result = "quit" if ok else "update-failed"
        return self.conn.update_finished(ok)


async def _shielded(fn: Callable[[], Awaitable[None]]) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(10):
        await fn()


async def _first(chunks: AsyncIterator[bytes]) -> bytes | None:
    try:
        return await chunks.__anext__()
    except StopAsyncIteration:
        return None


def _printable(text: str) -> str:
    return text.encode("unicode_escape").decode("ascii")[:100]


__all__ = ["Bound", "MessageGone", "Server", "make_server_tls_context"]
