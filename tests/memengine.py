"""A second ``Engine`` for the UIDL store, in memory: proof that the seam is enough for the store's rules
(the next issue's PostgreSQL engine implements the same protocol). For tests only."""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterable, Iterator, Sequence

from gateway.store.engine import MailboxRows, Row, State


class _Box:
    def __init__(self, account: str) -> None:
        self.account = account
        self.rows: dict[str, Row] = {}
        self.reserved: set[str] = set()
        self.last_hash: str | None = None
        self.version = 0


class _Tx:
    def __init__(self, box: _Box) -> None:
        self.box = box
        box.version += 1

    @property
    def last_hash(self) -> str | None:
        return self.box.last_hash

    @property
    def version(self) -> int:
        return self.box.version

    def rows(self) -> dict[str, Row]:
        return dict(self.box.rows)

    def taken(self, uidls: Collection[str]) -> set[str]:
        live = {r.uidl for r in self.box.rows.values()}
        return {u for u in uidls if u in self.box.reserved or u in live}

    def insert(self, rows: Sequence[Row], now: float) -> None:
        for r in rows:
            assert r.key not in self.box.rows and not self.taken({r.uidl})
            self.box.rows[r.key] = r

    def rekey(self, old_key: str, row: Row) -> None:
        del self.box.rows[old_key]
        self.box.rows[row.key] = row._replace(state="present", gone_at=None)

    def set_state(self, keys: Sequence[str], state: State, now: float) -> None:
        for k in keys:
            self.box.rows[k] = self.box.rows[k]._replace(
                state=state, gone_at=now if state == "gone" else None
            )

    def set_order(self, key: str, order_pos: int) -> None:
        self.box.rows[key] = self.box.rows[key]._replace(order_pos=order_pos)

    def reserve(self, uidls: Iterable[str]) -> None:
        self.box.reserved.update(uidls)

    def forget(self, keys: Sequence[str]) -> None:
        _remove(self.box, keys)

    def finish(self, list_hash: str, count: int) -> None:
        self.box.last_hash = list_hash


def _remove(box: _Box, keys: Iterable[str]) -> None:
    """Rows go; their UIDLs are reserved at once (the engine contract)."""
    for k in keys:
        row = box.rows.pop(k, None)
        if row is not None:
            box.reserved.add(row.uidl)


class MemoryEngine:
    errors: tuple[type[Exception], ...] = (OSError,)

    def __init__(self) -> None:
        self.boxes: dict[str, _Box] = {}

    @contextlib.contextmanager
    def mailbox_tx(self, name: str, account: str) -> Iterator[_Tx]:
        box = self.boxes.setdefault(name, _Box(account))
        saved = (dict(box.rows), set(box.reserved), box.last_hash)
        try:
            yield _Tx(box)
        except BaseException:
            box.rows, box.reserved, box.last_hash = saved
            raise

    def read_rows(self, name: str) -> MailboxRows | None:
        box = self.boxes.get(name)
        return None if box is None else MailboxRows(dict(box.rows), box.last_hash)

    def version(self, name: str) -> int:
        box = self.boxes.get(name)
        return -1 if box is None else box.version

    def mark_deleted(self, name: str, keys: Sequence[str]) -> None:
        box = self.boxes[name]
        box.version += 1
        _remove(box, keys)

    def record_fingerprints(self, name: str, prints: Sequence[tuple[str, str | None, str | None]]) -> None:
        box = self.boxes[name]
        for k, h, b in prints:
            if (r := box.rows.get(k)) is not None:
                box.rows[k] = r._replace(header_sha1=h or r.header_sha1, body_sha1=b or r.body_sha1)

    def record_sizes(self, name: str, sizes: Sequence[tuple[str, int, int]]) -> None:
        box = self.boxes[name]
        box.version += 1
        for k, listed, sent in sizes:
            if (r := box.rows.get(k)) is not None and r.size == listed:
                box.rows[k] = r._replace(sent_size=sent)

    def adopt(self, name: str, legacy: Sequence[str]) -> str | None:
        if name in self.boxes:
            return None
        for old in legacy:
            if old in self.boxes:
                self.boxes[name] = self.boxes.pop(old)
                self.boxes[name].version += 1
                return old
        return None

    def prune(self, gone_before: float) -> int:
        n = 0
        for box in self.boxes.values():
            for k, r in list(box.rows.items()):
                if r.state == "gone" and (r.gone_at or 0) < gone_before:
                    _remove(box, [k])
                    n += 1
        return n

    def mailboxes(self, account: str | None = None) -> list[tuple[str, str]]:
        return sorted((n, b.account) for n, b in self.boxes.items() if account in (None, b.account))

    def rows(self, name: str) -> list[Row]:
        box = self.boxes.get(name)
        rows = [] if box is None else list(box.rows.values())
        return sorted(rows, key=lambda r: (r.order_pos is None, r.order_pos or 0))

    def schema_version(self) -> int:
        return 0

    def integrity_ok(self) -> bool:
        return True

    def close(self) -> None:
        pass
