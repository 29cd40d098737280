"""Build a v1 UIDL store with the code of schema 1 (PYTHONPATH=a checkout of it) and dump it as SQL:

PYTHONPATH=/path/to/old/checkout python tests/data/make_uidl_store_v1.py > tests/data/uidl-store-v1.sql
"""

import pathlib
import sqlite3
import sys
import tempfile

from gateway.store import SCHEMA_VERSION, Item, UidlStore

assert SCHEMA_VERSION == 1
d = pathlib.Path(tempfile.mkdtemp())
s = UidlStore(d / "u.db")
# mailbox 1: a poller: 30 seen and deleted, 3 live, one vanished (gone) with fingerprints, one collision
s.assign(
    "imap:h:143:alice:INBOX",
    "alice",
    [Item(f"u:1:{i}", 100 + i, native=f"{i:08x}00000001", uid=i, uidvalidity=1) for i in range(1, 31)],
    "native",
)
s.mark_deleted("imap:h:143:alice:INBOX", [f"u:1:{i}" for i in range(1, 31)])
s.assign(
    "imap:h:143:alice:INBOX",
    "alice",
    [Item(f"u:1:{i}", 100 + i, native=f"{i:08x}00000001", uid=i, uidvalidity=1) for i in range(31, 35)],
    "native",
)
s.record_fingerprints("imap:h:143:alice:INBOX", [("u:1:34", "H34", "B34")])
s.assign(
    "imap:h:143:alice:INBOX",
    "alice",
    [Item(f"u:1:{i}", 100 + i, native=f"{i:08x}00000001", uid=i, uidvalidity=1) for i in range(31, 34)]
    + [Item("u:1:99", 5, native="00000001" + "00000001")],
    "native",
)
# mailbox 2: imported UIDLs with order, one retired gateway UIDL
s.assign("maildir:/m:bob", "bob", [Item("k1", 10, native="n-k1"), Item("k2", 20, native="n-k2")], "native")
s.import_uidls(
    "maildir:/m:bob",
    "bob",
    [(Item("k1", 10, native=""), "OLD-1", 2), (Item("k2", 20, native=""), "OLD-2", 1)],
)
s.close()

db = sqlite3.connect(d / "u.db")
out = [
    "-- A UIDL store as main's code (gateway/store.py, schema version 1, at 0eb16a7) leaves it; "
    "made by tests/data/make_uidl_store_v1.py.",
    "PRAGMA user_version = 1;",
]
out += [line for line in db.iterdump()]
print("\n".join(out))  # > tests/data/uidl-store-v1.sql
for r in db.execute(
    "select m.name, key, uidl, state, order_pos from message "
    "join mailbox m on m.id = mailbox_id order by 1, 2"
):
    print(r, file=sys.stderr)
