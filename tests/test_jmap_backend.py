"""The gateway on a real Cyrus JMAP upstream (started by the suite), driven by real POP3 clients."""

from __future__ import annotations

import dataclasses
import itertools
import poplib
import re
import secrets
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from gateway.backends.jmap import JmapBackend, JmapSettings
from gateway.config import Config, ListenConfig, ServerConfig
from gateway.server import Bound, Server
from gateway.store import AsyncUidlStore
from tests.realservers import corpus
from tests.realservers.clients import (
    curl_pop3,
    delivered_messages,
    pop3_url,
    run_fetchmail,
    run_getmail,
    run_mpop,
)
from tests.realservers.cyrus import MAX_OBJECTS_IN_GET, Cyrus
from tests.realservers.dovecot import MailUser
from tests.tcpproxy import RecordingProxy
from tests.waits import until

pytestmark = pytest.mark.realserver

_numbers = itertools.count(1)
POLICIES = ["expunge", "move:Archive", "flag:$POP3Deleted"]


@pytest.fixture
def user(cyrus: Cyrus, request: pytest.FixtureRequest) -> MailUser:
    """A fresh Cyrus user with an empty INBOX, named after the test."""
    slug = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:30].strip("-")
    mail_user = MailUser(f"j{next(_numbers)}-{slug}", secrets.token_hex(8))
    cyrus.add_user(mail_user.name, mail_user.password)
    return mail_user


@dataclasses.dataclass
class Gateway:
    server: Server
    backend: JmapBackend
    bound: Bound

    @property
    def host(self) -> str:
        return self.bound.host

    @property
    def port(self) -> int:
        return self.bound.port


@pytest.fixture
async def start_gateway(
    nursery: trio.Nursery, cyrus: Cyrus, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Callable[..., Any]]:
    """Start gateways onto the test Cyrus (or `url`), with the durable UIDL store as `serve` has it;
    each is drained and its backend and store closed at the end."""
    started: list[Gateway] = []
    stores: list[AsyncUidlStore] = []

    async def start(url: str | None = None, *, store_dir: Path | None = None, **settings: Any) -> Gateway:
        backend = JmapBackend(JmapSettings.from_url(url or cyrus.jmap_url, timeout=10.0, **settings))
        cfg = Config(
            server=dataclasses.replace(ServerConfig(), upstream_timeout=10.0),
            listen=(ListenConfig("127.0.0.1:0"),),
        )
        store = AsyncUidlStore((store_dir or tmp_path_factory.mktemp("store")) / "uidl.sqlite3")
        await store.open()
        stores.append(store)
        server = Server(cfg, backend, store=store)
        [bound] = await nursery.start(server.serve)
        gateway = Gateway(server, backend, bound)
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        gateway.server.drain()
    with trio.fail_after(10):
        for gateway in started:
            await gateway.server.drained.wait()
            await gateway.backend.aclose()
        for store in stores:
            await store.aclose()


@pytest.fixture
async def gateway(start_gateway: Callable[..., Any]) -> Gateway:
    gw: Gateway = await start_gateway()
    return gw


async def in_thread(fn: Callable[[], Any]) -> Any:
    return await trio.to_thread.run_sync(fn)


def pop3_session(gw: Gateway, user: MailUser, fn: Callable[[poplib.POP3], Any]) -> Any:
    p = poplib.POP3(gw.host, gw.port, timeout=30)
    try:
        p.user(user.name)
        p.pass_(user.password)
        return fn(p)
    finally:
        try:
            p.quit()
        except (poplib.error_proto, OSError):
            p.close()


def retr(p: poplib.POP3, n: int) -> bytes:
    _, lines, _ = p.retr(n)
    return b"\r\n".join(lines) + b"\r\n"


