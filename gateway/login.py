"""The login gate: everything that decides whether a login may proceed, in one place.

The session hands the gate the credentials the POP3 core parsed; the gate answers ``Admitted`` (a maildrop,
open and attached to the UIDL store, with its resources on the session's exit stack) or ``Refused`` (the
core's ``Refusal`` and the metric label). The session writes nothing of its own: the core words the reply.

Rules, in the order they apply:

1. **Reservation before the wait.** Every attempt first reserves a pending slot on its client key and its
   account key. The delay it waits is the one its key would have after all attempts in flight ahead of it
   failed too, so twenty parallel guesses wait 1, 2, 4, ... seconds, not twenty times the same delay, and
   a lock-out cannot be overshot by the concurrency: an attempt that would be the one past
   ``lockout_after`` counts as locked out. After the wait the lock-out is checked again.
2. **A clean address is not punished for someone else's guesses.** An address with no failures and no
   attempt in flight is judged by its own record only: the account's delay and lock-out (the work of
   guessers elsewhere) apply only to addresses that have failed themselves.
3. **A lock-out answers like a failure.** After the same delay a failure would have had, with the same
   ``-ERR [AUTH]`` reply; the upstream is not asked.
4. **Only a wrong password is a failure.** [IN-USE], [LOGIN-DELAY], [SYS/...] refusals and an APOP that
   could never succeed (``ApopUnavailable``) are not recorded as failed guesses.
5. After the upstream accepted the credentials: the per-account session limit, LOGIN-DELAY (the last login
   per account, bounded), the [IN-USE] lock, then the UIDL store.

``OUTCOMES`` is the one table from a backend's outcome to the POP3 refusal, the login metric label and the
error metric (if any).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import math
from collections.abc import Iterator
from typing import Final

import trio

from gateway import durable, identity
from gateway.backends.base import (
    ApopUnavailable,
    AuthFailed,
    Backend,
    BackendError,
    Maildrop,
    PermFailure,
    TempFailure,
)
from gateway.config import UidlFormat
from gateway.identity import throttle_key
from gateway.limits import AuthThrottle, Limit, SessionLimits, ThrottlePolicy, client_key
from gateway.metrics import ErrorKind, LoginResult, Metrics
from gateway.proto.logins import Login
from gateway.proto.pop3 import Refusal
from gateway.sessionlog import escape
from gateway.store import AsyncUidlStore

log = logging.getLogger("gateway.login")

MAX_REMEMBERED_LOGINS: Final = 100_000  # accounts whose last login time is kept for LOGIN-DELAY


@dataclasses.dataclass(frozen=True, slots=True)
class Outcome:
    refusal: Refusal
    result: LoginResult
    error: ErrorKind | None = None


# The one table: backend outcome -> POP3 refusal, login metric label, error metric.
OUTCOMES: Final[dict[type[BaseException], Outcome]] = {
    ApopUnavailable: Outcome(Refusal.AUTH, "auth"),
    AuthFailed: Outcome(Refusal.AUTH, "auth"),
    PermFailure: Outcome(Refusal.PERM, "sys-perm", "upstream-failed"),
    TempFailure: Outcome(Refusal.TEMP, "sys-temp", "upstream-failed"),
    BackendError: Outcome(Refusal.TEMP, "sys-temp", "upstream-failed"),
    trio.TooSlowError: Outcome(Refusal.TEMP, "sys-temp", "upstream-timeout"),
}
LOCKED_OUT: Final = Outcome(Refusal.AUTH, "locked-out")
ACCOUNT_BUSY: Final = Outcome(Refusal.ACCOUNT_BUSY, "in-use")
IN_USE: Final = Outcome(Refusal.IN_USE, "in-use")
TOO_FREQUENT: Final = Outcome(Refusal.LOGIN_DELAY, "login-delay")
STORE_FAILED: Final = Outcome(Refusal.TEMP, "sys-temp", "upstream-failed")


def outcome_of(exc: BaseException) -> Outcome:
    for kind in type(exc).__mro__:
        found = OUTCOMES.get(kind)
        if found is not None:
            return found
    raise LookupError(type(exc).__name__)  # pragma: no cover (only OUTCOMES' types are caught)


@dataclasses.dataclass(frozen=True, slots=True)
class Admitted:
    drop: Maildrop
    username: str
    key: str


@dataclasses.dataclass(frozen=True, slots=True)
class Refused:
    outcome: Outcome
    login_delay: int = 0  # seconds the client should now wait (CAPA LOGIN-DELAY)


@dataclasses.dataclass(frozen=True, slots=True)
class GateSettings:
    login_delay: int = 0
    in_use_lock: bool = True
    upstream_timeout: float = 30.0
    uidl_format: UidlFormat = "native"


class _Pending:
    """Attempts in flight per key (bounded by the sessions open: a key goes when its count is 0)."""

    __slots__ = ("_counts",)

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}

    def get(self, key: str) -> int:
        return self._counts.get(key, 0)

    @contextlib.contextmanager
    def reserve(self, *keys: str) -> Iterator[None]:
        for key in keys:
            self._counts[key] = self._counts.get(key, 0) + 1
        try:
            yield
        finally:
            for key in keys:
                n = self._counts[key] - 1
                if n:
                    self._counts[key] = n
                else:
                    del self._counts[key]


def _delay_after(policy: ThrottlePolicy, failures: int) -> float:
    if failures <= 0 or policy.base_delay == 0:
        return 0.0
    return float(min(policy.base_delay * 2.0 ** min(failures - 1, 64), policy.max_delay))


class LoginGate:
    def __init__(
        self,
        backend: Backend,
        *,
        limits: SessionLimits,
        throttle: AuthThrottle,
        metrics: Metrics,
        settings: GateSettings,
        store: AsyncUidlStore | None = None,
    ) -> None:
        self.backend = backend
        self.store = store
        self.metrics = metrics
        self.limits = limits
        self.throttle = throttle
        self.settings = settings
        self._pending = _Pending()
        self._locks: set[str] = set()
        self._last_login: collections.OrderedDict[str, float] = collections.OrderedDict()

    def reconfigure(self, *, limits: SessionLimits, throttle: AuthThrottle, settings: GateSettings) -> None:
        """SIGHUP: new policies for new attempts. Built by the caller; swapping cannot fail."""
        self.limits, self.throttle, self.settings = limits, throttle, settings

    async def login(
        self, login: Login, *, ip: str, peer: str, stack: contextlib.AsyncExitStack
    ) -> Admitted | Refused:
        throttle = self.throttle
        policy = throttle.policy
        ip_key = "ip:" + client_key(ip, throttle.ipv6_prefix)
        account = login.username
        acct_key = "account:" + throttle_key(account, throttle.identity).hex()  # ALICE and alice are one
        clean = throttle.failures(ip) == 0 and self._pending.get(ip_key) == 0 and not throttle.locked_out(ip)
        scope_account = None if clean else account
        with self._pending.reserve(ip_key, acct_key):
            ahead = self._pending.get(ip_key) - 1
            if scope_account is not None:
                ahead = max(ahead, self._pending.get(acct_key) - 1)
            failures = throttle.failures(ip, scope_account) + ahead
            locked = throttle.locked_out(ip, scope_account) is not None or bool(
                policy.lockout_after and failures >= policy.lockout_after
            )
            delay = _delay_after(policy, failures)
            if locked:  # the delay of the attempt that locked the key out: no faster answer gives it away
                delay = max(delay, _delay_after(policy, policy.lockout_after - 1))
            if delay > 0:
                await trio.sleep(delay)
            if locked or throttle.locked_out(ip, scope_account) is not None:
                # answered like a failure, after the same delay; the upstream is not asked
                log.warning("login refused peer=%s user=%s: locked out", peer, escape(account))
                return self._refused(LOCKED_OUT)
            try:
                with (
                    trio.fail_after(self.settings.upstream_timeout),
                    self.metrics.time_upstream(self.backend.name, "open"),
                ):
                    drop = await stack.enter_async_context(self.backend.open_maildrop(login))
            except (BackendError, trio.TooSlowError) as exc:
                outcome = outcome_of(exc)
                wait = 0
                if outcome.refusal is Refusal.AUTH and not isinstance(exc, ApopUnavailable):
                    throttle.record_failure(ip, account)
                    wait = math.ceil(throttle.delay_for(ip))
                log.info("login failed peer=%s user=%s code=%s", peer, escape(account), outcome.refusal.code)
                return self._refused(outcome, wait)
        throttle.record_success(ip, account)
        return await self._admit(login, drop, peer, stack)

    async def _admit(
        self, login: Login, drop: Maildrop, peer: str, stack: contextlib.AsyncExitStack
    ) -> Admitted | Refused:
        acct = identity.account_key(self.backend, drop, login.username)  # one key per account
        key = acct.key
        if self.limits.acquire_account(key) is not None:
            self.metrics.session_refused(Limit.PER_ACCOUNT)
            return self._refused(ACCOUNT_BUSY)
        stack.callback(self.limits.release_account, key)
        now = trio.current_time()
        delay = self.settings.login_delay
        last = self._last_login.get(key)
        if delay and last is not None and now - last < delay:
            return self._refused(TOO_FREQUENT)
        if self.settings.in_use_lock:
            if key in self._locks:
                return self._refused(IN_USE)
            self._locks.add(key)
            stack.callback(self._locks.discard, key)
        if self.store is not None:
            try:
                with trio.fail_after(self.settings.upstream_timeout):
                    durable_drop = await durable.attach(
                        drop,
                        self.store,
                        name=key,
                        account=login.username,
                        fmt=getattr(drop, "uidl_format", None) or self.settings.uidl_format,
                        legacy=acct.legacy,
                    )
            except (BackendError, trio.TooSlowError) as exc:
                log.error("uidl assignment failed peer=%s user=%s: %r", peer, escape(login.username), exc)
                return self._refused(STORE_FAILED)
            stack.push_async_callback(_shielded_flush, durable_drop)
            drop = durable_drop
        self._remember_login(key, now)
        self.metrics.login("ok")
        return Admitted(drop, login.username, key)

    def _remember_login(self, key: str, now: float) -> None:
        last = self._last_login
        last.pop(key, None)
        last[key] = now
        horizon = now - self.settings.login_delay
        # oldest first: drop what no longer matters, and never keep more than the cap
        while last and (len(last) > MAX_REMEMBERED_LOGINS or next(iter(last.values())) <= horizon):
            last.popitem(last=False)

    def _refused(self, outcome: Outcome, login_delay: int = 0) -> Refused:
        self.metrics.login(outcome.result)
        if outcome.error is not None:
            self.metrics.error(outcome.error)
        return Refused(outcome, login_delay)


async def _shielded_flush(drop: durable.DurableMaildrop) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(10):
        await drop.flush()


__all__ = ["OUTCOMES", "Admitted", "GateSettings", "LoginGate", "Refused", "outcome_of"]
