"""The store's rules over each engine behind the seam: the sqlite one and an in-memory one (the shape a
PostgreSQL engine takes). The rules live above the seam, so both must behave the same."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import durable
from gateway.store import AsyncUidlStore, Item, SqliteEngine, UidlStore
from tests.fakes import FakeBackend, FakeMaildrop
from tests.memengine import MemoryEngine


@pytest.fixture(params=["sqlite", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[UidlStore]:
    engine = SqliteEngine(tmp_path / "u.db") if request.param == "sqlite" else MemoryEngine()
    s = UidlStore(engine=engine)
    yield s
    s.close()


def items(*specs: tuple[str, int]) -> list[Item]:
    return [Item(key, size, native=f"n-{key}") for key, size in specs]


def test_uidls_stay_and_a_deleted_one_is_never_given_again(store: UidlStore) -> None:
    first = store.assign("mb", "a", [Item("k1", 1, native="same")], "native")
    assert store.assign("mb", "a", [Item("k1", 1, native="other")], "native").uidls == first.uidls
    store.mark_deleted("mb", ["k1"])
    assert store.assign("mb", "a", [Item("k2", 1, native="same")], "native").uidls == ("same-2",)


def test_a_renumbered_message_is_rematched_and_a_stranger_is_not(store: UidlStore) -> None:
    store.assign("mb", "a", items(("o1", 9), ("o2", 9)), "native")
    store.record_fingerprints("mb", [("o1", "H", "B1"), ("o2", "H", "B2")])
    plan = store.assign_or_plan("mb", "a", items(("x", 9), ("y", 9)), "native")
    assert not hasattr(plan, "uidls") and set(plan.need_header) == {"x", "y"}  # type: ignore[union-attr]
    r = store.assign("mb", "a", items(("x", 9), ("y", 9)), "native", {"x": ("H", "B2"), "y": ("H", "B9")})
    assert r.uidls == ("n-o2", "n-y") and r.rematched == 1


def test_import_order_and_sizes(store: UidlStore) -> None:
    store.assign("mb", "a", items(("k1", 1)), "native")
    store.import_uidls(
        "mb", "a", [(Item("k2", 2, native=""), "OLD-A", 1), (Item("k1", 1, native=""), "OLD-B", 2)]
    )
    r = store.assign("mb", "a", items(("k1", 1), ("k2", 2)), "native")
    assert r.uidls == ("OLD-B", "OLD-A") and r.order == (1, 0)
    with pytest.raises(ValueError, match="already given"):
        store.import_uidls("mb", "a", [(Item("k3", 1, native=""), "n-k1", 3)])  # k1's own, now retired
    store.record_sizes("mb", [("k2", 2, 5)])
    assert store.assign("mb", "a", items(("k1", 1), ("k2", 2)), "native").sizes == (1, 5)


async def test_the_async_adapter_and_attach_run_on_another_engine(tmp_path: Path) -> None:
    engine = MemoryEngine()
    s = AsyncUidlStore(tmp_path / "unused", engine=lambda: engine)
    await s.open()
    backend = FakeBackend({"alice": "pw"}, {"alice": {"a": b"Subject: a\r\n\r\nx\r\n"}})
    wrapped = await durable.attach(
        FakeMaildrop(backend, "alice"), s, name="fake:alice", account="alice", fmt="native"
    )
    assert [e.uidl for e in wrapped.entries] == ["uid-a"]
    await s.aclose()
    assert not (tmp_path / "unused").exists()


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(st.sets(st.integers(0, 20), max_size=10), st.sets(st.integers(0, 20), max_size=4)),
        min_size=1,
        max_size=6,
    ),
    st.booleans(),
)
def test_both_engines_give_the_same_uidls(
    tmp_path_factory: pytest.TempPathFactory, sessions: list[tuple[set[int], set[int]]], renumber: bool
) -> None:
    stores = [UidlStore(tmp_path_factory.mktemp("e") / "u.db"), UidlStore(engine=MemoryEngine())]
    deleted: set[int] = set()
    given_to: dict[str, str] = {}
    try:
        for n, (present, to_delete) in enumerate(sessions):
            keys = sorted(present - deleted)
            gen = n if renumber else 0
            snap = [Item(f"g{gen}:{k}", 10 + k % 3, native=f"u{k % 4}") for k in keys]
            prints = {i.key: (f"h{i.key.split(':')[1]}", None) for i in snap}
            results = [s.assign("mb", "a", snap, "native", prints) for s in stores]
            assert results[0].uidls == results[1].uidls
            for item, u in zip(snap, results[0].uidls, strict=True):
                assert given_to.setdefault(u, item.key.split(":")[1]) == item.key.split(":")[1]
            for s in stores:
                s.record_fingerprints("mb", [(i.key, prints[i.key][0], None) for i in snap])
                s.mark_deleted("mb", [f"g{gen}:{k}" for k in to_delete & set(keys)])
            deleted |= to_delete & set(keys)
    finally:
        for s in stores:
            s.close()
