"""Durable UIDLs against a real Dovecot, with real keep-mode clients: a UIDVALIDITY reset, an expunge and
re-append of the same messages, and a gateway restart make no client download anything twice. A SIGKILL
mid-session changes no UIDL and leaves the store intact."""

from __future__ import annotations

import dataclasses
import os
import poplib
import signal
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from gateway.backends.imap import ImapBackend, ImapSettings
from gateway.config import Config, ListenConfig, ServerConfig
from gateway.server import Bound, Server
from gateway.store import AsyncUidlStore
from tests.gwproc import SpawnedGateway, spawn_gateway
from tests.realservers import corpus
from tests.realservers.clients import run_fetchmail, run_getmail, run_mpop
from tests.realservers.dovecot import Dovecot, MailUser

pytestmark = pytest.mark.realserver

CLIENTS: dict[str, Callable[..., int]] = {
    "fetchmail": run_fetchmail,
    "mpop": run_mpop,
    "getmail": run_getmail,
}


async def start_gateway(
    nursery: trio.Nursery, dovecot: Dovecot, state: Path, port: int = 0
) -> tuple[Server, Bound]:
    store = AsyncUidlStore(state / "uidl.sqlite3")
    await store.open()
    cfg = Config(
        server=dataclasses.replace(ServerConfig(), upstream_timeout=20.0, state_dir=str(state)),
        listen=(ListenConfig(f"127.0.0.1:{port}"),),
    )
    server = Server(cfg, ImapBackend(ImapSettings(dovecot.host, dovecot.imap_port, "none")), store=store)
    [bound] = await nursery.start(server.serve)
    return server, bound


async def stop_gateway(server: Server) -> None:
    server.drain()
    with trio.fail_after(10):
        await server.drained.wait()
    assert server.store is not None
    await server.store.aclose()


def uidl_list(bound: Bound, user: MailUser) -> list[bytes]:
    p = poplib.POP3(bound.host, bound.port, timeout=30)
    p.user(user.name)
    p.pass_(user.password)
    _, lines, _ = p.uidl()
    p.quit()
    return list(lines)


