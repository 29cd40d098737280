"""The gateway on a real Dovecot IMAP upstream, compared byte for byte with Dovecot's own POP3 server."""

from __future__ import annotations

import dataclasses
import imaplib
import poplib
import re
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from gateway.backends.imap import ImapBackend, ImapSettings
from gateway.config import Config, ListenConfig, ServerConfig
from gateway.server import Bound, Server
from gateway.store import AsyncUidlStore
from tests.realservers import corpus
from tests.realservers.dovecot import Dovecot, MailUser
from tests.tcpproxy import RecordingProxy
from tests.waits import until

pytestmark = pytest.mark.realserver


def make_server(dovecot: Dovecot, *, tls: str = "none", port: int | None = None, **kw: Any) -> Server:
    if port is None:
        port = dovecot.imaps_port if tls == "implicit" else dovecot.imap_port
    settings = ImapSettings(dovecot.host, port, tls, ca_file=str(dovecot.ca_file), **kw)
    cfg = Config(
        server=dataclasses.replace(ServerConfig(), upstream_timeout=10.0),
        listen=(ListenConfig("127.0.0.1:0"),),
    )
    # with the durable UIDL store, as `pop3-gateway serve` runs (opened and closed by serve())
    store = AsyncUidlStore(Path(tempfile.mkdtemp(prefix="pop3gw-store-")) / "uidl.sqlite3")
    return Server(cfg, ImapBackend(settings), store=store)


@pytest.fixture
async def served(nursery: trio.Nursery, dovecot: Dovecot) -> AsyncIterator[tuple[Server, Bound]]:
    server = make_server(dovecot)
    [bound] = await nursery.start(server.serve)
    yield server, bound
    server.drain()


@pytest.fixture
def gateway(served: tuple[Server, Bound]) -> Bound:
    return served[1]


async def in_thread(fn: Callable[[], Any]) -> Any:
    return await trio.to_thread.run_sync(fn)


def pop3_session(host: str, port: int, user: MailUser, fn: Callable[[poplib.POP3], Any]) -> Any:
    p = poplib.POP3(host, port, timeout=30)
    try:
        p.user(user.name)
        p.pass_(user.password)
        return fn(p)
    finally:
        try:
            p.quit()
        except (poplib.error_proto, OSError):
            p.close()


def snapshot(p: poplib.POP3) -> dict[str, Any]:
    count, octets = p.stat()
    _, listing, _ = p.list()
    _, uidls, _ = p.uidl()
    bodies = []
    tops = []
    for n in range(1, count + 1):
        _, lines, _ = p.retr(n)
        bodies.append(b"\r\n".join(lines))
        for k in (0, 1, 3, 99999999):
            _, lines, _ = p.top(n, k)
            tops.append((n, k, b"\r\n".join(lines)))
    return {"stat": (count, octets), "list": listing, "uidl": uidls, "bodies": bodies, "tops": tops}


async def test_differential_against_dovecot_pop3(
    gateway: Bound, dovecot: Dovecot, mail_user: MailUser
) -> None:
    messages = [*corpus.tricky_messages(), corpus.big_message(10 * 1024 * 1024)]
    dovecot.append(mail_user.name, mail_user.password, messages)
    ours = await in_thread(lambda: pop3_session(gateway.host, gateway.port, mail_user, snapshot))
    theirs = await in_thread(lambda: pop3_session(dovecot.host, dovecot.pop3_port, mail_user, snapshot))
    assert ours["stat"] == theirs["stat"]
    assert ours["stat"][0] == len(messages)
    assert ours["list"] == theirs["list"]
    assert ours["uidl"] == theirs["uidl"]  # the same UIDL strings: a site coming from Dovecot sees no change
    for i, (a, b) in enumerate(zip(ours["bodies"], theirs["bodies"], strict=True)):
        assert a == b, f"RETR {i + 1} differs"
    assert ours["tops"] == theirs["tops"]


