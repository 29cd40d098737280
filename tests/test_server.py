"""The trio shell, on port 0 or on memory streams, with the in-memory fake backend."""

from __future__ import annotations

import dataclasses
import poplib
import ssl
from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing
import trustme

from gateway.config import Config, ListenConfig, ServerConfig
from gateway.server import Bound, Server
from tests.fakes import FakeBackend
from tests.waits import until

MSG1 = b"From: a@example.org\r\nSubject: one\r\n\r\nHello\r\n.dot line\r\n"
MSG2 = b"From: b@example.org\r\nSubject: two\r\n\r\nno final newline"
MSG3 = b"From: c@example.org\nSubject: lf\n\nbare lf body\n"


def backend() -> FakeBackend:
    return FakeBackend(
        {"alice": "pw", "bob": "pw2"}, {"alice": {"m1": MSG1, "m2": MSG2, "m3": MSG3}, "bob": {}}
    )


def config(**server: object) -> Config:
    return Config(
        server=dataclasses.replace(ServerConfig(), **server),  # type: ignore[arg-type]
        listen=(ListenConfig("127.0.0.1:0"),),
    )


_OPEN: list[trio.abc.Stream] = []


@pytest.fixture(autouse=True)
async def close_clients() -> AsyncIterator[None]:
    yield
    while _OPEN:
        await trio.aclose_forcefully(_OPEN.pop())


class Client:
    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buf = b""
        _OPEN.append(stream)

    @classmethod
    async def connect(cls, bound: Bound) -> Client:
        return cls(await trio.open_tcp_stream(bound.host, bound.port))

    async def readline(self) -> bytes:
        while b"\r\n" not in self.buf:
            data = await self.stream.receive_some(65536)
            if not data:
                raise EOFError(self.buf)
            self.buf += data
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    async def read_multiline(self) -> bytes:
        while b"\r\n.\r\n" not in self.buf:
            data = await self.stream.receive_some(65536)
            if not data:
                raise EOFError(self.buf)
            self.buf += data
        body, _, self.buf = self.buf.partition(b"\r\n.\r\n")
        return body + b"\r\n"

    async def send(self, line: bytes) -> None:
        await self.stream.send_all(line + b"\r\n")

    async def cmd(self, line: bytes) -> bytes:
        await self.send(line)
        return await self.readline()

    async def read_all(self) -> bytes:
        out = self.buf
        while data := await self.stream.receive_some(65536):
            out += data
        self.buf = b""
        return out

    async def login(self, user: bytes = b"alice", password: bytes = b"pw") -> bytes:
        assert (await self.readline()).startswith(b"+OK")
        assert (await self.cmd(b"USER " + user)).startswith(b"+OK")
        return await self.cmd(b"PASS " + password)


@pytest.fixture
async def running(nursery: trio.Nursery) -> AsyncIterator[tuple[Server, FakeBackend, Bound]]:
    be = backend()
    server = Server(config(), be)
    [bound] = await nursery.start(server.serve)
    yield server, be, bound
    server.drain()


async def test_login_stat_retr_quit(running: tuple[Server, FakeBackend, Bound]) -> None:
    _, be, bound = running
    c = await Client.connect(bound)
    assert (await c.login()).startswith(b"+OK Logged in, 3 messages")
    assert await c.cmd(b"STAT") == b"+OK 3 %d" % (len(MSG1) + len(MSG2) + len(MSG3) + 4)
    assert await c.cmd(b"RETR 1") == b"+OK %d octets" % len(MSG1)
    assert await c.read_multiline() == MSG1.replace(b"\r\n.dot", b"\r\n..dot")
    assert await c.cmd(b"RETR 2") == b"+OK %d octets" % len(MSG2)
    assert await c.read_multiline() == MSG2 + b"\r\n"
    assert await c.cmd(b"LIST 3") == b"+OK 3 %d" % (len(MSG3) + 4)
    await c.cmd(b"RETR 3")
    assert await c.read_multiline() == MSG3.replace(b"\n", b"\r\n")
    assert await c.cmd(b"DELE 2") == b"+OK Message 2 deleted"
    assert await c.cmd(b"QUIT") == b"+OK Logging out, messages deleted"
    assert await c.read_all() == b""
    assert be.deletion_batches == [["m2"]]
    assert set(be.boxes["alice"]) == {"m1", "m3"}


