"""The embedded engine of the UIDL store: sqlite3 in the state directory.

Invariants:
- One writer connection, used by one thread at a time (the async adapter's ``CapacityLimiter(1)``);
  readers on their own connections (WAL: they never wait for the writer, nor it for them), ``READERS``
  at a time.
- Every UIDL ever given in a mailbox is either on a live row of ``message`` (``UNIQUE (mailbox_id,
  uidl)``) or in ``reserved`` (a 64-bit hash, ``UNIQUE`` by its primary key): a row's UIDL is reserved in
  the same transaction that removes the row (``forget``, ``mark_deleted``, ``prune``), never later. So a
  first login writes one row per message, not two. ``reserved`` is compact, never pruned, consulted only
  for a new message's proposal. ``message`` holds only the messages not deleted (present, or gone and kept
  for rematching until the retention), so a login reads what its mailbox holds now and a poller that
  deletes everything at QUIT keeps it small.
- Every change is one transaction (``BEGIN IMMEDIATE`` ... ``COMMIT``); WAL with ``synchronous=FULL``: a
  SIGKILL at any point leaves either the old or the new state.
- The schema is versioned (``PRAGMA user_version``) and migrates forward, one step at a time, each step one
  transaction. Version 2 moved the deleted rows into ``reserved``; version 3 stopped reserving live rows
  (their ``reserved`` entries from version 2 stay, harmless), and an older program must not write it.
"""

from __future__ import annotations

import contextlib
import hashlib
import queue
import sqlite3
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

from gateway import files
from gateway.store.engine import MailboxRows, Row, State

SCHEMA_VERSION = 3
# Reads at once beside the writer. Measured (8 mailboxes of 5,000 to 20,000 rows, 40 uncached logins
# at once, 2 cores): 1 reader 0.71-0.84 s, 2 readers 1.48-1.54 s, 3 readers 1.21-1.82 s. Building the
# rows holds the GIL, so more reader threads only contend; what matters is that reads do not wait for
# a write (a first login assigning 100,000 UIDLs), which one lane of their own gives.
READERS = 1
_CHUNK = 500  # host parameters per IN (...) query
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
    2: """
    CREATE TABLE reserved (
        mailbox_id INTEGER NOT NULL REFERENCES mailbox(id),
        h INTEGER NOT NULL,                 -- uidl_hash(uidl): every UIDL ever given in the mailbox
        PRIMARY KEY (mailbox_id, h)
    ) WITHOUT ROWID;
    INSERT OR IGNORE INTO reserved (mailbox_id, h) SELECT mailbox_id, uidl_hash(uidl) FROM message;
    ALTER TABLE message ADD COLUMN sent_size INTEGER;
    ALTER TABLE message ADD COLUMN gone_at REAL;
    UPDATE message SET gone_at = CAST(strftime('%s', 'now') AS REAL) WHERE state = 'gone';
    DELETE FROM message WHERE state = 'deleted';
    CREATE INDEX message_gone ON message (gone_at) WHERE state = 'gone';
    ALTER TABLE mailbox ADD COLUMN version INTEGER NOT NULL DEFAULT 0;  -- bumped by every write
    """,
    # No change of tables: rows are reserved when they go, not when they come. The version is what keeps a
    # program of version 2, which reads ``reserved`` alone, from giving a live row's UIDL again.
    3: "",
}
T = TypeVar("T")
_ROW = "key, uidl, size, header_sha1, body_sha1, state, order_pos, sent_size, gone_at"


def uidl_hash(uidl: str) -> int:
    """The reservation of ``uidl``: the first 64 bits of its SHA-1, signed (an sqlite INTEGER)."""
    digest = hashlib.sha1(uidl.encode("utf-8", "surrogatepass"), usedforsecurity=False).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=30)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("PRAGMA foreign_keys=ON")
    db.create_function("uidl_hash", 1, uidl_hash, deterministic=True)
    return db


