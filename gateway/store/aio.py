"""The UIDL store for trio code: every call on a worker thread, typed, with the engine's errors translated.

- Writes run one at a time (``CapacityLimiter(1)``: the engine's one writer); reads (the cache check,
  the login of a mailbox left as it was, the plan of a renumbering) run on ``READERS`` threads of their
  own beside them, so a login never waits for another mailbox's write.
- Every engine error (``Engine.errors``: sqlite3.Error, OSError...) becomes ``StoreError``, a
  ``TempFailure``: callers catch the gateway's own error and the login gate answers ``[SYS/TEMP]``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import trio

from gateway.backends.base import TempFailure
from gateway.store.core import (
    DEFAULT_MAX_FINGERPRINTS,
    DEFAULT_RETENTION,
    Assignment,
    Plan,
    Prints,
    UidlStore,
)
from gateway.store.engine import Engine, Item
from gateway.store.sqlite import READERS, SqliteEngine

T = TypeVar("T")
DEFAULT_FINGERPRINT_CONCURRENCY = 4


class StoreError(TempFailure):
    """The UIDL store failed (disk, database); trying later may work. ``str`` is for logs only."""


class AsyncUidlStore:
    """The store for trio code."""

    def __init__(
        self,
        path: Path,
        *,
        retention: float = DEFAULT_RETENTION,
        max_fingerprints: int = DEFAULT_MAX_FINGERPRINTS,
        fingerprint_concurrency: int = DEFAULT_FINGERPRINT_CONCURRENCY,
        engine: Callable[[], Engine] | None = None,
    ) -> None:
        self.fingerprint_concurrency = fingerprint_concurrency  # header reads at once while rematching
        self._writer = trio.CapacityLimiter(1)
        self._readers = trio.CapacityLimiter(READERS)
        self._store: UidlStore | None = None
        self._path = path
        self._retention = retention
        self._max_fingerprints = max_fingerprints
        self._engine = engine
        # the engine's errors (a custom engine's are known once it is made)
        self._errors: tuple[type[Exception], ...] = SqliteEngine.errors if engine is None else (OSError,)
        self.operations: Callable[[str], None] | None = None  # metrics hook: called with the op name

    @property
    def max_fingerprints(self) -> int:
        return self._max_fingerprints

    async def open(self) -> None:
        """Open (and migrate) the store, then forget rows gone longer than the retention."""

        def make() -> UidlStore:
            engine = self._engine() if self._engine is not None else SqliteEngine(self._path)
            self._errors = engine.errors
            store = UidlStore(
                engine=engine, retention=self._retention, max_fingerprints=self._max_fingerprints
            )
            try:
                store.prune()
            except BaseException:
                store.close()
                raise
            return store

        self._store = await self._run(make, op="open", need_open=False)

    async def aclose(self) -> None:
        if self._store is not None:
            store, self._store = self._store, None
            await trio.to_thread.run_sync(store.close, limiter=self._writer)

    @property
    def is_open(self) -> bool:
        return self._store is not None

    async def _run(self, fn: Callable[[], T], *, op: str, need_open: bool = True, read: bool = False) -> T:
        if need_open and self._store is None:
            raise StoreError("the UIDL store is not open")
        if self.operations is not None:
            self.operations(op)
        try:
            return await trio.to_thread.run_sync(fn, limiter=self._readers if read else self._writer)
        except self._errors as exc:
            raise StoreError(f"uidl store failure: {exc!r}") from exc

    def _s(self) -> UidlStore:
        if self._store is None:
            raise StoreError("the UIDL store is not open")
        return self._store

    async def cached(
        self, name: str, keys: tuple[str, ...], sizes: tuple[int, ...] | None = None
    ) -> Assignment | None:
        return await self._run(lambda: self._s().cached(name, keys, sizes), op="plan", read=True)

    async def need_body(self, name: str, items: Sequence[Item], prints: Prints) -> list[str]:
        return await self._run(lambda: self._s().need_body(name, items, prints), op="plan", read=True)

    async def assign_or_plan(
        self, name: str, account: str, items: Sequence[Item], fmt: str
    ) -> Assignment | Plan:
        """``assign`` when no fingerprint is needed, else the ``Plan`` of the headers to read first. A login
        that changes nothing reads only (beside other logins); one that does writes, one at a time."""
        first = await self._run(lambda: self._s().read_assignment(name, items), op="plan", read=True)
        if first is not None:
            return first
        return await self._run(lambda: self._s().write_assignment(name, account, items, fmt), op="assign")

    async def assign(
        self, name: str, account: str, items: Sequence[Item], fmt: str, fingerprints: Prints | None = None
    ) -> Assignment:
        return await self._run(lambda: self._s().assign(name, account, items, fmt, fingerprints), op="assign")

    async def adopt(self, name: str, legacy: Sequence[str]) -> str | None:
        return await self._run(lambda: self._s().adopt(name, legacy), op="adopt")

    async def record_fingerprints(
        self, name: str, prints: Sequence[tuple[str, str | None, str | None]]
    ) -> None:
        await self._run(lambda: self._s().record_fingerprints(name, prints), op="fingerprints")

    async def record_sizes(self, name: str, sizes: Sequence[tuple[str, int, int]]) -> None:
        await self._run(lambda: self._s().record_sizes(name, sizes), op="sizes")

    async def mark_deleted(self, name: str, keys: Sequence[str]) -> None:
        await self._run(lambda: self._s().mark_deleted(name, keys), op="mark_deleted")

    async def prune(self) -> int:
        return await self._run(lambda: self._s().prune(), op="prune")


__all__ = ["AsyncUidlStore", "StoreError"]
