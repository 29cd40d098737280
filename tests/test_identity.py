"""One account, one key: however a user name is typed, locks, limits and the UIDL namespace see one account,
and UIDL stores written before identities existed keep their namespaces (no client downloads anything
again)."""

from __future__ import annotations

import dataclasses
import json
import poplib
import secrets
import tempfile
from collections.abc import AsyncGenerator, Sequence
from pathlib import Path

import pytest
import trio

from gateway import accounts, durable
from gateway.backends.base import Backend, Entry, Maildrop, PasswordLogin
from gateway.backends.imap import ImapBackend, ImapSettings
from gateway.backends.jmap import JmapBackend, JmapSettings
from gateway.backends.maildir import MaildirBackend
from gateway.config import Config, ConfigError, ListenConfig, ServerConfig, loads
from gateway.identity import (
    MAX_USERNAME_OCTETS,
    AccountKey,
    IdentityPolicy,
    account_key,
    normalize,
    throttle_key,
)
from gateway.server import Server
from gateway.store import AsyncUidlStore
from tests.realservers import corpus
from tests.realservers.cyrus import Cyrus
from tests.realservers.dovecot import Dovecot, MailUser
from tests.realservers.rawimap import ImapConnection, quote

LOWER = IdentityPolicy()
EXACT = IdentityPolicy(username_case="exact")


# ---------------------------------------------------------------- normalize


def test_lower_folds_ascii_letters_and_nothing_else() -> None:
    assert normalize("ALICE", LOWER) == "alice"
    assert normalize("Alice.Smith@Example.COM", LOWER) == "alice.smith@example.com"
    # never Unicode folding: these may be other accounts upstream (straße/strasse, Kelvin sign/k, Ä/ä)
    assert normalize("STRAßE", LOWER) == "straße"
    assert normalize("\u212aelvin", LOWER) == "\u212aelvin"
    assert normalize("ÄLICE", LOWER) == "Älice"


def test_exact_keeps_the_name_as_typed() -> None:
    assert normalize("ALICE", EXACT) == "ALICE"
    assert normalize("ALICE", EXACT) != normalize("alice", EXACT)


def test_default_realm_makes_alice_and_alice_at_realm_one_account() -> None:
    policy = IdentityPolicy(default_realm="Example.com")
    assert normalize("alice", policy) == normalize("alice@example.com", policy) == "alice@example.com"
    assert normalize("ALICE@EXAMPLE.COM", policy) == "alice@example.com"
    assert normalize("alice@other.test", policy) == "alice@other.test"  # a realm of its own is kept
    exact = IdentityPolicy(username_case="exact", default_realm="Example.com")
    assert normalize("Alice", exact) == "Alice@Example.com"


def test_a_name_in_its_normal_form_is_unchanged() -> None:
    """The compatibility rule: with the defaults, `alice` keys exactly as before identities existed."""
    for name in ("alice", "bob@example.com", "u1-x.y_z", "älice"):
        assert normalize(name, LOWER) == name


@pytest.mark.parametrize("bad", ["a@b", "exa mple.com", "x\nexample.com", "x" * 254])
def test_a_realm_that_is_no_domain_is_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="default_realm"):
        IdentityPolicy(default_realm=bad)
    with pytest.raises(ConfigError, match=r"server\.default_realm"):
        loads(f"[server]\ndefault_realm = {json.dumps(bad)}\n")


def test_the_config_keys_make_the_policy() -> None:
    config = loads('[server]\nusername_case = "exact"\ndefault_realm = "example.com"\n')
    assert IdentityPolicy.from_config(config.server) == IdentityPolicy("exact", "example.com")
    assert IdentityPolicy.from_config(ServerConfig()) == LOWER
    with pytest.raises(ConfigError, match=r"server\.username_case"):
        loads('[server]\nusername_case = "casefold"\n')


def test_throttle_keys_are_16_bytes_whatever_the_name() -> None:
    assert len(throttle_key("a" * 100_000, LOWER)) == 16
    assert throttle_key("ALICE", LOWER) == throttle_key("alice", LOWER)
    assert throttle_key("ALICE", EXACT) != throttle_key("alice", EXACT)
    assert throttle_key("alice", IdentityPolicy(default_realm="x.test")) == throttle_key(
        "alice@x.test", LOWER
    )
    assert throttle_key("alice", LOWER) != throttle_key("bob", LOWER)
    assert MAX_USERNAME_OCTETS == 256


# ---------------------------------------------------------------- keys from the maildrop's identity


@dataclasses.dataclass
class Drop:
    """A maildrop of three messages, as any backend would open it."""

    identity: str
    _entries: tuple[Entry, ...] = (Entry("1", 10, "n-1"), Entry("2", 20, "n-2"), Entry("3", 30, "n-3"))

    @property
    def entries(self) -> Sequence[Entry]:
        return self._entries

    async def stream(self, index: int, *, top_lines: int | None = None) -> AsyncGenerator[bytes, None]:
        yield b"Subject: x\r\n\r\nbody\r\n"

    def note_size(self, index: int, octets: int) -> None:
        pass

    async def apply_deletions(self, indexes: Sequence[int]) -> None:
        pass


