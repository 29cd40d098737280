"""Token logins through ImapBackend against real Dovecot (its oauth2 passdb) with real tokens from
panva's oidc-provider, and the visibility window (since/newest) against the real Dovecot fixture.

- a device-flow JWT opens the user's mailbox with OAUTHBEARER, XOAUTH2 and auto, over plain IMAP and
  after STARTTLS;
- an app-only (client credentials) token opens another user's mailbox: the upstream identity is not the
  token's subject, as for Microsoft's shared mailboxes and IMAP.AccessAsApp;
- a garbage token, an expired one and another user's are TokenRejected, with Dovecot's error challenge
  answered as RFC 7628 wants (the NO arrives: no hang);
- an opaque token checked by introspection works until it is revoked.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator

import pytest
import trio

from gateway.backends.base import PasswordLogin, TokenLogin, TokenRejected
from gateway.backends.imap import ImapBackend, ImapSettings
from tests.realservers.corpus import message
from tests.realservers.dovecot import Dovecot, MailUser
from tests.realservers.oidc import OPAQUE_RESOURCE, OidcProvider
from tests.realservers.rawimap import append_messages
from tests.test_imap_backend import uids_in

pytestmark = [pytest.mark.realserver, pytest.mark.timeout(90)]


def backend_for(server: Dovecot, tls: str = "none", **kw: object) -> ImapBackend:
    extra: dict[str, object] = {"ca_file": str(server.ca_file)} if tls != "none" else {}
    settings = ImapSettings(server.host, server.imap_port, tls, connect_timeout=10.0, **extra, **kw)  # type: ignore[arg-type]
    return ImapBackend(settings)


async def subjects(backend: ImapBackend, login: TokenLogin) -> tuple[str, list[bytes]]:
    """The maildrop's identity and the first header line of every message, read through the backend."""
    heads = []
    async with backend.open_maildrop(login) as drop:
        for i in range(len(drop.entries)):
            body = b""
            async for chunk in drop.stream(i, top_lines=0):
                body += chunk
            heads.append(next(line for line in body.split(b"\r\n") if line.startswith(b"Subject:")))
        return drop.identity, heads


@pytest.mark.parametrize(
    ("mechanism", "tls"),
    [("oauthbearer", "none"), ("xoauth2", "none"), ("auto", "starttls"), ("xoauth2", "starttls")],
)
async def test_a_device_flow_token_opens_the_mailbox(
    oidc: OidcProvider, dovecot_oauth2: Dovecot, mechanism: str, tls: str
) -> None:
    tag = f"tok-{mechanism}-{tls}"
    dovecot_oauth2.append("alice", oidc.accounts["alice"], [message(tag, [b"hello"])])
    tokens = await trio.to_thread.run_sync(oidc.device_login, "alice")
    backend = backend_for(dovecot_oauth2, tls)
    identity, heads = await subjects(backend, TokenLogin("alice", tokens.access_token, mechanism))  # type: ignore[arg-type]
    assert identity == "alice"
    assert any(tag.encode() in h for h in heads)


@pytest.mark.parametrize("mechanism", ["xoauth2", "oauthbearer"])
async def test_an_app_token_opens_a_mailbox_that_is_not_its_subject(
    oidc: OidcProvider, dovecot_oauth2: Dovecot, mechanism: str
) -> None:
    """Shared-mailbox style: the token's subject is the app (client id), the upstream identity is bob."""
    tag = f"app-{mechanism}"
    dovecot_oauth2.append("bob", oidc.accounts["bob"], [message(tag, [b"for bob"])])
    app = await trio.to_thread.run_sync(oidc.client_credentials)
    identity, heads = await subjects(
        backend_for(dovecot_oauth2),
        TokenLogin("bob", app.access_token, mechanism),  # type: ignore[arg-type]
    )
    assert identity == "bob"
    assert any(tag.encode() in h for h in heads)


@pytest.mark.parametrize("mechanism", ["xoauth2", "oauthbearer"])
async def test_garbage_and_wrong_user_tokens_are_token_rejected(
    oidc: OidcProvider, dovecot_oauth2: Dovecot, mechanism: str
) -> None:
    backend = backend_for(dovecot_oauth2)
    with trio.fail_after(20):  # the error challenge must be answered, or Dovecot waits for ever
        with pytest.raises(TokenRejected) as garbage:
            await subjects(backend, TokenLogin("alice", "garbage.not.ajwt", mechanism))  # type: ignore[arg-type]
        # Dovecot sent its error challenge (so the dummy response went out): the status is from it
        assert garbage.value.status == {"xoauth2": "401", "oauthbearer": "invalid_token"}[mechanism]
        alices = await trio.to_thread.run_sync(oidc.device_login, "alice")
        with pytest.raises(TokenRejected) as refused:
            await subjects(backend, TokenLogin("bob", alices.access_token, mechanism))  # type: ignore[arg-type]
    assert alices.access_token not in str(refused.value)


async def test_an_expired_token_is_token_rejected_and_a_refreshed_one_works(
    oidc: OidcProvider, dovecot_oauth2: Dovecot
) -> None:
    tokens = await trio.to_thread.run_sync(oidc.device_login, "alice")
    assert tokens.refresh_token is not None
    backend = backend_for(dovecot_oauth2)
    await subjects(backend, TokenLogin("alice", tokens.access_token))
    await trio.sleep(tokens.expires_in + 1.5)
    with pytest.raises(TokenRejected):
        await subjects(backend, TokenLogin("alice", tokens.access_token))
    fresh = await trio.to_thread.run_sync(oidc.refresh, tokens.refresh_token)
    identity, _ = await subjects(backend, TokenLogin("alice", fresh.access_token))
    assert identity == "alice"


