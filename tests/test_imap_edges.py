"""IMAP upstream edge cases against a real Dovecot: sizes, round trips, TOP bounds, no-UIDPLUS safety,
policies that fail, \\Seen, slow upstreams, folders, exact credentials and memory on a 50 MB message."""

from __future__ import annotations

import poplib
import re
import socket
from pathlib import Path

import pytest
import trio

from gateway.backends.imap import ImapBackend, ImapSettings
from gateway.config import Config, ListenConfig
from gateway.server import Server
from tests.gwproc import spawn_gateway
from tests.realservers import corpus
from tests.realservers.dovecot import Dovecot, MailUser
from tests.tcpproxy import RecordingProxy
from tests.test_imap_backend import imap_for, in_thread, make_server, pop3_session, uids_in
from tests.waits import until

pytestmark = pytest.mark.realserver


def commands(wire: bytes) -> list[bytes]:
    """Verb (and first argument for UID commands) of each command line the gateway sent upstream."""
    out = []
    for line in wire.split(b"\r\n"):
        m = re.match(rb"A\d{4} (UID [A-Z]+|[A-Z]+)", line)
        if m:
            out.append(m.group(1))
    return out


async def proxied(nursery: trio.Nursery, dovecot: Dovecot, **kw: object) -> tuple[RecordingProxy, object]:
    proxy = RecordingProxy(dovecot.host, dovecot.imap_port)
    port = await nursery.start(proxy.serve)
    server = make_server(dovecot, port=port, **kw)
    [bound] = await nursery.start(server.serve)
    return proxy, bound


async def test_snapshot_round_trips_do_not_grow_with_the_mailbox(
    nursery: trio.Nursery, dovecot: Dovecot, mail_user: MailUser
) -> None:
    proxy, bound = await proxied(nursery, dovecot)
    dovecot.append(mail_user.name, mail_user.password, corpus.sized_messages(3, 500))
    await in_thread(lambda: pop3_session(bound.host, bound.port, mail_user, lambda p: p.uidl()))  # type: ignore[attr-defined]
    dovecot.append(mail_user.name, mail_user.password, corpus.sized_messages(300, 500))
    count = await in_thread(lambda: pop3_session(bound.host, bound.port, mail_user, lambda p: p.stat()[0]))  # type: ignore[attr-defined]
    assert count == 303
    # the upstream LOGOUT is sent after the client's QUIT was answered
    await until(lambda: all(commands(c)[-1:] == [b"LOGOUT"] for c in proxy.client_bytes), timeout=5)
    small, large = commands(proxy.client_bytes[0]), commands(proxy.client_bytes[1])
    assert small == large
    assert small.count(b"UID FETCH") == 1


async def test_top_reads_a_bounded_range_of_a_large_message(
    nursery: trio.Nursery, dovecot: Dovecot, mail_user: MailUser
) -> None:
    proxy, bound = await proxied(nursery, dovecot)
    big = corpus.big_message(8 * 1024 * 1024)
    dovecot.append(mail_user.name, mail_user.password, [big])

    def top(p: poplib.POP3) -> list[bytes]:
        return p.top(1, 0)[1]

    lines = await in_thread(lambda: pop3_session(bound.host, bound.port, mail_user, top))  # type: ignore[attr-defined]
    assert b"\r\n".join(lines) + b"\r\n" == big[: big.index(b"\r\n\r\n") + 4]
    assert b"BODY.PEEK[]<0.65536>" in proxy.client_bytes[0]
    assert proxy.server_bytes[0] < 1024 * 1024


async def test_a_wrong_upstream_size_is_refused_then_corrected(
    nursery: trio.Nursery, dovecot: Dovecot, mail_user: MailUser, caplog: pytest.LogCaptureFixture
) -> None:
    msg = corpus.sized_message(0, 2000)
    assert corpus.pop3_size(msg) == 2000
    dovecot.append(mail_user.name, mail_user.password, [msg])
    proxy, bound = await proxied(nursery, dovecot)
    proxy.rewrite = lambda data: data.replace(b"RFC822.SIZE 2000", b"RFC822.SIZE 2017")

    def first(p: poplib.POP3) -> tuple[bytes, str]:
        listed = p.list(1)
        try:
            p.retr(1)
            return listed, "retrieved"
        except poplib.error_proto as exc:
            return listed, str(exc)

    listed, reply = await in_thread(lambda: pop3_session(bound.host, bound.port, mail_user, first))  # type: ignore[attr-defined]
    assert listed == b"+OK 1 2017"
    assert "[SYS/TEMP]" in reply  # never a message that disagrees with this session's LIST
    assert "size mismatch" in caplog.text

    def second(p: poplib.POP3) -> tuple[bytes, bytes, list[bytes]]:
        resp, lines, _ = p.retr(1)
        return p.list(1), resp, lines

    listed, resp, lines = await in_thread(lambda: pop3_session(bound.host, bound.port, mail_user, second))  # type: ignore[attr-defined]
    assert listed == b"+OK 1 2000"
    assert resp == b"+OK 2000 octets"
    assert b"\r\n".join(lines) + b"\r\n" == corpus.pop3_view(msg)


