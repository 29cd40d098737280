"""The durable UIDL store: sqlite3 in the state directory, used from one worker thread.

Invariants:
- A row is never deleted: a UIDL, once given, stays reserved in its mailbox forever, so it can never be
  given to another message (the ``UNIQUE (mailbox_id, uidl)`` constraint makes that a database fact).
- A message is keyed by the most stable upstream identity there is (IMAP EMAILID, else UIDVALIDITY+UID;
  the JMAP Email id; the Maildir base name). When the upstream renumbers, rows whose messages vanished
  are matched to the new keys by fingerprint (size, header SHA-1, body SHA-1) and keep their UIDL.
- Every change of one session is one transaction (``BEGIN IMMEDIATE`` ... ``COMMIT``), committed before the
  client sees a UIDL; WAL mode with ``synchronous=FULL``: a SIGKILL at any point leaves either the old or
  the new state, and every UIDL ever shown is still there after a restart.
- The schema is versioned (``PRAGMA user_version``) and migrates forward, one step at a time.
- ``AsyncUidlStore`` runs every call on a worker thread behind ``CapacityLimiter(1)``: one connection, one
  thread at a time, the trio loop never blocks on disk.
"""

from __future__ import annotations

import dataclasses
import hashlib
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import trio

from gateway import files
from gateway.proto import uidl as rules

SCHEMA_VERSION = 1
_MIGRATIONS: dict[int, str] = {
    1: """
    CREATE TABLE mailbox (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,          -- the backend's lock key: upstream + account + folder
        account TEXT NOT NULL,
        last_list_hash TEXT,
        last_count INTEGER,
        sessions INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE message (
        mailbox_id INTEGER NOT NULL REFERENCES mailbox(id),
        key TEXT NOT NULL,                  -- the stable upstream identity
        uidl TEXT NOT NULL,
        size INTEGER NOT NULL,
        header_sha1 TEXT,
        body_sha1 TEXT,
        state TEXT NOT NULL DEFAULT 'present',  -- present | gone | deleted
        order_pos INTEGER,                  -- the old server's order, from `uidl import`
        first_seen REAL NOT NULL,
        PRIMARY KEY (mailbox_id, key),
        UNIQUE (mailbox_id, uidl)
    ) WITHOUT ROWID;
    """,
}

T = TypeVar("T")


class Item(NamedTuple):
    """One message of a snapshot, as the store needs it (a tuple: cheap by the 100,000)."""

    key: str
    size: int
    native: str  # the backend's proposed UIDL
    uid: int = 0
    uidvalidity: int = 0


class Row(NamedTuple):
    key: str
    uidl: str
    size: int
    header_sha1: str | None
    body_sha1: str | None
    state: str
    order_pos: int | None


@dataclasses.dataclass(frozen=True, slots=True)
class Plan:
    """What a session must learn from the upstream before UIDLs can be assigned."""

    new_keys: tuple[str, ...]
    need_header: tuple[str, ...]  # new messages whose size matches a vanished row with a header hash


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