@pytest.mark.parametrize("tls", ["starttls", "implicit"])
async def test_tls_upstreams(nursery: trio.Nursery, dovecot: Dovecot, mail_user: MailUser, tls: str) -> None:
    msgs = corpus.tricky_messages()[:2]
    dovecot.append(mail_user.name, mail_user.password, msgs)
    server = make_server(dovecot, tls=tls)
    [bound] = await nursery.start(server.serve)

    def fn(p: poplib.POP3) -> tuple[int, bytes]:
        _, lines, _ = p.retr(1)
        return p.stat()[0], b"\r\n".join(lines) + b"\r\n"

    count, body = await in_thread(lambda: pop3_session(bound.host, bound.port, mail_user, fn))
    assert count == 2
    assert body == msgs[0]
    server.drain()


async def test_starttls_upstream_refuses_an_untrusted_certificate(
    nursery: trio.Nursery, dovecot: Dovecot, mail_user: MailUser
) -> None:
    settings = ImapSettings(dovecot.host, dovecot.imap_port, "starttls")  # no CA: the test CA is not trusted
    cfg = Config(listen=(ListenConfig("127.0.0.1:0"),))
    server = Server(cfg, ImapBackend(settings))
    [bound] = await nursery.start(server.serve)
    with pytest.raises(poplib.error_proto, match=r"SYS/TEMP"):
        await in_thread(lambda: pop3_session(bound.host, bound.port, mail_user, lambda p: p.stat()))
    server.drain()


async def test_wrong_password_gives_auth(gateway: Bound, mail_user: MailUser) -> None:
    bad = MailUser(mail_user.name, "wrong")
    with pytest.raises(poplib.error_proto, match=r"-ERR \[AUTH\]"):
        await in_thread(lambda: pop3_session(gateway.host, gateway.port, bad, lambda p: p.stat()))


async def test_unreachable_upstream_gives_sys_temp_quickly(
    nursery: trio.Nursery, dovecot: Dovecot, mail_user: MailUser
) -> None:
    proxy = RecordingProxy("127.0.0.1", 1)  # nothing listens on port 1
    port = await nursery.start(proxy.serve)
    server = make_server(dovecot, port=port)
    [bound] = await nursery.start(server.serve)
    start = trio.current_time()
    with pytest.raises(poplib.error_proto, match=r"-ERR \[SYS/TEMP\]"):
        await in_thread(lambda: pop3_session(bound.host, bound.port, mail_user, lambda p: p.stat()))
    assert trio.current_time() - start < 5
    server.drain()


def imap_for(dovecot: Dovecot, user: MailUser) -> imaplib.IMAP4:
    m = imaplib.IMAP4(dovecot.host, dovecot.imap_port)
    m.login(user.name, user.password)
    return m


def uids_in(dovecot: Dovecot, user: MailUser, mailbox: str = "INBOX") -> list[int]:
    m = imap_for(dovecot, user)
    try:
        typ, _ = m.select(mailbox)
        if typ != "OK":
            return []
        _, data = m.uid("SEARCH", "ALL")
        return [int(x) for x in data[0].split()]
    finally:
        m.logout()


async def test_dele_quit_removes_exactly_the_marked_and_keeps_another_clients_deleted(
    gateway: Bound, dovecot: Dovecot, mail_user: MailUser
) -> None:
    uids = dovecot.append(mail_user.name, mail_user.password, corpus.sized_messages(5, 2000))
    # another IMAP client flags message 5 \Deleted and does not expunge
    m = imap_for(dovecot, mail_user)
    m.select("INBOX")
    m.uid("STORE", str(uids[4]), "+FLAGS.SILENT", r"(\Deleted)")
    m.logout()

    def fn(p: poplib.POP3) -> None:
        p.dele(2)
        p.dele(4)

    await in_thread(lambda: pop3_session(gateway.host, gateway.port, mail_user, fn))
    assert uids_in(dovecot, mail_user) == [uids[0], uids[2], uids[4]]


async def test_dele_then_dropped_connection_removes_nothing(
    served: tuple[Server, Bound], dovecot: Dovecot, mail_user: MailUser
) -> None:
    server, gateway = served
    uids = dovecot.append(mail_user.name, mail_user.password, corpus.sized_messages(3, 1000))

    def fn() -> None:
        p = poplib.POP3(gateway.host, gateway.port, timeout=10)
        p.user(mail_user.name)
        p.pass_(mail_user.password)
        p.dele(1)
        p.dele(2)
        p.sock.close()  # no QUIT

    await in_thread(fn)
    await until(lambda: server.active_sessions == 0)  # the session has ended: a wrong EXPUNGE came before
    assert uids_in(dovecot, mail_user) == uids


