"""The one matching rule, without a database: which known message (a vanished row, an old server's
message) is which new one. The store and `uidl import` both call it."""

from __future__ import annotations

import ast
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import migrate
from gateway.backends.base import Entry
from gateway.proto.uidlmatch import Known, Seen, body_candidates, header_candidates, pair

ROOT = Path(__file__).resolve().parent.parent


def test_identical_messages_are_paired_in_order() -> None:
    known = [Known("a", 10, "H"), Known("b", 10, "H")]
    seen = [Seen("x", 10, "H"), Seen("y", 10, "H")]
    assert [(k.ident, s.ident) for k, s in pair(known, seen).pairs] == [("a", "x"), ("b", "y")]


def test_no_header_hash_or_another_size_matches_nothing() -> None:
    known = [Known("a", 10, "H"), Known("b", 11, None)]
    assert pair(known, [Seen("x", 10, None), Seen("y", 11, "H"), Seen("z", 12, "H")]).pairs == ()


def test_the_body_decides_and_another_body_matches_nothing() -> None:
    known = [Known("a", 9, "H", "B1"), Known("b", 9, "H", "B2")]
    got = pair(known, [Seen("x", 9, "H", "B2"), Seen("y", 9, "H", "B3"), Seen("z", 9, "H", None)])
    assert [(k.ident, s.ident) for k, s in got.pairs] == [("b", "x")]


def test_header_candidates_are_the_sizes_of_vanished_rows_with_a_header_and_capped() -> None:
    known = [Known("a", 10, "H"), Known("b", 20, None)]
    seen = [Seen(f"s{i}", 10) for i in range(8)] + [Seen("t", 20), Seen("u", 30)]
    assert header_candidates(known, seen, 3) == (["s0", "s1", "s2"], 5)
    assert header_candidates(known, seen, 100) == ([f"s{i}" for i in range(8)], 0)
    assert header_candidates(known, seen, 0) == ([], 8)
    assert header_candidates([], seen, 3) == ([], 0)


def test_bodies_are_read_only_where_the_headers_cannot_tell() -> None:
    known = [Known("a", 9, "H", "B1"), Known("b", 9, "H", "B2"), Known("c", 8, "G", "B")]
    seen = [Seen("x", 9, "H"), Seen("y", 8, "G"), Seen("z", 9, None)]
    assert body_candidates(known, seen) == ["x"]


def test_strict_pairs_equal_groups_and_refuses_unequal_ones() -> None:
    known = [Known("1", 10, "H"), Known("2", 10, "H"), Known("3", 20, "G"), Known("4", 30, "U")]
    seen = [
        Seen("a", 10, "H"),
        Seen("b", 10, "H"),
        Seen("c", 20, "G"),
        Seen("d", 20, "G"),
        Seen("e", 31, "U"),
    ]
    got = pair(known, seen, strict=True)
    assert [(k.ident, s.ident) for k, s in got.pairs] == [("1", "a"), ("2", "b"), ("4", "e")]
    assert [k.ident for k in got.ambiguous] == ["3"]
    assert got.by_header_only == 1 and got.paired_duplicates == 2
    assert [s.ident for s in got.unmatched_seen(seen)] == ["c", "d"]  # never handed to the header pass
    assert got.unmatched_known(known) == []


def test_uidl_import_matches_by_the_same_rule() -> None:
    def old(n: int, size: int, header: str) -> migrate.OldMessage:
        return migrate.OldMessage(n, f"OLD{n}", size, header, "")

    def new(i: int, size: int, header: str | None) -> migrate.NewMessage:
        return migrate.NewMessage(i, Entry(str(i), size, f"n{i}"), header)

    olds = [old(1, 10, "H"), old(2, 10, "H"), old(3, 20, "G"), old(4, 30, "U"), old(5, 40, "V")]
    news = [new(0, 10, "H"), new(1, 10, "H"), new(2, 20, "G"), new(3, 20, "G"), new(4, 31, "U")]
    report = migrate.match(olds, news)
    assert [(o.number, n.index) for o, n in report.matched] == [(1, 0), (2, 1), (4, 4)]
    assert [o.number for o in report.ambiguous] == [3]
    assert [o.number for o in report.unmatched_old] == [5]
    assert sorted(n.index for n in report.unmatched_new) == [2, 3]
    assert report.matched_by_headers_only == 1 and report.paired_duplicates == 2


def _size_header_keys(path: Path) -> list[int]:
    """Lines that build a (size, header hash) key: the grouping only the matching module may do."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Tuple) and len(node.elts) == 2:
            attrs = {e.attr for e in node.elts if isinstance(e, ast.Attribute)}
            if {"size", "header_sha1"} <= attrs:
                out.append(node.lineno)
    return out


def test_the_store_and_uidl_import_have_no_matching_rule_of_their_own() -> None:
    users = [*(ROOT / "gateway" / "store").glob("*.py"), ROOT / "gateway" / "migrate.py"]
    for path in [*users, ROOT / "gateway" / "durable.py"]:
        assert _size_header_keys(path) == [], path
    assert _size_header_keys(ROOT / "gateway" / "proto" / "uidlmatch.py")  # the check sees the real one
    importers = [p.name for p in users if "gateway.proto.uidlmatch" in p.read_text()]
    assert sorted(importers) == ["core.py", "migrate.py"]


messages = st.tuples(
    st.integers(1, 3),  # size
    st.sampled_from(["H", "G", None]),  # header hash
    st.sampled_from(["B1", "B2", None]),  # body hash
)


@settings(max_examples=300, deadline=None)
@given(st.lists(messages, max_size=12), st.lists(messages, max_size=12), st.booleans())
def test_a_uidl_is_never_given_to_two_messages(
    known_specs: list[tuple[int, str | None, str | None]],
    seen_specs: list[tuple[int, str | None, str | None]],
    strict: bool,
) -> None:
    known = [Known(f"k{i}", *spec) for i, spec in enumerate(known_specs)]
    seen = [Seen(f"s{i}", *spec) for i, spec in enumerate(seen_specs)]
    got = pair(known, seen, strict=strict)
    ks = [k.ident for k, _ in got.pairs]
    ss = [s.ident for _, s in got.pairs]
    assert len(ks) == len(set(ks))  # a known message (its UIDL) goes to one new message at most
    assert len(ss) == len(set(ss))  # a new message gets one UIDL at most
    assert not set(ks) & {k.ident for k in got.ambiguous}
    for k, s in got.pairs:
        assert k.header_sha1 is not None and k.header_sha1 == s.header_sha1
        assert k.size == s.size or strict
        group = [o for o in known if (o.size, o.header_sha1) == (k.size, k.header_sha1)]
        if k.size == s.size and len({o.body_sha1 for o in group}) > 1:
            assert s.body_sha1 is not None and s.body_sha1 == k.body_sha1
    cands, skipped = header_candidates(known, seen, 5)
    assert len(cands) <= 5 and len(cands) + skipped == len(
        [s for s in seen if s.size in {k.size for k in known if k.header_sha1 is not None}]
    )
