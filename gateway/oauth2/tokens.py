"""Upstream credentials of mapped accounts: OAuth2 access tokens kept fresh, and stored secrets.

``TokenSource.access_token(account, provider, force=False)`` is what a login asks for. It reads the
account's record from the ``TokenVault`` and returns its access token while that is more than
``refresh_margin`` seconds from expiry. Otherwise, under ``vault.refreshing(account)`` (one refresher per
account across tasks and processes), it loads the record again (another refresher may have finished),
decides again, and renews: with the refresh token, or, for an app-only account (a record the
client-credentials flow made), with a new client-credentials grant. The new token set, with a rotated
refresh token when the server sent one, is stored (atomically, fsync'd) before its access token is
returned: a refresh token the provider rotated is never lost after it was used. ``force=True`` (the
upstream refused the token) renews even an unexpired token, unless another refresher replaced it
meanwhile.

Failures, each one log line that holds no token, code or secret, and ``oauth2_refresh_total{outcome}``:

- ``invalid_grant`` (revoked, expired, consent withdrawn) and an account without a usable record raise
  ``ReauthorizationNeeded`` (an ``AuthFailed``: ``-ERR [AUTH]``). The log line names the account and the
  command that repairs it: ``pop3-gateway oauth login --account NAME``. The record is kept (for
  ``oauth status``); only that command replaces it.
- The token endpoint down, slow (``token_timeout``), answering 5xx or nonsense: ``TempFailure``
  (``-ERR [SYS/TEMP]``) and the record is untouched. An access token that has not expired yet is still
  returned while its refresh is failing this way.
- Anything else the provider refuses (``invalid_client``: an expired client secret; a discovery document
  that is not the issuer's): ``PermFailure`` (``[SYS/PERM]``), outcome ``refused``.
- A record that does not decrypt (another key, altered): ``PermFailure``; the key is the operator's to fix.

``SecretVault`` keeps the other kinds of upstream credential (a ``stored`` account's upstream password,
a ``bearer`` account's JMAP API token) sealed with the same ``Keyring`` (AES-256-GCM; the associated
data binds the format version, the key id, the kind and the account, so a record moved to another
account or kind fails closed), one 0600 file per account and kind under ``<state_dir>/secrets/``,
replaced atomically.

``open_token_source(config)`` builds the whole thing from ``[oauth2]``: keys (``load_keyring``), the vault
under ``<state_dir>/oauth2/``, one ``OAuth2Client`` per ``[oauth2.providers.NAME]`` (``ProviderRegistry``;
an ``oidc`` provider is discovered at its first use and cached).
"""

from __future__ import annotations

import binascii
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import secrets
import stat
import time
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Literal, Protocol

import httpx
import trio
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from gateway.backends.base import AuthFailed, PermFailure, TempFailure
from gateway.config import Config, ConfigError, OAuth2Config, OAuth2ProviderConfig
from gateway.files import make_private_dir
from gateway.metrics import Metrics, RefreshOutcome
from gateway.oauth2 import flows, providers
from gateway.oauth2.vault import (
    ENV_VAR,
    MAX_RECORD_BYTES,
    NONCE_BYTES,
    Keyring,
    RecordError,
    StoredToken,
    TokenVault,
    _b64d,
    _b64e,
    needs_refresh,
)

log = logging.getLogger("gateway.oauth2")

SECRET_VERSION = "p3gs1"  # noqa: S105 - a format tag, no secret
MAX_SECRET_CHARS = 16 * 1024
MAX_CLIENT_SECRET_BYTES = 4096
OIDC_DEFAULT_SCOPE = "openid offline_access"
SecretKind = Literal["password", "bearer"]
SECRET_KINDS: tuple[str, ...] = ("password", "bearer")
Flow = Literal["device", "code", "client-credentials"]


class ReauthorizationNeeded(AuthFailed):
    """The account's grant is gone (or it never had one): ``pop3-gateway oauth login`` must run again."""

    def __init__(self, account: str, why: str) -> None:
        super().__init__(f"oauth2: account {_shown(account)} needs re-authorisation ({why})")
        self.account = account


class UnknownProvider(LookupError):
    """No ``[oauth2.providers.NAME]`` of that name."""


def _shown(text: str) -> str:
    """An account or provider name made safe for one log line."""
    return re.sub(r"[^\x21-\x7e]", "?", text)[:320]


def login_command(account: str) -> str:
    return f"pop3-gateway oauth login --account {_shown(account)}"


# ------------------------------------------------------------------ keys, paths, client secrets


