"""Turning a raw message into the body of a POP3 multi-line reply, one chunk at a time.

Invariants (RFC 1939 section 3):
- Every line end on the wire is CRLF: a bare LF becomes CRLF. A bare CR stays as it is.
- A line that starts with "." gets one more "." in front (dot-stuffing).
- The reply ends with CRLF "." CRLF. A message whose last line has no line end gets a CRLF before the
  terminating ".": that CRLF belongs to the terminator and is not counted in ``octets``.
- ``octets`` counts what the message is on the wire before dot-stuffing: the size LIST and STAT report.
- With ``top_lines`` set (TOP n k): the header block, the blank line ending it, then at most k lines of
  the body. A message with no blank line is all header and is sent whole.
- Memory stays bounded by the chunk size: nothing is kept between chunks except one held-back CR
  (to see whether the next chunk starts with its LF) and two booleans.
"""

from __future__ import annotations

from collections.abc import Callable

TERMINATOR = b".\r\n"


class BodyEncoder:
    __slots__ = ("_at_line_start", "_body_lines_left", "_held_cr", "_in_headers", "_sink", "done", "octets")

    def __init__(self, top_lines: int | None = None, sink: Callable[[bytes], None] | None = None) -> None:
        """``sink``, if given, receives every normalised piece before dot-stuffing (for fingerprints)."""
        if top_lines is not None and top_lines < 0:
            raise ValueError("top_lines must be >= 0")
        self._at_line_start = True
        self._held_cr = False
        # None: send everything; otherwise the number of body lines still to send after the headers
        self._body_lines_left = top_lines
        self._in_headers = top_lines is not None
        self.done = False  # True once a TOP cut has been reached: further input is ignored
        self.octets = 0
        self._sink = sink

    def feed(self, chunk: bytes) -> bytes:
        """Encode the next piece of the raw message; returns the bytes to send (possibly empty)."""
        if self.done or not chunk:
            return b""
        if self._held_cr:
            chunk = b"\r" + chunk
            self._held_cr = False
        if chunk.endswith(b"\r"):
            chunk = chunk[:-1]
            self._held_cr = True
            if not chunk:
                return b""
        data = _normalise(chunk)
        if self._body_lines_left is not None:
            data = self._cut_for_top(data)
            if not data:
                return b""
        return self._stuff(data)

    def finish(self) -> bytes:
        """The end of the message: returns what is left, the closing CRLF if needed, and the "."."""
        tail = b""
        if self._held_cr and not self.done:
            tail = self._stuff(b"\r")
        self._held_cr = False
        self.done = True
        if not self._at_line_start:
            tail += b"\r\n"
        return tail + TERMINATOR

    def _stuff(self, data: bytes) -> bytes:
        self.octets += len(data)
        if self._sink is not None:
            self._sink(data)
        out = _stuff_dots(data)
        if self._at_line_start and data[:1] == b".":
            out = b"." + out
        self._at_line_start = data[-1:] == b"\n"
        return out

    def _cut_for_top(self, data: bytes) -> bytes:
        """Keep what TOP sends of ``data``; sets ``done`` when the cut is reached."""
        pos = 0
        at_line_start = self._at_line_start
        end = len(data)
        if self._in_headers:
            while pos < end:
                if at_line_start and data.startswith(b"\r\n", pos):
                    pos += 2
                    self._in_headers = False
                    at_line_start = True
                    break
                nl = data.find(b"\n", pos)
                if nl < 0:
                    return data
                pos = nl + 1
                at_line_start = True
            if self._in_headers:
                return data
        left = self._body_lines_left
        assert left is not None
        if left == 0:
            self.done = True
            return data[:pos]
        if data.count(b"\n", pos) < left:
            self._body_lines_left = left - data.count(b"\n", pos)
            return data
        while left:
            pos = data.index(b"\n", pos) + 1
            left -= 1
        self._body_lines_left = 0
        self.done = True
        return data[:pos]


_FEW_DOTS = 64


def _stuff_dots(data: bytes) -> bytes:
    """``data`` with "." doubled after every LF. Dot lines are rare in mail: finding them one by one and
    joining is about twice as fast as ``bytes.replace``, which is kept for chunks with many of them."""
    pos = data.find(b"\n.")
    if pos < 0:
        return data
    parts: list[bytes] = []
    start = 0
    while pos >= 0:
        if len(parts) == _FEW_DOTS:
            return data.replace(b"\n.", b"\n..")
        parts.append(data[start : pos + 1])
        start = pos + 1
        pos = data.find(b"\n.", pos + 2)
    parts.append(data[start:])
    return b".".join(parts)


def _normalise(data: bytes) -> bytes:
    """Bare LF -> CRLF. ``data`` never ends in a CR (the caller holds it back)."""
    if b"\n" not in data:
        return data
    lf = data.count(b"\n")
    if data.count(b"\r\n") == lf:
        return data
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def wire_size(message: bytes) -> int:
    """The size LIST reports for a whole message held in memory (tests and small messages only)."""
    if message.endswith(b"\r"):
        return len(_normalise(message[:-1])) + 1
    return len(_normalise(message))