def top_view(raw: bytes, lines: int) -> bytes:
    """What TOP n `lines` reassembles to: the header, the blank line and the first body lines."""
    text = corpus.pop3_view(raw)
    head, sep, body = text.partition(b"\r\n\r\n")
    if not sep:
        return text
    return head + sep + b"".join(line + b"\r\n" for line in body.split(b"\r\n")[:-1][:lines])


def email_ids(cyrus: Cyrus, user: MailUser, mailbox_role: str = "inbox") -> list[str]:
    """The Email ids in the user's inbox, by the stdlib (not the gateway's JMAP code), oldest first."""
    mailboxes = cyrus.jmap(user.name, user.password, [["Mailbox/get", {"accountId": user.name}, "m"]])
    [inbox] = [m for m in mailboxes[0][1]["list"] if m["role"] == mailbox_role]  # type: ignore[index]
    query = {
        "accountId": user.name,
        "filter": {"inMailbox": inbox["id"]},
        "sort": [{"property": "receivedAt", "isAscending": True}],
    }
    result = cyrus.jmap(user.name, user.password, [["Email/query", query, "q"]])
    return list(result[0][1]["ids"])  # type: ignore[index,call-overload]


# ------------------------------------------------------------------ bytes and listings


async def test_retr_top_list_and_uidl_carry_the_appended_bytes(
    gateway: Gateway, cyrus: Cyrus, user: MailUser
) -> None:
    messages = [*corpus.tricky_messages(), corpus.big_message(3 * 1024 * 1024)]
    cyrus.append(user.name, user.password, messages)

    def fn(p: poplib.POP3) -> dict[str, Any]:
        count, octets = p.stat()
        _, listing, _ = p.list()
        _, uidls, _ = p.uidl()
        bodies = [retr(p, n) for n in range(1, count + 1)]
        tops = [b"\r\n".join(p.top(n, 1)[1]) + b"\r\n" for n in range(1, count + 1)]
        return {"stat": (count, octets), "list": listing, "uidl": uidls, "bodies": bodies, "tops": tops}

    out = await in_thread(lambda: pop3_session(gateway, user, fn))
    sizes = [corpus.pop3_size(m) for m in messages]
    assert out["stat"] == (len(messages), sum(sizes))
    assert out["list"] == [b"%d %d" % (n, s) for n, s in enumerate(sizes, start=1)]
    for n, (got, raw) in enumerate(zip(out["bodies"], messages, strict=True), start=1):
        assert got == corpus.pop3_view(raw), f"RETR {n} differs"
    assert out["tops"] == [top_view(m, 1) for m in messages]
    ids = email_ids(cyrus, user)
    assert out["uidl"] == [b"%d %s" % (n, i.encode()) for n, i in enumerate(ids, start=1)]


async def test_a_mailbox_larger_than_one_page_lists_every_message_in_order(
    start_gateway: Callable[..., Any], cyrus: Cyrus, user: MailUser
) -> None:
    count = 2 * MAX_OBJECTS_IN_GET + 37  # three Email/get batches at the server's own limit
    messages = corpus.sized_messages(count, 400)
    cyrus.append(user.name, user.password, messages)
    ids = email_ids(cyrus, user)
    for page_size in (1024, 7):  # capped by the server's maxObjectsInGet; and smaller than it
        gw = await start_gateway(page_size=page_size)

        def fn(p: poplib.POP3) -> tuple[int, list[bytes], bytes, bytes]:
            _, uidls, _ = p.uidl()
            return p.stat()[0], uidls, retr(p, 1), retr(p, count)

        n, uidls, first, last = await in_thread(lambda gw=gw: pop3_session(gw, user, fn))
        assert n == count
        assert [u.split()[1].decode() for u in uidls] == ids
        assert first == messages[0]
        assert last == messages[-1]


