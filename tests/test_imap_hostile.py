"""The IMAP backend against a hostile upstream: a scripted fake IMAP server on loopback (port 0) floods,
lies about UIDs and sends bodies nobody asked for. Each is a temporary failure of that session only, in
bounded memory, never a traceback to the client."""

from __future__ import annotations

import poplib
import tracemalloc
from collections.abc import Awaitable, Callable, Iterator

import pytest
import trio

from gateway.backends.base import PasswordLogin, TempFailure
from gateway.backends.imap import ImapBackend, ImapConnection, ImapSettings
from gateway.config import Config, ListenConfig
from gateway.server import Server
from tests.test_imap_backend import in_thread

CAPS = b"IMAP4rev1 UIDPLUS MOVE"
MIB = 1024 * 1024


class Wire:
    """One fake-server connection: command lines in, scripted bytes out."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = b""

    async def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            data = await self.stream.receive_some(65536)
            if not data:
                raise EOFError
            self.buf += data
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)


Handler = Callable[[Wire, bytes, bytes], Awaitable[None]]


async def select_ok(
    w: Wire, tag: bytes, line: bytes = b"", *, exists: int = 1, uidvalidity: bytes = b"7"
) -> None:
    await w.send(
        b"* %d EXISTS\r\n* OK [UIDVALIDITY %s] ok\r\n%s OK [READ-WRITE] done\r\n" % (exists, uidvalidity, tag)
    )


async def fetch_rows(
    w: Wire, tag: bytes, line: bytes = b"", *, rows: bytes = b"* 1 FETCH (UID 7 RFC822.SIZE 12)\r\n"
) -> None:
    await w.send(rows + tag + b" OK done\r\n")


class FakeImap:
    """Answers LOGIN, CAPABILITY, ID, LOGOUT itself; SELECT and UID FETCH go to the test's handlers."""

    def __init__(self, **handlers: Handler) -> None:
        self.handlers: dict[str, Handler] = {"SELECT": select_ok, "FETCH": fetch_rows, **handlers}
        self.commands: list[bytes] = []
        self.port = 0

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        w = Wire(stream)
        try:
            await w.send(b"* OK [CAPABILITY " + CAPS + b"] fake ready\r\n")
            while True:
                line = await w.line()
                self.commands.append(line)
                tag, _, rest = line.partition(b" ")
                verb = rest.split(b" ", 2)
                name = verb[1].decode() if verb[0].upper() == b"UID" else verb[0].decode()
                name = name.upper()
                if name == "LOGIN":
                    await w.send(tag + b" OK [CAPABILITY " + CAPS + b"] in\r\n")
                elif name == "LOGOUT":
                    await w.send(b"* BYE bye\r\n" + tag + b" OK out\r\n")
                    return
                elif name in self.handlers:
                    await self.handlers[name](w, tag, line)
                else:
                    await w.send(tag + b" OK fine\r\n")
        except (EOFError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await stream.aclose()


async def start(nursery: trio.Nursery, fake: FakeImap, **kw: object) -> ImapBackend:
    port = await nursery.start(fake.serve)
    return ImapBackend(ImapSettings("127.0.0.1", port, "none", connect_timeout=10.0, **kw))  # type: ignore[arg-type]


LOGIN = PasswordLogin("alice", "secret")


@pytest.fixture
def traced() -> Iterator[None]:
    tracemalloc.start()
    try:
        yield
    finally:
        tracemalloc.stop()


def peak_since_reset() -> int:
    return tracemalloc.get_traced_memory()[1]


# -- floods


async def flood_alerts(w: Wire, tag: bytes) -> None:
    """300,000 ``* OK [ALERT]`` lines (9 MB) during SELECT: every one would be kept before the fix."""
    chunk = b"* OK [ALERT] the upstream says hello again\r\n" * 1000
    for _ in range(300):
        await w.send(chunk)
    await select_ok(w, tag)


async def test_an_alert_flood_during_select_is_sys_temp_at_login_in_bounded_memory(
    nursery: trio.Nursery, traced: None
) -> None:
    fake = FakeImap(SELECT=lambda w, tag, line: flood_alerts(w, tag))
    port = await nursery.start(fake.serve)
    settings = ImapSettings("127.0.0.1", port, "none", connect_timeout=10.0)
    server = Server(Config(listen=(ListenConfig("127.0.0.1:0"),)), ImapBackend(settings))
    [bound] = await nursery.start(server.serve)

    def login() -> str:
        p = poplib.POP3(bound.host, bound.port, timeout=30)
        try:
            p.user("alice")
            try:
                return p.pass_("secret").decode()
            except poplib.error_proto as exc:
                return str(exc)
        finally:
            p.close()

    tracemalloc.reset_peak()
    reply = await in_thread(login)
    peak = peak_since_reset()
    assert reply.startswith("b'-ERR [SYS/TEMP]")
    assert "Traceback" not in reply
    assert peak < 8 * MIB, f"peak traced memory {peak // 1024} KiB during an ALERT flood"
    server.drain()


async def test_an_untagged_flood_after_the_snapshot_fails_that_session_only(nursery: trio.Nursery) -> None:
    async def flood_on_store(w: Wire, tag: bytes, line: bytes) -> None:
        for _ in range(20):
            await w.send(b"* 1 FETCH (FLAGS (\\Seen))\r\n" * 1000)
        await w.send(tag + b" OK stored\r\n")

    backend = await start(nursery, FakeImap(STORE=flood_on_store), delete_policy="flag:$gone")
    async with backend.open_maildrop(LOGIN) as drop:
        with pytest.raises(TempFailure, match="too many untagged"):
            await drop.apply_deletions([0])
    async with backend.open_maildrop(LOGIN) as drop:  # the next session is not affected
        assert [e.uid for e in drop.entries] == [7]


async def test_unsolicited_body_octets_count_against_the_budget(nursery: trio.Nursery, traced: None) -> None:
    """A 40 MB body of a message nobody asked for, inside SELECT: dropped as it streams, then cut off."""

    async def body_in_select(w: Wire, tag: bytes, line: bytes) -> None:
        size = 40 * MIB
        await w.send(b"* 1 FETCH (UID 9 BODY[] {%d}\r\n" % size)
        block = b"x" * MIB
        for _ in range(40):
            await w.send(block)
        await w.send(b")\r\n")
        await select_ok(w, tag)

    backend = await start(nursery, FakeImap(SELECT=body_in_select))
    tracemalloc.reset_peak()
    with pytest.raises(TempFailure, match="too many octets"):
        async with backend.open_maildrop(LOGIN):
            pass
    assert peak_since_reset() < 8 * MIB


# -- snapshot rows


async def test_more_messages_than_max_snapshot_rows_is_sys_temp(nursery: trio.Nursery) -> None:
    fake = FakeImap(SELECT=lambda w, tag, line: select_ok(w, tag, exists=5))
    backend = await start(nursery, fake, max_snapshot_rows=3)
    with pytest.raises(TempFailure, match="max_snapshot_rows=3"):
        async with backend.open_maildrop(LOGIN):
            pass
    assert not any(b"UID FETCH 1:*" in c for c in fake.commands)  # refused before the fetch


@pytest.mark.parametrize("flags", [False, True])
async def test_more_fetch_rows_than_the_cap_is_sys_temp(nursery: trio.Nursery, flags: bool) -> None:
    """EXISTS says 2, the server sends 50,000 rows (through the fast path, or as FETCH events)."""
    extra = b" FLAGS ()" if flags else b""
    rows = b"".join(b"* %d FETCH (UID %d RFC822.SIZE 10%s)\r\n" % (i, i, extra) for i in range(1, 50_001))
    fake = FakeImap(
        SELECT=lambda w, tag, line: select_ok(w, tag, exists=2),
        FETCH=lambda w, tag, line: fetch_rows(w, tag, rows=rows),
    )
    backend = await start(
        nursery, fake, max_snapshot_rows=1000, delete_policy="flag:$x" if flags else "expunge"
    )
    with pytest.raises(TempFailure, match="max_snapshot_rows=1000"):
        async with backend.open_maildrop(LOGIN):
            pass


# -- UIDs


@pytest.mark.parametrize(
    "row",
    [
        b"* 1 FETCH (UID 0 RFC822.SIZE 12)",
        b"* 1 FETCH (UID 4294967296 RFC822.SIZE 12)",
        b"* 1 FETCH (UID 99999999999 RFC822.SIZE 12)",
        b"* 1 FETCH (RFC822.SIZE 12 UID 4294967296)",
    ],
)
async def test_a_uid_outside_1_to_2_32_is_caught_at_the_snapshot(nursery: trio.Nursery, row: bytes) -> None:
    fake = FakeImap(FETCH=lambda w, tag, line: fetch_rows(w, tag, rows=row + b"\r\n"))
    backend = await start(nursery, fake)
    with pytest.raises(TempFailure, match="UID outside"):
        async with backend.open_maildrop(LOGIN):
            pass


@pytest.mark.parametrize("uidvalidity", [b"0", b"4294967296", b"123456789012345"])
async def test_a_uidvalidity_outside_1_to_2_32_is_caught_at_the_snapshot(
    nursery: trio.Nursery, uidvalidity: bytes
) -> None:
    fake = FakeImap(SELECT=lambda w, tag, line: select_ok(w, tag, uidvalidity=uidvalidity))
    backend = await start(nursery, fake)
    with pytest.raises(TempFailure, match="UIDVALIDITY"):
        async with backend.open_maildrop(LOGIN):
            pass


async def test_the_largest_uid_and_uidvalidity_are_fine(nursery: trio.Nursery) -> None:
    fake = FakeImap(
        SELECT=lambda w, tag, line: select_ok(w, tag, uidvalidity=b"4294967295"),
        FETCH=lambda w, tag, line: fetch_rows(w, tag, rows=b"* 1 FETCH (UID 4294967295 RFC822.SIZE 12)\r\n"),
    )
    backend = await start(nursery, fake)
    async with backend.open_maildrop(LOGIN) as drop:
        [entry] = drop.entries
        assert (entry.uid, entry.uidvalidity, entry.uidl) == (0xFFFFFFFF, 0xFFFFFFFF, "ffffffffffffffff")


# -- bodies nobody asked for

BODY = b"Subject: hi\r\n\r\nhello\r\n"  # 22 octets


async def test_retr_streams_only_the_body_it_asked_for(nursery: trio.Nursery, traced: None) -> None:
    async def fetch(w: Wire, tag: bytes, line: bytes) -> None:
        if b"1:*" in line:
            await fetch_rows(w, tag, rows=b"* 1 FETCH (UID 7 RFC822.SIZE %d)\r\n" % len(BODY))
            return
        big = 8 * MIB  # within the octet budget (16 MiB): dropped, not fatal
        await w.send(b"* 2 FETCH (UID 9 BODY[] {%d}\r\n" % big)  # another message's body, first
        for _ in range(8):
            await w.send(b"y" * MIB)
        await w.send(b")\r\n* 1 FETCH (UID 7 BODY[HEADER] {13}\r\nSubject: no\r\n)\r\n")  # another section
        await w.send(b"* 1 FETCH (UID 7 BODY[] {%d}\r\n%s)\r\n" % (len(BODY), BODY))  # the answer
        await w.send(b"* 1 FETCH (UID 7 BODY[] {5}\r\nextra)\r\n")  # and a second one
        await w.send(tag + b" OK done\r\n")

    backend = await start(nursery, FakeImap(FETCH=fetch), mark_seen=True)  # mark_seen: no read-ahead
    async with backend.open_maildrop(LOGIN) as drop:
        tracemalloc.reset_peak()
        got = b"".join([chunk async for chunk in drop.stream(0)])
        peak = peak_since_reset()
    assert got == BODY
    assert peak < 8 * MIB


async def test_read_ahead_keeps_only_the_bodies_it_asked_for(nursery: trio.Nursery) -> None:
    async def fetch(w: Wire, tag: bytes, line: bytes) -> None:
        for uid in range(100, 600):  # 500 messages nobody asked for, UID before the body
            await w.send(b"* 3 FETCH (UID %d BODY[] {%d}\r\n%s)\r\n" % (uid, len(BODY), BODY))
        for uid in range(600, 700):  # 100 more, UID after the body
            await w.send(b"* 3 FETCH (BODY[] {%d}\r\n%s UID %d)\r\n" % (len(BODY), BODY, uid))
        await w.send(b"* 1 FETCH (UID 7 BODY[] {%d}\r\n%s)\r\n" % (len(BODY), BODY))
        await w.send(tag + b" OK done\r\n")

    fake = FakeImap()
    backend = await start(nursery, fake)
    async with backend.open_maildrop(LOGIN) as drop:
        fake.handlers["FETCH"] = fetch
        conn: ImapConnection = drop.conn
        bodies = await conn.fetch_small_bodies([7, 8], 1024)
    assert bodies == {7: BODY}


async def test_header_hashes_keep_only_the_uids_asked_for(nursery: trio.Nursery) -> None:
    header = b"Subject: hi\r\n\r\n"

    async def fetch(w: Wire, tag: bytes, line: bytes) -> None:
        for uid in range(100, 400):
            await w.send(b"* 3 FETCH (UID %d BODY[HEADER] {%d}\r\n%s)\r\n" % (uid, len(header), header))
        await w.send(b"* 1 FETCH (UID 7 BODY[HEADER] {%d}\r\n%s)\r\n" % (len(header), header))
        await w.send(tag + b" OK done\r\n")

    fake = FakeImap()
    backend = await start(nursery, fake)
    async with backend.open_maildrop(LOGIN) as drop:
        fake.handlers["FETCH"] = fetch
        hashes = await drop.conn.fetch_header_hashes([7])
    assert list(hashes) == [7]
