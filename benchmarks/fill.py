"""Filling a big mailbox fast: IMAP MULTIAPPEND (RFC 3502) with LITERAL+ (RFC 7888), on parallel connections.

The tests' pipelined APPEND helper (`Dovecot.append`) sends one APPEND command per message. On Dovecot's
Maildir every APPEND is its own transaction (a dovecot-uidlist lock and rewrite, an index update), and on a
growing mailbox that cost grows: 2,000 messages take ~3 s, 20,000 take ~100 s (~5 ms each). One APPEND
command carrying 1,000 messages is one transaction: 100,000 small messages take ~35 s, linearly, on one
connection, and ~20 s on four in parallel (Dovecot holds the mailbox lock only to commit).

The messages of one batch get consecutive UIDs in the order given; batches from parallel connections
interleave. Uses the tests' raw IMAP client (`tests/realservers/rawimap.py`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

from tests.realservers.rawimap import ImapConnection, quote

BATCH = 1000
BATCH_BYTES = 4 << 20
CONNECTIONS = 4


class FillError(RuntimeError):
    pass


def multiappend(
    host: str,
    port: int,
    user: str,
    password: str,
    messages: Iterable[bytes],
    *,
    mailbox: str = "INBOX",
    batch: int = BATCH,
    progress: Callable[[int], None] | None = None,
) -> int:
    """APPEND `messages` to `mailbox`, `batch` messages per command; returns how many were appended.

    `progress(done)` is called after every batch. Needs MULTIAPPEND and LITERAL+ (Dovecot and Cyrus have
    both)."""
    with ImapConnection.open(host, port) as imap:
        imap.command(f"LOGIN {quote(user)} {quote(password)}".encode())
        caps = {c.upper() for line in imap.command_lines(b"CAPABILITY") for c in line.split()[2:]}
        missing = {b"MULTIAPPEND", b"LITERAL+"} - caps
        if missing:
            raise FillError(f"the IMAP server at {host}:{port} lacks {sorted(missing)}")
        box = quote(mailbox).encode()
        done = 0
        for chunk in _batches(messages, batch):
            imap.command(b"APPEND " + box + b" " + b" ".join(b"{%d+}\r\n%s" % (len(m), m) for m in chunk))
            done += len(chunk)
            if progress is not None:
                progress(done)
        imap.command(b"LOGOUT")
    return done


def multiappend_parallel(
    host: str,
    port: int,
    user: str,
    password: str,
    count: int,
    make: Callable[[int], bytes],
    *,
    connections: int = CONNECTIONS,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Append messages `make(1)` ... `make(count)` over `connections` MULTIAPPEND connections at once
    (connection k appends messages k+1, k+1+connections, ...); `progress(done)` counts all of them."""
    lock = threading.Lock()
    done_by = [0] * connections

    def one(k: int) -> int:
        def report(done: int) -> None:
            with lock:
                done_by[k] = done
                if progress is not None:
                    progress(sum(done_by))

        messages = (make(i) for i in range(k + 1, count + 1, connections))
        return multiappend(host, port, user, password, messages, progress=report)

    with ThreadPoolExecutor(max_workers=connections, thread_name_prefix="fill") as pool:
        futures = [pool.submit(one, k) for k in range(connections)]
        return sum(f.result() for f in futures)


def _batches(messages: Iterable[bytes], size: int) -> Iterator[list[bytes]]:
    chunk: list[bytes] = []
    octets = 0
    for m in messages:
        chunk.append(m)
        octets += len(m)
        if len(chunk) >= size or octets >= BATCH_BYTES:
            yield chunk
            chunk, octets = [], 0
    if chunk:
        yield chunk