async def test_dropped_connection_deletes_nothing(running: tuple[Server, FakeBackend, Bound]) -> None:
    server, be, bound = running
    c = await Client.connect(bound)
    await c.login()
    assert (await c.cmd(b"DELE 1")).startswith(b"+OK")
    await c.stream.aclose()
    await until(lambda: server.active_sessions == 0, timeout=5)
    assert be.deletion_batches == []
    assert be.open_drops == 0
    assert len(be.boxes["alice"]) == 3


async def test_dele_rset_quit_deletes_nothing(running: tuple[Server, FakeBackend, Bound]) -> None:
    _, be, bound = running
    c = await Client.connect(bound)
    await c.login()
    await c.cmd(b"DELE 1")
    await c.cmd(b"DELE 3")
    assert (await c.cmd(b"RSET")).startswith(b"+OK")
    assert await c.cmd(b"QUIT") == b"+OK Logging out"
    assert be.deletion_batches in ([], [[]])
    assert len(be.boxes["alice"]) == 3


async def test_wrong_password_gets_auth_code(
    running: tuple[Server, FakeBackend, Bound], socket_clock: trio.testing.MockClock
) -> None:
    _, _, bound = running
    c = await Client.connect(bound)
    assert await c.login(password=b"nope") == b"-ERR [AUTH] Authentication failed"
    assert (await c.cmd(b"USER alice")).startswith(b"+OK")
    assert (await c.cmd(b"PASS pw")).startswith(b"+OK Logged in")


async def test_second_session_for_same_account_gets_in_use(
    running: tuple[Server, FakeBackend, Bound],
) -> None:
    _, _, bound = running
    first = await Client.connect(bound)
    assert (await first.login()).startswith(b"+OK")
    second = await Client.connect(bound)
    assert await second.login() == b"-ERR [IN-USE] Maildrop is locked by another session"
    assert await first.cmd(b"QUIT") == b"+OK Logging out"
    await first.read_all()
    third = await Client.connect(bound)
    assert (await third.login()).startswith(b"+OK")


async def test_message_expunged_upstream_gets_err_and_session_goes_on(
    running: tuple[Server, FakeBackend, Bound],
) -> None:
    _, be, bound = running
    c = await Client.connect(bound)
    await c.login()
    del be.boxes["alice"]["m1"]
    assert await c.cmd(b"RETR 1") == b"-ERR [SYS/TEMP] Message is no longer available"
    assert (await c.cmd(b"RETR 2")).startswith(b"+OK")
    await c.read_multiline()


async def test_upstream_dying_mid_message_never_sends_the_terminator(nursery: trio.Nursery) -> None:
    be = backend()
    be.boxes["alice"]["big"] = b"Subject: big\r\n\r\n" + b"line\r\n" * 50_000
    be.fail_after_chunks = 40  # past the first 64 KiB write batch: the client has seen +OK and some lines
    server = Server(config(), be)
    [bound] = await nursery.start(server.serve)
    c = await Client.connect(bound)
    await c.login()
    assert (await c.cmd(b"RETR 4")).startswith(b"+OK")
    rest = await c.read_all()
    assert b"\r\n.\r\n" not in rest
    assert 0 < len(rest) <= 40 * 4096
    assert be.deletion_batches == []
    server.drain()


