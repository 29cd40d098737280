"""Migration from an old POP3 server with `pop3-gateway uidl import`: keep-mode clients that already
downloaded everything from the old server download nothing from the gateway, and the gateway's UIDL list
is the old server's, in the old order."""

from __future__ import annotations

import dataclasses
import poplib
import random
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio

from gateway.backends.imap import ImapBackend, ImapSettings
from gateway.config import Config, ListenConfig, ServerConfig
from gateway.server import Server
from gateway.store import AsyncUidlStore
from tests.realservers import corpus
from tests.realservers.clients import run_fetchmail, run_getmail, run_mpop
from tests.realservers.dovecot import Dovecot, MailUser, start_dovecot

pytestmark = [pytest.mark.realserver, pytest.mark.client]

CLIENTS: dict[str, Callable[..., int]] = {
    "fetchmail": run_fetchmail,
    "mpop": run_mpop,
    "getmail": run_getmail,
}


@pytest.fixture(scope="module")
def old_server() -> Iterator[Dovecot]:
    """The old POP3 server: a second, separate Dovecot on Maildir."""
    root = Path(tempfile.mkdtemp(prefix="pop3gw-old-"))
    server = start_dovecot(root)
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


def old_uidls(old: Dovecot, user: MailUser) -> list[bytes]:
    p = poplib.POP3(old.host, old.pop3_port, timeout=30)
    p.user(user.name)
    p.pass_(user.password)
    lines = list(p.uidl()[1])
    p.quit()
    return lines


def uidl_import(
    state: Path, dovecot: Dovecot, old: Dovecot, user: MailUser, *extra: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway",
            "uidl",
            "import",
            "--account",
            user.name,
            "--from",
            f"pop3://{user.name}@{old.host}:{old.pop3_port}",
            "--password-stdin",
            "--state-dir",
            str(state),
            "--upstream",
            f"imap://{dovecot.host}:{dovecot.imap_port}",
            *extra,
        ],
        input=user.password + "\n",
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def test_clients_download_nothing_after_migration(
    nursery: trio.Nursery, dovecot: Dovecot, old_server: Dovecot, mail_user: MailUser, tmp_path: Path
) -> None:
    messages = [*corpus.tricky_messages(), *corpus.sized_messages(6, 3000)]
    old_server.add_user(mail_user.name, mail_user.password)
    old_server.append(mail_user.name, mail_user.password, messages)
    shuffled = messages[:]
    random.Random(4).shuffle(shuffled)
    dovecot.append(mail_user.name, mail_user.password, shuffled)  # the same mail, another order and UIDs

    work = {name: tmp_path / name for name in CLIENTS}

    def run_all(port: int) -> dict[str, int]:
        return {
            name: run(old_server.host, port, mail_user.name, mail_user.password, work[name])
            for name, run in CLIENTS.items()
        }

    first = await trio.to_thread.run_sync(run_all, old_server.pop3_port)
    assert first == dict.fromkeys(CLIENTS, len(messages))

    state = tmp_path / "state"
    dry = await trio.to_thread.run_sync(
        lambda: uidl_import(state, dovecot, old_server, mail_user, "--dry-run")
    )
    assert dry.returncode == 0, dry.stderr
    assert "dry run: nothing written" in dry.stdout
    assert not (state / "uidl.sqlite3").exists()
    done = await trio.to_thread.run_sync(lambda: uidl_import(state, dovecot, old_server, mail_user))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"matched:                  {len(messages)} " in done.stdout
    assert "unmatched on old server:  0" in done.stdout

    store = AsyncUidlStore(state / "uidl.sqlite3")
    await store.open()
    cfg = Config(
        server=dataclasses.replace(ServerConfig(), state_dir=str(state)),
        listen=(ListenConfig("127.0.0.1:0"),),
    )
    server = Server(cfg, ImapBackend(ImapSettings(dovecot.host, dovecot.imap_port, "none")), store=store)
    [bound] = await nursery.start(server.serve)
    # the switch: clients now reach the gateway where the old server was (getmail keys its memory by port)
    for f in work["getmail"].glob(f"oldmail-*-{old_server.pop3_port}-*"):
        f.rename(f.with_name(f.name.replace(f"-{old_server.pop3_port}-", f"-{bound.port}-")))

    def gateway_uidls() -> list[bytes]:
        p = poplib.POP3(bound.host, bound.port, timeout=30)
        p.user(mail_user.name)
        p.pass_(mail_user.password)
        lines = list(p.uidl()[1])
        p.quit()
        return lines

    assert await trio.to_thread.run_sync(gateway_uidls) == old_uidls(
        old_server, mail_user
    )  # same UIDLs, same order
    second = await trio.to_thread.run_sync(run_all, bound.port)
    assert second == dict.fromkeys(CLIENTS, 0)
    server.drain()
    with trio.fail_after(10):
        await server.drained.wait()
    await store.aclose()

    show = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway",
            "uidl",
            "show",
            "--account",
            mail_user.name,
            "--state-dir",
            str(state),
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert all(line.split()[1].decode() in show.stdout for line in old_uidls(old_server, mail_user))
    export = subprocess.run(
        [sys.executable, "-m", "gateway", "uidl", "export", "--format", "csv", "--state-dir", str(state)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert export.stdout.startswith("mailbox,account,uidl,key,size,state,order")
    assert export.stdout.count("\n") == len(messages) + 1


async def test_a_message_missing_on_one_side_is_named_in_the_report(
    dovecot: Dovecot, old_server: Dovecot, mail_user: MailUser, tmp_path: Path
) -> None:
    messages = corpus.sized_messages(4, 2000, tag="mig")
    old_server.add_user(mail_user.name, mail_user.password)
    old_server.append(mail_user.name, mail_user.password, messages)
    extra = corpus.sized_message(9, 2500, tag="only-upstream")
    dovecot.append(mail_user.name, mail_user.password, [*messages[:3], extra])  # messages[3] never arrived
    missing_uidl = old_uidls(old_server, mail_user)[3].split()[1].decode()
    result = await trio.to_thread.run_sync(
        lambda: uidl_import(tmp_path / "s", dovecot, old_server, mail_user)
    )
    assert result.returncode == 3, result.stdout + result.stderr  # imported, but with something to look at
    assert "matched:                  3 " in result.stdout
    assert "unmatched on old server:  1" in result.stdout
    assert "unmatched upstream:       1" in result.stdout
    assert f"only on old server: #4 uidl={missing_uidl}" in result.stdout
    assert corpus.message_id(messages[3]).decode() in result.stdout
    assert "only upstream: id=4 size=2500" in result.stdout
