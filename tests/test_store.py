"""The UIDL store on its own: assignment, formats, rematching, import, schema, crash-safety rules."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.proto import uidl as rules
from gateway.store import SCHEMA_VERSION, Assignment, AsyncUidlStore, Item, Plan, UidlStore


def items(*specs: tuple[str, int]) -> list[Item]:
    return [Item(key, size, native=f"n-{key}") for key, size in specs]


@pytest.fixture
def store(tmp_path: Path) -> UidlStore:
    s = UidlStore(tmp_path / "uidl.sqlite3")
    yield s  # type: ignore[misc]
    s.close()


def test_uidls_are_stable_across_sessions_and_restarts(tmp_path: Path) -> None:
    path = tmp_path / "u.db"
    s = UidlStore(path)
    first = s.assign("mb", "alice", items(("a", 10), ("b", 20)), "native").uidls
    assert first == ("n-a", "n-b")
    s.close()
    s = UidlStore(path)
    again = s.assign("mb", "alice", items(("a", 10), ("b", 20), ("c", 5)), "native")
    assert again.uidls[:2] == first
    assert again.new == 1
    assert s.integrity_ok()
    s.close()


def test_a_deleted_messages_uidl_is_never_given_again(store: UidlStore) -> None:
    store.assign("mb", "a", [Item("k1", 1, native="same")], "native")
    store.mark_deleted("mb", ["k1"])
    r = store.assign("mb", "a", [Item("k2", 1, native="same")], "native")
    assert r.uidls == ("same-2",)
    r = store.assign("mb", "a", [Item("k3", 1, native="same")], "native")
    assert r.uidls == ("same-3",)


@pytest.mark.parametrize(
    ("fmt", "expected"),
    [
        ("native", "n-k"),
        ("dovecot", "0000002a00000007"),
        ("uidvalidity-uid", "7-42"),
        ("hash", rules.propose("hash", key="k", native="", uid=0, uidvalidity=0)),
    ],
)
def test_formats(store: UidlStore, fmt: str, expected: str) -> None:
    r = store.assign("mb", "a", [Item("k", 1, native="n-k", uid=42, uidvalidity=7)], fmt)
    assert r.uidls == (expected,)


def test_gmail_and_hash_formats_are_valid_and_stable() -> None:
    g = rules.propose("gmail", key="e:abc", native="", uid=1, uidvalidity=1)
    assert g.startswith("GmailId") and len(g) == 23 and rules.is_valid(g)
    assert g == rules.propose("gmail", key="e:abc", native="x", uid=9, uidvalidity=9)
    h = rules.propose("hash", key="e:abc", native="", uid=0, uidvalidity=0)
    assert len(h) == 40 and rules.is_valid(h)


@pytest.mark.parametrize("native", ["has space", "x" * 71, "", "caf\u00e9", "tab\tin"])
def test_a_native_id_breaking_rfc1939_is_hashed(native: str) -> None:
    out = rules.propose("native", key="k", native=native, uid=0, uidvalidity=0)
    assert rules.is_valid(out)
    assert out != native


def test_collision_suffix_stays_within_70_chars() -> None:
    long = "y" * 70
    out = rules.unique(long, {long})
    assert out.endswith("-2") and len(out) == 70


def test_renumbered_upstream_keeps_uidls_by_fingerprint(store: UidlStore) -> None:
    old = [Item(f"u:1:{i}", 100 + i, native=f"{i:08x}00000001", uid=i, uidvalidity=1) for i in range(1, 4)]
    first = store.assign("mb", "a", old, "native").uidls
    store.record_fingerprints("mb", [(f"u:1:{i}", f"h{i}", f"b{i}") for i in range(1, 4)])
    new = [Item(f"u:2:{i}", 100 + i, native=f"{i:08x}00000002", uid=i, uidvalidity=2) for i in range(1, 5)]
    plan = store.assign_or_plan("mb", "a", new, "native")  # UidlStore.plan is gone: this is its one home
    assert isinstance(plan, Plan)
    assert set(plan.need_header) == {"u:2:1", "u:2:2", "u:2:3"}  # the 4th has a size no vanished row has
    prints = {f"u:2:{i}": (f"h{i}", None) for i in range(1, 4)}
    r = store.assign("mb", "a", new, "native", prints)
    assert r.uidls[:3] == first
    assert r.rematched == 3
    assert r.new == 1 and r.uidls[3] == "0000000400000002"


def test_a_different_message_of_the_same_size_never_takes_an_old_uidl(store: UidlStore) -> None:
    store.assign("mb", "a", [Item("old", 50, native="OLD")], "native")
    store.record_fingerprints("mb", [("old", "h-old", None)])
    r = store.assign("mb", "a", [Item("new", 50, native="NEW")], "native", {"new": ("h-other", None)})
    assert r.uidls == ("NEW",)
    assert r.rematched == 0 and r.unmatched_vanished == 1


def test_the_body_decides_when_headers_are_not_enough(store: UidlStore) -> None:
    store.assign("mb", "a", items(("o1", 9), ("o2", 9)), "native")
    store.record_fingerprints("mb", [("o1", "H", "B1"), ("o2", "H", "B2")])
    new = items(("x", 9), ("y", 9))
    assert set(store.need_body("mb", new, {"x": ("H", None), "y": ("H", None)})) == {"x", "y"}
    r = store.assign("mb", "a", new, "native", {"x": ("H", "B2"), "y": ("H", "B1")})
    assert r.uidls == ("n-o2", "n-o1")


def test_deleted_rows_are_never_rematched(store: UidlStore) -> None:
    store.assign("mb", "a", items(("o", 9)), "native")
    store.record_fingerprints("mb", [("o", "H", "B")])
    store.mark_deleted("mb", ["o"])
    r = store.assign("mb", "a", items(("n", 9)), "native", {"n": ("H", "B")})
    assert r.uidls == ("n-n",)


def test_import_stores_old_uidls_and_order(store: UidlStore) -> None:
    store.assign("mb", "a", items(("k1", 1)), "native")  # the gateway had already named k1
    mapping = [(Item("k2", 2, native=""), "OLD-A", 1), (Item("k1", 1, native=""), "OLD-B", 2)]
    store.import_uidls("mb", "a", mapping)
    r = store.assign("mb", "a", items(("k1", 1), ("k2", 2), ("k3", 3)), "native")
    assert r.uidls == ("OLD-B", "OLD-A", "n-k3")
    assert r.order == (1, 0, 2)  # the old server's order first
    # the gateway's own earlier UIDL for k1 stays reserved
    r = store.assign("mb", "a", [Item("k9", 1, native="n-k1")], "native")
    assert r.uidls == ("n-k1-2",)


def test_import_refuses_an_old_uidl_held_by_another_message(store: UidlStore) -> None:
    store.assign("mb", "a", items(("k1", 1)), "native")
    with pytest.raises(ValueError, match="already given"):
        store.import_uidls("mb", "a", [(Item("k2", 1, native=""), "n-k1", 1)])
    assert [r.key for r in store.rows("mb")] == ["k1"]  # nothing written


def test_schema_is_versioned_and_a_newer_one_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "u.db"
    s = UidlStore(path)
    assert s.schema_version() == SCHEMA_VERSION
    s.close()
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(RuntimeError, match="newer"):
        UidlStore(path)


def test_wal_and_full_sync(store: UidlStore) -> None:
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_a_large_snapshot_is_one_transaction(store: UidlStore) -> None:
    big = [Item(f"u:1:{i}", 1000, native=f"{i:08x}00000001") for i in range(1, 20_001)]
    statements: list[str] = []
    store.db.set_trace_callback(statements.append)
    r = store.assign("mb", "a", big, "native")
    store.db.set_trace_callback(None)
    assert len(set(r.uidls)) == 20_000
    assert sum(s.startswith("BEGIN") for s in statements) == 1
    assert sum(s.startswith("COMMIT") for s in statements) == 1


async def test_async_store_runs_on_a_worker_thread(tmp_path: Path) -> None:
    s = AsyncUidlStore(tmp_path / "a.db")
    ops: list[str] = []
    s.operations = ops.append
    await s.open()
    r = await s.assign("mb", "a", items(("k", 1)), "native")
    assert r.uidls == ("n-k",)
    await s.aclose()
    assert ops == ["open", "assign"]


# ------------------------------------------------------------------ hypothesis


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sets(st.integers(0, 30), max_size=12),  # the keys present in this session
            st.sets(st.integers(0, 30), max_size=4),  # keys deleted at its QUIT
            st.sampled_from(["native", "dovecot", "hash", "gmail", "uidvalidity-uid"]),
        ),
        min_size=1,
        max_size=8,
    ),
    st.sampled_from(["same", "n", "x" * 69, "bad id"]),
)
def test_every_uidl_is_valid_unique_and_never_changes(
    tmp_path_factory: pytest.TempPathFactory, sessions: list[tuple[set[int], set[int], str]], native: str
) -> None:
    s = UidlStore(tmp_path_factory.mktemp("h") / "u.db")
    given_to: dict[str, str] = {}  # uidl -> key
    of_key: dict[str, str] = {}
    deleted: set[int] = set()
    for present, to_delete, fmt in sessions:
        keys = sorted(present - deleted)
        snapshot = [Item(f"k{k}", 10, native=f"{native}{k % 3}", uid=k + 1, uidvalidity=1) for k in keys]
        r = s.assign("mb", "a", snapshot, fmt)
        for item, u in zip(snapshot, r.uidls, strict=True):
            assert rules.is_valid(u)
            assert given_to.setdefault(u, item.key) == item.key  # never given to another message
            assert of_key.setdefault(item.key, u) == u  # never changes
        gone = [f"k{k}" for k in to_delete & set(keys)]
        s.mark_deleted("mb", gone)
        deleted |= to_delete & set(keys)
    s.close()


def test_assign_or_plan_assigns_in_one_pass_or_asks_for_headers_first(store: UidlStore) -> None:
    from gateway.store import Assignment, Plan

    first = store.assign_or_plan("mb", "a", items(("a", 5), ("b", 6)), "native")
    assert isinstance(first, Assignment) and first.uidls == ("n-a", "n-b")
    store.record_fingerprints("mb", [("a", "H", None)])
    plan = store.assign_or_plan("mb", "a", items(("b", 6), ("a2", 5)), "native")
    assert isinstance(plan, Plan) and plan.need_header == ("a2",)
    assert [r.key for r in store.rows("mb")] == ["a", "b"]  # nothing written
    r = store.assign("mb", "a", items(("b", 6), ("a2", 5)), "native", {"a2": ("H", None)})
    assert r.uidls == ("n-b", "n-a")


def test_an_unchanged_snapshot_is_answered_without_reading_the_rows_again(tmp_path: Path) -> None:
    s = UidlStore(tmp_path / "u.db")
    snapshot = items(("a", 1), ("b", 2))
    first = s.assign("mb", "acct", snapshot, "native")
    statements: list[str] = []
    s.db.set_trace_callback(statements.append)
    again = s.assign("mb", "acct", snapshot, "native")
    s.db.set_trace_callback(None)
    assert again.uidls == first.uidls and again.new == 0
    assert not any(st.startswith(("BEGIN", "SELECT key")) for st in statements)
    # a write by another process (here: another connection) is seen at once
    other = UidlStore(tmp_path / "u.db")
    other.import_uidls("mb", "acct", [(Item("b", 2, native=""), "OLD-B", 1)])
    other.close()
    after = s.assign("mb", "acct", snapshot, "native")
    assert "OLD-B" in after.uidls
    # and our own deletions drop the cached answer
    s.mark_deleted("mb", ["a"])
    assert s.assign("mb", "acct", items(("b", 2), ("c", 3)), "native").uidls == ("OLD-B", "n-c")
    s.close()


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=80))
def test_uidl_validity_check_is_exactly_rfc1939(text: str) -> None:
    import re

    assert rules.is_valid(text) == (re.fullmatch(r"[\x21-\x7e]{1,70}", text) is not None)


# ------------------------------------------------------------------ the store follows the live mailbox


def test_a_message_with_another_body_never_takes_the_last_vanished_uidl(store: UidlStore) -> None:
    """Two vanished rows with the same size and headers but different bodies: the body decides, also for
    the last one left (a third message with its own body is new)."""
    store.assign("mb", "a", items(("o1", 9), ("o2", 9)), "native")
    store.record_fingerprints("mb", [("o1", "H", "B1"), ("o2", "H", "B2")])
    r = store.assign("mb", "a", items(("x", 9), ("y", 9)), "native", {"x": ("H", "B1"), "y": ("H", "B3")})
    assert r.uidls == ("n-o1", "n-y")
    assert r.rematched == 1


def _login_steps(path: Path, live: int) -> int:
    """sqlite VM steps of one uncached login (a fresh process) to ``live`` messages, half of them new."""
    s = UidlStore(path)
    steps = [0]

    def count() -> int:
        steps[0] += 1
        return 0

    s.db.set_progress_handler(count, 100)
    for reader in getattr(getattr(s, "engine", None), "_all_readers", []):
        reader.set_progress_handler(count, 100)
    s.assign("mb", "a", [Item(f"live{i}", 10, native=f"L{i}") for i in range(live)], "native")
    s.close()
    return steps[0]


def _poll_and_delete(path: Path, start: int, count: int) -> None:
    s = UidlStore(path)
    for first in range(start, start + count, 500):
        batch = [Item(f"k{i}", 10, native=f"U{i}") for i in range(first, first + 500)]
        s.assign("mb", "a", batch, "native")
        s.mark_deleted("mb", [i.key for i in batch])
    s.close()


def test_a_login_costs_what_the_live_mailbox_holds_not_its_history(tmp_path: Path) -> None:
    """A poller that deletes at QUIT: 1,000 and then 10,000 deleted messages later, a login to 10 live ones
    does the same work (before: every row ever seen was read at every uncached login)."""
    path = tmp_path / "u.db"
    _poll_and_delete(path, 0, 1000)
    small = _login_steps(path, 10)
    _poll_and_delete(path, 1000, 9000)
    big = _login_steps(path, 10)
    assert big < small * 2, (small, big)
    s = UidlStore(path)
    try:
        assert s.db.execute("SELECT count(*) FROM message").fetchone()[0] == 10  # deleted rows are gone
        r = s.assign("mb", "a", [Item("again", 10, native="U5")], "native")  # a deleted UIDL, proposed
        assert r.uidls == ("U5-2",)  # ... is still reserved
    finally:
        s.close()


def test_vanished_rows_wait_for_the_retention_then_only_their_uidl_stays(tmp_path: Path) -> None:
    s = UidlStore(tmp_path / "u.db", retention=3600)
    s.assign("mb", "a", items(("a", 5), ("b", 6)), "native")
    s.record_fingerprints("mb", [("a", "H", None)])
    s.assign("mb", "a", items(("b", 6)), "native")  # a vanished (another client moved it away)
    assert [(r.key, r.state) for r in s.rows("mb")] == [("a", "gone"), ("b", "present")]
    assert s.prune() == 0  # within the retention: kept for rematching
    r = s.assign("mb", "a", items(("b", 6), ("a2", 5)), "native", {"a2": ("H", None)})
    assert r.uidls == ("n-b", "n-a")  # ... and rematched
    s.assign("mb", "a", items(("b", 6)), "native")
    assert s.prune(now=time.time() + 7200) == 1
    assert [r.key for r in s.rows("mb")] == ["b"]
    r = s.assign("mb", "a", [Item("c", 7, native="n-a")], "native")
    assert r.uidls == ("n-a-2",)  # the pruned row's UIDL is never given to another message
    s.close()


def test_a_v1_store_migrates_forward_and_keeps_every_uidl(tmp_path: Path) -> None:
    """tests/data/uidl-store-v1.sql is a store made by the code of schema 1 (main before issue 10)."""
    path = tmp_path / "uidl.sqlite3"
    db = sqlite3.connect(path)
    dump = (Path(__file__).parent / "data" / "uidl-store-v1.sql").read_text()
    db.executescript(dump)
    old = {
        (name, key): (uidl, state, pos)
        for name, key, uidl, state, pos in db.execute(
            "SELECT m.name, key, uidl, state, order_pos FROM message JOIN mailbox m ON m.id = mailbox_id"
        )
    }
    assert db.execute("PRAGMA user_version").fetchone()[0] == 1
    db.close()
    s = UidlStore(path)
    try:
        assert s.schema_version() == SCHEMA_VERSION and s.integrity_ok()
        rows = {
            (name, r.key): (r.uidl, r.state, r.order_pos) for name, _ in s.mailboxes() for r in s.rows(name)
        }
        assert rows == {
            k: v for k, v in old.items() if v[1] != "deleted"
        }  # the live and gone ones, as they were
        alice, bob = "imap:h:143:alice:INBOX", "maildir:/m:bob"
        live = [Item(f"u:1:{i}", 100 + i, native="x") for i in range(31, 34)] + [
            Item("u:1:99", 5, native="x")
        ]
        assert s.assign(alice, "alice", live, "native").uidls == tuple(old[(alice, i.key)][0] for i in live)
        r = s.assign(bob, "bob", [Item("k1", 10, native=""), Item("k2", 20, native="")], "native")
        assert r.uidls == ("OLD-1", "OLD-2") and r.order == (1, 0)
        # every UIDL the old store had given stays reserved, the deleted and retired ones too
        for (name, _), (uidl, _, _) in old.items():
            again = s.assign(name, "x", [*s_live(s, name), Item(f"new:{uidl}", 1, native=uidl)], "native")
            assert again.uidls[-1] != uidl, (name, uidl)
            s.mark_deleted(name, [f"new:{uidl}"])
        # the gone row keeps its fingerprints: it is rematched
        r = s.assign(
            alice, "alice", [*live, Item("u:2:34", 134, native="y")], "native", {"u:2:34": ("H34", None)}
        )
        assert r.uidls[-1] == old[(alice, "u:1:34")][0]
    finally:
        s.close()


def s_live(s: UidlStore, name: str) -> list[Item]:
    return [Item(r.key, r.size, native=r.uidl) for r in s.rows(name) if r.state == "present"]


def test_size_corrections_survive_a_restart(tmp_path: Path) -> None:
    s = UidlStore(tmp_path / "u.db")
    snap = items(("a", 100), ("b", 200))
    s.assign("mb", "a", snap, "native")
    s.record_sizes("mb", [("a", 100, 103)])
    s.close()
    s = UidlStore(tmp_path / "u.db")
    assert s.assign("mb", "a", snap, "native").sizes == (103, 200)
    # a message the upstream lists with yet another size is listed as the upstream says
    assert s.assign("mb", "a", items(("a", 101), ("b", 200)), "native").sizes == ()
    s.close()


async def test_engine_errors_become_the_gateways_temporary_failure(tmp_path: Path) -> None:
    from gateway.backends.base import TempFailure
    from gateway.store import StoreError

    s = AsyncUidlStore(tmp_path / "a.db")
    await s.open()
    s._s().engine.db.close()  # type: ignore[attr-defined]  # the disk went away under the writer
    with pytest.raises(StoreError) as caught:
        await s.mark_deleted("mb", ["k"])
    assert isinstance(caught.value, TempFailure)
    with pytest.raises(TempFailure):
        await s.assign("mb", "a", items(("k", 1)), "native")
    await s.aclose()


def test_the_async_store_is_typed_and_durable_imports_no_engine() -> None:
    import ast
    import inspect
    import typing

    import gateway.durable
    import gateway.store.aio

    for name, fn in inspect.getmembers(AsyncUidlStore, inspect.iscoroutinefunction):
        hints = typing.get_type_hints(fn)
        params = inspect.signature(fn).parameters
        for p in params.values():
            assert p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD), name
            assert p.name == "self" or hints.get(p.name) not in (None, typing.Any), (name, p.name)
        assert "return" in hints, name
    for module in (gateway.durable, gateway.store.aio):
        tree = ast.parse(Path(module.__file__ or "").read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert "sqlite3" not in imported, module.__name__


async def test_logins_to_other_mailboxes_read_beside_a_write(tmp_path: Path) -> None:
    """A login that changes nothing reads on a reader connection: a long write elsewhere does not stop it."""
    import threading

    import trio

    sync = UidlStore(tmp_path / "a.db")
    snap = items(("a", 1), ("b", 2))
    first = sync.assign("quiet", "q", snap, "native")
    sync.close()
    s = AsyncUidlStore(tmp_path / "a.db")
    await s.open()
    release = threading.Event()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                lambda: s._run(lambda: release.wait(10), op="assign")  # a write that takes its time
            )
            await trio.sleep(0.05)
            with trio.fail_after(5):
                assert await s.cached("quiet", ("a", "b")) is None  # a new process: nothing cached
                got = await s.assign_or_plan("quiet", "q", snap, "native")
            release.set()
        assert isinstance(got, Assignment) and got.uidls == first.uidls
        assert await s.cached("quiet", ("a", "b")) is not None  # and remembered
    finally:
        release.set()
        await s.aclose()


def test_a_first_login_writes_rows_once_and_a_removed_row_is_reserved_as_it_goes(store: UidlStore) -> None:
    """Version 3: a live row's UIDL is taken by the row itself (its UNIQUE index); ``reserved`` gets it in
    the transaction that removes the row. So a first login of N messages inserts N rows, not 2N."""
    store.assign("mb", "a", [Item(f"k{i}", 10, native=f"U{i}") for i in range(100)], "native")
    assert store.db.execute("SELECT count(*) FROM reserved").fetchone()[0] == 0
    store.mark_deleted("mb", ["k3"])
    assert store.db.execute("SELECT count(*) FROM reserved").fetchone()[0] == 1
    # the live ones and the deleted one are all taken: each proposal gets a suffix
    r = store.assign("mb", "a", [Item("new1", 1, native="U3"), Item("new2", 1, native="U4")], "native")
    assert r.uidls == ("U3-2", "U4-2")