def _chunks(values: Sequence[T]) -> Iterator[Sequence[T]]:
    for i in range(0, len(values), _CHUNK):
        yield values[i : i + _CHUNK]


class _Tx:
    """``MailboxTx`` on the writer connection, inside ``BEGIN IMMEDIATE``."""

    def __init__(self, db: sqlite3.Connection, mailbox_id: int, last_hash: str | None, version: int) -> None:
        self.db = db
        self.mailbox_id = mailbox_id
        self._last_hash = last_hash
        self._version = version
        self._nothing_given: bool | None = None  # learnt at the first taken() of the transaction

    @property
    def version(self) -> int:
        return self._version

    @property
    def last_hash(self) -> str | None:
        return self._last_hash

    def rows(self) -> dict[str, Row]:
        return _read(self.db, self.mailbox_id)

    def taken(self, uidls: Collection[str]) -> set[str]:
        m = self.mailbox_id
        if self._nothing_given is None:  # once per transaction: a fresh mailbox has given nothing
            self._nothing_given = not any(
                self.db.execute(f"SELECT 1 FROM {table} WHERE mailbox_id = ? LIMIT 1", (m,)).fetchone()  # noqa: S608 - a constant
                for table in ("reserved", "message")
            )
        if self._nothing_given:
            return set()
        wanted = list(uidls)
        out: set[str] = set()
        for chunk in _chunks(wanted):  # on a live row (the UNIQUE index answers)
            cur = self.db.execute(
                f"SELECT uidl FROM message WHERE mailbox_id = ? AND uidl IN ({','.join('?' * len(chunk))})",  # noqa: S608 - placeholders only
                (m, *chunk),
            )
            out.update(u for (u,) in cur)
        by_hash: dict[int, list[str]] = {}
        for u in wanted:
            by_hash.setdefault(uidl_hash(u), []).append(u)
        for hchunk in _chunks(list(by_hash)):  # or given to a row since removed
            cur = self.db.execute(
                f"SELECT h FROM reserved WHERE mailbox_id = ? AND h IN ({','.join('?' * len(hchunk))})",  # noqa: S608 - placeholders only
                (m, *hchunk),
            )
            for (h,) in cur:
                out.update(by_hash[h])
        return out

    def insert(self, rows: Sequence[Row], now: float) -> None:
        m = self.mailbox_id
        self.db.executemany(
            "INSERT INTO message (mailbox_id, key, uidl, size, header_sha1, body_sha1, order_pos, "
            "first_seen) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [(m, r.key, r.uidl, r.size, r.header_sha1, r.body_sha1, r.order_pos, now) for r in rows],
        )
        if rows:
            self._nothing_given = False

    def reserve(self, uidls: Iterable[str]) -> None:
        m = self.mailbox_id
        rows = [(m, uidl_hash(u)) for u in uidls]
        if rows:
            self._nothing_given = False
        self.db.executemany("INSERT OR IGNORE INTO reserved (mailbox_id, h) VALUES (?, ?)", rows)

    def rekey(self, old_key: str, row: Row) -> None:
        self.db.execute(
            "UPDATE message SET key = ?, size = ?, state = 'present', gone_at = NULL, header_sha1 = ?, "
            "body_sha1 = ?, sent_size = ? WHERE mailbox_id = ? AND key = ?",
            (row.key, row.size, row.header_sha1, row.body_sha1, row.sent_size, self.mailbox_id, old_key),
        )

    def set_state(self, keys: Sequence[str], state: State, now: float) -> None:
        gone_at = now if state == "gone" else None
        self.db.executemany(
            "UPDATE message SET state = ?, gone_at = ? WHERE mailbox_id = ? AND key = ?",
            [(state, gone_at, self.mailbox_id, k) for k in keys],
        )

    def set_order(self, key: str, order_pos: int) -> None:
        self.db.execute(
            "UPDATE message SET order_pos = ? WHERE mailbox_id = ? AND key = ?",
            (order_pos, self.mailbox_id, key),
        )

    def forget(self, keys: Sequence[str]) -> None:
        _remove(self.db, [(self.mailbox_id, k) for k in keys])

    def finish(self, list_hash: str, count: int) -> None:
        self.db.execute(
            "UPDATE mailbox SET last_list_hash = ?, last_count = ?, sessions = sessions + 1 WHERE id = ?",
            (list_hash, count, self.mailbox_id),
        )