def imap_backend(policy: IdentityPolicy = LOWER) -> ImapBackend:
    return ImapBackend(ImapSettings("imap.test", 143, "none", identity=policy))


def test_an_account_key_is_the_lock_key_of_the_identity() -> None:
    backend = imap_backend()
    assert account_key(backend, Drop("alice"), "ALICE") == AccountKey(
        key="imap:imap.test:143:alice:INBOX",
        identity="alice",
        legacy=("imap:imap.test:143:ALICE:INBOX",),
    )


@pytest.mark.parametrize(
    "backend",
    [
        imap_backend(),
        JmapBackend(JmapSettings.from_url("jmap+http://jmap.test/")),
        MaildirBackend(Path("/srv/mail"), Path("/srv/users")),
    ],
    ids=["imap", "jmap", "maildir"],
)
def test_a_name_typed_as_the_upstream_names_it_keeps_its_key(backend: Backend) -> None:
    """A site whose users always typed `alice` keeps every UIDL namespace: nothing to carry over."""
    key = account_key(backend, Drop("alice"), "alice")
    assert key.key == backend.lock_key("alice")  # the key the typed name had before identities
    assert key.legacy == ()


async def test_the_maildir_identity_is_the_users_file_name(tmp_path: Path) -> None:
    users = tmp_path / "users"
    accounts.add_user(users, "Alice", "pw")
    (tmp_path / "mail" / "Alice").mkdir(parents=True)
    backend = MaildirBackend(tmp_path / "mail", users)
    async with backend.open_maildrop(PasswordLogin("Alice", "pw")) as drop:
        assert drop.identity == "Alice"
        assert account_key(backend, drop, "Alice").key == f"maildir:{tmp_path / 'mail'}:Alice"


# ---------------------------------------------------------------- the UIDL namespace carries over


@pytest.fixture
async def store(tmp_path: Path) -> AsyncGenerator[AsyncUidlStore, None]:
    s = AsyncUidlStore(tmp_path / "uidl.sqlite3")
    await s.open()
    yield s
    await s.aclose()


async def attach(store: AsyncUidlStore, drop: Drop, key: AccountKey) -> list[str]:
    wrapped = await durable.attach(
        drop, store, name=key.key, account=key.identity, fmt="native", legacy=key.legacy
    )
    assert wrapped.identity == drop.identity
    return [e.uidl for e in wrapped.entries]


def old_store_with_imported_uidls(tmp_path: Path, name: str) -> None:
    """A store as older versions left it: the namespace of the typed name, with UIDLs imported from an old
    POP3 server (so that no new UIDL can be derived from the upstream: only the store knows them)."""
    from gateway.store import Item, UidlStore

    s = UidlStore(tmp_path / "uidl.sqlite3")
    try:
        items = [Item(e.key or e.upstream_id, e.size, e.uidl) for e in Drop("x").entries]
        s.import_uidls(name, "ALICE", [(item, f"OLD-{i}", i) for i, item in enumerate(items, 1)])
    finally:
        s.close()


async def test_a_namespace_of_the_typed_name_is_carried_over(tmp_path: Path) -> None:
    backend = imap_backend()
    old_store_with_imported_uidls(tmp_path, backend.lock_key("ALICE"))
    s = AsyncUidlStore(tmp_path / "uidl.sqlite3")
    await s.open()
    try:
        key = account_key(backend, Drop("alice"), "ALICE")
        assert await attach(s, Drop("alice"), key) == ["OLD-1", "OLD-2", "OLD-3"]
        # and from now on every spelling finds them, under the one key
        assert await attach(s, Drop("alice"), account_key(backend, Drop("alice"), "alice")) == [
            "OLD-1",
            "OLD-2",
            "OLD-3",
        ]
    finally:
        await s.aclose()
    from gateway.store import UidlStore

    sync = UidlStore(tmp_path / "uidl.sqlite3")
    try:
        assert [name for name, _ in sync.mailboxes()] == ["imap:imap.test:143:alice:INBOX"]
    finally:
        sync.close()


async def test_the_namespace_of_the_account_wins_over_an_old_one(store: AsyncUidlStore) -> None:
    backend = imap_backend()
    canonical = account_key(backend, Drop("alice"), "alice")
    first = await attach(store, Drop("alice"), canonical)
    typed = account_key(backend, Drop("alice"), "Alice")
    assert await attach(store, Drop("alice"), typed) == first
    assert await store.adopt(typed.key, typed.legacy) is None  # it exists: nothing is carried over


async def test_the_usual_login_costs_no_extra_store_call(store: AsyncUidlStore) -> None:
    ops: list[str] = []
    store.operations = ops.append
    backend = imap_backend()
    key = account_key(backend, Drop("alice"), "alice")
    await attach(store, Drop("alice"), key)
    await attach(store, Drop("alice"), key)
    assert "adopt" not in ops


async def test_an_account_key_is_one_for_every_spelling(store: AsyncUidlStore) -> None:
    backend = imap_backend()
    keys = {account_key(backend, Drop(normalize(t, LOWER)), t).key for t in ("alice", "ALICE", "aLiCe")}
    assert keys == {"imap:imap.test:143:alice:INBOX"}


