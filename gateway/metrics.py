"""Prometheus metrics of one gateway process, in a private registry (never the library's global one).

The shell calls the methods below as things happen; ``/metrics`` on the admin endpoint serves ``render()``.
Every label value comes from a closed set (the ``Literal`` types below, checked again at run time) so that
nothing a client sends can create new series: an unknown POP3 verb is counted as ``OTHER``.

Names (all prefixed ``pop3_gateway_``), as listed in docs/operations.md:

=====================================  =========  ==================================================
sessions_active                        gauge      POP3 sessions open now
sessions_total                         counter    POP3 sessions accepted (refused ones excluded)
sessions_refused_total{limit}          counter    connections or logins refused by a session limit
logins_total{result}                   counter    login attempts by outcome (RFC 3206 code or ok)
commands_total{verb}                   counter    POP3 commands by verb
sent_bytes_total                       counter    octets written to POP3 clients
upstream_duration_seconds{backend,op}  histogram  time spent in upstream calls
uidl_store_operations_total{op}        counter    UIDL store operations
errors_total{kind}                     counter    errors by kind
oauth2_refresh_total{outcome}          counter    OAuth2 token refreshes by outcome
build_info{version}                    gauge      always 1
=====================================  =========  ==================================================

plus the standard ``process_*`` metrics (CPU, memory, open file descriptors) on Linux.

No ``*_created`` series: prometheus_client adds one per counter and histogram series (a start timestamp
Prometheus does not use, doubling the series). Its only switch is process-wide
(``disable_created_metrics()``); instead ``render()`` exposes this registry through ``_WithoutCreated``,
so nothing global changes.
"""

from __future__ import annotations

import contextlib
import time
import typing
from collections.abc import Callable, Iterator
from typing import Final, Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric

from gateway import __version__
from gateway.limits import Limit

NAMESPACE: Final = "pop3_gateway"

LoginResult = Literal["ok", "auth", "in-use", "login-delay", "sys-temp", "sys-perm", "locked-out"]
BackendKind = Literal["maildir", "imap", "jmap"]
UpstreamOp = Literal["open", "fetch", "delete"]
UidlStoreOp = Literal["read", "write", "import", "prune"]
ErrorKind = Literal[
    "internal",  # an exception reached the session boundary
    "upstream-timeout",  # an upstream call outlived upstream_timeout
    "upstream-failed",  # the upstream refused or broke (SYS/TEMP to the client)
    "upstream-mid-message",  # the upstream failed after a RETR/TOP status line went out: connection dropped
    "update-failed",  # deletions at QUIT did not all apply
    "tls-handshake",  # a client's TLS handshake failed or timed out
    "proxy-header",  # a missing or malformed PROXY header, or one from an untrusted peer
    "accept",  # accept() failed (EMFILE and friends)
]

RefreshOutcome = Literal[
    "ok",  # a new access token was stored
    "invalid_grant",  # the grant is gone: the account needs `oauth login` again
    "temporary",  # the token endpoint was down, slow or broken: the stored token is kept
    "refused",  # any other OAuth error (invalid_client: an expired client secret...), or an unusable provider
]

LOGIN_RESULTS: Final = typing.get_args(LoginResult)
BACKENDS: Final = typing.get_args(BackendKind)
UPSTREAM_OPS: Final = typing.get_args(UpstreamOp)
UIDL_STORE_OPS: Final = typing.get_args(UidlStoreOp)
ERROR_KINDS: Final = typing.get_args(ErrorKind)
REFRESH_OUTCOMES: Final = typing.get_args(RefreshOutcome)
VERBS: Final = (
    "USER",
    "PASS",
    "APOP",
    "AUTH",
    "STLS",
    "CAPA",
    "QUIT",
    "NOOP",
    "STAT",
    "LIST",
    "RETR",
    "DELE",
    "RSET",
    "TOP",
    "UIDL",
    "OTHER",
)
UPSTREAM_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _WithoutCreated:
    """A view of a registry without the ``*_created`` samples of its counters and histograms."""

    _TYPES: Final = frozenset({"counter", "histogram", "summary", "gaugehistogram"})

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        for family in self._registry.collect():
            if family.type in self._TYPES:
                created = family.name + "_created"
                view = Metric(family.name, family.documentation, family.type, family.unit)
                view.samples = [s for s in family.samples if s.name != created]
                family = view
            yield family


def _check(value: str, allowed: tuple[str, ...], what: str) -> str:
    if value not in allowed:
        raise ValueError(f"unknown {what} label value {value!r}")
    return value