@pytest.mark.parametrize("mechanism", ["xoauth2", "oauthbearer"])
async def test_an_opaque_token_works_by_introspection_until_revoked(
    oidc: OidcProvider, dovecot_oauth2_introspect: Dovecot, mechanism: str
) -> None:
    tag = f"opaque-{mechanism}"
    dovecot_oauth2_introspect.append("bob", oidc.accounts["bob"], [message(tag, [b"opaque"])])
    tokens = await trio.to_thread.run_sync(lambda: oidc.device_login("bob", resource=OPAQUE_RESOURCE))
    assert tokens.access_token.count(".") == 0  # opaque, not a JWT
    backend = backend_for(dovecot_oauth2_introspect)
    login = TokenLogin("bob", tokens.access_token, mechanism)  # type: ignore[arg-type]
    _, heads = await subjects(backend, login)
    assert any(tag.encode() in h for h in heads)
    await trio.to_thread.run_sync(oidc.revoke, tokens.access_token, "access_token")
    with pytest.raises(TokenRejected):
        await subjects(backend, login)


# -- the visibility window, against the ordinary Dovecot fixture (PLAIN logins)

# internal dates by UID (1..6): not in UID order, so "since" and "newest" pick different messages
DATES = ["01-Mar-2024", "01-Jan-2020", "01-May-2024", "31-Jan-2024", "01-Feb-2024", "15-Jun-2019"]


@pytest.fixture
def dated(dovecot: Dovecot, mail_user: MailUser) -> Iterator[list[int]]:
    dates = iter(DATES)
    uids = append_messages(
        dovecot.host,
        dovecot.imap_port,
        mail_user.name,
        mail_user.password,
        [message(f"dated-{d}", [b"x"]) for d in DATES],
        "INBOX",
        exists_marker=b"[ALREADYEXISTS]",
        date=lambda: f"{next(dates)} 12:00:00 +0000".encode(),
    )
    assert uids == [1, 2, 3, 4, 5, 6]
    yield uids


def plain(user: MailUser) -> PasswordLogin:
    return PasswordLogin(user.name, user.password)


async def listed_uids(dovecot: Dovecot, user: MailUser, **kw: object) -> list[int]:
    backend = backend_for(dovecot, **kw)
    async with backend.open_maildrop(plain(user)) as drop:
        return [e.uid for e in drop.entries]


@pytest.mark.parametrize(
    ("window", "expected"),
    [
        ({}, [1, 2, 3, 4, 5, 6]),
        ({"since": datetime.date(2024, 2, 1)}, [1, 3, 5]),  # on the day counts (SINCE is >=)
        ({"since": datetime.date(2024, 1, 31)}, [1, 3, 4, 5]),
        ({"newest": 2}, [5, 6]),  # newest by upstream order (UID), whatever the dates
        ({"newest": 10}, [1, 2, 3, 4, 5, 6]),
        ({"since": datetime.date(2024, 1, 1), "newest": 2}, [4, 5]),
        ({"since": datetime.date(2030, 1, 1)}, []),
        ({"since": datetime.date(2024, 2, 1), "delete_policy": "flag:$Popped"}, [1, 3, 5]),
    ],
)
async def test_the_window_lists_only_its_messages(
    dovecot: Dovecot, mail_user: MailUser, dated: list[int], window: dict[str, object], expected: list[int]
) -> None:
    assert await listed_uids(dovecot, mail_user, **window) == expected


async def test_window_deletions_map_to_the_filtered_snapshot(
    dovecot: Dovecot, mail_user: MailUser, dated: list[int]
) -> None:
    backend = backend_for(dovecot, since=datetime.date(2024, 2, 1))
    async with backend.open_maildrop(plain(mail_user)) as drop:
        assert [e.uid for e in drop.entries] == [1, 3, 5]
        await drop.apply_deletions([1, 2])  # POP3 messages 2 and 3 of the window: UIDs 3 and 5
    assert uids_in(dovecot, mail_user) == [1, 2, 4, 6]
    newest = backend_for(dovecot, newest=1)
    async with newest.open_maildrop(plain(mail_user)) as drop:
        assert [e.uid for e in drop.entries] == [6]
        await drop.apply_deletions([0])
    assert uids_in(dovecot, mail_user) == [1, 2, 4]


async def test_a_flag_window_leaves_flagged_messages_out_and_flags_only_listed_ones(
    dovecot: Dovecot, mail_user: MailUser, dated: list[int]
) -> None:
    backend = backend_for(dovecot, newest=2, delete_policy="flag:$Popped")
    async with backend.open_maildrop(plain(mail_user)) as drop:
        assert [e.uid for e in drop.entries] == [5, 6]
        await drop.apply_deletions([1])
    async with backend.open_maildrop(plain(mail_user)) as drop:
        assert [e.uid for e in drop.entries] == [4, 5]  # 6 is flagged now: the newest 2 visible ones
    assert uids_in(dovecot, mail_user) == [1, 2, 3, 4, 5, 6]