@pytest.mark.parametrize("policy", POLICIES)
async def test_byte_identical_duplicates_are_one_message_and_deleting_it_takes_both_copies(
    start_gateway: Callable[..., Any], cyrus: Cyrus, user: MailUser, policy: str
) -> None:
    twin = corpus.sized_message(1, 600, tag="twin")
    other = corpus.sized_message(2, 600, tag="other")
    uids = cyrus.append(user.name, user.password, [twin, twin, other])
    cyrus.append(user.name, user.password, [], mailbox="Archive")
    assert len(cyrus.imap_uids(user.name, user.password)) == 3
    gw = await start_gateway(delete_policy=policy)

    def fn(p: poplib.POP3) -> tuple[int, bytes]:
        count = p.stat()[0]
        body = retr(p, 1)
        p.dele(1)
        return count, body

    count, body = await in_thread(lambda: pop3_session(gw, user, fn))
    assert count == 2  # Cyrus shows the two IMAP copies as one Email
    assert body == twin
    inbox, archive, flags = _state(cyrus, user)
    if policy == "expunge":
        assert inbox == [uids[2]]  # both copies expunged
    elif policy.startswith("move:"):
        assert inbox == [uids[2]]
        assert len(archive) == 1  # Cyrus keeps one copy in the target
    else:
        assert inbox == uids
        assert {u for u, f in flags.items() if "$pop3deleted" in f} == {uids[0], uids[1]}  # both flagged
    count = await in_thread(lambda: pop3_session(gw, user, lambda p: p.stat()[0]))
    assert count == 1


# ------------------------------------------------------------------ DELE, RSET, QUIT, drops, policies


def _state(cyrus: Cyrus, user: MailUser) -> tuple[list[int], list[int], dict[int, set[str]]]:
    return (
        cyrus.imap_uids(user.name, user.password),
        cyrus.imap_uids(user.name, user.password, "Archive"),
        cyrus.imap_flags(user.name, user.password),
    )


@pytest.mark.parametrize("policy", POLICIES)
async def test_dele_quit_applies_the_policy_to_exactly_the_marked(
    start_gateway: Callable[..., Any], cyrus: Cyrus, user: MailUser, policy: str
) -> None:
    uids = cyrus.append(user.name, user.password, corpus.sized_messages(5, 900))
    cyrus.append(user.name, user.password, [], mailbox="Archive")
    gw = await start_gateway(delete_policy=policy)

    def fn(p: poplib.POP3) -> None:
        p.dele(2)
        p.dele(4)

    await in_thread(lambda: pop3_session(gw, user, fn))
    inbox, archive, flags = _state(cyrus, user)
    kept = [uids[0], uids[2], uids[4]]
    if policy == "expunge":
        assert inbox == kept
        assert archive == []
    elif policy.startswith("move:"):
        assert inbox == kept
        assert len(archive) == 2
    else:
        assert inbox == uids  # still there upstream, flagged
        assert {u for u, f in flags.items() if "$pop3deleted" in f} == {uids[1], uids[3]}
    count = await in_thread(lambda: pop3_session(gw, user, lambda p: p.stat()[0]))
    assert count == 3  # every policy hides them from later sessions


@pytest.mark.parametrize("policy", POLICIES)
async def test_dele_rset_quit_changes_nothing(
    start_gateway: Callable[..., Any], cyrus: Cyrus, user: MailUser, policy: str
) -> None:
    cyrus.append(user.name, user.password, corpus.sized_messages(3, 700))
    cyrus.append(user.name, user.password, [], mailbox="Archive")
    before = _state(cyrus, user)
    gw = await start_gateway(delete_policy=policy)

    def fn(p: poplib.POP3) -> None:
        p.dele(1)
        p.dele(3)
        p.rset()

    await in_thread(lambda: pop3_session(gw, user, fn))
    assert _state(cyrus, user) == before


