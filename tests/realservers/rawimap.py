"""The small pieces the private test servers share: a raw pipelining IMAP client for filling mailboxes,
IMAP string quoting, APPENDUID parsing and free loopback ports."""

from __future__ import annotations

import contextlib
import re
import socket
from collections.abc import Callable, Iterator, Sequence

HOST = "127.0.0.1"
_APPENDUID = re.compile(rb"\[APPENDUID (\d+) (\d+)\]")


def free_ports(count: int) -> list[int]:
    """Ports the kernel hands out for port 0, all held at once so they differ."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind((HOST, 0))
        return [sock.getsockname()[1] for sock in socks]


def quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def appended_uids(imap: ImapConnection, tags: list[bytes]) -> list[int]:
    imap.flush()
    uids = []
    for tag in tags:
        reply = imap.reply(tag)
        match = _APPENDUID.search(reply)
        if match is None:
            raise RuntimeError(f"APPEND reply without APPENDUID: {reply!r}")
        uids.append(int(match.group(2)))
    return uids


class ImapConnection:
    """Just enough IMAP client for creating and filling mailboxes (no literals in responses needed)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = b""
        self._out = bytearray()
        self._next_tag = 0
        self.untagged: list[bytes] = []

    @classmethod
    @contextlib.contextmanager
    def open(cls, host: str, port: int) -> Iterator[ImapConnection]:
        with socket.create_connection((host, port), timeout=30) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = cls(sock)
            greeting = conn._readline()
            if not greeting.startswith(b"* OK"):
                raise RuntimeError(f"unexpected IMAP greeting: {greeting!r}")
            yield conn

    def tagged(self, command: bytes) -> bytes:
        self._next_tag += 1
        tag = b"A%d" % self._next_tag
        self._out += tag + b" " + command + b"\r\n"
        return tag

    def flush(self) -> None:
        self._sock.sendall(self._out)
        self._out.clear()

    def command(self, command: bytes, *, allow_no: bytes | None = None) -> bytes:
        tag = self.tagged(command)
        self.flush()
        return self.reply(tag, allow_no=allow_no)

    def command_lines(self, command: bytes) -> list[bytes]:
        self.untagged = []
        self.command(command)
        return self.untagged

    def reply(self, tag: bytes, *, allow_no: bytes | None = None) -> bytes:
        while True:
            line = self._readline()
            if line.startswith(tag + b" "):
                status = line[len(tag) + 1 :]
                if status.startswith(b"OK") or (
                    allow_no and status.startswith(b"NO") and allow_no.lower() in status.lower()
                ):
                    return line
                raise RuntimeError(f"IMAP command {tag.decode()} failed: {line!r}")
            self.untagged.append(line)

    def _readline(self) -> bytes:
        while b"\r\n" not in self._buffer:
            chunk = self._sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"IMAP server closed the connection; buffered {self._buffer!r}")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\r\n", 1)
        return line


APPEND_WINDOW = 64  # pipelined APPENDs in flight before the tagged replies are read
APPEND_WINDOW_BYTES = 1 << 20


def append_messages(
    host: str,
    port: int,
    user: str,
    password: str,
    messages: Sequence[bytes],
    mailbox: str,
    *,
    exists_marker: bytes,
    date: Callable[[], bytes] | None = None,
) -> list[int]:
    """APPEND ``messages`` over IMAP, pipelined with LITERAL+ and TCP_NODELAY; returns their UIDs.

    A mailbox other than INBOX is created first (a NO containing ``exists_marker`` means it was there);
    ``date``, if given, supplies each message's internal date."""
    uids: list[int] = []
    with ImapConnection.open(host, port) as imap:
        imap.command(f"LOGIN {quote(user)} {quote(password)}".encode())
        if mailbox.upper() != "INBOX":
            imap.command(f"CREATE {quote(mailbox)}".encode(), allow_no=exists_marker)
        box = quote(mailbox).encode()
        pending = 0
        batch: list[bytes] = []
        for message in messages:
            when = b' "%s"' % date() if date is not None else b""
            batch.append(imap.tagged(b"APPEND %s%s {%d+}\r\n%s" % (box, when, len(message), message)))
            pending += len(message)
            if len(batch) >= APPEND_WINDOW or pending >= APPEND_WINDOW_BYTES:
                uids += appended_uids(imap, batch)
                batch, pending = [], 0
        uids += appended_uids(imap, batch)
        imap.command(b"LOGOUT")
    return uids
