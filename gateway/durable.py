"""Durable UIDLs for any backend: wraps a session's maildrop with the UIDL store.

At login the backend's snapshot goes through the store, which gives each message its UIDL: the one it
had before, the one a vanished row had when the fingerprint matches (the upstream renumbered), or a new
one that was never given out in this mailbox. The order the client sees is the backend's, except that
messages imported from an old POP3 server come first, in that server's order.

Fingerprints are learnt for free while messages are sent (RETR and TOP) and stored at the end of the
session; when the upstream renumbers, only new messages whose size matches a vanished row are read
(headers, then the body when headers are not enough).
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from collections.abc import AsyncGenerator, Sequence

from gateway.backends.base import Entry, Maildrop, TempFailure
from gateway.proto.body import BodyEncoder
from gateway.proto.uidl import Fingerprinter
from gateway.store import Assignment, AsyncUidlStore, Item

log = logging.getLogger("gateway.uidl")


class DurableMaildrop:
    """A Maildrop whose entries carry durable UIDLs; indexes are the client's, mapped to the backend's."""

    def __init__(
        self, inner: Maildrop, store: AsyncUidlStore, name: str, order: Sequence[int], entries: list[Entry]
    ) -> None:
        self.inner = inner
        self.store = store
        self.name = name
        self._map = list(order)
        self._entries = entries
        self._prints: dict[str, tuple[str | None, str | None]] = {}
        self.drift: dict[str, object] = {}

    @property
    def entries(self) -> Sequence[Entry]:
        return self._entries

    @property
    def identity(self) -> str:
        return self.inner.identity

    async def stream(self, index: int, *, top_lines: int | None = None) -> AsyncGenerator[bytes, None]:
        async with contextlib.aclosing(self.inner.stream(self._map[index], top_lines=top_lines)) as chunks:
            async for chunk in chunks:
                yield chunk

    def note_size(self, index: int, octets: int) -> None:
        self.inner.note_size(self._map[index], octets)

    def note_fingerprint(self, index: int, header_sha1: str | None, body_sha1: str | None) -> None:
        key = self._entries[index].stable_key
        old_h, old_b = self._prints.get(key, (None, None))
        self._prints[key] = (header_sha1 or old_h, body_sha1 or old_b)

    async def apply_deletions(self, indexes: Sequence[int]) -> None:
        await self.inner.apply_deletions([self._map[i] for i in indexes])
        try:  # rows in state 'deleted' are never candidates when matching a renumbered upstream
            await self.store.mark_deleted(self.name, [self._entries[i].stable_key for i in indexes])
        except (sqlite3.Error, OSError) as exc:
            log.error("uidl store: cannot record deletions for %s: %r", self.name, exc)

    async def flush(self) -> None:
        if not self._prints:
            return
        prints = [(k, h, b) for k, (h, b) in self._prints.items()]
        self._prints.clear()
        try:
            await self.store.record_fingerprints(self.name, prints)
        except (sqlite3.Error, OSError) as exc:
            log.error("uidl store: cannot record fingerprints for %s: %r", self.name, exc)


async def _fingerprint(drop: Maildrop, index: int, *, whole: bool) -> tuple[str | None, str | None]:
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


async def attach(
    drop: Maildrop,
    store: AsyncUidlStore,
    *,
    name: str,
    account: str,
    fmt: str,
    legacy: Sequence[str] = (),
) -> DurableMaildrop:
    """Give the snapshot durable UIDLs (one store transaction) and return the wrapped maildrop.

    ``name`` is the mailbox's namespace (``identity.AccountKey.key``). When the store has none by that
    name yet, the first of ``legacy`` (the names older versions used for this login) that it has is
    carried over to ``name``: its UIDLs, fingerprints and imported order stay the client's."""
    entries = list(drop.entries)
    keys = tuple([e.key or e.upstream_id for e in entries])
    try:
        # The usual login: the same snapshot as last time, answered from the store's memory.
        cached = await store.cached(name, keys)
        if not cached and legacy:
            old = await store.adopt(name, legacy)
            if old is not None:
                log.warning("uidl store: mailbox %s continues as %s", old, name)
        items = [] if cached else [Item(e.stable_key, e.size, e.uidl, e.uid, e.uidvalidity) for e in entries]
        first = cached or await store.assign_or_plan(name, account, items, fmt)
        if isinstance(first, Assignment):
            result, renumbered = first, False
        else:
            by_key = {k: i for i, k in enumerate(keys)}
            prints: dict[str, tuple[str | None, str | None]] = {}
            batch = getattr(drop, "header_hashes", None)
            if batch is not None:  # one round trip for all of them (IMAP)
                hashes = await batch([by_key[k] for k in first.need_header])
                prints.update({entries[i].stable_key: (h, None) for i, h in hashes.items()})
            else:
                for key in first.need_header:
                    prints[key] = await _fingerprint(drop, by_key[key], whole=False)
            for key in await store.need_body(name, items, prints):
                prints[key] = await _fingerprint(drop, by_key[key], whole=True)
            result, renumbered = await store.assign(name, account, items, fmt, prints), True
    except (sqlite3.Error, OSError) as exc:
        raise TempFailure(f"uidl store failure: {exc!r}") from exc
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
        len(items),
        result.list_hash[:16],
        "no" if result.previous_hash in (None, result.list_hash) else "yes",
        result.new,
        result.gone,
        result.rematched,
    )
    uidls = result.uidls
    if result.order == tuple(range(len(entries))) and all(
        e.uidl == u for e, u in zip(entries, uidls, strict=True)
    ):
        ordered = entries  # the usual case on IMAP: the store kept the backend's own UIDLs, in its order
    else:
        ordered = [entries[i]._replace(uidl=uidls[i]) for i in result.order]
    wrapped = DurableMaildrop(drop, store, name, result.order, ordered)
    wrapped.drift = {
        "uidl_hash": result.list_hash[:16],
        "uidl_changed": 0 if result.previous_hash in (None, result.list_hash) else result.new + result.gone,
        "uidl_new": result.new,
        "uidl_gone": result.gone,
        "uidl_rematched": result.rematched,
    }
    return wrapped
