"""What every protocol core shares: the NEED_DATA sentinel, the protocol-error family, the UIDL rule.

Sans-IO like the cores that import it (POP3, IMAP, JMAP, PROXY, UIDL, maildrop).

- ``NEED_DATA`` is the one "feed me more bytes" answer of every ``next_event()``. It is the only
  member of the ``NeedData`` enum, so ``if event is NEED_DATA`` (or ``isinstance(event, NeedData)``)
  narrows ``Event | NeedData`` to ``Event`` for mypy without a cast; it survives copy and pickle as
  itself.
- Errors: ``ProtocolError`` is the base. ``LocalProtocolError`` is our own code misusing a core (a
  bug on our side, never the peer's). ``RemoteProtocolError`` is the peer's mistake (a client, an
  upstream server, a load balancer); ``reply_hint`` is what the shell may answer its client, when the
  core knows better than a generic error. ``str(exc)`` is for logs only: it never reaches a client.
- UIDLs: RFC 1939 section 7 allows 1 to 70 characters, each in 0x21..0x7E. ``uidl_or_sha1`` keeps a
  text that obeys the rule and hashes any other into the 40 hex digits of its SHA-1.
"""

from __future__ import annotations

import enum
import hashlib
from typing import Final

__all__ = [
    "MAX_UIDL",
    "NEED_DATA",
    "LocalProtocolError",
    "NeedData",
    "ProtocolError",
    "RemoteProtocolError",
    "is_valid_uidl",
    "uidl_or_sha1",
]


class NeedData(enum.Enum):
    """Type of the ``NEED_DATA`` sentinel: ``next_event()`` needs more bytes."""

    NEED_DATA = "NEED_DATA"

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData.NEED_DATA


class ProtocolError(Exception):
    """Base of the protocol errors the cores raise. ``str(exc)`` is for logs, never for a client."""


class LocalProtocolError(ProtocolError):
    """Our own code misused a core (a command illegal in this state, a result nobody asked for...)."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol. ``reply_hint``: the reply text the shell may send its client, or None
    for the shell's generic one. The hint is the core's own text, never the peer's bytes."""

    def __init__(self, msg: str, *, reply_hint: str | None = None) -> None:
        super().__init__(msg)
        self.reply_hint = reply_hint


# ---------------------------------------------------------------- UIDLs (RFC 1939 section 7)

MAX_UIDL: Final = 70


def is_valid_uidl(uidl: str) -> bool:
    """1 to 70 characters in 0x21..0x7E (string methods: faster than a regex, same answer)."""
    return 0 < len(uidl) <= MAX_UIDL and uidl.isascii() and uidl.isprintable() and " " not in uidl


def uidl_or_sha1(text: str) -> str:
    """``text`` when it is a valid UIDL, else the 40 hex digits of the SHA-1 of its bytes.

    The bytes are UTF-8 with ``surrogateescape``, so a file name that was not UTF-8 (``os.listdir``
    decodes it with surrogate escapes) hashes as its bytes on disk. A lone surrogate that escape cannot
    map (U+D800..U+DC7F, U+DD00..U+DFFF: JSON may carry one) is encoded as itself (``surrogatepass``),
    so no text makes this raise.
    """
    if is_valid_uidl(text):
        return text
    try:
        data = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        data = text.encode("utf-8", "surrogatepass")
    return hashlib.sha1(data, usedforsecurity=False).hexdigest()
