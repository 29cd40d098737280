"""JMAP with a login's own token (issue 11's TokenLogin) and the visibility window, against the fake JMAP
upstream of tests/proto/test_jmap.py (httpx.MockTransport). The real Cyrus side of JMAP is in
tests/test_jmap_backend.py."""

from __future__ import annotations

import datetime
import logging
import re
import secrets
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import httpx
import pytest

from gateway.backends.base import AuthFailed, PasswordLogin, TempFailure, TokenLogin, TokenRejected
from gateway.backends.jmap import JmapBackend, JmapSettings, jmap_after
from gateway.proto import jmap
from tests.proto.test_jmap import FakeJmap
from tests.realservers.cyrus import Cyrus
from tests.realservers.dovecot import MailUser
from tests.realservers.rawimap import append_messages

TOKEN = "per-login.access-token_~+/="


@pytest.fixture
def fake() -> FakeJmap:
    f = FakeJmap()
    f.token = TOKEN
    f.session_extra = {
        "accounts": {
            "alice": {"name": "alice", "isPrimary": True, "accountCapabilities": {jmap.MAIL: {}}},
            "s1": {"name": "shared@example.org", "accountCapabilities": {jmap.MAIL: {}}},
        },
        "primaryAccounts": {jmap.MAIL: "alice"},
    }
    return f


@pytest.fixture
async def make(fake: FakeJmap) -> AsyncIterator[Callable[..., JmapBackend]]:
    made: list[JmapBackend] = []

    def build(**settings: Any) -> JmapBackend:
        backend = JmapBackend(
            JmapSettings.from_url("jmap+https://jmap.test/", **settings),
            transport=httpx.MockTransport(fake.handler),
        )
        made.append(backend)
        return backend

    yield build
    for backend in made:
        await backend.aclose()


def message(n: int) -> bytes:
    return b"Subject: m%d\r\nMessage-ID: <m%d@test>\r\n\r\nbody %d\r\n" % (n, n, n)


async def test_a_token_login_sends_bearer_on_every_request(
    make: Callable[..., JmapBackend], fake: FakeJmap
) -> None:
    fake.add(message(1))
    backend = make()
    async with backend.open_maildrop(TokenLogin("alice", TOKEN)) as drop:
        assert drop.identity == "alice" and len(drop.entries) == 1
        body = b"".join([chunk async for chunk in drop.stream(0)])
    assert body == message(1)
    headers = [r.headers.get("authorization") for r in fake.requests if r.url.path != "/.well-known/jmap"]
    assert headers and all(h == "Bearer " + TOKEN for h in headers)


async def test_the_account_is_the_one_named_for_the_upstream_user(
    make: Callable[..., JmapBackend], fake: FakeJmap
) -> None:
    backend = make()
    async with backend.open_maildrop(TokenLogin("shared@example.org", TOKEN)) as drop:
        assert drop.identity == "s1"
    with pytest.raises(AuthFailed, match="no mail account named 'nobody'"):
        async with backend.open_maildrop(TokenLogin("nobody", TOKEN)):
            pass


async def test_a_refused_token_is_token_rejected(make: Callable[..., JmapBackend]) -> None:
    backend = make()
    with pytest.raises(TokenRejected) as refused:
        async with backend.open_maildrop(TokenLogin("alice", "expired-token")):
            pass
    assert refused.value.status == "401"
    assert "expired-token" not in str(refused.value)


async def test_other_refusals_stay_plain_auth_failed(
    make: Callable[..., JmapBackend], fake: FakeJmap
) -> None:
    # the configured token (today's mode) and HTTP Basic: a 401 is bad credentials, not a token to refresh
    fake.token = ""
    with pytest.raises(AuthFailed) as basic:
        async with make().open_maildrop(PasswordLogin("alice", "wrong")):
            pass
    assert not isinstance(basic.value, TokenRejected)


async def test_a_401_mid_session_is_temp_failure(make: Callable[..., JmapBackend], fake: FakeJmap) -> None:
    fake.add(message(1))
    fake.download_hook = lambda email: httpx.Response(401)
    async with make().open_maildrop(TokenLogin("alice", TOKEN)) as drop:
        with pytest.raises(TempFailure, match="mid-session"):
            _ = [chunk async for chunk in drop.stream(0)]


