"""Mapped accounts and routes in front of the real backends: one ``Backend`` that picks, per login, the
upstream profile, the upstream identity and the credential.

``open_maildrop(login)``, in order:

1. The account key is ``gateway.identity.normalize`` of the typed name (``ALICE`` and ``alice`` are one
   account with the default policy); the account book (``gateway.mapping``, re-read when its file changes)
   is asked for it.
2. **A mapped account.** The local credential is checked first, against the users file (``gateway.accounts``,
   scrypt on a worker thread; APOP against its APOP secret). A wrong one is ``AuthFailed`` and no upstream
   connection is made. A ``pass-through`` account may have no users-file record: the upstream then checks
   the password, as without mapping. Then the upstream login, by credential kind:
   ``pass-through`` -> ``PasswordLogin(upstream_user, typed password)``; ``stored`` -> the password from the
   ``SecretReader``; ``oauth2`` -> ``TokenLogin(upstream_user, TokenProvider.access_token(...))``; a
   ``TokenRejected`` answer forces one refresh and one retry; ``bearer`` -> ``TokenLogin`` with the
   ``SecretReader``'s bearer token. APOP can serve every kind but ``pass-through`` (which needs the password
   itself: ``ApopUnavailable``).
3. **No account.** The first matching route (``gateway.routing``), else ``accounts.default_upstream``, gets
   the login as typed. Neither: ``AuthFailed``. A first login never creates or claims an account.
4. Per-account ``folder``, ``delete_policy``, ``mark_seen`` and window are a backend built for the profile
   with those overrides (cached by what differs); ``uidl_format`` rides on the returned maildrop as the
   ``uidl_format`` attribute, which the login gate prefers to the global format. ``newest:N`` is applied
   here (the last N entries, deletions translated) unless the backend's settings take ``newest``
   themselves; ``since`` / ``days`` need the backend's ``since`` setting.

Keys: the returned maildrop's ``identity`` is ``"\\0mapped\\0"`` + the serving backend's ``lock_key`` of its
own identity, and ``lock_key`` strips that prefix, so an account keeps the lock and UIDL namespace it
would have unmapped on the same upstream (no POP3 name holds a NUL, so none can forge one). A plain
name given to ``lock_key`` (``identity.account_key`` asks for the typed name's legacy namespace) is
answered by the backend that serves that name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import hmac
import logging
import os
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol

import trio

from gateway import accounts, files
from gateway.backends.base import (
    ApopLogin,
    ApopUnavailable,
    AuthFailed,
    Backend,
    Entry,
    Login,
    Maildrop,
    NotReachable,
    PasswordLogin,
    PermFailure,
    TempFailure,
    TokenLogin,
    TokenRejected,
)
from gateway.config import DEFAULT_PROFILE, Config, ConfigError, UidlFormat, upstream_scheme
from gateway.identity import IdentityPolicy, normalize
from gateway.mapping import Account, AccountBook, MappingError
from gateway.routing import Route, resolve

__all__ = [
    "MappedBackend",
    "MappedMaildrop",
    "SecretReader",
    "TokenProvider",
    "UnavailableSecrets",
    "UnavailableTokens",
    "Variant",
    "accounts_needing_keys",
    "book_problems",
    "wanted",
]

log = logging.getLogger("gateway.mapped")

_MAPPED: Final = "\x00mapped\x00"
MAX_VARIANTS: Final = 1024  # per-account backends kept built; the oldest unused goes first
_UsersStamp = tuple[int, int, int, int]


class TokenProvider(Protocol):
    """OAuth2 access tokens for mapped accounts (gateway/oauth2/tokens.py implements it)."""

    async def access_token(self, account_name: str, provider: str, *, force: bool = False) -> str:
        """A valid access token (refreshed when near expiry, or when ``force``). Raises AuthFailed (the
        grant is gone) or TempFailure (the token endpoint is down)."""
        ...


class SecretReader(Protocol):
    """Stored upstream secrets of mapped accounts (the secret vault implements it)."""

    async def get(self, account_name: str, kind: Literal["password", "bearer"]) -> str:
        """The secret; raises AuthFailed when none is stored, TempFailure when it cannot be read."""
        ...


class UnavailableTokens:
    """Stands in when no token source is wired: oauth2 accounts get [SYS/PERM]."""

    async def access_token(self, account_name: str, provider: str, *, force: bool = False) -> str:
        raise PermFailure("no OAuth2 token source is configured in this gateway")


class UnavailableSecrets:
    """Stands in when no secret vault is wired: stored and bearer accounts get [SYS/PERM]."""

    async def get(self, account_name: str, kind: Literal["password", "bearer"]) -> str:
        raise PermFailure("no secret vault is configured in this gateway")


@dataclasses.dataclass(frozen=True, slots=True)
class Variant:
    """What a per-account backend differs in from its profile's; ``Variant(profile)`` is the profile's own."""

    profile: str
    folder: str | None = None
    delete_policy: str | None = None  # DeletePolicy text: hashable, parsed by the builder
    mark_seen: bool | None = None
    since: datetime.date | None = None
    newest: int | None = None


BackendFactory = Callable[[Variant], Backend]


class MappedMaildrop:
    """The serving backend's maildrop, seen through the account's ``newest`` window (``offset`` entries
    hidden at the front), with the account's key and UIDL format."""

    __slots__ = ("_entries", "_inner", "_offset", "identity", "uidl_format")

    def __init__(
        self, inner: Maildrop, identity: str, uidl_format: UidlFormat | None, newest: int | None
    ) -> None:
        entries = inner.entries
        self._offset = max(0, len(entries) - newest) if newest is not None else 0
        self._entries: Sequence[Entry] = entries[self._offset :] if self._offset else entries
        self._inner = inner
        self.identity = identity
        self.uidl_format = uidl_format

    @property
    def entries(self) -> Sequence[Entry]:
        return self._entries

    def _map(self, index: int) -> int:
        if not 0 <= index < len(self._entries):
            raise IndexError(f"message index {index} out of range 0..{len(self._entries) - 1}")
        return index + self._offset

    def stream(self, index: int, *, top_lines: int | None = None) -> AsyncGenerator[bytes, None]:
        return self._inner.stream(self._map(index), top_lines=top_lines)

    def note_size(self, index: int, octets: int) -> None:
        self._inner.note_size(self._map(index), octets)

    async def apply_deletions(self, indexes: Sequence[int]) -> None:
        await self._inner.apply_deletions([self._map(i) for i in indexes])


