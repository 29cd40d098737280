"""Which small messages are read ahead: the window, the bounds and the bookkeeping."""

from __future__ import annotations

from gateway.backends.readahead import CHUNK, ReadAhead, chunks


def make(sizes: list[int]) -> ReadAhead:
    return ReadAhead(sizes, max_message=100, budget=250, first_window=2, max_count=4)


def test_a_miss_fetches_the_next_small_messages_within_window_and_budget() -> None:
    ra = make([10] * 10)
    assert ra.batch(0) == [0, 1]  # the first window
    ra.put(0, b"a")
    ra.put(1, b"b")
    assert ra.take(0) == b"a" and ra.take(1) == b"b"  # two hits: the window doubles twice, up to 4
    assert ra.batch(2) == [2, 3, 4, 5]


def test_big_messages_stop_a_batch_and_are_never_eligible() -> None:
    ra = make([10, 10, 500, 10])
    assert ra.eligible(0) and not ra.eligible(2)
    assert ra.batch(0) == [0, 1]
    ra = ReadAhead([90, 90, 90, 90], max_message=100, budget=250, first_window=8, max_count=8)
    assert ra.batch(0) == [0, 1]  # the octet budget


def test_a_miss_forgets_what_was_read_ahead() -> None:
    ra = make([10] * 5)
    ra.put(3, b"x")
    ra.batch(0)
    assert ra.take(3) is None


def test_chunks_are_bounded() -> None:
    body = b"z" * (CHUNK * 2 + 5)
    pieces = list(chunks(body))
    assert [len(p) for p in pieces] == [CHUNK, CHUNK, 5] and b"".join(pieces) == body
