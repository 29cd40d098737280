"""The UIDL store's rules over any ``Engine``: assignment, rematching, import, the login cache.

Invariants:
- A UIDL, once given, stays reserved in its mailbox forever (``MailboxTx.taken``), so it is never given
  to another message; the rows of deleted messages are not kept, only that reservation.
- A message is keyed by the most stable upstream identity there is (IMAP EMAILID, else UIDVALIDITY+UID;
  the JMAP Email id; the Maildir base name). When the upstream renumbers, rows whose messages vanished are
  matched to the new keys by ``gateway.proto.uidlmatch`` and keep their UIDL. A vanished row waits
  ``retention`` seconds for its message to come back, then only its reservation is kept.
- Every change of one session is one transaction, committed before the client sees a UIDL.
- A login whose answer needs no write (nothing new, nothing vanished since last time) reads only: on the
  engine's readers, beside other logins.
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from gateway.proto import uidl as rules
from gateway.proto.uidlmatch import Known, Seen, body_candidates, header_candidates, pair
from gateway.store.engine import Engine, Item, MailboxTx, Row

DEFAULT_RETENTION = 90 * 86400.0
DEFAULT_MAX_FINGERPRINTS = 1000
Prints = dict[str, tuple[str | None, str | None]]


@dataclasses.dataclass(frozen=True, slots=True)
class Plan:
    """What a session must learn from the upstream before UIDLs can be assigned."""

    new_keys: tuple[str, ...]
    need_header: tuple[str, ...]  # new messages whose size matches a vanished row with a header hash
    known: tuple[Known, ...] = ()  # the vanished rows, to decide which bodies to read (``need_body``)
    skipped: int = 0  # candidates over the per-login cap: they get new UIDLs


@dataclasses.dataclass(frozen=True, slots=True)
class Assignment:
    uidls: tuple[str, ...]  # in snapshot order
    order: tuple[int, ...]  # the snapshot indexes in the order the client sees them
    new: int
    gone: int
    rematched: int
    unmatched_vanished: int
    list_hash: str
    previous_hash: str | None
    sizes: tuple[int, ...] = ()  # in snapshot order: the sizes to list (persisted corrections); () = as given


def _vanished(rows: dict[str, Row], present: set[str]) -> list[Row]:
    out = [r for r in rows.values() if r.key not in present]
    out.sort(key=lambda r: (r.order_pos is None, r.order_pos or 0, r.uidl))
    return out


def _known(rows: Iterable[Row]) -> list[Known]:
    return [Known(r.key, r.size, r.header_sha1, r.body_sha1) for r in rows]


def _client_order(items: Sequence[Item], rows: dict[str, Row]) -> tuple[int, ...]:
    """Imported messages first, in the old server's order; then the rest in the backend's order."""
    positions = [rows[i.key].order_pos for i in items]
    if all(p is None for p in positions):
        return tuple(range(len(items)))
    return tuple(sorted(range(len(items)), key=lambda i: (positions[i] is None, positions[i] or 0, i)))


def _sizes(items: Sequence[Item], rows: dict[str, Row]) -> tuple[int, ...]:
    out = []
    fixed = False
    for i in items:
        r = rows[i.key]
        if r.sent_size is not None and r.size == i.size:
            out.append(r.sent_size)
            fixed = True
        else:
            out.append(i.size)
    return tuple(out) if fixed else ()


def _listing(items: Sequence[Item], rows: dict[str, Row]) -> tuple[tuple[str, ...], tuple[int, ...], str]:
    uidls = tuple(rows[i.key].uidl for i in items)
    order = _client_order(items, rows)
    listing = "\n".join(uidls[i] for i in order).encode()
    return uidls, order, hashlib.sha1(listing, usedforsecurity=False).hexdigest()


_NO_PRINTS: tuple[None, None] = (None, None)


class _Reserved:
    """``in``: was this UIDL ever given in the mailbox, or just now? One query for the batch of
    proposals, one more for each suffix a collision needs."""

    def __init__(self, tx: MailboxTx, proposals: set[str]) -> None:
        self.tx = tx
        self.checked = proposals
        self.taken = tx.taken(proposals) if proposals else set()
        self.given: set[str] = set()

    def __contains__(self, uidl: object) -> bool:
        assert isinstance(uidl, str)
        if uidl in self.given or uidl in self.taken:
            return True
        return uidl not in self.checked and bool(self.tx.taken({uidl}))


class UidlStore:
    """Synchronous; used from the engine's threads (one writer at a time, readers beside it)."""

    def __init__(
        self,
        path: Path | None = None,
        *,
        engine: Engine | None = None,
        retention: float = DEFAULT_RETENTION,
        max_fingerprints: int = DEFAULT_MAX_FINGERPRINTS,
    ) -> None:
        if engine is None:
            from gateway.store.sqlite import SqliteEngine

            assert path is not None
            engine = SqliteEngine(path)
        self.engine = engine
        self.retention = retention
        self.max_fingerprints = max_fingerprints
        # mailbox -> (its version, snapshot keys, listed sizes if corrected, the assignment for exactly that)
        self._cache: dict[str, tuple[int, tuple[str, ...], tuple[int, ...], Assignment]] = {}
        self._pending: dict[str, int] = {}  # a miss: the mailbox's version read before its rows
        self._lock = threading.Lock()

    # -- the engine's own

    @property
    def db(self):  # type: ignore[no-untyped-def]  # the sqlite engine's writer, for tests
        return self.engine.db  # type: ignore[attr-defined]

    def close(self) -> None:
        self.engine.close()

    def schema_version(self) -> int:
        return int(self.engine.schema_version())  # type: ignore[attr-defined]

    def integrity_ok(self) -> bool:
        return bool(self.engine.integrity_ok())  # type: ignore[attr-defined]

    def mailboxes(self, account: str | None = None) -> list[tuple[str, str]]:
        return self.engine.mailboxes(account)

    def rows(self, name: str) -> list[Row]:
        return self.engine.rows(name)

    def _wrote(self, name: str) -> None:
        with self._lock:
            self._cache.pop(name, None)

    def adopt(self, name: str, legacy: Sequence[str]) -> str | None:
        """Carry the first existing mailbox of ``legacy`` over to ``name`` (renamed, rows and all) unless
        ``name`` exists already; the old name that was carried over, or None. One transaction."""
        old = self.engine.adopt(name, legacy)
        if old is not None:
            self._wrote(old)
            self._wrote(name)
        return old

    def prune(self, now: float | None = None) -> int:
        return self.engine.prune((time.time() if now is None else now) - self.retention)

    # -- the login cache

    def cached(
        self, name: str, keys: tuple[str, ...], sizes: tuple[int, ...] | None = None
    ) -> Assignment | None:
        """The assignment of this mailbox's last session if its snapshot had exactly ``keys`` (and, when
        sizes were corrected, ``sizes``) and nobody wrote to that mailbox since: the answer cannot differ,
        and the rows need not be read again."""
        version = self.engine.version(name)
        with self._lock:
            hit = self._cache.get(name)
            if (
                hit is not None
                and hit[1] == keys
                and hit[0] == version
                and (not hit[3].sizes or hit[2] == sizes)
            ):
                return hit[3]
            self._pending[name] = version
        return None

    def _remember(self, name: str, items: Sequence[Item], result: Assignment, version: int) -> None:
        unchanged = dataclasses.replace(
            result, new=0, gone=0, rematched=0, unmatched_vanished=0, previous_hash=result.list_hash
        )
        listed = tuple(i.size for i in items) if result.sizes else ()
        self._cache[name] = (version, tuple(i.key for i in items), listed, unchanged)

    # -- a session's snapshot

    def _plan(self, rows: dict[str, Row], items: Sequence[Item]) -> Plan:
        present = {i.key for i in items}
        new = [i for i in items if i.key not in rows]
        known = _known(_vanished(rows, present))
        need, skipped = header_candidates(known, [Seen(i.key, i.size) for i in new], self.max_fingerprints)
        return Plan(tuple(i.key for i in new), tuple(need), tuple(known), skipped)

    def need_body(self, name: str, items: Sequence[Item], prints: Prints) -> list[str]:
        """New messages whose size and header hash match several vanished rows with different bodies."""
        mb = self.engine.read_rows(name)
        if mb is None:
            return []
        known = _known(_vanished(mb.rows, {i.key for i in items}))
        return need_body(known, items, prints, self.max_fingerprints)

    def read_assignment(self, name: str, items: Sequence[Item]) -> Assignment | Plan | None:
        """On a reader: the answer when it needs no write (the usual login of a mailbox left as it was),
        the ``Plan`` when headers must be read first, else None (``assign`` must write)."""
        mb = self.engine.read_rows(name)
        if mb is None:
            return None
        rows = mb.rows
        if any(i.key not in rows for i in items):
            plan = self._plan(rows, items)
            return plan if plan.need_header else None
        present = {i.key for i in items}
        vanished = [r for r in rows.values() if r.key not in present]
        if any(r.state == "present" for r in vanished) or any(rows[i.key].state != "present" for i in items):
            return None
        uidls, order, list_hash = _listing(items, rows)
        if list_hash != mb.last_hash:
            return None
        result = Assignment(
            uidls, order, 0, len(vanished), 0, len(vanished), list_hash, mb.last_hash, _sizes(items, rows)
        )
        with self._lock:
            pending = self._pending.pop(name, None)
            if pending is not None:  # read before the rows: a write since makes it stale, never wrong
                self._remember(name, items, result, pending)
        return result

    def assign(
        self, name: str, account: str, items: Sequence[Item], fmt: str, fingerprints: Prints | None = None
    ) -> Assignment:
        """Give every item its UIDL (existing, rematched or new) in one transaction."""
        result = self._assign(name, account, items, fmt, fingerprints or {}, plan_first=False)
        assert isinstance(result, Assignment)
        return result

    def assign_or_plan(self, name: str, account: str, items: Sequence[Item], fmt: str) -> Assignment | Plan:
        """``assign`` when no fingerprint is needed (the usual case), else the ``Plan`` of the headers to
        read first (and nothing written)."""
        keys = tuple(i.key for i in items)
        if (hit := self.cached(name, keys, tuple(i.size for i in items))) is not None:
            return hit
        first = self.read_assignment(name, items)
        if first is not None:
            return first
        return self.write_assignment(name, account, items, fmt)

    def write_assignment(self, name: str, account: str, items: Sequence[Item], fmt: str) -> Assignment | Plan:
        """The writing half of ``assign_or_plan``."""
        return self._assign(name, account, items, fmt, {}, plan_first=True)

    def _assign(
        self, name: str, account: str, items: Sequence[Item], fmt: str, prints: Prints, *, plan_first: bool
    ) -> Assignment | Plan:
        keys = tuple(i.key for i in items)
        if not prints and (hit := self.cached(name, keys, tuple(i.size for i in items))) is not None:
            return hit
        self._wrote(name)
        with self.engine.mailbox_tx(name, account) as tx:
            version = tx.version
            result = self._assign_in(tx, items, fmt, prints, plan_first=plan_first)
        if isinstance(result, Assignment):
            with self._lock:
                self._remember(name, items, result, version)
        return result

    def _assign_in(
        self, tx: MailboxTx, items: Sequence[Item], fmt: str, prints: Prints, *, plan_first: bool
    ) -> Assignment | Plan:
        rows = tx.rows()
        present = {i.key for i in items}
        vanished = _vanished(rows, present)
        new_items = [i for i in items if i.key not in rows]
        if plan_first and vanished and new_items:
            plan = self._plan(rows, items)
            if plan.need_header:
                return plan  # nothing written: the transaction commits empty
        now = time.time()
        if vanished and new_items:  # nothing to rematch otherwise (a first login: no vanished rows)
            seen = [Seen(i.key, i.size, *prints.get(i.key, (None, None))) for i in new_items]
            matched = pair(_known(vanished), seen).pairs
        else:
            matched = ()
        for k, s in matched:
            old = rows.pop(k.ident)
            row = old._replace(
                key=s.ident,
                size=s.size,
                header_sha1=s.header_sha1,
                body_sha1=s.body_sha1 or old.body_sha1,
                state="present",
                gone_at=None,
                sent_size=old.sent_size if old.size == s.size else None,
            )
            tx.rekey(k.ident, row)
            rows[s.ident] = row
        fresh = [i for i in new_items if i.key not in rows] if matched else new_items  # not rematched
        propose = rules.propose
        proposals = [
            propose(fmt, key=i.key, native=i.native, uid=i.uid, uidvalidity=i.uidvalidity) for i in fresh
        ]
        reserved = _Reserved(tx, set(proposals))
        taken, given = reserved.taken, reserved.given
        inserts = []
        for item, proposal in zip(fresh, proposals, strict=True):
            # the usual case first: a proposal never given (one set lookup each, no query)
            uidl = (
                proposal
                if proposal not in taken and proposal not in given
                else rules.unique(proposal, reserved)
            )
            given.add(uidl)
            h, b = prints.get(item.key, _NO_PRINTS) if prints else _NO_PRINTS
            row = Row(item.key, uidl, item.size, h, b, "present", None)
            inserts.append(row)
            rows[item.key] = row
        tx.insert(inserts, now)
        matched_keys = {k.ident for k, _ in matched}
        still = [r for r in vanished if r.key not in matched_keys]
        expired = [r.key for r in still if r.state == "gone" and (r.gone_at or now) < now - self.retention]
        tx.forget(expired)
        tx.set_state([r.key for r in still if r.state == "present"], "gone", now)
        tx.set_state([i.key for i in items if rows[i.key].state != "present"], "present", now)
        gone = len(still) - len(expired)
        uidls, order, list_hash = _listing(items, rows)
        previous = tx.last_hash
        tx.finish(list_hash, len(uidls))
        return Assignment(
            uidls=uidls,
            order=order,
            new=len(inserts),
            gone=gone,
            rematched=len(matched),
            unmatched_vanished=gone,
            list_hash=list_hash,
            previous_hash=previous,
            sizes=_sizes(items, rows),
        )

    # -- what a session learnt

    def record_fingerprints(self, name: str, prints: Iterable[tuple[str, str | None, str | None]]) -> None:
        batch = [(k, h, b) for k, h, b in prints if h is not None or b is not None]
        if batch:
            self.engine.record_fingerprints(name, batch)

    def record_sizes(self, name: str, sizes: Sequence[tuple[str, int, int]]) -> None:
        """(key, listed size, sent size) of messages RETR sent with another size than listed."""
        if sizes:
            self._wrote(name)
            self.engine.record_sizes(name, sizes)

    def mark_deleted(self, name: str, keys: Iterable[str]) -> None:
        self._wrote(name)
        self.engine.mark_deleted(name, list(keys))

    # -- migration from an old POP3 server

    def import_uidls(self, name: str, account: str, mapping: Sequence[tuple[Item, str, int]]) -> int:
        """Store old-server UIDLs (and order) for upstream messages: (item, old uidl, old position).

        A message that already has a UIDL keeps it reserved and takes the old one. Raises ValueError,
        writing nothing, if an old UIDL is already given to another message (or was, to one since deleted).
        """
        for _, old_uidl, _ in mapping:
            if not rules.is_valid(old_uidl):
                raise ValueError(f"old UIDL {old_uidl!r} is not a valid RFC 1939 UIDL")
        self._wrote(name)
        with self.engine.mailbox_tx(name, account) as tx:
            rows = tx.rows()
            by_uidl = {r.uidl: r for r in rows.values()}
            ever = tx.taken({u for _, u, _ in mapping})
            now = time.time()
            for item, old_uidl, pos in mapping:
                holder = by_uidl.get(old_uidl)
                if (holder is not None and holder.key != item.key) or (holder is None and old_uidl in ever):
                    raise ValueError(f"old UIDL {old_uidl!r} is already given to another message")
                current = rows.get(item.key)
                if current is not None and current.uidl != old_uidl:
                    tx.forget([item.key])  # the gateway's own UIDL stays reserved
                    del by_uidl[current.uidl]
                    current = None
                if current is None:
                    row = Row(item.key, old_uidl, item.size, None, None, "present", pos)
                    tx.insert([row], now)
                    rows[item.key] = row
                else:
                    tx.set_order(item.key, pos)
                by_uidl[old_uidl] = rows[item.key]
        return len(mapping)


def need_body(known: Sequence[Known], items: Sequence[Item], prints: Prints, cap: int) -> list[str]:
    """Which new messages (with their header hashes in ``prints``) need their body read, at most ``cap``."""
    seen = [Seen(i.key, i.size, prints[i.key][0]) for i in items if i.key in prints]
    return body_candidates(known, seen)[: max(cap, 0)]


__all__ = ["DEFAULT_MAX_FINGERPRINTS", "DEFAULT_RETENTION", "Assignment", "Plan", "UidlStore", "need_body"]