def _apop_matches(timestamp: str, secret: str, digest: str) -> bool:
    expected = hashlib.md5((timestamp + secret).encode("utf-8", "surrogatepass"), usedforsecurity=False)
    return hmac.compare_digest(
        expected.hexdigest().encode("ascii"), digest.lower().encode("utf-8", "surrogatepass")
    )


class MappedBackend:
    def __init__(
        self,
        *,
        factory: BackendFactory,
        profiles: Sequence[str],
        book: AccountBook,
        users_file: Path,
        routes: Sequence[Route] = (),
        default_upstream: str = DEFAULT_PROFILE,
        tokens: TokenProvider | None = None,
        secrets: SecretReader | None = None,
        identity: IdentityPolicy | None = None,
        today: Callable[[], datetime.date] = datetime.date.today,
    ) -> None:
        self._factory = factory
        self._base: dict[str, Backend] = {name: factory(Variant(name)) for name in profiles}
        self._variants: OrderedDict[Variant, Backend] = OrderedDict()
        self._retired: list[Backend] = []
        self._book = book
        self._users_file = Path(users_file)
        self._users: tuple[_UsersStamp, dict[str, accounts.UserRecord]] | None = None
        self._routes = tuple(routes)
        self._default = default_upstream
        self._tokens: TokenProvider = tokens if tokens is not None else UnavailableTokens()
        self._secrets: SecretReader = secrets if secrets is not None else UnavailableSecrets()
        self._policy = identity if identity is not None else book.policy
        self._today = today
        self._file_lock = trio.CapacityLimiter(1)  # one re-read of the book / users file at a time
        self._scrypt_limiter = trio.CapacityLimiter(max(1, min(4, os.cpu_count() or 1)))
        self._book_error = ""
        main = self._base.get(default_upstream) or next(iter(self._base.values()))
        self.name = main.name  # metrics: the kind of the default upstream

    @classmethod
    def from_config(
        cls, config: Config, *, tokens: TokenProvider | None = None, secrets: SecretReader | None = None
    ) -> MappedBackend:
        from gateway.backends import build_backend

        policy = IdentityPolicy.from_config(config.server)
        try:
            book = AccountBook.load(config.accounts_path, policy)
        except MappingError as exc:
            raise ConfigError(str(exc), key="accounts.file") from None
        problems = book_problems(book, config)
        if problems:
            raise ConfigError(problems[0], key="accounts.file")
        profiles = config.profiles()

        def factory(v: Variant) -> Backend:
            up = profiles[v.profile]
            changes: dict[str, Any] = {
                k: getattr(v, k)
                for k in ("folder", "delete_policy", "mark_seen")
                if getattr(v, k) is not None
            }
            where = "upstream" if v.profile == DEFAULT_PROFILE else f"upstreams.{v.profile}"
            return build_backend(
                dataclasses.replace(up, **changes), config, where=where, since=v.since, newest=v.newest
            )

        return cls(
            factory=factory,
            profiles=list(profiles),
            book=book,
            users_file=files.users_file_path(config),
            routes=[Route(r.match, r.upstream) for r in config.routes],
            default_upstream=config.accounts.default_upstream,
            tokens=tokens,
            secrets=secrets,
            identity=policy,
        )

    # -- the Backend protocol

    async def apop_available(self) -> bool:
        for backend in self._base.values():
            if await backend.apop_available():
                return True
        try:
            await self._refresh_book()
            users = await self._load_users()
        except TempFailure:
            return False
        return any(
            (record := users.get(a.name)) is not None and record.apop_secret is not None
            for a in self._book
            if a.credential != "pass-through"
        )

    def lock_key(self, identity: str) -> str:
        if identity.startswith(_MAPPED):
            return identity[len(_MAPPED) :]
        # a typed name (``identity.account_key``'s legacy namespace): where that name is served
        account = self._book.get(identity)
        if account is not None:
            try:
                backend = self._backend_for(account)
            except PermFailure:
                return f"unserved:{identity}"
            return backend.lock_key(normalize(account.upstream_user, self._policy))
        profile = resolve(self._routes, normalize(identity, self._policy), self._default)
        if profile is None or profile not in self._base:
            return f"unserved:{identity}"
        return self._base[profile].lock_key(identity)

    async def probe(self) -> None:
        for name, backend in self._base.items():
            try:
                await backend.probe()
            except NotReachable as exc:
                raise NotReachable(f"{exc} (upstream profile {name!r})") from None

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            for backend in [*self._variants.values(), *self._retired, *self._base.values()]:
                await backend.aclose()
            for source in {id(s): s for s in (self._tokens, self._secrets)}.values():
                closer = getattr(source, "aclose", None)  # the gateway's Credentials hold an http client
                if closer is not None:
                    await closer()
        self._variants.clear()
        self._retired.clear()

    @contextlib.asynccontextmanager
    async def open_maildrop(self, login: Login) -> AsyncIterator[MappedMaildrop]:
        await self._refresh_book()
        account = self._book.get(login.username)
        async with contextlib.AsyncExitStack() as stack:
            if account is None:
                drop = await self._open_routed(login, stack)
            else:
                await self._check_local(account, login)
                drop = await self._open_mapped(account, login, stack)
            yield drop

    # -- the two kinds of login

    async def _open_routed(self, login: Login, stack: contextlib.AsyncExitStack) -> MappedMaildrop:
        key = normalize(login.username, self._policy)
        profile = resolve(self._routes, key, self._default)
        if profile is None:
            raise AuthFailed("mapped: no account, route or default upstream for this name")
        backend = self._base[profile]
        inner = await stack.enter_async_context(backend.open_maildrop(login))
        return MappedMaildrop(inner, _MAPPED + backend.lock_key(inner.identity), None, None)

    async def _open_mapped(
        self, account: Account, login: Login, stack: contextlib.AsyncExitStack
    ) -> MappedMaildrop:
        backend = self._backend_for(account)
        upstream = await self._upstream_login(account, login, force=False)
        try:
            inner = await stack.enter_async_context(backend.open_maildrop(upstream))
        except TokenRejected:
            if account.credential != "oauth2":
                raise
            log.info("mapped: upstream refused the token of account %s: refreshing once", account.name)
            upstream = await self._upstream_login(account, login, force=True)
            inner = await stack.enter_async_context(backend.open_maildrop(upstream))
        newest = account.window.newest
        applies_newest = "newest" in _window_fields(backend)
        return MappedMaildrop(
            inner,
            _MAPPED + backend.lock_key(inner.identity),
            account.uidl_format,
            None if applies_newest else newest,
        )

    async def _upstream_login(
        self, account: Account, login: Login, *, force: bool
    ) -> PasswordLogin | TokenLogin:
        user = account.upstream_user
        match account.credential:
            case "pass-through":
                if not isinstance(login, PasswordLogin):
                    raise ApopUnavailable("mapped: a pass-through account needs the password itself")
                return PasswordLogin(user, login.password)
            case "stored":
                return PasswordLogin(user, await self._secrets.get(account.name, "password"))
            case "bearer":
                return TokenLogin(user, await self._secrets.get(account.name, "bearer"))
            case "oauth2":
                assert account.provider is not None  # Account checks it
                return TokenLogin(
                    user, await self._tokens.access_token(account.name, account.provider, force=force)
                )
        raise PermFailure(f"mapped: unknown credential kind {account.credential!r}")  # pragma: no cover

    async def _check_local(self, account: Account, login: Login) -> None:
        """The local POP3 credential of a mapped account; raises before any upstream work."""
        users = await self._load_users()
        record = users.get(account.name)
        if isinstance(login, ApopLogin):
            if account.credential == "pass-through":
                raise ApopUnavailable("mapped: APOP cannot serve a pass-through account")
            secret = record.apop_secret if record is not None else None
            ok = _apop_matches(login.timestamp, secret or "", login.digest)
            if secret is None:
                raise ApopUnavailable(f"mapped: no APOP secret for account {account.name!r}")
            if not ok:
                raise AuthFailed(f"mapped: wrong APOP digest for account {account.name!r}")
            return
        if not isinstance(login, PasswordLogin):  # pragma: no cover - clients send only these two
            raise AuthFailed("mapped: unsupported login")
        if record is None and account.credential == "pass-through":
            return  # no local password: the upstream checks the one typed, as without mapping
        stored = record.password_hash if record is not None else accounts.DUMMY_HASH
        ok = await trio.to_thread.run_sync(
            accounts.verify_password, login.password, stored, limiter=self._scrypt_limiter
        )
        if record is None:
            log.warning("mapped: account %s has no local password in the users file", account.name)
            raise AuthFailed(f"mapped: account {account.name!r} has no local password")
        if not ok:
            raise AuthFailed(f"mapped: wrong local password for account {account.name!r}")

    # -- backends per account

    def variant_of(self, account: Account) -> Variant:
        if account.upstream not in self._base:
            raise PermFailure(
                f"mapped: account {account.name!r} names no known upstream {account.upstream!r}"
            )
        return Variant(
            account.upstream,
            folder=account.folder,
            delete_policy=None if account.delete_policy is None else str(account.delete_policy),
            mark_seen=account.mark_seen,
            since=account.window.since(self._today()),
            newest=account.window.newest,
        )

    def _backend_for(self, account: Account) -> Backend:
        variant = self.variant_of(account)
        if variant == Variant(account.upstream):
            return self._base[account.upstream]
        backend = self._variants.get(variant)
        if backend is not None:
            self._variants.move_to_end(variant)
            return backend
        if variant.newest is not None and "newest" not in _window_fields(self._base[account.upstream]):
            # applied by MappedMaildrop: the backend itself is the one without the window
            without = dataclasses.replace(variant, newest=None)
            if without == Variant(account.upstream):
                return self._base[account.upstream]
            variant = without
            backend = self._variants.get(variant)
            if backend is not None:
                self._variants.move_to_end(variant)
                return backend
        try:
            backend = self._factory(variant)
        except ConfigError as exc:
            raise PermFailure(f"mapped: account {account.name!r}: {exc}") from None
        if variant.since is not None and "since" not in _window_fields(backend):
            self._retired.append(backend)
            raise PermFailure(
                f"mapped: account {account.name!r}: this upstream cannot apply a since/days window"
            )
        self._variants[variant] = backend
        while len(self._variants) > MAX_VARIANTS:
            # not closed now: a session may still use it; closed with the gateway
            self._retired.append(self._variants.popitem(last=False)[1])
        return backend

    def account_backend(self, account: Account) -> Backend:
        """The backend an account's logins use (for ``account test``). Raises PermFailure."""
        return self._backend_for(account)

    @contextlib.asynccontextmanager
    async def open_upstream(self, account: Account, password: str | None) -> AsyncIterator[MappedMaildrop]:
        """For ``account test``: the account's upstream maildrop without the local check (``password``
        is the upstream one, for pass-through accounts)."""
        async with contextlib.AsyncExitStack() as stack:
            yield await self._open_mapped(account, PasswordLogin(account.name, password or ""), stack)

    # -- files

    async def _refresh_book(self) -> None:
        try:
            await trio.to_thread.run_sync(self._book.refresh, limiter=self._file_lock)
        except MappingError as exc:
            if str(exc) != self._book_error:
                log.error("accounts file not reloaded, keeping the accounts read before: %s", exc)
            self._book_error = str(exc)
        else:
            self._book_error = ""

    async def _load_users(self) -> dict[str, accounts.UserRecord]:
        cached = self._users
        path = self._users_file

        def load() -> tuple[_UsersStamp, dict[str, accounts.UserRecord]]:
            try:
                st = os.stat(path)
            except FileNotFoundError:
                return (0, 0, 0, -1), {}
            stamp = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
            if cached is not None and cached[0] == stamp:
                return cached
            return stamp, accounts.load_users(path)

        try:
            self._users = await trio.to_thread.run_sync(load, limiter=self._file_lock)
        except (OSError, ValueError) as exc:
            raise TempFailure(f"mapped: cannot read the users file: {exc}") from exc
        return self._users[1]


