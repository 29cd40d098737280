"""UIDL rules and message fingerprints (pure: no I/O).

- Every UIDL obeys RFC 1939 section 7: 1 to 70 characters, each in 0x21..0x7E. Anything else is hashed
  (``common.uidl_or_sha1``, the one sanitiser every backend's proposal goes through).
- Formats for a message seen for the first time:
  ``native``          what the backend proposes (IMAP: Dovecot's ``%08x`` UID + ``%08x`` UIDVALIDITY;
                      JMAP: the Email id; Maildir: the base name), the default;
  ``dovecot``         ``%08x`` UID + ``%08x`` UIDVALIDITY (backends without UIDs: native);
  ``uidvalidity-uid`` ``<uidvalidity>-<uid>`` in decimal (backends without UIDs: native);
  ``gmail``           ``GmailId`` + 16 hex digits derived from the stable key, as Gmail's POP3 shows them;
  ``hash``            the first 40 hex digits of SHA-1 over the stable key.
- A collision with any UIDL ever given in the same mailbox gets a deterministic suffix ``-2``, ``-3``...
- Fingerprints (as Dovecot's pop3-migration plugin does): the size first; then SHA-1 over the header
  block without the headers that differ between stores (Return-Path, Status, X-Status, X-UID, X-UIDL,
  X-IMAP, X-IMAPbase, X-Keywords, X-Message-Flag, Content-Length); the body's SHA-1 as a fallback.
  Both are taken over CRLF-normalised text, so LF Maildirs, IMAP and old POP3 servers agree.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Container
from typing import Final

from gateway.proto.common import MAX_UIDL as MAX_UIDL
from gateway.proto.common import is_valid_uidl, uidl_or_sha1

FORMATS: Final = ("native", "dovecot", "uidvalidity-uid", "gmail", "hash")
VOLATILE_HEADERS: Final = frozenset(
    h.lower()
    for h in (
        "Return-Path",
        "Status",
        "X-Status",
        "X-UID",
        "X-UIDL",
        "X-IMAP",
        "X-IMAPbase",
        "X-Keywords",
        "X-Message-Flag",
        "Content-Length",
    )
)
MAX_HEADER_BLOCK: Final = 1024 * 1024
MAX_HASHED_BODY: Final = 1024 * 1024


is_valid = is_valid_uidl  # the store's name for the RFC 1939 rule


def _sha1(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8", "surrogatepass"), usedforsecurity=False).hexdigest()


def propose(fmt: str, *, key: str, native: str, uid: int, uidvalidity: int) -> str:
    """The UIDL ``fmt`` gives a new message; always valid (hashed when the format's result is not)."""
    if fmt == "dovecot" and uid:
        candidate = f"{uid:08x}{uidvalidity:08x}"
    elif fmt == "uidvalidity-uid" and uid:
        candidate = f"{uidvalidity}-{uid}"
    elif fmt == "gmail":
        candidate = "GmailId" + _sha1(key)[:16]
    elif fmt == "hash":
        candidate = _sha1(key)
    else:
        candidate = native
    return uidl_or_sha1(candidate)


def unique(candidate: str, taken: Container[str]) -> str:
    """``candidate``, or the first of ``candidate-2``, ``candidate-3``... that was never given out."""
    if candidate not in taken:
        return candidate
    n = 2
    while True:
        suffix = f"-{n}"
        name = candidate[: MAX_UIDL - len(suffix)] + suffix
        if name not in taken:
            return name
        n += 1


def header_hash(header_block: bytes) -> str:
    """SHA-1 of a header block (up to and including the blank line, or all of it), without the headers
    that differ between stores; line ends normalised to CRLF."""
    text = re.sub(rb"\r?\n", b"\r\n", header_block)
    digest = hashlib.sha1(usedforsecurity=False)
    keep = True
    for line in text.split(b"\r\n"):
        if not line:
            continue
        if line[:1] in (b" ", b"\t"):
            if keep:
                digest.update(line + b"\r\n")
            continue
        name = line.split(b":", 1)[0].strip().lower()
        keep = name.decode("latin-1") not in VOLATILE_HEADERS
        if keep:
            digest.update(line + b"\r\n")
    return digest.hexdigest()


class Fingerprinter:
    """Fed the CRLF-normalised message as the client receives it; yields header and body hashes."""

    __slots__ = ("_at_line_start", "_body", "_body_seen", "_header", "_in_header", "_overflow")

    def __init__(self) -> None:
        self._header = bytearray()
        self._in_header = True
        self._at_line_start = True
        self._body = hashlib.sha1(usedforsecurity=False)
        self._overflow = False
        self._body_seen = 0

    def feed(self, data: bytes) -> None:
        if not self._in_header:
            if self._body_seen <= MAX_HASHED_BODY:
                self._body_seen += len(data)
                self._body.update(data)
            return
        start = len(self._header)
        self._header += data
        end = self._find_header_end(start)
        if end is not None:
            self._in_header = False
            self._body_seen = len(self._header) - end
            self._body.update(self._header[end:])
            del self._header[end:]
        elif len(self._header) > MAX_HEADER_BLOCK:
            self._overflow = True
            self._in_header = False
            self._header.clear()

    def _find_header_end(self, start: int) -> int | None:
        buf = self._header
        if start == 0 and buf.startswith(b"\r\n"):
            return 2
        pos = buf.find(b"\n\r\n", max(start - 2, 0))
        return None if pos < 0 else pos + 3

    def finish(self) -> None:
        """The whole message was fed: a message without a blank line is all header."""
        if self._in_header and not self._overflow:
            self._in_header = False

    def header_sha1(self) -> str | None:
        """None when the message had no complete header block within the cap."""
        if self._overflow or self._in_header:
            return None
        return header_hash(bytes(self._header))

    def body_sha1(self) -> str | None:
        """None also for bodies over MAX_HASHED_BODY: the body hash only breaks ties between messages of
        the same size and headers, and hashing 50 MB on every RETR would cost more than it is worth."""
        if self._overflow or self._in_header or self._body_seen > MAX_HASHED_BODY:
            return None
        return self._body.hexdigest()


Sink = Callable[[bytes], None]