async def test_failed_update_reports_sys_temp(nursery: trio.Nursery) -> None:
    be = backend()
    be.fail_deletions = True
    server = Server(config(), be)
    [bound] = await nursery.start(server.serve)
    c = await Client.connect(bound)
    await c.login()
    await c.cmd(b"DELE 1")
    assert await c.cmd(b"QUIT") == b"-ERR [SYS/TEMP] Some deleted messages were not removed"
    server.drain()


async def test_one_thousand_pipelined_commands_in_one_write(
    running: tuple[Server, FakeBackend, Bound],
) -> None:
    _, _, bound = running
    c = await Client.connect(bound)
    await c.login()
    script = b"".join(b"LIST %d\r\nNOOP\r\n" % (i % 5) for i in range(500))
    await c.stream.send_all(script)
    for i in range(500):
        reply = await c.readline()
        assert reply.startswith(b"+OK" if 1 <= i % 5 <= 3 else b"-ERR"), (i, reply)
        assert await c.readline() == b"+OK"
    assert (await c.cmd(b"STAT")).startswith(b"+OK 3 ")


async def test_bad_input_over_the_wire(running: tuple[Server, FakeBackend, Bound]) -> None:
    _, _, bound = running
    c = await Client.connect(bound)
    await c.login()
    assert await c.cmd(b"NOOP " + b"x" * 300) == b"-ERR Line too long"
    assert await c.cmd(b"RETR \x00") == b"-ERR NUL in command"
    assert await c.cmd("RETR \u00e9".encode()) == b"-ERR Non-ASCII command"
    assert await c.cmd(b"RETR 0") == b"-ERR No such message"
    assert await c.cmd(b"RETR -1") == b"-ERR Invalid message number"
    assert await c.cmd(b"RETR 99999999999999999999") == b"-ERR No such message"
    assert await c.cmd(b"USER x") == b"-ERR Command not valid in TRANSACTION state"
    assert (await c.cmd(b"STAT")).startswith(b"+OK 3")


async def test_max_sessions_refuses_with_sys_temp(nursery: trio.Nursery) -> None:
    server = Server(config(max_sessions=1), backend())
    [bound] = await nursery.start(server.serve)
    first = await Client.connect(bound)
    assert (await first.readline()).startswith(b"+OK")
    second = await Client.connect(bound)
    assert await second.readline() == b"-ERR [SYS/TEMP] Too many sessions, try again later"
    assert await second.read_all() == b""
    server.drain()


async def test_login_delay_is_enforced(nursery: trio.Nursery) -> None:
    server = Server(config(login_delay=300), backend())
    [bound] = await nursery.start(server.serve)
    c = await Client.connect(bound)
    await c.readline()
    assert b"LOGIN-DELAY 300" in (await c.cmd(b"CAPA")) + await c.read_multiline()
    await c.cmd(b"USER alice")
    assert (await c.cmd(b"PASS pw")).startswith(b"+OK")
    assert await c.cmd(b"QUIT") == b"+OK Logging out"
    c2 = await Client.connect(bound)
    assert await c2.login() == b"-ERR [LOGIN-DELAY] Logins are too frequent"
    server.drain()


async def test_poplib_talks_to_the_shell(running: tuple[Server, FakeBackend, Bound]) -> None:
    _, be, bound = running

    def client() -> tuple[tuple[int, int], list[bytes], list[bytes], list[bytes]]:
        p = poplib.POP3(bound.host, bound.port, timeout=10)
        p.user("alice")
        p.pass_("pw")
        stat = p.stat()
        _, lines, _ = p.retr(1)
        _, uidl, _ = p.uidl()
        _, top, _ = p.top(1, 0)
        p.dele(3)
        p.quit()
        return stat, lines, uidl, top

    stat, lines, uidl, top = await trio.to_thread.run_sync(client)
    assert stat[0] == 3
    assert b"\r\n".join(lines) + b"\r\n" == MSG1
    assert uidl == [b"1 uid-m1", b"2 uid-m2", b"3 uid-m3"]
    assert top == [b"From: a@example.org", b"Subject: one", b""]
    assert be.deletion_batches == [["m3"]]