@pytest.mark.parametrize("token", ["has space", "", "x" * 9000, "é"])
async def test_a_token_that_is_no_b64token_is_refused_before_any_request(
    make: Callable[..., JmapBackend], fake: FakeJmap, token: str
) -> None:
    with pytest.raises(AuthFailed) as refused:
        async with make().open_maildrop(TokenLogin("alice", token)):
            pass
    assert not isinstance(refused.value, TokenRejected)
    assert not fake.requests


async def test_the_token_is_in_no_log_line_or_repr(
    make: Callable[..., JmapBackend], fake: FakeJmap, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    fake.add(message(1))
    backend = make()
    async with backend.open_maildrop(TokenLogin("alice", TOKEN)) as drop:
        assert TOKEN not in repr(drop._view) and TOKEN not in repr(drop._view.creds)
    with pytest.raises(TokenRejected) as refused:
        async with backend.open_maildrop(TokenLogin("alice", "bad-" + TOKEN)):
            pass
    for text in (caplog.text, str(refused.value), repr(refused.value), repr(backend.settings)):
        assert TOKEN not in text


# -- the visibility window


def test_after_is_midnight_utc() -> None:
    assert jmap_after(datetime.date(2024, 2, 1)) == "2024-02-01T00:00:00Z"
    assert jmap_after(datetime.date.min) == "0001-01-01T00:00:00Z"


RECEIVED = [  # added in this order; receivedAt order is 2, 4, 1, 3, 5 (by n)
    (1, "2024-03-01T08:00:00Z"),
    (2, "2019-06-15T08:00:00Z"),
    (3, "2024-05-01T08:00:00Z"),
    (4, "2024-02-01T00:00:00Z"),  # exactly midnight: the fake's `after` is strict, as RFC 8621 says
    (5, "2024-06-01T08:00:00Z"),
]


@pytest.fixture
def dated(fake: FakeJmap) -> dict[int, str]:
    return {n: fake.add(message(n), received=when).id for n, when in RECEIVED}


async def listed(backend: JmapBackend) -> list[str]:
    async with backend.open_maildrop(TokenLogin("alice", TOKEN)) as drop:
        return [e.upstream_id for e in drop.entries]


@pytest.mark.parametrize(
    ("window", "expected"),
    [
        ({}, [2, 4, 1, 3, 5]),
        ({"since": datetime.date(2024, 2, 1)}, [1, 3, 5]),
        ({"since": datetime.date(2024, 1, 31)}, [4, 1, 3, 5]),
        ({"newest": 2}, [3, 5]),
        ({"newest": 9}, [2, 4, 1, 3, 5]),
        ({"since": datetime.date(2020, 1, 1), "newest": 3}, [1, 3, 5]),
        ({"since": datetime.date(2030, 1, 1)}, []),
    ],
)
async def test_the_window_lists_only_its_messages_oldest_first(
    make: Callable[..., JmapBackend], dated: dict[int, str], window: dict[str, Any], expected: list[int]
) -> None:
    assert await listed(make(**window)) == [dated[n] for n in expected]


async def test_the_window_filter_and_sort_go_to_the_server(
    make: Callable[..., JmapBackend], fake: FakeJmap, dated: dict[int, str]
) -> None:
    await listed(make(since=datetime.date(2024, 2, 1), newest=2, page_size=50))
    [query] = [args for calls in fake.api_calls for name, args, _ in calls if name == "Email/query"]
    assert query["filter"] == {"inMailbox": "inbox1", "after": "2024-02-01T00:00:00Z"}
    assert query["sort"][0] == {"property": "receivedAt", "isAscending": False}
    assert query["limit"] == 2  # no more than the window needs


async def test_newest_pages_stop_once_they_have_n(
    make: Callable[..., JmapBackend], fake: FakeJmap, dated: dict[int, str]
) -> None:
    assert await listed(make(newest=3, page_size=1)) == [dated[n] for n in (1, 3, 5)]
    queries = [args for calls in fake.api_calls for name, args, _ in calls if name == "Email/query"]
    assert max(q["position"] for q in queries) <= 3


async def test_window_deletions_map_to_the_filtered_snapshot(
    make: Callable[..., JmapBackend], fake: FakeJmap, dated: dict[int, str]
) -> None:
    backend = make(newest=2)
    async with backend.open_maildrop(TokenLogin("alice", TOKEN)) as drop:
        await drop.apply_deletions([0])  # POP3 message 1 of the window: the 2nd newest, n=3
    assert sorted(fake.in_box()) == sorted(dated[n] for n in (1, 2, 4, 5))


def test_newest_must_be_positive() -> None:
    with pytest.raises(ValueError, match="newest"):
        JmapSettings.from_url("jmap+https://h/", newest=0)


# -- the window against real Cyrus (JMAP receivedAt is the IMAP internal date of the APPEND)

CYRUS_DATES = ["01-Mar-2024 08:00:00 +0000", "15-Jun-2019 08:00:00 +0000", "01-Feb-2024 00:00:00 +0000"]
CYRUS_DATES += ["31-Jan-2024 23:59:59 +0000", "01-Jun-2024 08:00:00 +0000"]


@pytest.fixture
def cyrus_dated(cyrus: Cyrus, request: pytest.FixtureRequest) -> tuple[MailUser, dict[int, bytes]]:
    slug = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:24].strip("-")
    user = MailUser(f"jw{secrets.token_hex(3)}-{slug}", secrets.token_hex(8))
    cyrus.add_user(user.name, user.password)
    dates = iter(CYRUS_DATES)
    messages = {n: message(100 + n) for n in range(1, 6)}
    append_messages(
        cyrus.host,
        cyrus.imap_port,
        user.name,
        user.password,
        list(messages.values()),
        "INBOX",
        exists_marker=b"already exists",
        date=lambda: next(dates).encode(),
    )
    return user, messages


