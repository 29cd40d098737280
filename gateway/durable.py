"""Durable UIDLs for any backend: wraps a session's maildrop with the UIDL store.

At login the backend's snapshot goes through the store, which gives each message its UIDL: the one it
had before, the one a vanished row had when the fingerprint matches (the upstream renumbered), or a new
one that was never given out in this mailbox. The order the client sees is the backend's, except that
messages imported from an old POP3 server come first, in that server's order.

Fingerprints are learnt for free while messages are sent (RETR and TOP) and stored at the end of the
session; when the upstream renumbers, only new messages whose size matches a vanished row are read
(headers, then the body when headers are not enough): at most ``max_fingerprints`` of them per login,
``fingerprint_concurrency`` at a time. The rest get new UIDLs and are stored, so the next login does not
read them again: a sender who mails many messages of a vanished row's size cannot keep logins failing.

Size corrections are stored too: when RETR sent another number of octets than listed, the store keeps the
sent size, and the next session lists it, even in another process or after a restart.

Store failures are ``StoreError`` (a ``TempFailure``): no engine module is imported here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence

import trio

from gateway.backends.base import BackendError, Entry, Maildrop, SizeChanged
from gateway.proto.body import BodyEncoder
from gateway.proto.uidl import Fingerprinter
from gateway.store import Assignment, AsyncUidlStore, Item, Plan, StoreError, need_body

log = logging.getLogger("gateway.uidl")


class DurableMaildrop:
    """A Maildrop whose entries carry durable UIDLs; indexes are the client's, mapped to the backend's."""

    def __init__(
        self,
        inner: Maildrop,
        store: AsyncUidlStore,
        name: str,
        order: Sequence[int],
        entries: list[Entry],
        listed: Sequence[int] | None = None,
    ) -> None:
        self.inner = inner
        self.store = store
        self.name = name
        self._map = list(order)
        self._entries = entries
        self._listed = listed  # None: the backend's own entries (inner.entries[order[i]]) say it
        self._prints: dict[str, tuple[str | None, str | None]] = {}
        self._sizes: dict[str, tuple[int, int]] = {}  # key -> (listed by the backend, sent)
        self.drift: dict[str, object] = {}

    @property
    def entries(self) -> Sequence[Entry]:
        return self._entries

    @property
    def identity(self) -> str:
        return self.inner.identity

    async def stream(self, index: int, *, top_lines: int | None = None) -> AsyncGenerator[bytes, None]:
        try:
            async with contextlib.aclosing(
                self.inner.stream(self._map[index], top_lines=top_lines)
            ) as chunks:
                async for chunk in chunks:
                    yield chunk
        except SizeChanged as exc:  # the backend learnt the true size itself: the store keeps it too
            self._note_size(index, exc.actual)
            raise

    def note_size(self, index: int, octets: int) -> None:
        self.inner.note_size(self._map[index], octets)
        self._note_size(index, octets)

    def _note_size(self, index: int, octets: int) -> None:
        if len(self._sizes) < len(self._entries):  # one per message at most: bounded by the snapshot
            listed = self._listed
            backend_size = listed[index] if listed is not None else self.inner.entries[self._map[index]].size
            self._sizes[self._entries[index].stable_key] = (backend_size, octets)

    def note_fingerprint(self, index: int, header_sha1: str | None, body_sha1: str | None) -> None:
        key = self._entries[index].stable_key
        old_h, old_b = self._prints.get(key, (None, None))
        self._prints[key] = (header_sha1 or old_h, body_sha1 or old_b)

    async def apply_deletions(self, indexes: Sequence[int]) -> None:
        await self.inner.apply_deletions([self._map[i] for i in indexes])
        try:  # rows in state 'deleted' are never candidates when matching a renumbered upstream
            await self.store.mark_deleted(self.name, [self._entries[i].stable_key for i in indexes])
        except StoreError as exc:
            log.error("uidl store: cannot record deletions for %s: %r", self.name, exc)

    async def flush(self) -> None:
        """Store what the session learnt: fingerprints and size corrections."""
        if self._sizes:
            sizes = [(k, listed, sent) for k, (listed, sent) in self._sizes.items()]
            self._sizes.clear()
            try:
                await self.store.record_sizes(self.name, sizes)
            except StoreError as exc:
                log.error("uidl store: cannot record size corrections for %s: %r", self.name, exc)
        if not self._prints:
            return
        prints = [(k, h, b) for k, (h, b) in self._prints.items()]
        self._prints.clear()
        try:
            await self.store.record_fingerprints(self.name, prints)
        except StoreError as exc:
            log.error("uidl store: cannot record fingerprints for %s: %r", self.name, exc)


async def fingerprint(drop: Maildrop, index: int, *, whole: bool) -> tuple[str | None, str | None]:
    """The (header, body) SHA-1s of a message read from ``drop`` (the body's only when ``whole``): the one
    place a message is read to be fingerprinted (logins that rematch, and ``uidl import``). RETR and TOP learn
    the same fingerprints on the way, through the session's ``Fingerprinter`` sink."""
    fp = Fingerprinter()
    encoder = BodyEncoder(None if whole else 0, sink=fp.feed)
    async with contextlib.aclosing(drop.stream(index, top_lines=None if whole else 0)) as chunks:
        async for chunk in chunks:
            encoder.feed(chunk)
            if encoder.done:
                break
    encoder.finish()
    if whole:
        fp.finish()
    return fp.header_sha1(), fp.body_sha1() if whole else None


async def _read_prints(
    indexes: Sequence[int], read: Callable[[int], Awaitable[tuple[str | None, str | None]]], concurrency: int
) -> dict[int, tuple[str | None, str | None]]:
    """``read`` each index, ``concurrency`` at a time."""
    out: dict[int, tuple[str | None, str | None]] = {}
    failed: list[BackendError] = []
    limiter = trio.CapacityLimiter(max(concurrency, 1))

    async with trio.open_nursery() as nursery:

        async def one(i: int) -> None:
            async with limiter:
                try:
                    out[i] = await read(i)
                except BackendError as exc:  # the first failure fails the login ([SYS/TEMP]), not a UIDL
                    failed.append(exc)
                    nursery.cancel_scope.cancel()

        for i in indexes:
            nursery.start_soon(one, i)
    if failed:
        raise failed[0]
    return out


async def _fingerprints(
    drop: Maildrop, entries: Sequence[Entry], items: Sequence[Item], plan: Plan, cap: int, concurrency: int
) -> dict[str, tuple[str | None, str | None]]:
    """The fingerprints ``plan`` asks for (headers; then the bodies the headers cannot tell apart)."""
    by_key = {e.stable_key: i for i, e in enumerate(entries)}
    prints: dict[str, tuple[str | None, str | None]] = {}
    wanted = [by_key[k] for k in plan.need_header]
    batch = getattr(drop, "header_hashes", None)
    if batch is not None:  # one round trip for all of them (IMAP)
        hashes = await batch(wanted)
        prints.update({entries[i].stable_key: (h, None) for i, h in hashes.items()})
    else:
        got = await _read_prints(wanted, lambda i: fingerprint(drop, i, whole=False), concurrency)
        prints.update({entries[i].stable_key: hb for i, hb in got.items()})
    bodies = need_body(plan.known, items, prints, cap)
    got = await _read_prints(
        [by_key[k] for k in bodies], lambda i: fingerprint(drop, i, whole=True), concurrency
    )
    prints.update({entries[i].stable_key: hb for i, hb in got.items()})
    return prints


async def attach(
    drop: Maildrop,
    store: AsyncUidlStore,
    *,
    name: str,
    account: str,
    fmt: str,
    legacy: Sequence[str] = (),
    max_fingerprints: int | None = None,
    concurrency: int | None = None,
) -> DurableMaildrop:
    """Give the snapshot durable UIDLs (one store transaction) and return the wrapped maildrop.

    ``name`` is the mailbox's namespace (``identity.AccountKey.key``). When the store has none by that
    name yet, the first of ``legacy`` (the names older versions used for this login) that it has is
    carried over to ``name``: its UIDLs, fingerprints and imported order stay the client's.
    ``max_fingerprints`` (default: the store's) caps the messages read to match a renumbering.
    Raises ``StoreError`` (a ``TempFailure``) when the store fails."""
    cap = store.max_fingerprints if max_fingerprints is None else max_fingerprints
    concurrency = store.fingerprint_concurrency if concurrency is None else concurrency
    entries = list(drop.entries)
    keys = tuple([e.key or e.upstream_id for e in entries])
    # The usual login: the same snapshot as last time, answered from the store's memory.
    cached = await store.cached(name, keys, tuple([e.size for e in entries]))
    if not cached and legacy:
        old = await store.adopt(name, legacy)
        if old is not None:
            log.warning("uidl store: mailbox %s continues as %s", old, name)
    items = [] if cached else [Item(e.stable_key, e.size, e.uidl, e.uid, e.uidvalidity) for e in entries]
    first = cached or await store.assign_or_plan(name, account, items, fmt)
    if isinstance(first, Assignment):
        result, renumbered = first, False
    else:
        if len(first.need_header) > cap:  # this login's cap is below the store's
            over = len(first.need_header) - cap
            first = dataclasses.replace(
                first, need_header=first.need_header[:cap], skipped=first.skipped + over
            )
        if first.skipped:
            log.warning(
                "uidl store: mailbox=%s has %d more candidates for rematching than max_fingerprints=%d; "
                "they get new UIDLs",
                name,
                first.skipped,
                cap,
            )
        prints = await _fingerprints(drop, entries, items, first, cap, concurrency)
        result, renumbered = await store.assign(name, account, items, fmt, prints), True
    if renumbered or result.rematched:
        log.warning(
            "upstream renumbered mailbox=%s matched=%d unmatched_new=%d unmatched_vanished=%d",
            name,
            result.rematched,
            result.new,
            result.unmatched_vanished,
        )
    log.info(
        "uidl drift mailbox=%s count=%d list_hash=%s changed=%s new=%d gone=%d rematched=%d",
        name,
        len(entries),
        result.list_hash[:16],
        "no" if result.previous_hash in (None, result.list_hash) else "yes",
        result.new,
        result.gone,
        result.rematched,
    )
    uidls = result.uidls
    if (
        not result.sizes
        and result.order == tuple(range(len(entries)))
        and all(e.uidl == u for e, u in zip(entries, uidls, strict=True))
    ):
        ordered = entries  # the usual case on IMAP: the store kept the backend's own UIDLs, in its order
    else:
        sizes = result.sizes or tuple(e.size for e in entries)
        ordered = [entries[i]._replace(uidl=uidls[i], size=sizes[i]) for i in result.order]
    # the backend's listed sizes are read from its entries when a size correction needs them
    wrapped = DurableMaildrop(drop, store, name, result.order, ordered)
    wrapped.drift = {
        "uidl_hash": result.list_hash[:16],
        "uidl_changed": 0 if result.previous_hash in (None, result.list_hash) else result.new + result.gone,
        "uidl_new": result.new,
        "uidl_gone": result.gone,
        "uidl_rematched": result.rematched,
    }
    return wrapped