async def test_dele_rset_quit_removes_nothing(gateway: Bound, dovecot: Dovecot, mail_user: MailUser) -> None:
    uids = dovecot.append(mail_user.name, mail_user.password, corpus.sized_messages(3, 1000))

    def fn(p: poplib.POP3) -> None:
        p.dele(1)
        p.dele(3)
        p.rset()

    await in_thread(lambda: pop3_session(gateway.host, gateway.port, mail_user, fn))
    assert uids_in(dovecot, mail_user) == uids


async def test_move_policy_moves_to_the_folder(
    nursery: trio.Nursery, dovecot: Dovecot, mail_user: MailUser
) -> None:
    uids = dovecot.append(mail_user.name, mail_user.password, corpus.sized_messages(3, 1000))
    dovecot.append(mail_user.name, mail_user.password, [], mailbox="Archive")
    server = make_server(dovecot, delete_policy="move:Archive")
    [bound] = await nursery.start(server.serve)
    await in_thread(lambda: pop3_session(bound.host, bound.port, mail_user, lambda p: p.dele(2)))
    assert uids_in(dovecot, mail_user) == [uids[0], uids[2]]
    assert len(uids_in(dovecot, mail_user, "Archive")) == 1
    server.drain()


async def test_flag_policy_hides_without_deleting(
    nursery: trio.Nursery, dovecot: Dovecot, mail_user: MailUser
) -> None:
    uids = dovecot.append(mail_user.name, mail_user.password, corpus.sized_messages(3, 1000))
    server = make_server(dovecot, delete_policy="flag:$POP3Deleted")
    [bound] = await nursery.start(server.serve)
    await in_thread(lambda: pop3_session(bound.host, bound.port, mail_user, lambda p: p.dele(1)))
    assert uids_in(dovecot, mail_user) == uids  # still there upstream
    count = await in_thread(lambda: pop3_session(bound.host, bound.port, mail_user, lambda p: p.stat()[0]))
    assert count == 2  # hidden from later POP3 listings
    server.drain()


async def test_second_session_gets_in_use(gateway: Bound, mail_user: MailUser, dovecot: Dovecot) -> None:
    dovecot.append(mail_user.name, mail_user.password, corpus.sized_messages(1, 500))

    def fn(p: poplib.POP3) -> str:
        try:
            pop3_session(gateway.host, gateway.port, mail_user, lambda q: q.stat())
        except poplib.error_proto as exc:
            return str(exc)
        return "no error"

    assert "[IN-USE]" in await in_thread(lambda: pop3_session(gateway.host, gateway.port, mail_user, fn))


async def test_mailbox_changes_during_a_session(
    gateway: Bound, dovecot: Dovecot, mail_user: MailUser
) -> None:
    uids = dovecot.append(mail_user.name, mail_user.password, corpus.sized_messages(3, 1000))

    def fn(p: poplib.POP3) -> tuple[int, str, int]:
        before = p.stat()[0]
        dovecot.append(mail_user.name, mail_user.password, corpus.sized_messages(1, 700, tag="late"))
        m = imap_for(dovecot, mail_user)
        m.select("INBOX")
        m.uid("STORE", str(uids[1]), "+FLAGS.SILENT", r"(\Deleted)")
        m.expunge()
        m.logout()
        try:
            p.retr(2)
            gone = "retrieved"
        except poplib.error_proto as exc:
            gone = str(exc)
        p.retr(3)  # the session goes on
        return before, gone, p.stat()[0]

    before, gone, after = await in_thread(lambda: pop3_session(gateway.host, gateway.port, mail_user, fn))
    assert before == 3 and after == 3  # the snapshot is fixed for the session
    assert gone.startswith("b'-ERR")
    count = await in_thread(
        lambda: pop3_session(gateway.host, gateway.port, mail_user, lambda p: p.stat()[0])
    )
    assert count == 3  # 3 - 1 expunged + 1 arrived