@pytest.mark.parametrize("policy", POLICIES)
async def test_dele_then_a_dropped_connection_changes_nothing(
    start_gateway: Callable[..., Any], cyrus: Cyrus, user: MailUser, policy: str
) -> None:
    cyrus.append(user.name, user.password, corpus.sized_messages(3, 700))
    cyrus.append(user.name, user.password, [], mailbox="Archive")
    before = _state(cyrus, user)
    gw = await start_gateway(delete_policy=policy)

    def fn() -> None:
        p = poplib.POP3(gw.host, gw.port, timeout=10)
        p.user(user.name)
        p.pass_(user.password)
        p.dele(1)
        p.dele(2)
        p.sock.close()  # no QUIT

    await in_thread(fn)
    await until(lambda: gw.server.active_sessions == 0, timeout=5)  # the session has ended, without QUIT
    assert _state(cyrus, user) == before


async def test_move_to_a_missing_mailbox_fails_the_quit_and_moves_nothing(
    start_gateway: Callable[..., Any], cyrus: Cyrus, user: MailUser
) -> None:
    uids = cyrus.append(user.name, user.password, corpus.sized_messages(2, 700))
    gw = await start_gateway(delete_policy="move:Nowhere")

    def fn() -> str:
        p = poplib.POP3(gw.host, gw.port, timeout=10)
        p.user(user.name)
        p.pass_(user.password)
        p.dele(1)
        try:
            return p.quit().decode()
        except poplib.error_proto as exc:
            return str(exc)
        finally:
            p.close()

    assert "[SYS/TEMP]" in await in_thread(fn)
    assert cyrus.imap_uids(user.name, user.password) == uids


async def test_the_snapshot_is_fixed_for_the_session(gateway: Gateway, cyrus: Cyrus, user: MailUser) -> None:
    messages = corpus.sized_messages(3, 800)
    cyrus.append(user.name, user.password, messages)
    ids = email_ids(cyrus, user)

    def fn(p: poplib.POP3) -> tuple[int, str, bytes, int]:
        before = p.stat()[0]
        cyrus.append(user.name, user.password, corpus.sized_messages(1, 500, tag="late"))
        cyrus.jmap(
            user.name, user.password, [["Email/set", {"accountId": user.name, "destroy": [ids[1]]}, "d"]]
        )
        try:
            got = retr(p, 2).decode(errors="replace")
        except poplib.error_proto as exc:
            got = str(exc)
        return before, got, retr(p, 3), p.stat()[0]

    before, second, third, after = await in_thread(lambda: pop3_session(gateway, user, fn))
    assert before == after == 3
    # Destroyed upstream meanwhile: Cyrus's delayed expunge keeps the blob, so RETR may still give the
    # exact bytes; otherwise it must fail cleanly. Either way the session goes on.
    assert second == messages[1].decode() or second.startswith("b'-ERR")
    assert third == messages[2]
    count = await in_thread(lambda: pop3_session(gateway, user, lambda p: p.stat()[0]))
    assert count == 3  # 3 - 1 destroyed + 1 arrived


async def test_mark_seen_sets_seen_after_a_whole_retr_only(
    start_gateway: Callable[..., Any], cyrus: Cyrus, user: MailUser
) -> None:
    uids = cyrus.append(user.name, user.password, corpus.sized_messages(2, 700))
    gw = await start_gateway(mark_seen=True)

    def fn(p: poplib.POP3) -> None:
        retr(p, 1)
        p.top(2, 0)

    await in_thread(lambda: pop3_session(gw, user, fn))
    flags = cyrus.imap_flags(user.name, user.password)
    assert "\\seen" in flags[uids[0]]
    assert "\\seen" not in flags[uids[1]]


# ------------------------------------------------------------------ auth, locks, failures


async def test_wrong_password_gives_auth(gateway: Gateway, user: MailUser) -> None:
    bad = MailUser(user.name, "wrong")
    with pytest.raises(poplib.error_proto, match=r"-ERR \[AUTH\]"):
        await in_thread(lambda: pop3_session(gateway, bad, lambda p: p.stat()))


