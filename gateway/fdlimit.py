"""File descriptors: enough of them at start, and an accept loop that survives running out.

- ``raise_nofile_limit(max_sessions)``: at start, raises the soft ``RLIMIT_NOFILE`` to the hard limit and
  returns warnings (one sentence each) when even that cannot carry ``max_sessions``: each session may hold
  ``FDS_PER_SESSION`` descriptors (the client socket, the upstream socket, and one in reserve for the
  store, an upstream reconnect or a TLS handshake), plus ``FDS_RESERVED`` for the process itself.
- ``ResilientListener``: wraps a ``trio.SocketListener`` for ``trio.serve_listeners``. When ``accept()``
  fails with EMFILE, ENFILE, ENOBUFS or ENOMEM (the connection stays in the kernel's backlog), it waits
  (``BACKOFF_MIN`` doubling to ``BACKOFF_MAX``), logs at most one line per ``log_every`` seconds with
  the count of failures since the last line, and tries again; the first success after such a line logs
  that accepting has recovered (so at most two lines per ``log_every``, however failures and successes
  alternate). trio itself would log every failure, ten lines a second. Other errors propagate.
- ``preload_codecs()``: imports at start every codec the serving path may look up later (the first lookup
  of a codec imports a module, which needs a descriptor; under EMFILE that turned a polite refusal into
  an internal error).
"""

from __future__ import annotations

import codecs
import errno
import importlib
import logging
import resource
from collections.abc import Callable
from typing import Final

import trio

log = logging.getLogger("gateway.fdlimit")

FDS_PER_SESSION: Final = 3
FDS_RESERVED: Final = 64  # listeners, the admin endpoint, the store, logs, the upstream's pool, imports
CAPACITY_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
BACKOFF_MIN: Final = 0.1
BACKOFF_MAX: Final = 1.0
LOG_EVERY: Final = 10.0
_UNLIMITED_TARGET: Final = 1 << 20  # what "unlimited" is raised to (setting RLIM_INFINITY fails on some)

# Every codec named on the serving path (ours, trio's, h11's, httpx's, ssl's server_hostname).
CODECS: Final = (
    "ascii",
    "utf-8",
    "latin-1",
    "idna",
    "punycode",
    "unicode_escape",
    "raw_unicode_escape",
    "base64",
    "hex",
    "utf-16",
    "utf-32",
)
# Modules those codecs or the host name handling import on first use.
_LAZY_MODULES: Final = (
    "encodings.idna",
    "stringprep",
    "unicodedata",
    "idna",
    "idna.uts46data",
    "idna.idnadata",
)


def needed_fds(max_sessions: int) -> int:
    return max_sessions * FDS_PER_SESSION + FDS_RESERVED


def raise_nofile_limit(
    max_sessions: int,
    *,
    getrlimit: Callable[[int], tuple[int, int]] = resource.getrlimit,
    setrlimit: Callable[[int, tuple[int, int]], None] = resource.setrlimit,
) -> list[str]:
    """Raise the soft descriptor limit to the hard one; return warnings if that is still too low."""
    soft, hard = getrlimit(resource.RLIMIT_NOFILE)
    warnings: list[str] = []
    if soft != resource.RLIM_INFINITY:
        # an unlimited hard limit cannot always be the soft one (macOS): try a large finite one instead
        targets = [hard] if hard != resource.RLIM_INFINITY else [_UNLIMITED_TARGET, 1 << 16]
        for target in (t for t in targets if t > soft):
            try:
                setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            except (OSError, ValueError) as exc:
                warnings = [f"cannot raise the open-file limit from {soft} to {target}: {exc}"]
                continue
            soft, warnings = target, []
            break
    need = needed_fds(max_sessions)
    if soft != resource.RLIM_INFINITY and soft < need:
        warnings.append(
            f"the open-file limit is {soft} (hard {_show(hard)}), but server.max_sessions = {max_sessions} "
            f"may need {need}: raise the hard limit (ulimit -Hn, LimitNOFILE=, --ulimit nofile=) or lower "
            f"server.max_sessions to {max(1, (soft - FDS_RESERVED) // FDS_PER_SESSION)}"
        )
    return warnings


