"""Deleting on an IMAP upstream without UIDPLUS (or MOVE), against a real Dovecot whose capabilities a
proxy hides: nothing another client flagged is ever expunged or unflagged by us, and a COPY is never
repeated by a retry."""

from __future__ import annotations

import poplib
from collections.abc import Callable

import pytest
import trio

from tests.realservers import corpus
from tests.realservers.dovecot import Dovecot, MailUser
from tests.test_imap_backend import imap_for, in_thread, pop3_session, uids_in
from tests.test_imap_edges import proxied

pytestmark = pytest.mark.realserver


def hide(*caps: bytes) -> Callable[[bytes], bytes]:
    def rewrite(data: bytes) -> bytes:
        for cap in caps:
            for end in (b" ", b"]", b"\r\n"):
                data = data.replace(b" " + cap + end, end)
        return data

    return rewrite


def flag_deleted(dovecot: Dovecot, user: MailUser, *uids: int) -> None:
    """Another IMAP client flags messages \\Deleted and does not expunge."""
    m = imap_for(dovecot, user)
    m.select("INBOX")
    for uid in uids:
        m.uid("STORE", str(uid), "+FLAGS.SILENT", r"(\Deleted)")
    m.logout()


def deleted_flags(dovecot: Dovecot, user: MailUser) -> dict[int, bool]:
    m = imap_for(dovecot, user)
    m.select("INBOX")
    _, data = m.uid("FETCH", "1:*", "(UID FLAGS)")
    m.logout()
    out = {}
    for line in data:
        assert isinstance(line, bytes)
        uid = int(line.split(b"UID ")[1].split()[0].rstrip(b")"))
        out[uid] = b"\\Deleted" in line
    return out


def dele_quit(*numbers: int) -> Callable[[poplib.POP3], str]:
    def run(p: poplib.POP3) -> str:
        for n in numbers:
            p.dele(n)
        try:
            return p._shortcmd("QUIT").decode()  # quit() would close: pop3_session does that
        except poplib.error_proto as exc:
            return str(exc)

    return run


async def session(bound: object, user: MailUser, fn: Callable[[poplib.POP3], str]) -> str:
    return str(await in_thread(lambda: pop3_session(bound.host, bound.port, user, fn)))  # type: ignore[attr-defined]


async def test_without_uidplus_expunge_is_refused_before_anything_changes(
    nursery: trio.Nursery, dovecot: Dovecot, mail_user: MailUser, caplog: pytest.LogCaptureFixture
) -> None:
    uids = dovecot.append(mail_user.name, mail_user.password, corpus.sized_messages(3, 800))
    proxy, bound = await proxied(nursery, dovecot)
    proxy.rewrite = hide(b"UIDPLUS")
    reply = await session(bound, mail_user, dele_quit(1))
    assert "-ERR [SYS/TEMP]" in reply
    assert uids_in(dovecot, mail_user) == uids
    assert not any(deleted_flags(dovecot, mail_user).values())
    sent = b"".join(proxy.client_bytes)
    assert b"STORE" not in sent and b"EXPUNGE" not in sent  # no plain EXPUNGE that could take others' mail
    assert "lacks UIDPLUS" in caplog.text  # the operator is told why, at the login


async def test_opt_in_plain_expunge_takes_back_only_the_flags_it_set(
    nursery: trio.Nursery, dovecot: Dovecot, mail_user: MailUser
) -> None:
    """Another client flagged message 1 before us, and flags message 4 while we delete 1 and 2: the
    EXPUNGE is refused, our flag on 2 is taken back, theirs on 1 and 4 stay."""
    uids = dovecot.append(mail_user.name, mail_user.password, corpus.sized_messages(4, 800))
    flag_deleted(dovecot, mail_user, uids[0])
    proxy, bound = await proxied(nursery, dovecot, expunge_without_uidplus=True)
    raced = False

    def rewrite(data: bytes) -> bytes:
        nonlocal raced
        if not raced and b"OK Store completed" in data:  # our STORE is done: the other client acts now
            raced = True
            flag_deleted(dovecot, mail_user, uids[3])
        return hide(b"UIDPLUS")(data)

    proxy.rewrite = rewrite
    reply = await session(bound, mail_user, dele_quit(1, 2))
    assert raced
    assert "-ERR [SYS/TEMP]" in reply
    assert uids_in(dovecot, mail_user) == uids
    assert deleted_flags(dovecot, mail_user) == {uids[0]: True, uids[1]: False, uids[2]: False, uids[3]: True}


async def test_move_without_move_or_uidplus_leaves_no_copy_behind_on_retries(
    nursery: trio.Nursery, dovecot: Dovecot, mail_user: MailUser
) -> None:
    uids = dovecot.append(mail_user.name, mail_user.password, corpus.sized_messages(3, 800))
    dovecot.append(mail_user.name, mail_user.password, [], mailbox="Trash")
    flag_deleted(dovecot, mail_user, uids[2])  # another client's pending deletion
    proxy, bound = await proxied(nursery, dovecot, delete_policy="move:Trash")
    proxy.rewrite = hide(b"UIDPLUS", b"MOVE")
    for _ in range(3):  # the client retries: every attempt fails the same way
        assert "-ERR [SYS/TEMP]" in await session(bound, mail_user, dele_quit(1))
    assert uids_in(dovecot, mail_user, "Trash") == []
    assert uids_in(dovecot, mail_user) == uids


async def test_copy_is_not_repeated_after_a_failed_expunge(
    nursery: trio.Nursery, dovecot: Dovecot, mail_user: MailUser
) -> None:
    """UIDPLUS but no MOVE: COPY succeeds, the STORE after it fails; the retry must not COPY again."""
    uids = dovecot.append(mail_user.name, mail_user.password, corpus.sized_messages(3, 800))
    dovecot.append(mail_user.name, mail_user.password, [], mailbox="Trash")
    proxy, bound = await proxied(nursery, dovecot, delete_policy="move:Trash")
    fail_store = True

    def rewrite(data: bytes) -> bytes:
        data = hide(b"MOVE")(data)
        return data.replace(b"OK Store completed", b"NO Store failed") if fail_store else data

    proxy.rewrite = rewrite
    assert "-ERR [SYS/TEMP]" in await session(bound, mail_user, dele_quit(1))
    assert len(uids_in(dovecot, mail_user, "Trash")) == 1
    fail_store = False
    assert "+OK" in await session(bound, mail_user, dele_quit(1))
    assert uids_in(dovecot, mail_user) == uids[1:]
    assert len(uids_in(dovecot, mail_user, "Trash")) == 1  # one copy, not one per attempt
    assert sum(c.count(b"UID COPY") for c in proxy.client_bytes) == 1


def test_the_proxy_hides_a_capability() -> None:
    caps = b"* OK [CAPABILITY IMAP4rev1 UIDPLUS MOVE] hi\r\n* CAPABILITY IMAP4rev1 MOVE UIDPLUS\r\n"
    assert hide(b"UIDPLUS", b"MOVE")(caps) == b"* OK [CAPABILITY IMAP4rev1] hi\r\n* CAPABILITY IMAP4rev1\r\n"