async def test_apop_is_not_offered_and_refused_without_counting_as_a_guess(
    gateway: Gateway, user: MailUser
) -> None:
    """JMAP needs the password itself: no APOP timestamp in the greeting (fdm and others switch to APOP
    when they see one), and an APOP sent anyway is refused without reaching the upstream."""

    def fn() -> tuple[bytes, str]:
        p = poplib.POP3(gateway.host, gateway.port, timeout=10)
        try:
            welcome = p.getwelcome()
            try:
                return welcome, p._shortcmd(f"APOP {user.name} {'0' * 32}").decode()
            except poplib.error_proto as exc:
                return welcome, str(exc)
        finally:
            p.close()

    welcome, reply = await in_thread(fn)
    assert b"<" not in welcome
    assert reply.startswith("b'-ERR") and "APOP not available" in reply


async def test_second_session_gets_in_use(gateway: Gateway, cyrus: Cyrus, user: MailUser) -> None:
    cyrus.append(user.name, user.password, corpus.sized_messages(1, 500))

    def fn(p: poplib.POP3) -> str:
        try:
            pop3_session(gateway, user, lambda q: q.stat())
        except poplib.error_proto as exc:
            return str(exc)
        return "no error"

    assert "[IN-USE]" in await in_thread(lambda: pop3_session(gateway, user, fn))


async def test_unreachable_upstream_gives_sys_temp_quickly(
    nursery: trio.Nursery, start_gateway: Callable[..., Any], user: MailUser
) -> None:
    proxy = RecordingProxy("127.0.0.1", 1)  # nothing listens on port 1
    port = await nursery.start(proxy.serve)
    gw = await start_gateway(f"jmap+http://127.0.0.1:{port}/")
    start = trio.current_time()
    with pytest.raises(poplib.error_proto, match=r"-ERR \[SYS/TEMP\]"):
        await in_thread(lambda: pop3_session(gw, user, lambda p: p.stat()))
    assert trio.current_time() - start < 5


async def test_connection_cut_mid_retr_never_looks_complete(
    nursery: trio.Nursery, start_gateway: Callable[..., Any], cyrus: Cyrus, user: MailUser
) -> None:
    cyrus.append(user.name, user.password, [corpus.big_message(2 * 1024 * 1024)])
    proxy = RecordingProxy(cyrus.host, cyrus.http_port)
    port = await nursery.start(proxy.serve)
    proxy.cut_after_marker = b"Content-Type: application/octet-stream"
    proxy.cut_server_after = 300_000
    gw = await start_gateway(f"jmap+http://127.0.0.1:{port}/")

    def fn() -> bytes:
        p = poplib.POP3(gw.host, gw.port, timeout=30)
        p.user(user.name)
        p.pass_(user.password)
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


async def test_cyrus_stopped_mid_session_gives_sys_temp_and_deletes_nothing(
    gateway: Gateway, cyrus: Cyrus, user: MailUser
) -> None:
    uids = cyrus.append(user.name, user.password, corpus.sized_messages(2, 700))

    def fn() -> tuple[str, str]:
        p = poplib.POP3(gateway.host, gateway.port, timeout=30)
        p.user(user.name)
        p.pass_(user.password)
        cyrus.stop()
        try:
            try:
                retr_reply = retr(p, 1).decode(errors="replace")
            except poplib.error_proto as exc:
                retr_reply = str(exc)
            p.dele(2)
            try:
                quit_reply = p.quit().decode()
            except poplib.error_proto as exc:
                quit_reply = str(exc)
        finally:
            p.close()
        return retr_reply, quit_reply

    try:
        retr_reply, quit_reply = await in_thread(fn)
    finally:
        cyrus.restart()
    assert "[SYS/TEMP]" in retr_reply
    assert "[SYS/TEMP]" in quit_reply
    assert cyrus.imap_uids(user.name, user.password) == uids
    count = await in_thread(lambda: pop3_session(gateway, user, lambda p: p.stat()[0]))
    assert count == 2  # the gateway recovers once Cyrus is back


