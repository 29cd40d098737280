"""The durable UIDL store: the rules (``core``), the engine seam (``engine``), the embedded sqlite engine
(``sqlite``) and the async adapter for trio code (``aio``). ``from gateway.store import ...`` is the way in.

    rules (core.UidlStore) --uses--> Engine protocol <--implements-- SqliteEngine (next: PostgreSQL)
    trio callers --> AsyncUidlStore (typed; engine errors -> StoreError, a TempFailure) --> core
"""

from __future__ import annotations

from gateway.store.aio import AsyncUidlStore, StoreError
from gateway.store.core import (
    DEFAULT_MAX_FINGERPRINTS,
    DEFAULT_RETENTION,
    Assignment,
    Plan,
    UidlStore,
    need_body,
)
from gateway.store.engine import Engine, Item, MailboxRows, MailboxTx, Row
from gateway.store.sqlite import SCHEMA_VERSION, SqliteEngine

__all__ = [
    "DEFAULT_MAX_FINGERPRINTS",
    "DEFAULT_RETENTION",
    "SCHEMA_VERSION",
    "Assignment",
    "AsyncUidlStore",
    "Engine",
    "Item",
    "MailboxRows",
    "MailboxTx",
    "Plan",
    "Row",
    "SqliteEngine",
    "StoreError",
    "UidlStore",
    "need_body",
]