class UidlStore:
    """Synchronous; one instance per process, used from one thread at a time."""

    def __init__(self, path: Path) -> None:
        files.make_private_dir(path.parent)
        files.create_private_file(path)  # sqlite gives -wal and -shm the database's mode
        self.path = path
        self.db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=30)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self._migrate()
        # mailbox -> (data_version, snapshot keys, the assignment for exactly that snapshot)
        self._cache: dict[str, tuple[int, tuple[str, ...], Assignment]] = {}

    def close(self) -> None:
        self.db.close()

    # -- schema

    def _migrate(self) -> None:
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RuntimeError(f"{self.path}: schema version {version} is newer than this program's")
        while version < SCHEMA_VERSION:
            version += 1
            with self._transaction():  # DDL is transactional in sqlite: a step applies whole or not at all
                for statement in _MIGRATIONS[version].split(";"):
                    if statement.strip():
                        self.db.execute(statement)
                self.db.execute(f"PRAGMA user_version = {version}")

    def schema_version(self) -> int:
        return int(self.db.execute("PRAGMA user_version").fetchone()[0])

    def integrity_ok(self) -> bool:
        return bool(self.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok")

    class _Tx:
        def __init__(self, db: sqlite3.Connection) -> None:
            self.db = db

        def __enter__(self) -> None:
            self.db.execute("BEGIN IMMEDIATE")

        def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
            self.db.execute("ROLLBACK" if exc_type else "COMMIT")

    def _transaction(self) -> UidlStore._Tx:
        return UidlStore._Tx(self.db)

    # -- mailboxes

    def _mailbox(self, name: str, account: str) -> int:
        row = self.db.execute("SELECT id FROM mailbox WHERE name = ?", (name,)).fetchone()
        if row:
            return int(row[0])
        cur = self.db.execute("INSERT INTO mailbox (name, account) VALUES (?, ?)", (name, account))
        return int(cur.lastrowid or 0)

    def _rows(self, mailbox_id: int) -> dict[str, Row]:
        cur = self.db.execute(
            "SELECT key, uidl, size, header_sha1, body_sha1, state, order_pos FROM message "
            "WHERE mailbox_id = ?",
            (mailbox_id,),
        )
        return {r[0]: Row(*r) for r in cur}

    def mailboxes(self, account: str | None = None) -> list[tuple[str, str]]:
        if account is None:
            cur = self.db.execute("SELECT name, account FROM mailbox ORDER BY name")
        else:
            cur = self.db.execute(
                "SELECT name, account FROM mailbox WHERE account = ? ORDER BY name", (account,)
            )
        return [(r[0], r[1]) for r in cur]

    def rows(self, name: str) -> list[Row]:
        row = self.db.execute("SELECT id FROM mailbox WHERE name = ?", (name,)).fetchone()
        if not row:
            return []
        return sorted(self._rows(int(row[0])).values(), key=lambda r: (r.order_pos is None, r.order_pos or 0))

    def adopt(self, name: str, legacy: Sequence[str]) -> str | None:
        """Carry the first existing mailbox of ``legacy`` over to ``name`` (renamed, rows and all) unless
        ``name`` exists already; the old name that was carried over, or None. One transaction."""
        with self._transaction():
            if self.db.execute("SELECT 1 FROM mailbox WHERE name = ?", (name,)).fetchone():
                return None
            for old in legacy:
                cur = self.db.execute("UPDATE mailbox SET name = ? WHERE name = ?", (name, old))
                if cur.rowcount:
                    self._cache.pop(old, None)
                    self._cache.pop(name, None)
                    return old
        return None

    # -- a session's snapshot

    def plan(self, name: str, items: Sequence[Item]) -> Plan:
        """Read-only: which new messages need a header hash before ``assign`` can match them."""
        row = self.db.execute("SELECT id FROM mailbox WHERE name = ?", (name,)).fetchone()
        if not row:
            return Plan(tuple(i.key for i in items), ())
        rows = self._rows(int(row[0]))
        present = {i.key for i in items}
        new = [i for i in items if i.key not in rows]
        vanished_sizes = {
            r.size
            for r in rows.values()
            if r.state == "present" and r.key not in present and r.header_sha1 is not None
        }
        need = tuple(i.key for i in new if i.size in vanished_sizes)
        return Plan(tuple(i.key for i in new), need)

    def need_body(
        self, name: str, items: Sequence[Item], prints: dict[str, tuple[str | None, str | None]]
    ) -> list[str]:
        """New messages whose size and header hash match several vanished rows with different bodies."""
        row = self.db.execute("SELECT id FROM mailbox WHERE name = ?", (name,)).fetchone()
        if not row:
            return []
        rows = self._rows(int(row[0]))
        present = {i.key for i in items}
        bodies: dict[tuple[int, str], set[str | None]] = {}
        for r in rows.values():
            if r.state == "present" and r.key not in present and r.header_sha1 is not None:
                bodies.setdefault((r.size, r.header_sha1), set()).add(r.body_sha1)
        out = []
        for item in items:
            header = prints.get(item.key, (None, None))[0]
            if header is not None and len(bodies.get((item.size, header), ())) > 1:
                out.append(item.key)
        return out

    def assign(
        self,
        name: str,
        account: str,
        items: Sequence[Item],
        fmt: str,
        fingerprints: dict[str, tuple[str | None, str | None]] | None = None,
    ) -> Assignment:
        """Give every item its UIDL (existing, rematched or new) in one transaction."""
        result = self._assign(name, account, items, fmt, fingerprints or {}, plan_first=False)
        assert isinstance(result, Assignment)
        return result

    def assign_or_plan(self, name: str, account: str, items: Sequence[Item], fmt: str) -> Assignment | Plan:
        """``assign`` when no fingerprint is needed (the usual case: one pass over the rows), else the
        ``Plan`` of the headers to read first (and nothing written)."""
        return self._assign(name, account, items, fmt, {}, plan_first=True)

    def _assign(
        self,
        name: str,
        account: str,
        items: Sequence[Item],
        fmt: str,
        fingerprints: dict[str, tuple[str | None, str | None]],
        *,
        plan_first: bool,
    ) -> Assignment | Plan:
        keys = tuple(i.key for i in items)
        if not fingerprints and (hit := self.cached(name, keys)) is not None:
            return hit
        with self._transaction():
            mailbox_id = self._mailbox(name, account)
            rows = self._rows(mailbox_id)
            taken = {r.uidl for r in rows.values()}
            present = {i.key for i in items}
            vanished = [r for r in rows.values() if r.state == "present" and r.key not in present]
            new_items = [i for i in items if i.key not in rows]
            if plan_first and vanished and new_items:
                sizes = {r.size for r in vanished if r.header_sha1 is not None}
                need = tuple(i.key for i in new_items if i.size in sizes)
                if need:
                    self.db.execute("SELECT 1")  # nothing written: the transaction commits empty
                    return Plan(tuple(i.key for i in new_items), need)
            rematched = self._rematch(mailbox_id, rows, vanished, new_items, fingerprints)
            now = time.time()
            inserts = []
            for item in new_items:
                if item.key in rows:  # rematched just now
                    continue
                proposal = rules.propose(
                    fmt, key=item.key, native=item.native, uid=item.uid, uidvalidity=item.uidvalidity
                )
                uidl = rules.unique(proposal, taken)
                taken.add(uidl)
                fp = fingerprints.get(item.key, (None, None))
                inserts.append((mailbox_id, item.key, uidl, item.size, fp[0], fp[1], now))
                rows[item.key] = Row(item.key, uidl, item.size, fp[0], fp[1], "present", None)
            self.db.executemany(
                "INSERT INTO message (mailbox_id, key, uidl, size, header_sha1, body_sha1, first_seen) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                inserts,
            )
            still_vanished = [r.key for r in vanished if r.key not in present and rows.get(r.key) is r]
            self.db.executemany(
                "UPDATE message SET state = 'gone' WHERE mailbox_id = ? AND key = ?",
                [(mailbox_id, k) for k in still_vanished],
            )
            revived = [i.key for i in items if rows[i.key].state != "present"]
            self.db.executemany(
                "UPDATE message SET state = 'present' WHERE mailbox_id = ? AND key = ?",
                [(mailbox_id, k) for k in revived],
            )
            uidls = tuple(rows[i.key].uidl for i in items)
            order = _client_order(items, rows)
            listing = "\n".join(uidls[i] for i in order).encode()
            list_hash = hashlib.sha1(listing, usedforsecurity=False).hexdigest()
            prev = self.db.execute(
                "SELECT last_list_hash FROM mailbox WHERE id = ?", (mailbox_id,)
            ).fetchone()
            prev = prev[0] if prev else None
            self.db.execute(
                "UPDATE mailbox SET last_list_hash = ?, last_count = ?, sessions = sessions + 1 WHERE id = ?",
                (list_hash, len(uidls), mailbox_id),
            )
        result = Assignment(
            uidls=uidls,
            order=order,
            new=len(inserts),
            gone=len(still_vanished),
            rematched=rematched,
            unmatched_vanished=len(still_vanished),
            list_hash=list_hash,
            previous_hash=prev,
        )
        unchanged = dataclasses.replace(
            result, new=0, gone=0, rematched=0, unmatched_vanished=0, previous_hash=list_hash
        )
        self._cache[name] = (self._data_version(), keys, unchanged)
        return result

    def cached(self, name: str, keys: tuple[str, ...]) -> Assignment | None:
        """The assignment of this mailbox's last session if its snapshot had exactly ``keys`` and nobody
        else wrote the store since: the answer cannot differ, and 100,000 rows need not be read again."""
        hit = self._cache.get(name)
        if hit is not None and hit[1] == keys and hit[0] == self._data_version():
            return hit[2]
        return None

    def _data_version(self) -> int:
        """Changes whenever another connection (another process: `uidl import`) commits to the file."""
        return int(self.db.execute("PRAGMA data_version").fetchone()[0])

    def _rematch(
        self,
        mailbox_id: int,
        rows: dict[str, Row],
        vanished: list[Row],
        new_items: list[Item],
        fingerprints: dict[str, tuple[str | None, str | None]],
    ) -> int:
        """Give vanished rows' UIDLs to the new keys of the same messages (size, header SHA-1, body SHA-1)."""
        if not vanished or not new_items:
            return 0
        pool: dict[tuple[int, str], list[Row]] = {}
        for r in sorted(vanished, key=lambda r: (r.order_pos is None, r.order_pos or 0, r.uidl)):
            if r.header_sha1 is not None:
                pool.setdefault((r.size, r.header_sha1), []).append(r)
        matched = 0
        for item in new_items:
            header, body = fingerprints.get(item.key, (None, None))
            if header is None:
                continue
            candidates = pool.get((item.size, header))
            if not candidates:
                continue
            bodies = {c.body_sha1 for c in candidates}
            if len(candidates) > 1 and len(bodies) > 1:
                # the headers are not enough: the body decides, or nothing does
                chosen = next((c for c in candidates if body is not None and c.body_sha1 == body), None)
            else:
                chosen = candidates[0]
            if chosen is None:
                continue
            candidates.remove(chosen)
            self.db.execute(
                "UPDATE message SET key = ?, size = ?, state = 'present', header_sha1 = ?, "
                "body_sha1 = COALESCE(?, body_sha1) WHERE mailbox_id = ? AND key = ?",
                (item.key, item.size, header, body, mailbox_id, chosen.key),
            )
            del rows[chosen.key]
            rows[item.key] = chosen._replace(key=item.key, state="present")
            matched += 1
        return matched

    def record_fingerprints(self, name: str, prints: Iterable[tuple[str, str | None, str | None]]) -> None:
        batch = [(h, b, name, key) for key, h, b in prints if h is not None or b is not None]
        if not batch:
            return
        with self._transaction():
            self.db.executemany(
                "UPDATE message SET header_sha1 = COALESCE(?, header_sha1), "
                "body_sha1 = COALESCE(?, body_sha1) "
                "WHERE mailbox_id = (SELECT id FROM mailbox WHERE name = ?) AND key = ?",
                batch,
            )

    def mark_deleted(self, name: str, keys: Iterable[str]) -> None:
        self._cache.pop(name, None)
        with self._transaction():
            self.db.executemany(
                "UPDATE message SET state = 'deleted' "
                "WHERE mailbox_id = (SELECT id FROM mailbox WHERE name = ?) AND key = ?",
                [(name, k) for k in keys],
            )

    # -- migration from an old POP3 server

    def import_uidls(self, name: str, account: str, mapping: Sequence[tuple[Item, str, int]]) -> int:
        """Store old-server UIDLs (and order) for upstream messages: (item, old uidl, old position).

        A message that already has a UIDL keeps it reserved (moved to a retired row) and takes the old one.
        Raises ValueError, writing nothing, if an old UIDL is already given to another message.
        """
        self._cache.pop(name, None)
        with self._transaction():
            mailbox_id = self._mailbox(name, account)
            rows = self._rows(mailbox_id)
            by_uidl = {r.uidl: r for r in rows.values()}
            now = time.time()
            for item, old_uidl, pos in mapping:
                if not rules.is_valid(old_uidl):
                    raise ValueError(f"old UIDL {old_uidl!r} is not a valid RFC 1939 UIDL")
                holder = by_uidl.get(old_uidl)
                if holder is not None and holder.key != item.key:
                    raise ValueError(f"old UIDL {old_uidl!r} is already given to another message")
                current = rows.get(item.key)
                if current is not None and current.uidl != old_uidl:
                    # keep the gateway's own UIDL reserved forever under a retired key
                    self.db.execute(
                        "UPDATE message SET key = ?, state = 'deleted' WHERE mailbox_id = ? AND key = ?",
                        (f"retired:{current.key}:{current.uidl}", mailbox_id, item.key),
                    )
                    current = None
                if current is None:
                    self.db.execute(
                        "INSERT INTO message (mailbox_id, key, uidl, size, order_pos, first_seen) "
                        "VALUES (?, ?, ?, ?, ?, ?)",
                        (mailbox_id, item.key, old_uidl, item.size, pos, now),
                    )
                else:
                    self.db.execute(
                        "UPDATE message SET order_pos = ? WHERE mailbox_id = ? AND key = ?",
                        (pos, mailbox_id, item.key),
                    )
                by_uidl[old_uidl] = Row(item.key, old_uidl, item.size, None, None, "present", pos)
        return len(mapping)


def _client_order(items: Sequence[Item], rows: dict[str, Row]) -> tuple[int, ...]:
    """Imported messages first, in the old server's order; then the rest in the backend's order."""
    positions = [rows[i.key].order_pos for i in items]
    if all(p is None for p in positions):
        return tuple(range(len(items)))
    return tuple(sorted(range(len(items)), key=lambda i: (positions[i] is None, positions[i] or 0, i)))


class AsyncUidlStore:
    """The store for trio code: every call runs on a worker thread, one at a time."""

    def __init__(self, path: Path) -> None:
        self._limiter = trio.CapacityLimiter(1)
        self._store: UidlStore | None = None
        self._path = path
        self._lock = threading.Lock()
        self.operations: Callable[[str], None] | None = None  # metrics hook: called with the op name

    async def open(self) -> None:
        self._store = await self._run(lambda: UidlStore(self._path), op="open", need_open=False)

    async def aclose(self) -> None:
        if self._store is not None:
            store, self._store = self._store, None
            await trio.to_thread.run_sync(store.close, limiter=self._limiter)

    @property
    def is_open(self) -> bool:
        return self._store is not None

    async def _run(self, fn: Callable[[], T], *, op: str, need_open: bool = True) -> T:
        if need_open and self._store is None:
            raise RuntimeError("the UIDL store is not open")
        if self.operations is not None:
            self.operations(op)
        return await trio.to_thread.run_sync(fn, limiter=self._limiter)

    def _s(self) -> UidlStore:
        assert self._store is not None
        return self._store

    async def plan(self, name: str, items: Sequence[Item]) -> Plan:
        return await self._run(lambda: self._s().plan(name, items), op="plan")

    async def cached(self, name: str, keys: tuple[str, ...]) -> Assignment | None:
        return await self._run(lambda: self._s().cached(name, keys), op="plan")

    async def need_body(
        self, name: str, items: Sequence[Item], prints: dict[str, tuple[str | None, str | None]]
    ) -> list[str]:
        return await self._run(lambda: self._s().need_body(name, items, prints), op="plan")

    async def assign_or_plan(
        self, name: str, account: str, items: Sequence[Item], fmt: str
    ) -> Assignment | Plan:
        return await self._run(lambda: self._s().assign_or_plan(name, account, items, fmt), op="assign")

    async def adopt(self, name: str, legacy: Sequence[str]) -> str | None:
        return await self._run(lambda: self._s().adopt(name, legacy), op="adopt")

    async def assign(self, *args: Any, **kwargs: Any) -> Assignment:
        return await self._run(lambda: self._s().assign(*args, **kwargs), op="assign")

    async def record_fingerprints(self, name: str, prints: list[tuple[str, str | None, str | None]]) -> None:
        await self._run(lambda: self._s().record_fingerprints(name, prints), op="fingerprints")

    async def mark_deleted(self, name: str, keys: list[str]) -> None:
        await self._run(lambda: self._s().mark_deleted(name, keys), op="mark_deleted")
