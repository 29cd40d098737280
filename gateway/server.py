"""The trio shell: listeners, accept, graceful drain and reload. A session is ``gateway.session``'s.

- ``Server.serve(task_status=...)`` opens every listener, reports the bound addresses through
  ``task_status.started`` and runs until ``drain()`` has been called and the drain has finished.
  Accepting is ``trio.serve_listeners``, one call per configured listener.
- Drain: stop accepting at once; live sessions get ``shutdown_grace`` seconds to finish (a session in the
  middle of its UPDATE completes it); then the rest are cancelled, which closes them without UPDATE.
- Reload (SIGHUP): the new configuration's objects are all built first; only then are they swapped in,
  for sessions that start afterwards. Sessions already running keep what they started with.
"""

from __future__ import annotations

import dataclasses
import functools
import ssl

import trio

from gateway import errors, reload, tls
from gateway.admin import NotReady
from gateway.backends.base import Backend, BackendError, MessageGone, NotReachable
from gateway.config import Config, ListenConfig
from gateway.fdlimit import ResilientListener
from gateway.identity import IdentityPolicy
from gateway.limits import (
    AuthThrottle,
    PlaintextAuthPolicy,
    SessionLimits,
    TrustedNetworks,
)
from gateway.login import GateSettings, LoginGate
from gateway.metrics import Metrics
from gateway.session import DELETE_SHIELD_SECONDS, Occupancy, SessionEnv, run_session
from gateway.sessionlog import log
from gateway.store import AsyncUidlStore