async def test_without_uidplus_plain_expunge_only_when_no_one_else_flagged_deleted(
    nursery: trio.Nursery, dovecot: Dovecot, mail_user: MailUser
) -> None:
    uids = dovecot.append(mail_user.name, mail_user.password, corpus.sized_messages(4, 800))
    # the plain EXPUNGE is opt-in (the default refuses it: tests/test_imap_no_uidplus.py)
    proxy, bound = await proxied(nursery, dovecot, expunge_without_uidplus=True)
    proxy.rewrite = lambda data: data.replace(b" UIDPLUS", b"")
    await in_thread(lambda: pop3_session(bound.host, bound.port, mail_user, lambda p: p.dele(1)))  # type: ignore[attr-defined]
    assert uids_in(dovecot, mail_user) == uids[1:]
    assert b"UID EXPUNGE" not in b"".join(proxy.client_bytes)
    assert b"UID SEARCH DELETED" in proxy.client_bytes[0]

    # now another client has a pending \Deleted: we must not expunge it with ours
    m = imap_for(dovecot, mail_user)
    m.select("INBOX")
    m.uid("STORE", str(uids[3]), "+FLAGS.SILENT", r"(\Deleted)")
    m.logout()

    def dele(p: poplib.POP3) -> str:
        p.dele(1)
        try:
            return p.quit().decode()
        except poplib.error_proto as exc:
            return str(exc)

    reply = await in_thread(lambda: pop3_session(bound.host, bound.port, mail_user, dele))  # type: ignore[attr-defined]
    assert "[SYS/TEMP]" in reply
    assert uids_in(dovecot, mail_user) == uids[1:]  # nothing of ours or theirs was expunged
    m = imap_for(dovecot, mail_user)
    m.select("INBOX")
    _, data = m.uid("FETCH", f"{uids[1]}", "(FLAGS)")
    m.logout()
    assert b"\\Deleted" not in data[0]  # our mark was taken back


async def test_move_to_a_missing_folder_fails_cleanly_and_deletes_nothing(
    nursery: trio.Nursery, dovecot: Dovecot, mail_user: MailUser
) -> None:
    uids = dovecot.append(mail_user.name, mail_user.password, corpus.sized_messages(2, 800))
    server = make_server(dovecot, delete_policy="move:DoesNotExist")
    [bound] = await nursery.start(server.serve)

    def dele(p: poplib.POP3) -> str:
        p.dele(1)
        try:
            return p.quit().decode()
        except poplib.error_proto as exc:
            return str(exc)

    reply = await in_thread(lambda: pop3_session(bound.host, bound.port, mail_user, dele))  # type: ignore[attr-defined]
    assert "-ERR [SYS/TEMP]" in reply
    assert uids_in(dovecot, mail_user) == uids
    server.drain()


@pytest.mark.parametrize("mark_seen", [False, True])
async def test_seen_flag_follows_the_option(
    nursery: trio.Nursery, dovecot: Dovecot, mail_user: MailUser, mark_seen: bool
) -> None:
    uids = dovecot.append(mail_user.name, mail_user.password, corpus.sized_messages(2, 800))
    server = make_server(dovecot, mark_seen=mark_seen)
    [bound] = await nursery.start(server.serve)

    def read(p: poplib.POP3) -> None:
        p.retr(1)
        p.top(2, 0)

    await in_thread(lambda: pop3_session(bound.host, bound.port, mail_user, read))  # type: ignore[attr-defined]
    m = imap_for(dovecot, mail_user)
    m.select("INBOX")
    _, data = m.uid("FETCH", f"{uids[0]}:{uids[1]}", "(FLAGS)")
    m.logout()
    flags = [d for d in data if isinstance(d, bytes)]
    assert (b"\\Seen" in flags[0]) is mark_seen
    assert b"\\Seen" not in flags[1]  # TOP never marks
    server.drain()