@pytest.mark.client
@pytest.mark.parametrize("client", list(CLIENTS))
async def test_keep_mode_clients_download_nothing_twice_across_renumbering_and_restart(
    nursery: trio.Nursery,
    dovecot: Dovecot,
    mail_user: MailUser,
    tmp_path: Path,
    client: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    messages = corpus.tricky_messages()
    dovecot.append(mail_user.name, mail_user.password, messages)
    server, bound = await start_gateway(nursery, dovecot, tmp_path / "state")
    work = tmp_path / "client"

    async def fetch() -> int:
        run = CLIENTS[client]
        return await trio.to_thread.run_sync(
            lambda: run(bound.host, bound.port, mail_user.name, mail_user.password, work)
        )

    assert await fetch() == len(messages)
    before = await trio.to_thread.run_sync(uidl_list, bound, mail_user)

    # 1. UIDVALIDITY reset: every upstream UID changes
    status = dovecot.mailbox_status(mail_user.name)
    dovecot.set_uidvalidity(mail_user.name, status["uidvalidity"] + 1000)
    caplog.clear()
    assert await fetch() == 0
    assert "upstream renumbered" in caplog.text
    assert f"matched={len(messages)} unmatched_new=0" in caplog.text
    assert await trio.to_thread.run_sync(uidl_list, bound, mail_user) == before

    # 2. the same messages expunged and appended again (new UIDs, same UIDVALIDITY)
    dovecot.expunge_all(mail_user.name)
    dovecot.append(mail_user.name, mail_user.password, messages)
    assert await fetch() == 0

    # 3. a gateway restart on the same state directory (and port: getmail keys its memory by port)
    await stop_gateway(server)
    server, bound = await start_gateway(nursery, dovecot, tmp_path / "state", bound.port)
    assert await fetch() == 0
    assert await trio.to_thread.run_sync(uidl_list, bound, mail_user) == before

    # and new mail still arrives, exactly once
    dovecot.append(mail_user.name, mail_user.password, [corpus.sized_message(7, 4000, tag="new")])
    assert await fetch() == 1
    assert await fetch() == 0
    await stop_gateway(server)


async def test_unmatched_messages_get_new_uidls_and_old_ones_are_never_reused(
    nursery: trio.Nursery, dovecot: Dovecot, mail_user: MailUser, tmp_path: Path
) -> None:
    msgs = corpus.sized_messages(3, 1500)
    dovecot.append(mail_user.name, mail_user.password, msgs)
    server, bound = await start_gateway(nursery, dovecot, tmp_path / "state")

    def read_all(p: poplib.POP3) -> None:
        for n in range(1, 4):
            p.retr(n)

    def session() -> list[bytes]:
        p = poplib.POP3(bound.host, bound.port, timeout=30)
        p.user(mail_user.name)
        p.pass_(mail_user.password)
        read_all(p)
        lines = p.uidl()[1]
        p.quit()
        return list(lines)

    first = await trio.to_thread.run_sync(session)
    dovecot.expunge_all(mail_user.name)
    # two of the same messages come back, one different message of the same size arrives
    other = corpus.sized_message(99, 1500, tag="other")
    dovecot.append(mail_user.name, mail_user.password, [msgs[0], msgs[2], other])
    second = await trio.to_thread.run_sync(uidl_list, bound, mail_user)
    old = {line.split()[1] for line in first}
    new = [line.split()[1] for line in second]
    assert new[0] in old and new[1] in old
    assert new[2] not in old  # a different message never takes an old UIDL
    await stop_gateway(server)


def _spawn(state: Path, dovecot: Dovecot) -> SpawnedGateway:
    return spawn_gateway(state, f"imap://{dovecot.host}:{dovecot.imap_port}")


def test_sigkill_mid_session_changes_no_uidl_and_deletes_nothing(
    dovecot: Dovecot, mail_user: MailUser, tmp_path: Path
) -> None:
    uids = dovecot.append(mail_user.name, mail_user.password, corpus.sized_messages(20, 800))
    state = tmp_path / "state"
    gateway = _spawn(state, dovecot)
    proc = gateway.proc
    try:
        before = uidl_list(Bound(gateway.host, gateway.port, "none"), mail_user)
        # new mail arrives, a session sees it (UIDLs assigned), marks deletions, and the gateway dies
        dovecot.append(mail_user.name, mail_user.password, corpus.sized_messages(5, 900, tag="late"))
        p = poplib.POP3(gateway.host, gateway.port, timeout=30)
        p.user(mail_user.name)
        p.pass_(mail_user.password)
        seen = list(p.uidl()[1])
        p.dele(1)
        p.dele(2)
        p.retr(3)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        p.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    db = sqlite3.connect(state / "uidl.sqlite3")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db.close()
    gateway = _spawn(state, dovecot)  # on a new port: the client's UIDL memory is by user, not by port
    try:
        after = uidl_list(Bound(gateway.host, gateway.port, "none"), mail_user)
    finally:
        gateway.stop()
    assert after[: len(before)] == before
    assert after == seen  # including the UIDLs given just before the kill
    assert len(after) == 25
    m = dovecot.mailbox_status(mail_user.name)
    assert m["messages"] == 25  # the marked deletions died with the session
    assert uids


async def test_renumbering_reads_all_headers_in_one_round_trip(
    nursery: trio.Nursery, dovecot: Dovecot, mail_user: MailUser, tmp_path: Path
) -> None:
    from tests.tcpproxy import RecordingProxy

    dovecot.append(mail_user.name, mail_user.password, corpus.sized_messages(40, 1200))
    proxy = RecordingProxy(dovecot.host, dovecot.imap_port)
    port = await nursery.start(proxy.serve)
    store = AsyncUidlStore(tmp_path / "uidl.sqlite3")
    await store.open()
    cfg = Config(listen=(ListenConfig("127.0.0.1:0"),))
    server = Server(cfg, ImapBackend(ImapSettings(dovecot.host, port, "none")), store=store)
    [bound] = await nursery.start(server.serve)

    def read_all() -> list[bytes]:
        p = poplib.POP3(bound.host, bound.port, timeout=30)
        p.user(mail_user.name)
        p.pass_(mail_user.password)
        for n in range(1, 41):
            p.retr(n)
        lines = list(p.uidl()[1])
        p.quit()
        return lines

    before = await trio.to_thread.run_sync(read_all)
    dovecot.set_uidvalidity(mail_user.name, dovecot.mailbox_status(mail_user.name)["uidvalidity"] + 77)
    after = await trio.to_thread.run_sync(uidl_list, bound, mail_user)
    assert after == before
    wire = proxy.client_bytes[-1]
    assert wire.count(b"BODY.PEEK[HEADER]") == 1
    assert wire.count(b"UID FETCH") == 2  # the snapshot and the one header fetch
    server.drain()
    with trio.fail_after(10):
        await server.drained.wait()
    await store.aclose()