async def test_upstream_dying_mid_retr_never_looks_complete(
    nursery: trio.Nursery, dovecot: Dovecot, mail_user: MailUser
) -> None:
    dovecot.append(mail_user.name, mail_user.password, [corpus.big_message(2 * 1024 * 1024)])
    proxy = RecordingProxy(dovecot.host, dovecot.imap_port)
    port = await nursery.start(proxy.serve)
    proxy.cut_after_marker = b"BODY[] {"
    proxy.cut_server_after = 300_000
    server = make_server(dovecot, port=port)
    [bound] = await nursery.start(server.serve)

    def fn() -> bytes:
        p = poplib.POP3(bound.host, bound.port, timeout=30)
        p.user(mail_user.name)
        p.pass_(mail_user.password)
        p.sock.sendall(b"RETR 1\r\n")
        data = b""
        while chunk := p.sock.recv(65536):
            data += chunk
        p.close()
        return data

    data = await in_thread(fn)
    assert data.startswith(b"+OK")
    assert not data.endswith(b"\r\n.\r\n")
    assert len(data) < 2 * 1024 * 1024
    server.drain()


@pytest.mark.parametrize(
    "password",
    ['pa"ss\\word', "{5}\r\nA0001 LOGOUT", "x\r\nA1 DELETE INBOX\r\n", "p\u00e4ss w\u00f6rd " + "z" * 2000],
)
async def test_credentials_never_become_a_second_command(
    nursery: trio.Nursery, dovecot: Dovecot, mail_user: MailUser, password: str
) -> None:
    proxy = RecordingProxy(dovecot.host, dovecot.imap_port)
    port = await nursery.start(proxy.serve)
    server = make_server(dovecot, port=port)
    [bound] = await nursery.start(server.serve)
    sent_user = mail_user.name + '"{3}'

    def fn() -> str:
        import base64

        p = poplib.POP3(bound.host, bound.port, timeout=30)
        payload = base64.b64encode(b"\0" + sent_user.encode() + b"\0" + password.encode())
        try:
            p._putcmd("AUTH PLAIN")  # type: ignore[attr-defined]
            assert p._getline()[0].startswith(b"+")  # type: ignore[attr-defined]
            return p._shortcmd(payload.decode()).decode()  # type: ignore[attr-defined]
        except poplib.error_proto as exc:
            return str(exc)
        finally:
            p.close()

    reply = await in_thread(fn)
    assert "[AUTH]" in reply
    if len(password.encode()) <= 1024:
        # the proxy may record the upstream LOGOUT after the client's reply
        await until(lambda: b"LOGOUT" in b"".join(proxy.client_bytes), timeout=5)
    wire = b"".join(proxy.client_bytes)
    # parse what the gateway sent: every command line starts with one of our tags, and the strings were
    # sent as literals, so the password's CRLF and fake tags sit inside literal data only
    lines = _command_lines(wire)
    if len(password.encode()) > 1024:
        assert lines == []  # refused before anything was sent upstream
    else:
        assert [line.split(b" ", 2)[1] for line in lines] == [b"LOGIN", b"LOGOUT"]
    assert all(re.fullmatch(rb"A\d{4} [A-Z]+ .*|A\d{4} LOGOUT", line, re.DOTALL) for line in lines)
    assert b"DELETE" not in b"".join(lines)
    assert uids_in(dovecot, mail_user) == []  # INBOX still there, untouched
    server.drain()


def _command_lines(wire: bytes) -> list[bytes]:
    """Split a client->server IMAP byte stream into command lines, skipping literal data by its length."""
    out: list[bytes] = []
    pos = 0
    current = b""
    while pos < len(wire):
        nl = wire.find(b"\r\n", pos)
        assert nl >= 0, wire[pos:]
        seg = wire[pos:nl]
        pos = nl + 2
        m = re.search(rb"\{(\d+)\+?\}$", seg)
        current += seg
        if m:
            n = int(m.group(1))
            current += b"<literal %d>" % n
            pos += n
            continue
        out.append(current)
        current = b""
    return out
