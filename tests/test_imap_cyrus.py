"""The IMAP backend against the suite's Cyrus 3.6, which has OBJECTID (RFC 8474): the EMAILID key path
against a real server, with the durable UIDL store as `pop3-gateway serve` runs it."""

from __future__ import annotations

import dataclasses
import itertools
import poplib
import secrets
import tempfile
from pathlib import Path

import pytest
import trio

from gateway.backends.base import PasswordLogin
from gateway.backends.imap import ImapBackend, ImapSettings
from gateway.config import Config, ListenConfig, ServerConfig
from gateway.server import Bound, Server
from gateway.store import AsyncUidlStore
from tests.realservers import corpus
from tests.realservers.cyrus import Cyrus
from tests.realservers.dovecot import MailUser
from tests.test_imap_backend import in_thread, pop3_session

pytestmark = pytest.mark.realserver

_numbers = itertools.count(1)


@pytest.fixture
def cyrus_user(cyrus: Cyrus) -> MailUser:
    user = MailUser(f"imapc{next(_numbers)}x{secrets.token_hex(3)}", secrets.token_hex(8))
    cyrus.add_user(user.name, user.password)
    return user


def settings(cyrus: Cyrus) -> ImapSettings:
    return ImapSettings.from_url(cyrus.imap_url)


async def start(nursery: trio.Nursery, cyrus: Cyrus) -> Bound:
    cfg = Config(
        server=dataclasses.replace(ServerConfig(), upstream_timeout=10.0),
        listen=(ListenConfig("127.0.0.1:0"),),
    )
    store = AsyncUidlStore(Path(tempfile.mkdtemp(prefix="pop3gw-store-")) / "uidl.sqlite3")
    server = Server(cfg, ImapBackend(settings(cyrus)), store=store)
    [bound] = await nursery.start(server.serve)
    return bound


async def test_cyrus_offers_objectid_and_the_snapshot_keys_by_emailid(
    cyrus: Cyrus, cyrus_user: MailUser
) -> None:
    cyrus.append(cyrus_user.name, cyrus_user.password, corpus.sized_messages(2, 700))
    backend = ImapBackend(settings(cyrus))
    async with backend.open_maildrop(PasswordLogin(cyrus_user.name, cyrus_user.password)) as drop:
        assert "OBJECTID" in drop.conn.client.capabilities
        keys = [e.key for e in drop.entries]
    assert len(keys) == 2 and len(set(keys)) == 2
    assert all(k.startswith("e:M") for k in keys)  # Cyrus's EMAILID: M + 24 hex


async def test_retr_uidl_and_dele_through_cyrus_imap(
    nursery: trio.Nursery, cyrus: Cyrus, cyrus_user: MailUser
) -> None:
    messages = corpus.sized_messages(3, 900)
    uids = cyrus.append(cyrus_user.name, cyrus_user.password, messages)
    bound = await start(nursery, cyrus)

    def read(p: poplib.POP3) -> tuple[tuple[int, int], list[bytes], list[bytes]]:
        stat = p.stat()
        bodies = [b"\r\n".join(p.retr(n)[1]) + b"\r\n" for n in (1, 2, 3)]
        uidls = p.uidl()[1]
        p.dele(2)
        return stat, bodies, uidls

    stat, bodies, uidls = await in_thread(lambda: pop3_session(bound.host, bound.port, cyrus_user, read))
    assert stat == (3, sum(len(m) for m in messages))
    assert bodies == [corpus.pop3_view(m) for m in messages]
    assert len({u.split()[1] for u in uidls}) == 3
    assert cyrus.imap_uids(cyrus_user.name, cyrus_user.password) == [uids[0], uids[2]]


async def test_byte_identical_copies_get_two_uidls_stable_across_sessions(
    nursery: trio.Nursery, cyrus: Cyrus, cyrus_user: MailUser
) -> None:
    """Cyrus gives both copies one EMAILID; POP3 must still list two messages with two UIDLs, and keep
    them: the first copy keeps its UIDL when the second arrives, and both keep theirs afterwards."""
    message = corpus.sized_message(1, 800, tag="twice")
    bound = await start(nursery, cyrus)

    def uidls(p: poplib.POP3) -> list[str]:
        return [line.split()[1].decode() for line in p.uidl()[1]]

    async def listing() -> list[str]:
        return list(await in_thread(lambda: pop3_session(bound.host, bound.port, cyrus_user, uidls)))

    cyrus.append(cyrus_user.name, cyrus_user.password, [message])
    [first] = await listing()
    cyrus.append(cyrus_user.name, cyrus_user.password, [message])  # delivered again, byte for byte
    two = await listing()
    assert len(two) == 2 and len(set(two)) == 2
    assert two[0] == first
    assert await listing() == two
    cyrus.append(cyrus_user.name, cyrus_user.password, [message])
    three = await listing()
    assert three[:2] == two and len(set(three)) == 3
    assert await listing() == three
