"""JMAP token mode: which account a shared token serves a POP3 user. An explicit mapping, else one exact
name match; never a case-folded first match, which let ``Alice`` read the mailbox of ``alice``."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.accounts import add_user
from gateway.backends import make_backend
from gateway.backends.base import AuthFailed, PasswordLogin, PermFailure
from gateway.backends.jmap import JmapBackend, JmapSettings
from gateway.config import Config, ConfigError, UpstreamConfig
from gateway.proto import jmap
from tests.proto.test_jmap import FakeJmap

TOKEN = "shared-token"


def account(name: str) -> dict[str, Any]:
    return {"name": name, "accountCapabilities": {jmap.MAIL: {}}}


@pytest.fixture
def fake() -> FakeJmap:
    f = FakeJmap()
    f.token = TOKEN
    f.session_extra = {
        "username": "admin",
        "accounts": {
            "a1": account("alice"),
            "a2": account("Alice"),
            "t1": account("team"),
            "t2": account("team"),
            "p1": account("admin's own"),
        },
        "primaryAccounts": {jmap.MAIL: "p1"},
    }
    return f


@pytest.fixture
def users(tmp_path: Path) -> Path:
    path = tmp_path / "users"
    for name in ("alice", "Alice", "ALICE", "team", "admin", "carol"):
        add_user(path, name, name + " pass")
    return path


@pytest.fixture
async def make(fake: FakeJmap, users: Path) -> AsyncIterator[Callable[..., JmapBackend]]:
    made: list[JmapBackend] = []

    def build(**settings: Any) -> JmapBackend:
        b = JmapBackend(
            JmapSettings.from_url("jmap+https://jmap.test/", token=TOKEN, users_file=str(users), **settings),
            transport=httpx.MockTransport(fake.handler),
        )
        made.append(b)
        return b

    yield build
    for b in made:
        await b.aclose()


async def account_of(backend: JmapBackend, user: str) -> str:
    async with backend.open_maildrop(PasswordLogin(user, user + " pass")) as drop:
        return drop.identity


async def test_names_match_exactly_so_alice_and_Alice_are_two_accounts(
    make: Callable[..., JmapBackend],
) -> None:
    backend = make()
    assert await account_of(backend, "alice") == "a1"
    assert await account_of(backend, "Alice") == "a2"  # before: a1, the first case-folded match
    with pytest.raises(AuthFailed, match="no mail account named 'ALICE'"):
        await account_of(backend, "ALICE")  # before: a1 as well


async def test_two_accounts_with_the_users_name_are_refused_as_ambiguous(
    make: Callable[..., JmapBackend], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.jmap")
    with pytest.raises(PermFailure, match=r"2 mail accounts are named 'team' \(t1, t2\): map the user"):
        await account_of(make(), "team")  # before: t1, whichever came first
    assert "map the user to one" in caplog.text


async def test_the_mapping_decides_for_the_users_it_names(make: Callable[..., JmapBackend]) -> None:
    backend = make(token_accounts=("team=t2", "ALICE=a1", "carol=gone"))
    assert await account_of(backend, "team") == "t2"
    assert await account_of(backend, "ALICE") == "a1"
    assert await account_of(backend, "alice") == "a1"  # not in the mapping: the exact name
    with pytest.raises(PermFailure, match="'gone', which the token's session lacks"):
        await account_of(backend, "carol")


async def test_the_sessions_own_user_gets_the_primary_account(make: Callable[..., JmapBackend]) -> None:
    assert await account_of(make(), "admin") == "p1"


def test_the_mapping_is_checked_when_the_config_is(tmp_path: Path) -> None:
    def build(**up: Any) -> None:
        make_backend(Config(upstream=UpstreamConfig(**up)))

    with pytest.raises(ConfigError, match=r"upstream\.token_accounts.*POP3USER=ACCOUNTID"):
        build(url="jmap+https://h/", token="t", token_accounts=("alice",))
    with pytest.raises(ConfigError, match=r"upstream\.token_accounts.*set upstream\.token"):
        build(url="jmap+https://h/", token_accounts=("alice=a1",))
    with pytest.raises(ConfigError, match=r"upstream\.token_accounts.*only a JMAP upstream"):
        build(url=f"maildir://{tmp_path}", token="t", token_accounts=("alice=a1",))
    with pytest.raises(ValueError, match="mapped twice"):
        JmapSettings.from_url("jmap+https://h/", token="t", token_accounts=("a=x", "a=y"))