async def test_an_upstream_that_never_greets_gives_sys_temp_in_bounded_time(
    nursery: trio.Nursery, mail_user: MailUser
) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    silent: list[trio.SocketStream] = []

    async def accept_and_hang(stream: trio.SocketStream) -> None:
        silent.append(stream)
        await trio.sleep_forever()

    nursery.start_soon(trio.serve_listeners, accept_and_hang, listeners)
    settings = ImapSettings("127.0.0.1", port, "none", connect_timeout=1.0)
    cfg = Config(listen=(ListenConfig("127.0.0.1:0"),))
    server = Server(cfg, ImapBackend(settings))
    [bound] = await nursery.start(server.serve)
    start = trio.current_time()
    with pytest.raises(poplib.error_proto, match=r"SYS/TEMP"):
        await in_thread(lambda: pop3_session(bound.host, bound.port, mail_user, lambda p: p.stat()))  # type: ignore[attr-defined]
    assert trio.current_time() - start < 5
    server.drain()
    for s in silent:
        await s.aclose()


async def test_configured_folder_is_served(
    nursery: trio.Nursery, dovecot: Dovecot, mail_user: MailUser
) -> None:
    dovecot.append(mail_user.name, mail_user.password, corpus.sized_messages(1, 500))
    dovecot.append(mail_user.name, mail_user.password, corpus.sized_messages(3, 600), mailbox="Work")
    server = make_server(dovecot, folder="Work")
    [bound] = await nursery.start(server.serve)
    assert (
        await in_thread(lambda: pop3_session(bound.host, bound.port, mail_user, lambda p: p.stat()[0])) == 3
    )  # type: ignore[attr-defined]
    server.drain()


async def test_quotes_backslashes_and_braces_reach_dovecot_exactly(
    nursery: trio.Nursery, dovecot: Dovecot, mail_user: MailUser
) -> None:
    tricky = MailUser(mail_user.name + "x", 'pa"ss\\wo{5}rd \u00e4')
    dovecot.add_user(tricky.name, tricky.password)  # a new user is a new passwd-file: read at once
    dovecot.append(tricky.name, tricky.password, corpus.sized_messages(2, 500))
    server = make_server(dovecot)
    [bound] = await nursery.start(server.serve)
    assert await in_thread(lambda: pop3_session(bound.host, bound.port, tricky, lambda p: p.stat()[0])) == 2  # type: ignore[attr-defined]
    server.drain()


def _hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def _retr_discard(port: int, user: MailUser, n: int) -> int:
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    f = s.makefile("rb")
    f.readline()
    for cmd in (f"USER {user.name}", f"PASS {user.password}"):
        s.sendall(cmd.encode() + b"\r\n")
        assert f.readline().startswith(b"+OK")
    s.sendall(b"RETR %d\r\n" % n)
    assert f.readline().startswith(b"+OK")
    total = 0
    while (line := f.readline()) != b".\r\n":
        assert line
        total += len(line)
    s.sendall(b"QUIT\r\n")
    f.readline()
    s.close()
    return total


def test_a_50_mb_message_streams_in_flat_memory(
    dovecot: Dovecot, mail_user: MailUser, tmp_path: Path
) -> None:
    big = corpus.big_message(50 * 1024 * 1024)
    dovecot.append(mail_user.name, mail_user.password, [corpus.sized_message(0, 10_000), big])
    gateway = spawn_gateway(tmp_path, f"imap://{dovecot.host}:{dovecot.imap_port}")
    try:
        _retr_discard(gateway.port, mail_user, 1)  # warm up: imports, TLS-free code paths, buffers
        baseline = _hwm_kib(gateway.pid)
        received = _retr_discard(gateway.port, mail_user, 2)
        peak = _hwm_kib(gateway.pid)
    finally:
        gateway.stop()
    assert received >= len(big)
    print(f"gateway RSS high-water mark: {baseline} KiB after a small RETR, {peak} KiB after 50 MiB")
    assert peak - baseline < 16 * 1024, (
        f"peak RSS grew by {(peak - baseline) // 1024} MiB for a 50 MiB message"
    )
