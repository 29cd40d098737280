"""The maildrop as one POP3 session sees it: fixed at login, with deletion marks.

Invariants:
- Message numbers are 1-based, as on the wire, and fixed for the session (RFC 1939 section 5).
- A message marked deleted is not listed, counted or retrievable, and cannot be marked twice.
- RSET clears every mark. Nothing here deletes anything: ``commit_plan`` only says what the
  UPDATE state must delete.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence
from typing import Protocol


class Listed(Protocol):
    """What the session needs of a message: its size and UIDL (a backend's Entry has both)."""

    @property
    def size(self) -> int: ...

    @property
    def uidl(self) -> str: ...


@dataclasses.dataclass(frozen=True, slots=True)
class MessageInfo:
    size: int
    uidl: str


class Lookup(enum.Enum):
    NO_SUCH_MESSAGE = "no such message"
    DELETED = "message is deleted"


class SessionMaildrop:
    """The session's own view of a snapshot (not ``backends.base.Maildrop``, the upstream side)."""

    __slots__ = ("_deleted", "_deleted_octets", "_messages", "_total_octets", "generation")

    def __init__(self, messages: Sequence[Listed]) -> None:
        self._messages = tuple(messages)
        self._deleted: set[int] = set()  # 0-based indexes
        self._total_octets = sum(m.size for m in self._messages)
        self._deleted_octets = 0
        self.generation = 0  # changes whenever the marks do (a cached listing is valid while it stays)

    def __len__(self) -> int:
        return len(self._messages)

    def lookup(self, msg_num: int) -> Listed | Lookup:
        if not 1 <= msg_num <= len(self._messages):
            return Lookup.NO_SUCH_MESSAGE
        if msg_num - 1 in self._deleted:
            return Lookup.DELETED
        return self._messages[msg_num - 1]

    def stat(self) -> tuple[int, int]:
        """(messages not marked deleted, their octets)."""
        return len(self._messages) - len(self._deleted), self._total_octets - self._deleted_octets

    def live(self) -> list[tuple[int, Listed]]:
        """(msg_num, info) of every message not marked deleted, in order."""
        deleted = self._deleted
        if not deleted:
            return list(enumerate(self._messages, 1))
        return [(i + 1, m) for i, m in enumerate(self._messages) if i not in deleted]

    def lines(self, field: str) -> list[str]:
        """``"n value"`` for every message not marked deleted: LIST (``size``) and UIDL (``uidl``)."""
        deleted = self._deleted
        values: list[int] | list[str]
        values = [m.size for m in self._messages] if field == "size" else [m.uidl for m in self._messages]
        if not deleted:
            return [f"{n} {v}" for n, v in enumerate(values, 1)]
        return [f"{i + 1} {v}" for i, v in enumerate(values) if i not in deleted]

    def mark_deleted(self, msg_num: int) -> Listed | Lookup:
        found = self.lookup(msg_num)
        if not isinstance(found, Lookup):
            self._deleted.add(msg_num - 1)
            self._deleted_octets += found.size
            self.generation += 1
        return found

    def reset(self) -> None:
        if self._deleted:
            self.generation += 1
        self._deleted.clear()
        self._deleted_octets = 0

    def frozen(self) -> tuple[tuple[Listed, ...], frozenset[int]]:
        """The messages and the 0-based indexes marked deleted now, unaffected by later marks."""
        return self._messages, frozenset(self._deleted)

    def commit_plan(self) -> tuple[int, ...]:
        """The 0-based indexes the UPDATE state deletes, in order."""
        return tuple(sorted(self._deleted))