# ---------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def tls_server(
    ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory, mode: str, be: FakeBackend
) -> Server:
    cert = ca.issue_cert("127.0.0.1", "localhost")
    d = tmp_path_factory.mktemp("tls")
    cert_file, key_file = d / "cert.pem", d / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    cfg = Config(listen=(ListenConfig("127.0.0.1:0", mode, str(cert_file), str(key_file)),))  # type: ignore[arg-type]
    return Server(cfg, be)


async def test_implicit_tls_with_poplib(
    nursery: trio.Nursery, ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory
) -> None:
    server = tls_server(ca, tmp_path_factory, "implicit", backend())
    [bound] = await nursery.start(server.serve)
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)

    def client() -> tuple[int, list[bytes]]:
        p = poplib.POP3_SSL(bound.host, bound.port, context=ctx, timeout=10)
        p.user("alice")
        p.pass_("pw")
        count, _ = p.stat()
        caps = p.capa()
        p.quit()
        return count, list(caps)

    count, caps = await trio.to_thread.run_sync(client)
    assert count == 3
    assert "STLS" not in caps
    server.drain()


async def test_stls_with_poplib(
    nursery: trio.Nursery, ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory
) -> None:
    server = tls_server(ca, tmp_path_factory, "starttls", backend())
    [bound] = await nursery.start(server.serve)
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)

    def client() -> tuple[dict[str, list[str]], dict[str, list[str]], int]:
        p = poplib.POP3(bound.host, bound.port, timeout=10)
        before = p.capa()
        p.stls(context=ctx)
        after = p.capa()
        p.user("alice")
        p.pass_("pw")
        count, _ = p.stat()
        p.quit()
        return before, after, count

    before, after, count = await trio.to_thread.run_sync(client)
    assert "STLS" in before and "STLS" not in after
    assert count == 3
    server.drain()


async def test_plaintext_pipelined_after_stls_is_refused(
    nursery: trio.Nursery, ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory
) -> None:
    server = tls_server(ca, tmp_path_factory, "starttls", backend())
    [bound] = await nursery.start(server.serve)
    c = await Client.connect(bound)
    await c.readline()
    await c.stream.send_all(b"STLS\r\nUSER injected\r\n")
    assert (await c.readline()).startswith(b"-ERR")
    assert await c.read_all() == b""
    server.drain()


# ------------------------------------------------ timeouts and drain (memory streams, virtual time)


def open_session(server: Server, nursery: trio.Nursery) -> tuple[Client, trio.Event]:
    """A session on a memory stream: the client, and an event set when the server is done with it."""
    client_side, server_side = trio.testing.memory_stream_pair()
    done = trio.Event()

    async def run() -> None:
        await server.serve_stream(server_side)
        done.set()

    nursery.start_soon(run)
    return Client(client_side), done


async def session_on_memory_stream(server: Server, nursery: trio.Nursery) -> tuple[Client, trio.Event]:
    return open_session(server, nursery)