# ------------------------------------------------------------------ real clients


def _by_message_id(messages: list[bytes]) -> dict[bytes, bytes]:
    return {corpus.message_id(m): m for m in messages}


@pytest.mark.client
@pytest.mark.parametrize("client", ["fetchmail", "mpop", "getmail"])
async def test_keep_mode_client_fetches_once_then_only_new_mail(
    gateway: Gateway, cyrus: Cyrus, user: MailUser, client: str, tmp_path: Path
) -> None:
    run = {"fetchmail": run_fetchmail, "mpop": run_mpop, "getmail": run_getmail}[client]
    messages = corpus.tricky_messages()
    cyrus.append(user.name, user.password, messages)
    work = tmp_path / client

    def fetch() -> int:
        return run(gateway.host, gateway.port, user.name, user.password, work)

    assert await in_thread(fetch) == len(messages)
    assert await in_thread(fetch) == 0
    late = corpus.sized_message(1, 3000, tag="late")
    cyrus.append(user.name, user.password, [late])
    assert await in_thread(fetch) == 1
    delivered = []
    for raw in delivered_messages(work):
        text = corpus.normalize_crlf(raw)
        if client == "getmail":
            first, text = text.split(b"\r\n", 1)
            assert first.startswith(b"Return-Path: ")
        delivered.append(text)
    assert _by_message_id(delivered) == _by_message_id([corpus.pop3_view(m) for m in [*messages, late]])


@pytest.mark.client
async def test_curl_list_retr_uidl_top(gateway: Gateway, cyrus: Cyrus, user: MailUser) -> None:
    messages = corpus.tricky_messages()[:4]
    cyrus.append(user.name, user.password, messages)
    h, port, u, pw = gateway.host, gateway.port, user.name, user.password

    def run() -> dict[str, Any]:
        return {
            "list": curl_pop3(pop3_url(h, port), user=u, password=pw),
            "retr": [curl_pop3(pop3_url(h, port, str(n)), user=u, password=pw) for n in (1, 2, 3, 4)],
            "uidl": curl_pop3(pop3_url(h, port), "-X", "UIDL", user=u, password=pw),
            "top": curl_pop3(pop3_url(h, port), "-X", "TOP 2 0", user=u, password=pw),
        }

    out = await in_thread(run)
    listing = out["list"].decode().split("\r\n")[:-1]
    assert [int(line.split()[1]) for line in listing] == [corpus.pop3_size(m) for m in messages]
    assert out["retr"] == [corpus.pop3_view(m) for m in messages]
    assert [line.split()[1] for line in out["uidl"].decode().split("\r\n")[:-1]] == email_ids(cyrus, user)
    assert out["top"] == messages[1][: messages[1].index(b"\r\n\r\n") + 4]


async def test_uidls_survive_a_gateway_restart_and_are_never_reused(
    start_gateway: Callable[..., Any], cyrus: Cyrus, user: MailUser, tmp_path: Path
) -> None:
    cyrus.append(user.name, user.password, corpus.sized_messages(3, 1200, tag="durable"))
    first: Gateway = await start_gateway(store_dir=tmp_path)

    def uidls(gw: Gateway) -> list[bytes]:
        return list(pop3_session(gw, user, lambda p: p.uidl()[1]))

    before = await in_thread(lambda: uidls(first))
    assert [line.split()[1].decode() for line in before] == email_ids(cyrus, user)  # keyed by the Email id
    await in_thread(lambda: pop3_session(first, user, lambda p: p.dele(2)))
    first.server.drain()
    second: Gateway = await start_gateway(store_dir=tmp_path)
    after = await in_thread(lambda: uidls(second))
    assert [line.split()[1] for line in after] == [before[0].split()[1], before[2].split()[1]]