# ---------------------------------------------------------------- real servers


def upper(name: str) -> str:
    return name.upper()


@pytest.mark.realserver
def test_neither_dovecot_nor_cyrus_names_the_canonical_user_over_imap(
    dovecot: Dovecot, mail_user: MailUser, cyrus: Cyrus
) -> None:
    """Why IMAP identities come from the configured normalisation: the server says nothing about them."""
    cyrus.add_user(mail_user.name, mail_user.password)
    for host, port in ((dovecot.host, dovecot.imap_port), (cyrus.host, cyrus.imap_port)):
        with ImapConnection.open(host, port) as imap:
            said = [
                imap.command(f"LOGIN {quote(upper(mail_user.name))} {quote(mail_user.password)}".encode())
            ]
            for command in (b'ID ("name" "pop3-gateway")', b"NAMESPACE"):
                said += imap.command_lines(command)
            imap.command(b"LOGOUT")
        assert said[0].split()[1] == b"OK"  # the upstream is case-insensitive ...
        assert not [line for line in said if mail_user.name.encode() in line.lower()]  # ... and mute


async def open_twice(backend: Backend, user: MailUser, store: AsyncUidlStore) -> list[tuple[str, list[str]]]:
    seen = []
    for typed in (upper(user.name), user.name, user.name.capitalize()):
        async with backend.open_maildrop(PasswordLogin(typed, user.password)) as drop:
            key = account_key(backend, drop, typed)
            seen.append((key.key, await attach_drop(store, drop, key)))
    return seen


async def attach_drop(store: AsyncUidlStore, drop: Maildrop, key: AccountKey) -> list[str]:
    wrapped = await durable.attach(
        drop, store, name=key.key, account=key.identity, fmt="native", legacy=key.legacy
    )
    return [e.uidl for e in wrapped.entries]


@pytest.mark.realserver
async def test_dovecot_case_variants_are_one_account(
    dovecot: Dovecot, mail_user: MailUser, store: AsyncUidlStore, tmp_path: Path
) -> None:
    dovecot.append(mail_user.name, mail_user.password, corpus.sized_messages(3, 500))
    backend = ImapBackend(ImapSettings(dovecot.host, dovecot.imap_port, "none"))
    seen = await open_twice(backend, mail_user, store)
    expected_key = f"imap:{dovecot.host}:{dovecot.imap_port}:{mail_user.name}:INBOX"
    assert [k for k, _ in seen] == [expected_key] * 3  # one lock key, one UIDL namespace
    assert seen[0][1] == seen[1][1] == seen[2][1]
    assert len(seen[0][1]) == 3


@pytest.mark.realserver
async def test_cyrus_jmap_case_variants_are_one_account(cyrus: Cyrus, store: AsyncUidlStore) -> None:
    user = MailUser(f"jid-{secrets.token_hex(4)}", secrets.token_hex(8))
    cyrus.add_user(user.name, user.password)
    cyrus.append(user.name, user.password, corpus.sized_messages(3, 500, tag="jid"))
    backend = JmapBackend(JmapSettings.from_url(cyrus.jmap_url))
    try:
        async with backend.open_maildrop(PasswordLogin(upper(user.name), user.password)) as drop:
            assert drop.identity == user.name  # Cyrus's accountId: its own spelling, not ours
        seen = await open_twice(backend, user, store)
    finally:
        await backend.aclose()
    expected_key = f"jmap:{cyrus.http_base}:{user.name}:INBOX"
    assert [k for k, _ in seen] == [expected_key] * 3
    assert seen[0][1] == seen[1][1] == seen[2][1]
    assert len(seen[0][1]) == 3


@pytest.mark.realserver
async def test_a_case_variant_of_a_logged_in_user_is_in_use(
    nursery: trio.Nursery, dovecot: Dovecot, mail_user: MailUser
) -> None:
    """End to end: while `alice` holds the maildrop, `ALICE` gets [IN-USE], not a second session."""
    backend = ImapBackend(ImapSettings(dovecot.host, dovecot.imap_port, "none"))
    store = AsyncUidlStore(Path(tempfile.mkdtemp(prefix="pop3gw-store-")) / "uidl.sqlite3")
    cfg = Config(
        server=dataclasses.replace(ServerConfig(), upstream_timeout=10.0),
        listen=(ListenConfig("127.0.0.1:0"),),
    )
    server = Server(cfg, backend, store=store)
    [bound] = await nursery.start(server.serve)

    def sessions() -> bytes:
        first = poplib.POP3(bound.host, bound.port, timeout=30)
        try:
            first.user(mail_user.name)
            first.pass_(mail_user.password)
            second = poplib.POP3(bound.host, bound.port, timeout=30)
            try:
                second.user(upper(mail_user.name))
                try:
                    return second.pass_(mail_user.password)
                except poplib.error_proto as exc:
                    return bytes(exc.args[0])
            finally:
                second.close()
        finally:
            first.quit()

    try:
        reply = await trio.to_thread.run_sync(sessions)
    finally:
        server.drain()
    assert reply.startswith(b"-ERR [IN-USE]")