async def test_pre_login_timeout_is_shorter(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server = Server(config(login_timeout=30, idle_timeout=600), backend())
    c, done = await session_on_memory_stream(server, nursery)
    start = trio.current_time()
    await c.readline()
    assert await c.readline() == b"-ERR Autologout; idle for too long"
    await done.wait()
    assert 30 <= trio.current_time() - start < 31


async def test_idle_autologout_resets_on_every_command_and_never_updates(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    be = backend()
    server = Server(config(idle_timeout=600), be)
    c, done = await session_on_memory_stream(server, nursery)
    await c.login()
    await c.cmd(b"DELE 1")
    start = trio.current_time()
    for _ in range(3):
        await trio.sleep(500)
        assert await c.cmd(b"NOOP") == b"+OK"
    assert trio.current_time() - start >= 1500
    last = trio.current_time()
    assert await c.readline() == b"-ERR Autologout; idle for too long"
    await done.wait()
    assert 600 <= trio.current_time() - last < 601
    assert be.deletion_batches == []
    assert len(be.boxes["alice"]) == 3


async def test_default_idle_timeout_is_at_least_ten_minutes() -> None:
    assert ServerConfig().idle_timeout >= 600
    assert ServerConfig().login_timeout < ServerConfig().idle_timeout


async def test_drain_stops_accepting_and_lets_sessions_finish(nursery: trio.Nursery) -> None:
    be = backend()
    server = Server(config(shutdown_grace=30), be)
    finished = trio.Event()

    async def serve(task_status: trio.TaskStatus[list[Bound]] = trio.TASK_STATUS_IGNORED) -> None:
        await server.serve(task_status=task_status)
        finished.set()

    [bound] = await nursery.start(serve)
    c = await Client.connect(bound)
    await c.login()
    await c.cmd(b"DELE 1")
    server.drain()
    await until(lambda: not server.listening)
    with pytest.raises(OSError):
        await trio.open_tcp_stream(bound.host, bound.port)
    assert not finished.is_set()
    assert await c.cmd(b"QUIT") == b"+OK Logging out, messages deleted"
    with trio.fail_after(5):
        await finished.wait()
    assert be.deletion_batches == [["m1"]]


async def test_drain_grace_expires_and_closes_without_update(
    nursery: trio.Nursery, socket_clock: trio.testing.MockClock
) -> None:
    be = backend()
    server = Server(config(shutdown_grace=0.3), be)
    finished = trio.Event()

    async def serve(task_status: trio.TaskStatus[list[Bound]] = trio.TASK_STATUS_IGNORED) -> None:
        await server.serve(task_status=task_status)
        finished.set()

    [bound] = await nursery.start(serve)
    c = await Client.connect(bound)
    await c.login()
    await c.cmd(b"DELE 1")
    start = trio.current_time()
    server.drain()
    with trio.fail_after(5):
        await finished.wait()
    assert trio.current_time() - start >= 0.3
    assert await c.read_all() == b""  # closed, without UPDATE
    assert server.active_sessions == 0
    assert be.deletion_batches == []
    assert len(be.boxes["alice"]) == 3


async def test_internal_error_reaches_client_as_generic_err(nursery: trio.Nursery) -> None:
    be = backend()

    def broken(username: str) -> str:
        raise RuntimeError("secret internals /etc/passwd")

    be.lock_key = broken  # type: ignore[method-assign]
    server = Server(config(), be)
    [bound] = await nursery.start(server.serve)
    c = await Client.connect(bound)
    await c.readline()
    await c.cmd(b"USER alice")
    reply = await c.cmd(b"PASS pw")
    assert reply == b"-ERR [SYS/TEMP] Internal server error"
    assert b"secret" not in await c.read_all()
    server.drain()


async def test_every_greeting_carries_a_unique_apop_timestamp(
    running: tuple[Server, FakeBackend, Bound],
) -> None:
    import re

    _, _, bound = running
    stamps = set()
    for _ in range(5):
        c = await Client.connect(bound)
        greeting = await c.readline()
        m = re.search(rb"<[^<>@\s]+@[^<>\s]+>", greeting)
        assert m is not None, greeting
        stamps.add(m.group(0))
    assert len(stamps) == 5


async def test_a_client_reconnecting_right_after_quit_is_not_locked_out(
    nursery: trio.Nursery, socket_clock: trio.testing.MockClock
) -> None:
    be = backend()
    be.close_delay = 0.2  # a slow upstream logout must not keep the [IN-USE] lock past the QUIT reply
    server = Server(config(), be)
    [bound] = await nursery.start(server.serve)
    for _ in range(3):
        c = await Client.connect(bound)
        assert (await c.login()).startswith(b"+OK Logged in")
        assert (await c.cmd(b"QUIT")).startswith(b"+OK")
        assert be.open_drops == 0  # the maildrop was closed before +OK was sent
    server.drain()