def key_file_path(config: Config, environ: Mapping[str, str] | None = None) -> Path | None:
    """Where the key comes from: the configured key file; None when it is the environment variable
    (``key_file`` empty and the variable set); else ``<state_dir>/token.key``."""
    env = os.environ if environ is None else environ
    if config.oauth2.key_file:
        return Path(config.oauth2.key_file)
    if env.get(ENV_VAR):
        return None
    return config.state_path / "token.key"


def load_keyring(config: Config, environ: Mapping[str, str] | None = None) -> Keyring:
    """The keys for ``config``; ``vault.KeyFileError`` (text without any key) when there are none."""
    return Keyring.load(key_file_path(config, environ), environ)


def token_vault(config: Config, keys: Keyring, *, clock: Callable[[], float] = time.time) -> TokenVault:
    return TokenVault(config.state_path / "oauth2", keys, clock=clock)


def secret_vault(config: Config, keys: Keyring, *, clock: Callable[[], float] = time.time) -> SecretVault:
    return SecretVault(config.state_path / "secrets", keys, clock=clock)


def read_client_secret(path: Path | str, key: str) -> str:
    """The one-line client secret in ``path``, refused (``ConfigError`` naming ``key``) unless it is a
    regular file of this user (or root) with no access for group or others. The text never holds it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise ConfigError(f"cannot open {path}: {exc.strerror}", key=key) from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{path} is not a regular file", key=key)
        if st.st_mode & 0o077:
            raise ConfigError(
                f"{path} is readable by others (mode {stat.S_IMODE(st.st_mode):04o}): chmod 600 it", key=key
            )
        if st.st_uid not in (os.geteuid(), 0):
            raise ConfigError(f"{path} belongs to another user", key=key)
        data = f.read(MAX_CLIENT_SECRET_BYTES + 1)
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8", key=key) from None
    if len(data) > MAX_CLIENT_SECRET_BYTES or not text or not text.isprintable():
        raise ConfigError(f"{path} must hold one line: the client secret", key=key)
    return text


# ------------------------------------------------------------------ providers


@dataclasses.dataclass(frozen=True, slots=True)
class ProviderHandle:
    """A configured provider, ready to use: its endpoints, a client, and the scopes to ask for."""

    name: str
    provider: providers.Provider
    client: flows.OAuth2Client
    scope: str  # delegated flows (device, code)
    app_scope: str | None  # client credentials; None: the provider has none
    flow: Flow  # the configured default for `oauth login`
    redirect_uri: str


class Providers(Protocol):
    async def get(self, name: str) -> ProviderHandle: ...


class ProviderRegistry:
    """``[oauth2.providers]`` as ``ProviderHandle``s over one shared ``http`` client. Microsoft and Google
    profiles are built at once; an ``oidc`` one by discovery at its first ``get`` (bounded by
    ``timeout``), then cached. ``get`` raises ``UnknownProvider``, ``flows.Temporary`` (discovery cannot be
    fetched now) or ``providers.DiscoveryError`` (the document is not usable)."""

    def __init__(
        self,
        configs: Mapping[str, OAuth2ProviderConfig],
        http: httpx.AsyncClient,
        *,
        client_secrets: Mapping[str, str] | None = None,
        timeout: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._configs = dict(configs)
        self._http = http
        self._secrets = dict(client_secrets or {})
        self._timeout = timeout
        self._clock = clock
        self._handles: dict[str, ProviderHandle] = {}
        self._lock = trio.Lock()

    def __repr__(self) -> str:
        return f"ProviderRegistry({sorted(self._configs)!r})"

    @classmethod
    def from_config(
        cls, oauth2: OAuth2Config, http: httpx.AsyncClient, *, clock: Callable[[], float] = time.time
    ) -> ProviderRegistry:
        """Reads every ``client_secret_file`` now: a bad one is a ``ConfigError`` at start, not at a login."""
        found = {
            name: read_client_secret(p.client_secret_file, f"oauth2.providers.{name}.client_secret_file")
            for name, p in oauth2.providers.items()
            if p.client_secret_file
        }
        return cls(oauth2.providers, http, client_secrets=found, timeout=oauth2.token_timeout, clock=clock)

    @property
    def names(self) -> list[str]:
        return sorted(self._configs)

    def config(self, name: str) -> OAuth2ProviderConfig:
        try:
            return self._configs[name]
        except KeyError:
            raise UnknownProvider(f"no provider {_shown(name)!r} in [oauth2.providers]") from None

    async def get(self, name: str) -> ProviderHandle:
        cached = self._handles.get(name)
        if cached is not None:
            return cached
        conf = self.config(name)
        async with self._lock:
            cached = self._handles.get(name)
            if cached is not None:
                return cached
            if conf.kind == "microsoft":
                profile = providers.microsoft(conf.tenant or "organizations")
            elif conf.kind == "google":
                profile = providers.google()
            else:
                try:
                    with trio.fail_after(self._timeout):
                        profile = await providers.discover(
                            self._http, conf.issuer, scope=conf.scope or OIDC_DEFAULT_SCOPE, name=name
                        )
                except trio.TooSlowError:
                    raise flows.Temporary("discovery: timed out") from None
            handle = self._handle(name, conf, profile)
            self._handles[name] = handle
            return handle

    def _handle(self, name: str, conf: OAuth2ProviderConfig, profile: providers.Provider) -> ProviderHandle:
        secret = self._secrets.get(name)
        client = flows.OAuth2Client(
            profile.endpoints,
            conf.client_id,
            secret,
            http=self._http,
            auth_method=profile.auth_method if secret else "none",
            clock=self._clock,
        )
        app_scope = conf.app_scope or (
            conf.scope if conf.kind == "oidc" and conf.scope else profile.app_scope
        )
        return ProviderHandle(
            name=name,
            provider=profile,
            client=client,
            scope=conf.scope or profile.user_scope,
            app_scope=app_scope,
            flow=conf.flow,
            redirect_uri=conf.redirect_uri,
        )


# ------------------------------------------------------------------ access tokens


def effective_margin(stored: StoredToken, margin: float) -> float:
    """``margin``, but at most half the token's lifetime as granted (expiry minus the time it was stored):
    a provider handing out 5-minute tokens gets them refreshed at half-life, not at every login."""
    expires = stored.token.expires_at
    if expires is None:
        return margin
    return min(margin, max(0.0, (expires - stored.stored_at) / 2))


class TokenSource:
    """Fresh access tokens of OAuth2-mapped accounts (see the module's docstring)."""

    def __init__(
        self,
        vault: TokenVault,
        providers: Providers,
        metrics: Metrics | None = None,
        *,
        clock: Callable[[], float] = time.time,
        margin: float = 600.0,
        timeout: float = 10.0,
    ) -> None:
        self.vault = vault
        self.providers = providers
        self._metrics = metrics
        self._clock = clock
        self._margin = margin
        self._timeout = timeout

    def __repr__(self) -> str:
        return f"TokenSource({self.vault!r}, margin={self._margin})"

    async def access_token(self, account_name: str, provider: str, *, force: bool = False) -> str:
        """The account's access token, refreshed first when it is due (or ``force``). Raises
        ``ReauthorizationNeeded``, ``TempFailure`` or ``PermFailure``; never wipes a token."""
        stored = await self._load(account_name, provider)
        if not force and not self._due(stored):
            return stored.token.access_token
        seen = stored.token.access_token
        async with self.vault.refreshing(account_name):
            stored = await self._load(account_name, provider)
            due = self._due(stored)
            if not due and (not force or stored.token.access_token != seen):
                return stored.token.access_token  # fresh, or another refresher replaced the refused one
            return await self._renew(account_name, provider, stored, force=force)

    def _due(self, stored: StoredToken) -> bool:
        return needs_refresh(stored.token, self._clock(), effective_margin(stored, self._margin))

    async def _load(self, account: str, provider: str) -> StoredToken:
        try:
            stored = await self.vault.load(account)
        except RecordError as exc:
            log.error("oauth2: %s", exc)
            raise PermFailure(str(exc)) from None
        if stored is None:
            raise self._reauthorize(account, "no token stored")
        if stored.provider and stored.provider != provider:
            raise self._reauthorize(account, f"its token is from provider {_shown(stored.provider)!r}")
        return stored

    def _reauthorize(self, account: str, why: str) -> ReauthorizationNeeded:
        log.error(
            "oauth2: account %s needs re-authorisation (%s); run: %s",
            _shown(account),
            why,
            login_command(account),
        )
        return ReauthorizationNeeded(account, why)

    def _count(self, outcome: RefreshOutcome) -> None:
        if self._metrics is not None:
            self._metrics.oauth2_refresh(outcome)

    async def _renew(self, account: str, provider: str, stored: StoredToken, *, force: bool) -> str:
        app_only = not stored.token.refresh_token and stored.flow == "client-credentials"
        if not stored.token.refresh_token and not app_only:
            raise self._reauthorize(account, "no refresh token")
        try:
            handle = await self.providers.get(provider)
            with trio.fail_after(self._timeout):
                if app_only:
                    if handle.app_scope is None:
                        raise flows.Unsupported("the provider has no client-credentials scope")
                    fresh = await handle.client.client_credentials(handle.app_scope)
                else:
                    fresh = await handle.client.refresh(stored.token)
        except flows.InvalidGrant:
            self._count("invalid_grant")
            raise self._reauthorize(account, "invalid_grant") from None
        except (flows.Temporary, trio.TooSlowError) as exc:
            self._count("temporary")
            why = str(exc) if isinstance(exc, flows.Temporary) else "the token endpoint timed out"
            now = self._clock()
            if not force and (stored.token.expires_at is None or stored.token.expires_at > now):
                log.warning(
                    "oauth2: account %s: refresh failed for now (%s); the current token is used until expiry",
                    _shown(account),
                    why,
                )
                return stored.token.access_token
            log.warning(
                "oauth2: account %s: refresh failed for now (%s); the stored token is kept",
                _shown(account),
                why,
            )
            raise TempFailure(f"oauth2 refresh of {_shown(account)}: {why}") from None
        except (flows.OAuthError, providers.DiscoveryError, UnknownProvider, ValueError) as exc:
            self._count("refused")
            log.error("oauth2: account %s: the provider refused the refresh: %s", _shown(account), exc)
            raise PermFailure(f"oauth2 refresh of {_shown(account)}: {exc}") from None
        try:
            await self.vault.store(account, fresh, provider, stored.flow)
        except OSError as exc:
            self._count("temporary")
            log.error(
                "oauth2: account %s: the refreshed token cannot be stored: %s", _shown(account), exc.strerror
            )
            raise TempFailure(f"oauth2: the token of {_shown(account)} cannot be stored") from None
        self._count("ok")
        log.info("oauth2: account %s: token refreshed", _shown(account))
        return fresh.access_token


@contextlib.asynccontextmanager
async def open_token_source(
    config: Config,
    *,
    metrics: Metrics | None = None,
    keys: Keyring | None = None,
    environ: Mapping[str, str] | None = None,
) -> AsyncIterator[TokenSource]:
    """A ``TokenSource`` for ``config`` with its own http client, closed on exit. ``ConfigError`` for a
    bad client secret file, ``vault.KeyFileError`` without a usable key."""
    keys = keys if keys is not None else load_keyring(config, environ)
    async with flows.open_http() as http:
        registry = ProviderRegistry.from_config(config.oauth2, http)
        yield TokenSource(
            token_vault(config, keys),
            registry,
            metrics,
            margin=config.oauth2.refresh_margin,
            timeout=config.oauth2.token_timeout,
        )


# ------------------------------------------------------------------ stored secrets


@dataclasses.dataclass(frozen=True, slots=True)
class StoredSecret:
    secret: str = dataclasses.field(repr=False)
    stored_at: float
    kid: str


def _secret_associated(kid: str, account: str, kind: str) -> bytes:
    return b"\x00".join([SECRET_VERSION.encode(), kid.encode(), kind.encode(), account.encode("utf-8")])


def _check_kind(kind: str) -> None:
    if kind not in SECRET_KINDS:
        raise ValueError(f"a secret kind is one of {', '.join(SECRET_KINDS)}")


def seal_secret(keys: Keyring, account: str, kind: str, secret: str, now: float) -> bytes:
    _check_kind(kind)
    if not secret or len(secret) > MAX_SECRET_CHARS:
        raise ValueError(f"a secret is 1 to {MAX_SECRET_CHARS} characters")
    kid = keys.current
    key = keys.key(kid)
    assert key is not None
    doc = {"account": account, "kind": kind, "secret": secret, "stored_at": now}
    nonce = secrets.token_bytes(NONCE_BYTES)
    sealed = AESGCM(key).encrypt(nonce, json.dumps(doc).encode(), _secret_associated(kid, account, kind))
    return f"{SECRET_VERSION}.{kid}.{_b64e(nonce)}.{_b64e(sealed)}\n".encode()


def unseal_secret(keys: Keyring, account: str, kind: str, record: bytes) -> StoredSecret:
    what = f"the {kind} record of {account!r}"
    try:
        version, kid, nonce_text, sealed_text = record.decode("ascii").strip().split(".")
    except (UnicodeDecodeError, ValueError):
        raise RecordError(f"{what} is not a record") from None
    if version != SECRET_VERSION:
        raise RecordError(f"{what} has an unknown format {version[:16]!r}")
    key = keys.key(kid)
    if key is None:
        raise RecordError(f"{what} needs key {kid[:32]!r}, which is not loaded")
    try:
        nonce, sealed = _b64d(nonce_text), _b64d(sealed_text)
        if len(nonce) != NONCE_BYTES:
            raise ValueError("nonce length")
        plain = AESGCM(key).decrypt(nonce, sealed, _secret_associated(kid, account, kind))
        doc = json.loads(plain)
        secret, stored_at = doc["secret"], doc["stored_at"]
        if doc["account"] != account or doc["kind"] != kind or not isinstance(secret, str):
            raise ValueError("fields")
        if not isinstance(stored_at, int | float):
            raise ValueError("stored_at")
    except (ValueError, binascii.Error, InvalidTag, KeyError, TypeError):
        raise RecordError(
            f"{what} does not decrypt (another key, another account's or kind's, or altered)"
        ) from None
    return StoredSecret(secret, float(stored_at), kid)


class SecretVault:
    """Upstream passwords (``stored`` accounts) and bearer tokens (``bearer`` accounts) under
    ``directory`` (0700), one 0600 file per account and kind. Nothing here logs or reprs a secret."""

    def __init__(
        self, directory: Path | str, keys: Keyring, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.directory = Path(directory)
        self.keys = keys
        self._clock = clock
        self._io = trio.CapacityLimiter(1)

    def __repr__(self) -> str:
        return f"SecretVault({str(self.directory)!r}, {self.keys!r})"

    def _base(self, account: str, kind: str) -> str:
        _check_kind(kind)
        return hashlib.sha256(f"{kind}\x00{account}".encode()).hexdigest()[:40]

    def path(self, account: str, kind: str) -> Path:
        return self.directory / f"{self._base(account, kind)}.secret"

    # sync, for a worker thread

    def load_sync(self, account: str, kind: str) -> StoredSecret | None:
        path = self.path(account, kind)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise RecordError(f"the {kind} record of {account!r} cannot be opened: {exc.strerror}") from None
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise RecordError(f"the {kind} record of {account!r} is not a regular file")
            data = f.read(MAX_RECORD_BYTES + 1)
        if len(data) > MAX_RECORD_BYTES:
            raise RecordError(f"the {kind} record of {account!r} is too large")
        return unseal_secret(self.keys, account, kind, data)

    def get_sync(self, account: str, kind: str) -> str | None:
        stored = self.load_sync(account, kind)
        return None if stored is None else stored.secret

    def put_sync(self, account: str, kind: str, secret: str) -> None:
        record = seal_secret(self.keys, account, kind, secret, self._clock())
        _write_private(self.directory, self.path(account, kind), record)

    def delete_sync(self, account: str, kind: str) -> bool:
        try:
            self.path(account, kind).unlink()
        except FileNotFoundError:
            return False
        _fsync_dir(self.directory)
        return True

    def rewrap_sync(self, account: str, kind: str) -> bool:
        stored = self.load_sync(account, kind)
        if stored is None or stored.kid == self.keys.current:
            return False
        self.put_sync(account, kind, stored.secret)
        return True

    # async, for trio code

    async def get(self, account: str, kind: SecretKind) -> str | None:
        return await trio.to_thread.run_sync(self.get_sync, account, kind, limiter=self._io)

    async def put(self, account: str, kind: SecretKind, secret: str) -> None:
        await trio.to_thread.run_sync(self.put_sync, account, kind, secret, limiter=self._io)

    async def delete(self, account: str, kind: SecretKind) -> bool:
        return await trio.to_thread.run_sync(self.delete_sync, account, kind, limiter=self._io)

    async def rewrap(self, account: str, kind: SecretKind) -> bool:
        return await trio.to_thread.run_sync(self.rewrap_sync, account, kind, limiter=self._io)

    async def get_password(self, account: str) -> str | None:
        return await self.get(account, "password")

    async def get_bearer(self, account: str) -> str | None:
        return await self.get(account, "bearer")


def _write_private(directory: Path, final: Path, data: bytes) -> None:
    """``final`` replaced by ``data`` (0600): a temporary file in the same directory, fsync'd, renamed."""
    make_private_dir(directory)
    tmp = directory / f".{final.stem}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


__all__ = [
    "Flow",
    "ProviderHandle",
    "ProviderRegistry",
    "Providers",
    "ReauthorizationNeeded",
    "SecretKind",
    "SecretVault",
    "StoredSecret",
    "TokenSource",
    "UnknownProvider",
    "effective_margin",
    "key_file_path",
    "load_keyring",
    "login_command",
    "open_token_source",
    "read_client_secret",
    "secret_vault",
    "token_vault",
]