def _window_fields(backend: Backend) -> frozenset[str]:
    settings = getattr(backend, "settings", None)
    if settings is None or not dataclasses.is_dataclass(settings):
        return frozenset()
    return frozenset(f.name for f in dataclasses.fields(settings)) & {"since", "newest"}


def wanted(config: Config) -> bool:
    """Whether ``config`` needs a ``MappedBackend``: routes, named upstreams, accounts settings, or a
    default accounts file that holds accounts. Otherwise ``make_backend`` builds exactly what it built
    before mapped accounts existed."""
    a = config.accounts
    if config.routes or config.upstreams or a.file or a.default_upstream != DEFAULT_PROFILE:
        return True
    try:
        return len(AccountBook.load(config.accounts_path, IdentityPolicy.from_config(config.server))) > 0
    except MappingError as exc:
        raise ConfigError(str(exc), key="accounts.file") from None


def accounts_needing_keys(config: Config) -> list[str]:
    """The accounts (by name) whose upstream credential is sealed with the token key: oauth2, stored and
    bearer. Empty when the config maps nothing. Raises ConfigError for an unreadable accounts file."""
    if not wanted(config):
        return []
    try:
        book = AccountBook.load(config.accounts_path, IdentityPolicy.from_config(config.server))
    except MappingError as exc:
        raise ConfigError(str(exc), key="accounts.file") from None
    return [a.name for a in book if a.credential != "pass-through"]


