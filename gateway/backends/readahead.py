"""Read-ahead of small messages, shared by the backends that pay a round trip per message (IMAP, JMAP).

Clients fetch 1..n in order. When message i is asked for and was not read ahead, the batch is i and the
small messages after it, bounded in count (a window that starts small and doubles on every hit, so a
client that reads one message and leaves costs little) and in octets. Pure bookkeeping: the backend
does the fetching and hands the bodies back with ``put``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

CHUNK = 64 * 1024


class ReadAhead:
    def __init__(
        self, sizes: Sequence[int], *, max_message: int, budget: int, first_window: int, max_count: int
    ) -> None:
        self._sizes = sizes
        self._max_message = max_message
        self._budget = budget
        self._max_count = max_count
        self._window = first_window
        self._bodies: dict[int, bytes] = {}

    def eligible(self, index: int) -> bool:
        return self._sizes[index] <= self._max_message

    def take(self, index: int) -> bytes | None:
        """The body read ahead for ``index``, if any (a hit widens the window)."""
        body = self._bodies.pop(index, None)
        if body is not None:
            self._window = min(self._window * 2, self._max_count)
        return body

    def batch(self, index: int) -> list[int]:
        """A miss at ``index``: forget what was read ahead and say what to fetch now, ``index`` first."""
        self._bodies.clear()
        batch = [index]
        budget = self._budget - self._sizes[index]
        for j in range(index + 1, len(self._sizes)):
            size = self._sizes[j]
            if len(batch) >= self._window or size > self._max_message or size > budget:
                break
            batch.append(j)
            budget -= size
        return batch

    def put(self, index: int, body: bytes) -> None:
        self._bodies[index] = body


def chunks(body: bytes) -> Iterator[bytes]:
    """A body held whole, handed on in the same bounded pieces as a streamed one."""
    for i in range(0, len(body), CHUNK):
        yield body[i : i + CHUNK]
