"""A raw-socket POP3 client built not to be the bottleneck.

Login (greeting, USER, PASS) is lockstep; then either

- ``pipelined``: every command and QUIT go out in one write, and the replies are read with large
  ``recv_into`` calls into one preallocated buffer until the server closes the connection, with no parsing
  at all while the clock runs; or
- ``lockstep``: one command at a time, as poplib does, finding each reply's end with ``bytes.find`` (C speed,
  never rescanning what it already searched).

The session is timed from connect to the last byte. Replies are parsed and hashed only after the clock
stops. The client's own CPU time is measured too, to show it is small next to the wall time.
"""

from __future__ import annotations

import hashlib
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass

RECV_SIZE = 1 << 20
TIMEOUT = 300.0
TERMINATOR = b"\r\n.\r\n"


class Pop3Error(RuntimeError):
    pass


@dataclass(frozen=True)
class Command:
    line: bytes
    multiline: bool


@dataclass
class SessionResult:
    seconds: float
    client_cpu: float
    wire_bytes: int
    retr_count: int
    retr_octets: int  # the RETR bodies as sent (dot-stuffed, without the terminator)
    retr_digest: str
    listing_digest: str  # LIST and UIDL bodies
    retr_sizes: list[int]
    # per listing command (b"LIST", b"UIDL"): the digest of its body, and the body's line count
    listing_digests: dict[bytes, str]
    listing_lines: dict[bytes, int]


def list_uidl_retr(count: int) -> list[Command]:
    return [
        Command(b"LIST", True),
        Command(b"UIDL", True),
        *(Command(b"RETR %d" % n, True) for n in range(1, count + 1)),
    ]


def retr_all(count: int) -> list[Command]:
    return [Command(b"RETR %d" % n, True) for n in range(1, count + 1)]


def uidl_only() -> list[Command]:
    return [Command(b"UIDL", True)]


class Client:
    """Reuses one receive buffer across sessions (it grows by doubling when a session needs more)."""

    def __init__(self, initial: int = 64 << 20) -> None:
        self._buf = bytearray(initial)

    def _room(self, pos: int) -> memoryview:
        if len(self._buf) - pos < RECV_SIZE:
            self._buf.extend(bytes(len(self._buf)))
        return memoryview(self._buf)[pos:]

    def session(
        self,
        host: str,
        port: int,
        user: str,
        password: str,
        commands: Sequence[Command],
        *,
        mode: str = "pipelined",
    ) -> SessionResult:
        cpu0 = time.thread_time()
        t0 = time.perf_counter()
        with socket.create_connection((host, port), timeout=TIMEOUT) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            pos = self._read_reply(sock, 0, 0, multiline=False)
            for line in (b"USER " + user.encode(), b"PASS " + password.encode()):
                sock.sendall(line + b"\r\n")
                start = pos
                pos = self._read_reply(sock, start, pos, multiline=False)
                if not self._buf.startswith(b"+OK", start):
                    raise Pop3Error(f"{line.split()[0].decode()} refused: {bytes(self._buf[start:pos])!r}")
            after_login = pos
            if mode == "pipelined":
                sock.sendall(b"".join(c.line + b"\r\n" for c in commands) + b"QUIT\r\n")
                while True:
                    n = sock.recv_into(self._room(pos), RECV_SIZE)
                    if not n:
                        break
                    pos += n
            elif mode == "lockstep":
                for c in [*commands, Command(b"QUIT", False)]:
                    sock.sendall(c.line + b"\r\n")
                    pos = self._read_reply(sock, pos, pos, multiline=c.multiline)
            else:
                raise ValueError(f"unknown client mode {mode!r}")
        seconds = time.perf_counter() - t0
        client_cpu = time.thread_time() - cpu0
        return self._check(commands, after_login, pos, seconds, client_cpu)

    def _read_reply(self, sock: socket.socket, start: int, pos: int, *, multiline: bool) -> int:
        """Receive until the reply that starts at `start` is complete; return the end of the data read."""
        scanned = start
        while True:
            end = _reply_end(self._buf, start, pos, multiline, scanned)
            if end is not None:
                if end != pos:
                    raise Pop3Error(f"the server sent more than one reply: {bytes(self._buf[start:pos])!r}")
                return pos
            scanned = max(start, pos - len(TERMINATOR))
            n = sock.recv_into(self._room(pos), RECV_SIZE)
            if not n:
                raise Pop3Error(f"connection closed mid-reply: {bytes(self._buf[start : start + 200])!r}")
            pos += n

    def _check(
        self, commands: Sequence[Command], start: int, stop: int, seconds: float, client_cpu: float
    ) -> SessionResult:
        buf = self._buf
        retr = hashlib.blake2b(digest_size=16)
        listing = hashlib.blake2b(digest_size=16)
        per_command: dict[bytes, hashlib.blake2b] = {}
        lines: dict[bytes, int] = {}
        sizes: list[int] = []
        pos = start
        for c in [*commands, Command(b"QUIT", False)]:
            end = _reply_end(buf, pos, stop, c.multiline, pos)
            if end is None:
                raise Pop3Error(f"truncated reply to {c.line!r}: {bytes(buf[pos : pos + 200])!r}")
            if not buf.startswith(b"+OK", pos):
                raise Pop3Error(f"{c.line!r} failed: {bytes(buf[pos:end])[:200]!r}")
            if c.multiline:
                body = memoryview(buf)[buf.index(b"\r\n", pos) + 2 : end - 3]
                if c.line.startswith(b"RETR"):
                    retr.update(body)
                    sizes.append(len(body))
                else:
                    listing.update(c.line + b"\0")
                    listing.update(body)
                    per_command.setdefault(c.line, hashlib.blake2b(digest_size=16)).update(body)
                    # CRLFs from the status line up to the terminating dot, less the status line's
                    lines[c.line] = lines.get(c.line, 0) + buf.count(b"\r\n", pos, end - 3) - 1
            pos = end
        if pos != stop:
            raise Pop3Error(f"unexpected bytes after QUIT: {bytes(buf[pos : pos + 200])!r}")
        return SessionResult(
            seconds=seconds,
            client_cpu=client_cpu,
            wire_bytes=stop,
            retr_count=len(sizes),
            retr_octets=sum(sizes),
            retr_digest=retr.hexdigest(),
            listing_digest=listing.hexdigest(),
            retr_sizes=sizes,
            listing_digests={k: h.hexdigest() for k, h in per_command.items()},
            listing_lines=lines,
        )


def _reply_end(buf: bytearray, start: int, pos: int, multiline: bool, scanned: int) -> int | None:
    """End offset of the reply starting at `start` within buf[:pos], or None while incomplete."""
    crlf = buf.find(b"\r\n", start, pos)
    if crlf < 0:
        return None
    if not multiline or not buf.startswith(b"+OK", start):
        return crlf + 2
    term = buf.find(TERMINATOR, max(crlf, scanned), pos)
    return None if term < 0 else term + len(TERMINATOR)
