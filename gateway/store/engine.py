"""The seam between the UIDL store's rules and the database that keeps them (sqlite now, PostgreSQL next).

An engine implements ``Engine``: a handful of synchronous operations on rows, each one transaction, plus
``MailboxTx``, one write transaction on one mailbox, in which ``gateway.store.core`` assigns UIDLs. An
engine raises its own errors (sqlite3.Error, psycopg.Error, OSError) and lists them in ``errors``; the async
adapter (``gateway.store.aio``) turns them into ``StoreError``, so no caller imports an engine module.

What an engine must keep true:
- ``taken`` answers for every UIDL ever given in the mailbox: those on live rows, and those of every row
  removed (``forget``, ``mark_deleted``, ``prune`` reserve the row's UIDL in the transaction that removes
  it; ``reserve`` adds one directly), so a UIDL is never given to another message. A first login thus
  writes each row once. It may say "taken" for a UIDL that never was (a hash collision): that only adds a
  suffix.
- ``rows`` returns only the rows of messages not deleted (present, or gone: vanished upstream and kept
  for rematching until the retention): a login reads what its mailbox holds now, not its history.
- A ``MailboxTx`` is one transaction that excludes other writers of the same mailbox (sqlite:
  ``BEGIN IMMEDIATE``; PostgreSQL: ``SELECT ... FOR UPDATE`` of the mailbox row); it commits when the
  ``with`` block ends without an exception and rolls back otherwise.
- ``read_rows`` and ``version`` may run concurrently with a write and with other reads (other threads).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterable, Sequence
from contextlib import AbstractContextManager
from typing import Literal, NamedTuple, Protocol

State = Literal["present", "gone"]


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
    state: str  # present | gone
    order_pos: int | None
    sent_size: int | None = None  # what RETR really sent when it differs from ``size`` (the listed one)
    gone_at: float | None = None  # when the message vanished from the snapshot


@dataclasses.dataclass(frozen=True, slots=True)
class MailboxRows:
    """What a login reads of one mailbox: its live rows and the hash of the last listing."""

    rows: dict[str, Row]
    last_hash: str | None


class MailboxTx(Protocol):
    """One write transaction on one mailbox."""

    @property
    def last_hash(self) -> str | None: ...

    @property
    def version(self) -> int:
        """The mailbox's version once this transaction commits (bumped when it began)."""
        ...

    def rows(self) -> dict[str, Row]:
        """The live rows (present and gone), by key."""
        ...

    def taken(self, uidls: Collection[str]) -> set[str]:
        """Those of ``uidls`` that were ever given in this mailbox."""
        ...

    def insert(self, rows: Sequence[Row], now: float) -> None:
        """New rows (their UIDLs are taken while the rows live, and reserved when they go)."""
        ...

    def rekey(self, old_key: str, row: Row) -> None:
        """A vanished row that is now the message ``row.key`` (size and fingerprints from ``row``)."""
        ...

    def set_state(self, keys: Sequence[str], state: State, now: float) -> None: ...

    def set_order(self, key: str, order_pos: int) -> None: ...

    def reserve(self, uidls: Iterable[str]) -> None: ...

    def forget(self, keys: Sequence[str]) -> None:
        """Drop rows; their UIDLs are reserved in the same transaction."""
        ...

    def finish(self, list_hash: str, count: int) -> None:
        """The listing the client is about to see."""
        ...


class Engine(Protocol):
    errors: tuple[type[Exception], ...]  # what the adapter turns into StoreError

    def mailbox_tx(self, name: str, account: str) -> AbstractContextManager[MailboxTx]:
        """The write transaction of mailbox ``name`` (created when new)."""
        ...

    def read_rows(self, name: str) -> MailboxRows | None:
        """The live rows of ``name`` (None: no such mailbox), on a reader: may run beside a write."""
        ...

    def version(self, name: str) -> int:
        """The mailbox's version (-1: no such mailbox), on a reader. Every write that can change an
        assignment bumps it, in whichever process: the login cache's validity."""
        ...

    def mark_deleted(self, name: str, keys: Sequence[str]) -> None: ...

    def record_fingerprints(
        self, name: str, prints: Sequence[tuple[str, str | None, str | None]]
    ) -> None: ...

    def record_sizes(self, name: str, sizes: Sequence[tuple[str, int, int]]) -> None:
        """(key, listed size, sent size): RETR sent another number of octets than the row's size."""
        ...

    def adopt(self, name: str, legacy: Sequence[str]) -> str | None: ...

    def prune(self, gone_before: float) -> int:
        """Forget rows gone since before ``gone_before`` (their UIDLs are reserved); how many."""
        ...

    def mailboxes(self, account: str | None = None) -> list[tuple[str, str]]: ...

    def rows(self, name: str) -> list[Row]: ...

    def close(self) -> None: ...


__all__ = ["Engine", "Item", "MailboxRows", "MailboxTx", "Row", "State"]