def _remove(db: sqlite3.Connection, rows: Sequence[tuple[int, str]]) -> None:
    """Rows (mailbox id, key) go; their UIDLs are reserved in the same transaction."""
    db.executemany(
        "INSERT OR IGNORE INTO reserved (mailbox_id, h) "
        "SELECT mailbox_id, uidl_hash(uidl) FROM message WHERE mailbox_id = ? AND key = ?",
        rows,
    )
    db.executemany("DELETE FROM message WHERE mailbox_id = ? AND key = ?", rows)


def _read(db: sqlite3.Connection, mailbox_id: int) -> dict[str, Row]:
    cur = db.execute(f"SELECT {_ROW} FROM message WHERE mailbox_id = ?", (mailbox_id,))  # noqa: S608 - a constant
    return {r[0]: Row(*r) for r in cur}


class SqliteEngine:
    """``Engine`` on one sqlite file."""

    errors: tuple[type[Exception], ...] = (sqlite3.Error, OSError)

    def __init__(self, path: Path) -> None:
        files.make_private_dir(path.parent)
        files.create_private_file(path)  # sqlite gives -wal and -shm the database's mode
        self.path = path
        self.db = _connect(path)
        self._migrate()
        self._readers: queue.SimpleQueue[sqlite3.Connection] = queue.SimpleQueue()
        self._all_readers: list[sqlite3.Connection] = []

    def close(self) -> None:
        for db in self._all_readers:
            db.close()
        self._all_readers.clear()
        self.db.close()

    # -- schema

    def _migrate(self) -> None:
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RuntimeError(f"{self.path}: schema version {version} is newer than this program's")
        start = version
        while version < SCHEMA_VERSION:
            version += 1
            with self._transaction():  # DDL is transactional in sqlite: a step applies whole or not at all
                for statement in _MIGRATIONS[version].split(";"):
                    if statement.strip():
                        self.db.execute(statement)
                self.db.execute(f"PRAGMA user_version = {version}")
        if 0 < start < 2 <= version:  # version 2 freed the deleted rows' pages: give them back, once
            free = self.db.execute("PRAGMA freelist_count").fetchone()[0]
            if free * 2 > self.db.execute("PRAGMA page_count").fetchone()[0]:
                self.db.execute("VACUUM")

    def schema_version(self) -> int:
        return int(self.db.execute("PRAGMA user_version").fetchone()[0])

    def integrity_ok(self) -> bool:
        return bool(self.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok")

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def version(self, name: str) -> int:
        def read(db: sqlite3.Connection) -> int:
            row = db.execute("SELECT version FROM mailbox WHERE name = ?", (name,)).fetchone()
            return -1 if row is None else int(row[0])

        return self._with_reader(read)

    def _bump(self, name: str) -> None:
        self.db.execute("UPDATE mailbox SET version = version + 1 WHERE name = ?", (name,))

    # -- mailboxes

    def _mailbox_id(self, db: sqlite3.Connection, name: str) -> int | None:
        row = db.execute("SELECT id FROM mailbox WHERE name = ?", (name,)).fetchone()
        return None if row is None else int(row[0])

    @contextlib.contextmanager
    def mailbox_tx(self, name: str, account: str) -> Iterator[_Tx]:
        with self._transaction():
            row = self.db.execute("SELECT id, last_list_hash FROM mailbox WHERE name = ?", (name,)).fetchone()
            if row is None:
                cur = self.db.execute("INSERT INTO mailbox (name, account) VALUES (?, ?)", (name, account))
                row = (int(cur.lastrowid or 0), None)
            mailbox_id = int(row[0])
            (version,) = self.db.execute(
                "UPDATE mailbox SET version = version + 1 WHERE id = ? RETURNING version", (mailbox_id,)
            ).fetchone()
            yield _Tx(self.db, mailbox_id, row[1], int(version))

    def _with_reader(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        try:
            db = self._readers.get_nowait()
        except queue.Empty:
            db = _connect(self.path)
            self._all_readers.append(db)
        try:
            db.execute("BEGIN")  # one snapshot for both statements
            try:
                return fn(db)
            finally:
                db.execute("COMMIT")
        finally:
            self._readers.put(db)

    def read_rows(self, name: str) -> MailboxRows | None:
        def read(db: sqlite3.Connection) -> MailboxRows | None:
            row = db.execute("SELECT id, last_list_hash FROM mailbox WHERE name = ?", (name,)).fetchone()
            if row is None:
                return None
            return MailboxRows(_read(db, int(row[0])), row[1])

        return self._with_reader(read)

    def mailboxes(self, account: str | None = None) -> list[tuple[str, str]]:
        if account is None:
            cur = self.db.execute("SELECT name, account FROM mailbox ORDER BY name")
        else:
            cur = self.db.execute(
                "SELECT name, account FROM mailbox WHERE account = ? ORDER BY name", (account,)
            )
        return [(r[0], r[1]) for r in cur]

    def rows(self, name: str) -> list[Row]:
        mailbox_id = self._mailbox_id(self.db, name)
        if mailbox_id is None:
            return []
        rows = _read(self.db, mailbox_id).values()
        return sorted(rows, key=lambda r: (r.order_pos is None, r.order_pos or 0))

    def adopt(self, name: str, legacy: Sequence[str]) -> str | None:
        with self._transaction():
            if self._mailbox_id(self.db, name) is not None:
                return None
            for old in legacy:
                cur = self.db.execute("UPDATE mailbox SET name = ? WHERE name = ?", (name, old))
                if cur.rowcount:
                    self._bump(name)
                    return old
        return None

    # -- what sessions learnt

    def record_fingerprints(self, name: str, prints: Sequence[tuple[str, str | None, str | None]]) -> None:
        with self._transaction():
            self.db.executemany(
                "UPDATE message SET header_sha1 = COALESCE(?, header_sha1), "
                "body_sha1 = COALESCE(?, body_sha1) "
                "WHERE mailbox_id = (SELECT id FROM mailbox WHERE name = ?) AND key = ?",
                [(h, b, name, key) for key, h, b in prints],
            )

    def record_sizes(self, name: str, sizes: Sequence[tuple[str, int, int]]) -> None:
        with self._transaction():
            self.db.executemany(
                "UPDATE message SET sent_size = ? "
                "WHERE mailbox_id = (SELECT id FROM mailbox WHERE name = ?) AND key = ? AND size = ?",
                [(sent, name, key, listed) for key, listed, sent in sizes],
            )
            self._bump(name)

    def mark_deleted(self, name: str, keys: Sequence[str]) -> None:
        """The rows go; their UIDLs go to ``reserved``."""
        with self._transaction():
            mailbox_id = self._mailbox_id(self.db, name)
            if mailbox_id is not None:
                _remove(self.db, [(mailbox_id, k) for k in keys])
            self._bump(name)

    def prune(self, gone_before: float) -> int:
        with self._transaction():
            self.db.execute(
                "INSERT OR IGNORE INTO reserved (mailbox_id, h) "
                "SELECT mailbox_id, uidl_hash(uidl) FROM message WHERE state = 'gone' AND gone_at < ?",
                (gone_before,),
            )
            cur = self.db.execute("DELETE FROM message WHERE state = 'gone' AND gone_at < ?", (gone_before,))
            return int(cur.rowcount)


__all__ = ["READERS", "SCHEMA_VERSION", "SqliteEngine", "uidl_hash"]