def book_problems(book: AccountBook, config: Config) -> list[str]:
    """What is wrong between the accounts and the config (``check-config``, ``serve``, ``account add``)."""
    from gateway.backends import window_fields

    profiles = config.profiles()
    # [oauth2.providers.NAME] comes with the OAuth2 configuration; without it no provider is checked
    oauth2 = getattr(config, "oauth2", None)
    providers = getattr(oauth2, "providers", None)
    out: list[str] = []
    for a in book:
        up = profiles.get(a.upstream)
        if up is None:
            out.append(
                f"account {a.name!r}: no upstream profile {a.upstream!r} (known: {', '.join(profiles)})"
            )
            continue
        scheme = upstream_scheme(up.url) if up.url else ""
        if a.credential in ("oauth2", "bearer") and scheme in ("", "maildir"):
            out.append(f"account {a.name!r}: a {a.credential} credential needs an IMAP or JMAP upstream")
        if a.credential == "bearer" and not scheme.startswith("jmap"):
            out.append(f"account {a.name!r}: a bearer credential is a JMAP API token: needs a JMAP upstream")
        if a.credential == "oauth2" and providers is not None and a.provider not in providers:
            out.append(f"account {a.name!r}: no [oauth2.providers.{a.provider}]")
        if a.window.kind in ("since", "days") and "since" not in window_fields(scheme):
            out.append(f"account {a.name!r}: window {a.window} needs an upstream that filters by date")
    return out


if TYPE_CHECKING:
    _check: type[Backend] = MappedBackend