async def cyrus_subjects(backend: JmapBackend, user: MailUser, delete: Sequence[int] = ()) -> list[bytes]:
    async with backend.open_maildrop(PasswordLogin(user.name, user.password)) as drop:
        heads = []
        for i in range(len(drop.entries)):
            raw = b"".join([chunk async for chunk in drop.stream(i)])
            heads.append(raw.split(b"\r\n", 1)[0])
        await drop.apply_deletions(delete)
        return heads


@pytest.mark.parametrize(
    ("window", "expected"),
    [
        ({}, [2, 4, 3, 1, 5]),  # by receivedAt
        # Cyrus's `after` includes the instant: midnight on the day is in, the second before is not
        ({"since": datetime.date(2024, 2, 1)}, [3, 1, 5]),
        ({"newest": 2}, [1, 5]),
        ({"since": datetime.date(2024, 1, 1), "newest": 3}, [3, 1, 5]),
        ({"since": datetime.date(2030, 1, 1)}, []),
    ],
)
async def test_the_window_on_real_cyrus(
    cyrus: Cyrus, cyrus_dated: tuple[MailUser, dict[int, bytes]], window: dict[str, Any], expected: list[int]
) -> None:
    user, _ = cyrus_dated
    backend = JmapBackend(JmapSettings.from_url(cyrus.jmap_url, timeout=10.0, **window))
    try:
        assert await cyrus_subjects(backend, user) == [b"Subject: m%d" % (100 + n) for n in expected]
    finally:
        await backend.aclose()


async def test_window_deletions_on_real_cyrus_take_only_listed_messages(
    cyrus: Cyrus, cyrus_dated: tuple[MailUser, dict[int, bytes]]
) -> None:
    user, _ = cyrus_dated
    windowed = JmapBackend(JmapSettings.from_url(cyrus.jmap_url, timeout=10.0, newest=2))
    everything = JmapBackend(JmapSettings.from_url(cyrus.jmap_url, timeout=10.0))
    try:
        assert await cyrus_subjects(windowed, user, delete=[0]) == [b"Subject: m101", b"Subject: m105"]
        left = await cyrus_subjects(everything, user)
        assert left == [b"Subject: m%d" % (100 + n) for n in (2, 4, 3, 5)]
    finally:
        await windowed.aclose()
        await everything.aclose()