def _show(limit: int) -> str:
    return "unlimited" if limit == resource.RLIM_INFINITY else str(limit)


def preload_codecs() -> None:
    """Look up every codec the serving path uses, so that none needs an import (a descriptor) later."""
    for name in CODECS:
        codecs.lookup(name)
    for module in _LAZY_MODULES:
        try:
            importlib.import_module(module)
        except ImportError:  # pragma: no cover - idna is trio's dependency, always there
            continue
    "préload.example".encode("idna")  # the first IDNA encoding builds tables too


class ResilientListener(trio.abc.Listener[trio.SocketStream]):
    """A listener whose ``accept()`` rides out running out of descriptors or memory (see the module doc).

    ``on_failure`` is called with each capacity error (e.g. a metric); it must not raise.
    """

    def __init__(
        self,
        inner: trio.abc.Listener[trio.SocketStream],
        *,
        name: str = "",
        log_every: float = LOG_EVERY,
        backoff_min: float = BACKOFF_MIN,
        backoff_max: float = BACKOFF_MAX,
        on_failure: Callable[[OSError], None] | None = None,
    ) -> None:
        if not 0 < backoff_min <= backoff_max or log_every < 0:
            raise ValueError("need 0 < backoff_min <= backoff_max and log_every >= 0")
        self.inner = inner
        self.name = name or _describe(inner)
        self.log_every = log_every
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.on_failure = on_failure
        self.failures = 0  # since the last log line
        self.total_failures = 0
        self._last_log = float("-inf")
        self._reported = False  # a "failing" line went out and its "recovered" line has not

    @property
    def socket(self) -> trio.socket.SocketType:
        """The inner listener's socket (for its bound address), as ``trio.SocketListener`` has it."""
        sock = getattr(self.inner, "socket", None)
        if sock is None:
            raise AttributeError("the wrapped listener has no socket")
        return sock  # type: ignore[no-any-return]

    async def accept(self) -> trio.SocketStream:
        backoff = self.backoff_min
        while True:
            try:
                stream = await self.inner.accept()
            except OSError as exc:
                if exc.errno not in CAPACITY_ERRNOS:
                    raise
                self._failed(exc, backoff)
                await trio.sleep(backoff)
                backoff = min(backoff * 2, self.backoff_max)
                continue
            if self._reported:  # one "recovered" line per "failing" line: at most two lines per log_every
                self._reported = False
                log.warning(
                    "accept on %s recovered (%d failure(s) since the last report)", self.name, self.failures
                )
                self.failures = 0
            return stream

    def _failed(self, exc: OSError, backoff: float) -> None:
        self.failures += 1
        self.total_failures += 1
        if self.on_failure is not None:
            self.on_failure(exc)
        now = trio.current_time()
        if now - self._last_log >= self.log_every:
            log.warning(
                "accept on %s failing: %s; %d failure(s) since the last report; next try in %.1f s",
                self.name,
                errno.errorcode.get(exc.errno or 0, str(exc.errno)),
                self.failures,
                backoff,
            )
            self._last_log = now
            self._reported = True
            self.failures = 0

    async def aclose(self) -> None:
        await self.inner.aclose()


def _describe(listener: object) -> str:
    sock = getattr(listener, "socket", None)
    try:
        host, port = sock.getsockname()[:2]  # type: ignore[union-attr]
    except (AttributeError, OSError, ValueError, TypeError):
        return type(listener).__name__
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


__all__ = [
    "BACKOFF_MAX",
    "BACKOFF_MIN",
    "CAPACITY_ERRNOS",
    "FDS_PER_SESSION",
    "LOG_EVERY",
    "ResilientListener",
    "needed_fds",
    "preload_codecs",
    "raise_nofile_limit",
]