@dataclasses.dataclass(frozen=True, slots=True)
class Bound:
    host: str
    port: int
    tls: str


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
        self.metrics = metrics if metrics is not None else Metrics()
        self._tls = tls_contexts if tls_contexts is not None else self._load_tls(config)
        self._accept_scope = trio.CancelScope()
        self.occupancy = Occupancy()
        self.draining = False
        self.listening = False
        self.drained = trio.Event()  # set when serve() has finished its drain
        self._probe_cache: tuple[float, bool, str] | None = None
        limits, throttle = self._policies(config)
        self.gate = LoginGate(
            backend,
            limits=limits,
            throttle=throttle,
            metrics=self.metrics,
            settings=self._gate_settings(config),
            store=store,
        )
        self._env = self._make_env(config)

    # -- what sessions see

    @staticmethod
    def _policies(config: Config) -> tuple[SessionLimits, AuthThrottle]:
        lim = config.limits
        policy, limits = reload.policies(lim)
        return limits, AuthThrottle(
            policy,
            trio.current_time,
            ipv6_prefix=lim.ipv6_prefix,
            identity=IdentityPolicy.from_config(config.server),
        )

    @staticmethod
    def _gate_settings(config: Config) -> GateSettings:
        return GateSettings(
            login_delay=config.server.login_delay,
            in_use_lock=config.server.in_use_lock,
            upstream_timeout=config.server.upstream_timeout,
            uidl_format=config.upstream.uidl_format,
        )

    def _make_env(
        self,
        config: Config,
        *,
        limits: SessionLimits | None = None,
        plaintext: PlaintextAuthPolicy | None = None,
        trusted_proxies: TrustedNetworks | None = None,
    ) -> SessionEnv:
        """What new sessions see; a reload hands in the objects its plan built already."""
        s = config.server
        return SessionEnv(
            config=s,
            backend=self.backend,
            gate=self.gate,
            limits=limits if limits is not None else self.gate.limits,
            metrics=self.metrics,
            occupancy=self.occupancy,
            plaintext=plaintext
            if plaintext is not None
            else PlaintextAuthPolicy(
                everywhere=s.allow_plaintext_auth, networks=TrustedNetworks(s.plaintext_auth_networks)
            ),
            trusted_proxies=trusted_proxies
            if trusted_proxies is not None
            else TrustedNetworks(s.trusted_proxies),
            apop=s.apop,
        )

    @property
    def store(self) -> AsyncUidlStore | None:
        return self.gate.store

    @store.setter
    def store(self, store: AsyncUidlStore | None) -> None:
        self.gate.store = store

    @property
    def limits(self) -> SessionLimits:
        return self.gate.limits

    @property
    def throttle(self) -> AuthThrottle:
        return self.gate.throttle

    @property
    def active_sessions(self) -> int:
        return self.occupancy.active

    @property
    def total_sessions(self) -> int:
        return self.occupancy.total

    # -- reload

    def reload(self, config: Config) -> reload.Reload:
        """SIGHUP: plan the reload whole (``gateway.reload``: every new object built, and a change that
        cannot apply live refused with ``ReloadRefused``) before anything is swapped; then swap with plain
        assignments that cannot fail. New sessions see the new settings; running ones keep theirs."""
        plan = reload.plan_reload(self.config, config, open_sessions=self.occupancy.active)
        built = plan.built
        limits = built.limits
        old = self.gate.limits
        limits._by_ip, limits._by_account = old._by_ip, old._by_account  # keep counting open sessions
        throttle = AuthThrottle(
            built.throttle_policy,
            trio.current_time,
            ipv6_prefix=plan.config.limits.ipv6_prefix,
            identity=IdentityPolicy.from_config(plan.config.server),
        )
        throttle._records = self.gate.throttle._records
        settings = self._gate_settings(plan.config)
        env = self._make_env(
            plan.config, limits=limits, plaintext=built.plaintext, trusted_proxies=built.trusted_proxies
        )
        # everything is built: from here on nothing can fail
        self.gate.reconfigure(limits=limits, throttle=throttle, settings=settings)
        self._tls = dict(built.tls_contexts)
        self.config = plan.config
        self._env = env
        return plan

    @staticmethod
    def _load_tls(config: Config) -> dict[int, ssl.SSLContext]:
        return {
            i: tls.server_context(lc.cert_file, lc.key_file)
            for i, lc in enumerate(config.listen)
            if lc.tls != "none"
        }

    # -- readiness

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

    # -- serving

    def drain(self) -> None:
        """Stop accepting now; serve() then waits for the sessions up to the grace period."""
        self.draining = True
        self._accept_scope.cancel()

    async def serve(self, *, task_status: trio.TaskStatus[list[Bound]] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until drained. A UIDL store given unopened is opened here and closed at the end."""
        store = self.store
        own_store = store is not None and not store.is_open
        if store is not None and own_store:
            await store.open()
        try:
            await self._serve(task_status)
        finally:
            self.listening = False
            self.drained.set()
            if store is not None and own_store:
                with trio.CancelScope(shield=True):
                    await store.aclose()

    async def _open_listeners(self) -> list[tuple[int, list[trio.SocketListener]]]:
        groups: list[tuple[int, list[trio.SocketListener]]] = []
        try:
            for i, lc in enumerate(self.config.listen):
                groups.append((i, await errors.open_tcp_listeners(lc.address, "pop3")))
        except BaseException:
            for _, group in groups:
                for listener in group:
                    await trio.aclose_forcefully(listener)
            raise
        return groups

    async def _serve(self, task_status: trio.TaskStatus[list[Bound]]) -> None:
        groups = await self._open_listeners()
        addresses = [
            Bound(
                str(listener.socket.getsockname()[0]),
                int(listener.socket.getsockname()[1]),
                self.config.listen[i].tls,
            )
            for i, group in groups
            for listener in group
        ]
        async with trio.open_nursery() as sessions:
            try:
                with self._accept_scope:
                    async with trio.open_nursery() as accepting:
                        for i, group in groups:
                            handler = functools.partial(self._handle, self.config.listen[i], i)
                            resilient = [ResilientListener(x, on_failure=self._accept_failed) for x in group]
                            await accepting.start(
                                functools.partial(
                                    trio.serve_listeners, handler, resilient, handler_nursery=sessions
                                )
                            )
                        self.listening = True
                        task_status.started(addresses)
            finally:
                with trio.CancelScope(shield=True):
                    for _, group in groups:
                        for listener in group:
                            await trio.aclose_forcefully(listener)
                self.listening = False  # every listener is closed: a connection attempt is refused now
            log.info(
                "draining: %d session(s) open, grace %.0f s",
                self.occupancy.active,
                self.config.server.shutdown_grace,
            )
            with trio.move_on_after(self.config.server.shutdown_grace):
                await self.occupancy.wait_idle()
            sessions.cancel_scope.cancel()

    def _accept_failed(self, exc: OSError) -> None:
        self.metrics.error("accept")

    async def _handle(self, lc: ListenConfig, index: int, stream: trio.abc.Stream) -> None:
        self.occupancy.opened()
        try:
            await run_session(self._env, stream, lc, self._tls.get(index))
        finally:
            self.occupancy.closed()

    async def serve_stream(self, stream: trio.abc.Stream, index: int = 0) -> None:
        """Serve one already-accepted connection as if it came from listener ``index`` (tests)."""
        await self._handle(self.config.listen[index], index, stream)


PROBE_SECONDS = 3.0


async def _probe_upstream(backend: Backend) -> tuple[bool, str]:
    """Can the default upstream serve logins? The backend's own ``probe``, bounded to PROBE_SECONDS."""
    try:
        with trio.fail_after(PROBE_SECONDS):
            await backend.probe()
    except NotReachable as exc:
        return False, str(exc)  # worded for probers: a host:port or a fixed phrase
    except trio.TooSlowError:
        return False, f"upstream probe took over {PROBE_SECONDS:g} s"
    except BackendError as exc:
        log.warning("upstream probe failed: %r", exc)
        return False, "upstream not ready"
    return True, ""


__all__ = [
    "DELETE_SHIELD_SECONDS",
    "Bound",
    "MessageGone",
    "Server",
]