class Metrics:
    def __init__(self, *, clock: Callable[[], float] = time.perf_counter, process: bool = True) -> None:
        self._clock = clock
        self._registry = CollectorRegistry()
        r, ns = self._registry, NAMESPACE
        if process:
            ProcessCollector(registry=r)
        build = Gauge("build_info", "Build information; always 1", ["version"], namespace=ns, registry=r)
        build.labels(__version__).set(1)
        self._active = Gauge("sessions_active", "POP3 sessions open now", namespace=ns, registry=r)
        self._sessions = Counter("sessions", "POP3 sessions accepted", namespace=ns, registry=r)
        self._refused = Counter(
            "sessions_refused",
            "Connections or logins refused by a limit",
            ["limit"],
            namespace=ns,
            registry=r,
        )
        self._logins = Counter("logins", "Login attempts by result", ["result"], namespace=ns, registry=r)
        self._commands = Counter("commands", "POP3 commands by verb", ["verb"], namespace=ns, registry=r)
        self._sent = Counter("sent_bytes", "Octets written to POP3 clients", namespace=ns, registry=r)
        self._upstream = Histogram(
            "upstream_duration_seconds",
            "Time spent in upstream calls",
            ["backend", "op"],
            namespace=ns,
            registry=r,
            buckets=UPSTREAM_BUCKETS,
        )
        self._uidl = Counter(
            "uidl_store_operations", "UIDL store operations", ["op"], namespace=ns, registry=r
        )
        self._errors = Counter("errors", "Errors by kind", ["kind"], namespace=ns, registry=r)
        self._refresh = Counter(
            "oauth2_refresh", "OAuth2 token refreshes by outcome", ["outcome"], namespace=ns, registry=r
        )
        self._exposed = _WithoutCreated(r)
        # Every closed-set series exists from the start, at 0, so rates and alerts need no absent().
        for limit in Limit:
            self._refused.labels(limit.value)
        for result in LOGIN_RESULTS:
            self._logins.labels(result)
        for verb in VERBS:
            self._commands.labels(verb)
        for op in UIDL_STORE_OPS:
            self._uidl.labels(op)
        for kind in ERROR_KINDS:
            self._errors.labels(kind)
        for outcome in REFRESH_OUTCOMES:
            self._refresh.labels(outcome)

    @property
    def registry(self) -> CollectorRegistry:
        return self._registry

    # -- sessions

    def session_started(self) -> None:
        self._active.inc()
        self._sessions.inc()

    def session_ended(self) -> None:
        self._active.dec()

    def session_refused(self, limit: Limit) -> None:
        self._refused.labels(Limit(limit).value).inc()

    # -- protocol

    def login(self, result: LoginResult) -> None:
        self._logins.labels(_check(result, LOGIN_RESULTS, "login result")).inc()

    def command(self, verb: str | bytes, n: int = 1) -> None:
        """Count ``n`` commands of one verb; anything but a known POP3 verb counts as OTHER."""
        if isinstance(verb, bytes):
            verb = verb.decode("ascii", "replace")
        verb = verb.upper()
        self._commands.labels(verb if verb in VERBS else "OTHER").inc(n)

    def sent(self, octets: int) -> None:
        if octets < 0:
            raise ValueError("octets must be >= 0")
        self._sent.inc(octets)

    # -- upstream, store, errors

    def observe_upstream(self, backend: BackendKind, op: UpstreamOp, seconds: float) -> None:
        self._upstream.labels(
            _check(backend, BACKENDS, "backend"), _check(op, UPSTREAM_OPS, "upstream op")
        ).observe(seconds)

    @contextlib.contextmanager
    def time_upstream(self, backend: BackendKind | str, op: UpstreamOp) -> Iterator[None]:
        """Observe the time the block takes, also when it raises (a timeout is a latency too). A backend
        kind outside ``BACKENDS`` (a test's fake) is not observed: no label value is ever made up."""
        if backend not in BACKENDS:
            yield
            return
        started = self._clock()
        try:
            yield
        finally:
            self.observe_upstream(backend, op, self._clock() - started)  # type: ignore[arg-type]

    def uidl_store(self, op: UidlStoreOp) -> None:
        self._uidl.labels(_check(op, UIDL_STORE_OPS, "UIDL store op")).inc()

    def error(self, kind: ErrorKind) -> None:
        self._errors.labels(_check(kind, ERROR_KINDS, "error kind")).inc()

    def oauth2_refresh(self, outcome: RefreshOutcome) -> None:
        self._refresh.labels(_check(outcome, REFRESH_OUTCOMES, "refresh outcome")).inc()

    # -- exposition

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """The exposition body and its Content-Type: OpenMetrics if ``accept`` asks for it, else text."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self._exposed), content_type

    def sample(self, name: str, **labels: str) -> float | None:
        """One sample's value by its full name (``pop3_gateway_logins_total``); for tests and checks."""
        return self._registry.get_sample_value(name, labels)
