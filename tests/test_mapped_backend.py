"""MappedBackend with upstream doubles that count every open: the local password is checked before any
upstream work, credentials per kind, routes, per-account backends and windows, the per-account UIDL format.

The real-server side (Dovecot, a gateway process, poplib, mpop and fetchmail) is tests/test_mapped_real.py.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Literal

import pytest
import trio

from gateway.accounts import add_user
from gateway.backends.base import (
    ApopLogin,
    ApopUnavailable,
    AuthFailed,
    Backend,
    Login,
    PasswordLogin,
    PermFailure,
    TokenLogin,
    TokenRejected,
)
from gateway.backends.mapped import MappedBackend, Variant
from gateway.limits import AuthThrottle, SessionLimits, ThrottlePolicy
from gateway.login import Admitted, GateSettings, LoginGate
from gateway.mapping import Account, AccountBook, Window
from gateway.metrics import Metrics
from gateway.routing import Route
from gateway.store import AsyncUidlStore
from tests.fakes import FakeBackend, FakeMaildrop

BOXES = {
    "real-alice": {f"a{i}": f"Subject: a{i}\r\n\r\nbody {i}\r\n".encode() for i in range(5)},
    "bob@partner.example": {"b1": b"Subject: b\r\n\r\nb\r\n"},
    "carol": {"c1": b"Subject: c\r\n\r\nc\r\n"},
}


class Upstream(FakeBackend):
    """A fake upstream profile: passwords and tokens per upstream user; records every login it is given."""

    def __init__(self, label: str, variant: Variant) -> None:
        super().__init__(
            {"real-alice": "upstream-pw", "bob@partner.example": "bob-pw", "carol": "carol-pw"},
            {k: dict(v) for k, v in BOXES.items()},
        )
        self.label = label
        self.variant = variant
        self.tokens: dict[str, str] = {"real-alice": "token-2"}
        self.logins: list[Login | TokenLogin] = []

    def lock_key(self, username: str) -> str:
        return f"{self.label}:{username}:{self.variant.folder or 'INBOX'}"

    @contextlib.asynccontextmanager
    async def open_maildrop(self, login: Login) -> AsyncIterator[FakeMaildrop]:  # type: ignore[override]
        self.logins.append(login)
        if isinstance(login, TokenLogin):
            if self.tokens.get(login.username) != login.token:
                raise TokenRejected("token refused")
            yield FakeMaildrop(self, login.username)
            return
        async with super().open_maildrop(login) as drop:
            yield drop


class Tokens:
    def __init__(self, *tokens: str) -> None:
        self.tokens = list(tokens)
        self.calls: list[tuple[str, str, bool]] = []

    async def access_token(self, account_name: str, provider: str, *, force: bool = False) -> str:
        self.calls.append((account_name, provider, force))
        return self.tokens.pop(0)


class Secrets:
    def __init__(self, values: dict[tuple[str, str], str]) -> None:
        self.values = values
        self.asked: list[tuple[str, str]] = []

    async def get(self, account_name: str, kind: Literal["password", "bearer"]) -> str:
        self.asked.append((account_name, kind))
        try:
            return self.values[(account_name, kind)]
        except KeyError:
            raise AuthFailed("no secret stored") from None


class World:
    def __init__(self, tmp_path: Path) -> None:
        self.built: list[Upstream] = []
        self.book = AccountBook(tmp_path / "accounts.json")
        self.users = tmp_path / "users"
        self.tokens = Tokens("token-1", "token-2")
        self.secrets = Secrets({("alice", "password"): "upstream-pw", ("carol", "bearer"): "carol-token"})

    def factory(self, variant: Variant) -> Backend:
        up = Upstream(variant.profile, variant)
        self.built.append(up)
        return up

    def backend(self, routes: tuple[Route, ...] = (), default: str = "default") -> MappedBackend:
        self.book.save()
        return MappedBackend(
            factory=self.factory,
            profiles=["default", "o365", "partner"],
            book=AccountBook.load(self.book.path),
            users_file=self.users,
            routes=routes,
            default_upstream=default,
            tokens=self.tokens,
            secrets=self.secrets,
            today=lambda: datetime.date(2025, 3, 10),
        )

    def opens(self) -> int:
        return sum(len(b.logins) for b in self.built)

    def profile(self, name: str) -> Upstream:
        return next(b for b in self.built if b.variant == Variant(name))


@pytest.fixture
def world(tmp_path: Path) -> World:
    w = World(tmp_path)
    w.book.add(Account("alice", "real-alice", upstream="o365", credential="stored"))
    add_user(w.users, "alice", "local-pw", apop_secret="alice-apop")
    return w


async def test_a_wrong_local_password_never_reaches_the_upstream(world: World) -> None:
    backend = world.backend()
    for attempt in ("upstream-pw", "LOCAL-PW", ""):
        with pytest.raises(AuthFailed, match="wrong local password"):
            async with backend.open_maildrop(PasswordLogin("alice", attempt)):
                pass
    assert world.opens() == 0
    assert world.secrets.asked == []  # not even the stored secret is read


async def test_a_stored_account_logs_in_upstream_as_its_upstream_user(world: World) -> None:
    backend = world.backend()
    async with backend.open_maildrop(PasswordLogin("alice", "local-pw")) as drop:
        assert [e.upstream_id for e in drop.entries] == list(BOXES["real-alice"])
        key = backend.lock_key(drop.identity)
    assert world.profile("o365").logins == [PasswordLogin("real-alice", "upstream-pw")]
    assert key == "o365:real-alice:INBOX"
    assert world.secrets.asked == [("alice", "password")]


async def test_a_case_variant_name_opens_the_same_account_with_the_same_key(world: World) -> None:
    backend = world.backend()
    keys = []
    for typed in ("alice", "ALICE", "Alice"):
        async with backend.open_maildrop(PasswordLogin(typed, "local-pw")) as drop:
            keys.append(backend.lock_key(drop.identity))
            assert backend.lock_key(typed) == keys[-1]  # no legacy namespace to carry over
    assert keys == ["o365:real-alice:INBOX"] * 3
    assert [login.username for login in world.profile("o365").logins] == ["real-alice"] * 3


async def test_a_pass_through_account_sends_the_typed_password_as_its_upstream_user(world: World) -> None:
    world.book.add(Account("al", "real-alice"))  # no local password: the upstream checks it
    backend = world.backend()
    async with backend.open_maildrop(PasswordLogin("AL", "upstream-pw")) as drop:
        assert len(drop.entries) == 5
    with pytest.raises(AuthFailed):
        async with backend.open_maildrop(PasswordLogin("al", "wrong")):
            pass
    assert world.profile("default").logins == [
        PasswordLogin("real-alice", "upstream-pw"),
        PasswordLogin("real-alice", "wrong"),
    ]


async def test_a_pass_through_account_with_a_local_password_checks_it_first(world: World) -> None:
    world.book.add(Account("al", "real-alice"))
    add_user(world.users, "al", "upstream-pw")
    backend = world.backend()
    with pytest.raises(AuthFailed, match="wrong local password"):
        async with backend.open_maildrop(PasswordLogin("al", "wrong")):
            pass
    assert world.opens() == 0


async def test_an_account_without_a_local_password_is_refused_unless_pass_through(world: World) -> None:
    world.book.add(Account("nolocal", "real-alice", credential="stored"))
    backend = world.backend()
    with pytest.raises(AuthFailed, match="no local password"):
        async with backend.open_maildrop(PasswordLogin("nolocal", "anything")):
            pass
    assert world.opens() == 0


async def test_an_oauth2_token_the_upstream_rejects_is_refreshed_once_and_retried(world: World) -> None:
    world.book.add(
        Account("alice", "real-alice", upstream="o365", credential="oauth2", provider="m365"), replace=True
    )
    backend = world.backend()
    async with backend.open_maildrop(PasswordLogin("alice", "local-pw")) as drop:
        assert len(drop.entries) == 5
    assert world.tokens.calls == [("alice", "m365", False), ("alice", "m365", True)]
    assert world.profile("o365").logins == [
        TokenLogin("real-alice", "token-1"),
        TokenLogin("real-alice", "token-2"),
    ]


async def test_an_oauth2_token_rejected_twice_is_an_auth_failure(world: World) -> None:
    world.book.add(
        Account("alice", "real-alice", upstream="o365", credential="oauth2", provider="m365"), replace=True
    )
    world.tokens = Tokens("bad-1", "bad-2", "unused")
    backend = world.backend()
    with pytest.raises(AuthFailed):
        async with backend.open_maildrop(PasswordLogin("alice", "local-pw")):
            pass
    assert len(world.tokens.calls) == 2 and world.opens() == 2


async def test_a_bearer_account_sends_its_stored_token(world: World) -> None:
    world.book.add(Account("carol", "carol", upstream="partner", credential="bearer"))
    add_user(world.users, "carol", "carol-local")
    backend = world.backend()
    world.built[2].tokens["carol"] = "carol-token"  # the "partner" profile
    async with backend.open_maildrop(PasswordLogin("carol", "carol-local")) as drop:
        assert [e.upstream_id for e in drop.entries] == ["c1"]
    assert world.profile("partner").logins == [TokenLogin("carol", "carol-token")]


async def test_an_unmapped_name_follows_the_first_matching_route_as_typed(world: World) -> None:
    backend = world.backend(routes=(Route("*@PARTNER.example", "partner"), Route("*@*", "o365")))
    async with backend.open_maildrop(PasswordLogin("bob@partner.example", "bob-pw")) as drop:
        key = backend.lock_key(drop.identity)
    assert world.profile("partner").logins == [PasswordLogin("bob@partner.example", "bob-pw")]
    assert key == backend.lock_key("bob@partner.example") == "partner:bob@partner.example:INBOX"
    async with backend.open_maildrop(PasswordLogin("carol", "carol-pw")):
        pass  # no route: the default profile
    assert world.profile("default").logins == [PasswordLogin("carol", "carol-pw")]


async def test_no_account_no_route_and_no_default_is_refused_without_an_upstream(world: World) -> None:
    backend = world.backend(routes=(Route("*@partner.example", "partner"),), default="")
    with pytest.raises(AuthFailed, match="no account, route or default"):
        async with backend.open_maildrop(PasswordLogin("carol", "carol-pw")):
            pass
    assert world.opens() == 0
    # a first login claims nothing: the book is unchanged
    assert [a.name for a in AccountBook.load(world.book.path)] == ["alice"]


async def test_apop_checks_the_local_secret_and_cannot_serve_pass_through(world: World) -> None:
    backend = world.backend()
    ts = "<1.2@gw>"
    digest = hashlib.md5((ts + "alice-apop").encode()).hexdigest()
    assert await backend.apop_available()
    async with backend.open_maildrop(ApopLogin("ALICE", ts, digest)) as drop:
        assert len(drop.entries) == 5
    with pytest.raises(AuthFailed, match="wrong APOP digest"):
        async with backend.open_maildrop(ApopLogin("alice", ts, "0" * 32)):
            pass
    world.book.add(Account("pt", "real-alice"))
    add_user(world.users, "pt", "x", apop_secret="pt-apop")
    backend = world.backend()
    with pytest.raises(ApopUnavailable):
        async with backend.open_maildrop(ApopLogin("pt", ts, hashlib.md5(b"x").hexdigest())):
            pass
    assert world.opens() == 1


async def test_per_account_settings_build_one_backend_each_and_reuse_it(world: World) -> None:
    world.book.add(
        Account(
            "alice",
            "real-alice",
            upstream="o365",
            credential="stored",
            folder="Scans",
            delete_policy="flag:pop3-deleted",  # type: ignore[arg-type]
            mark_seen=True,
        ),
        replace=True,
    )
    backend = world.backend()
    for _ in range(3):
        async with backend.open_maildrop(PasswordLogin("alice", "local-pw")) as drop:
            assert backend.lock_key(drop.identity) == "o365:real-alice:Scans"
    variants = [b.variant for b in world.built if b.logins]
    assert variants == [Variant("o365", folder="Scans", delete_policy="flag:pop3-deleted", mark_seen=True)]
    assert len(world.built) == 4  # three profiles, one per-account backend


async def test_a_newest_window_shows_the_last_n_and_translates_indexes(world: World) -> None:
    world.book.add(
        Account("alice", "real-alice", upstream="o365", credential="stored", window=Window.parse("newest:2")),
        replace=True,
    )
    backend = world.backend()
    async with backend.open_maildrop(PasswordLogin("alice", "local-pw")) as drop:
        assert [e.upstream_id for e in drop.entries] == ["a3", "a4"]
        chunks = [c async for c in drop.stream(1)]
        assert b"".join(chunks) == BOXES["real-alice"]["a4"]
        with pytest.raises(IndexError):
            drop.stream(2)
        with pytest.raises(IndexError):
            drop.stream(-1)
        await drop.apply_deletions([0])
    up = world.profile("o365")
    assert up.deletion_batches == [["a3"]]  # the newest-but-one, not the first of the mailbox


async def test_a_since_window_needs_a_backend_that_filters_by_date(world: World) -> None:
    world.book.add(
        Account("alice", "real-alice", upstream="o365", credential="stored", window=Window.parse("days:7")),
        replace=True,
    )
    backend = world.backend()
    with pytest.raises(PermFailure, match="since/days window"):
        async with backend.open_maildrop(PasswordLogin("alice", "local-pw")):
            pass
    assert world.opens() == 0
    assert world.built[-1].variant.since == datetime.date(2025, 3, 4)


async def test_the_accounts_file_is_reread_when_it_changes(world: World) -> None:
    backend = world.backend()
    with pytest.raises(AuthFailed):
        async with backend.open_maildrop(PasswordLogin("dave", "local-pw")):
            pass  # unmapped: the default profile does not know dave
    world.book.add(Account("dave", "real-alice", upstream="o365", credential="stored"))
    world.book.save()
    add_user(world.users, "dave", "dave-pw")
    world.secrets.values[("dave", "password")] = "upstream-pw"
    async with backend.open_maildrop(PasswordLogin("dave", "dave-pw")) as drop:
        assert len(drop.entries) == 5
    world.book.path.write_text("{not json")  # a broken file keeps the accounts read before
    async with backend.open_maildrop(PasswordLogin("dave", "dave-pw")):
        pass


async def test_the_login_gate_gives_new_messages_the_accounts_uidl_format(
    world: World, tmp_path: Path
) -> None:
    world.book.add(
        Account("alice", "real-alice", upstream="o365", credential="stored", uidl_format="gmail"),
        replace=True,
    )
    backend = world.backend(routes=(Route("*", "default"),))
    store = AsyncUidlStore(tmp_path / "uidl.sqlite3")
    await store.open()
    gate = LoginGate(
        backend,
        limits=SessionLimits(),
        throttle=AuthThrottle(ThrottlePolicy(), trio.current_time),
        metrics=Metrics(process=False),
        settings=GateSettings(uidl_format="native"),
        store=store,
    )
    try:
        async with contextlib.AsyncExitStack() as stack:
            mapped = await gate.login(
                PasswordLogin("alice", "local-pw"), ip="127.0.0.1", peer="p", stack=stack
            )
            assert isinstance(mapped, Admitted)
            assert all(e.uidl.startswith("GmailId") for e in mapped.drop.entries)
        async with contextlib.AsyncExitStack() as stack:
            routed = await gate.login(
                PasswordLogin("carol", "carol-pw"), ip="127.0.0.1", peer="p", stack=stack
            )
            assert isinstance(routed, Admitted)
            assert [e.uidl for e in routed.drop.entries] == ["uid-c1"]  # the global format: native
    finally:
        await store.aclose()
