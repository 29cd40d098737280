"""The upstream credentials a running gateway hands to its mapped accounts: ``Credentials`` is both the
mapped backend's ``TokenProvider`` (OAuth2 access tokens, through ``tokens.TokenSource``) and its
``SecretReader`` (stored passwords and bearer tokens, through ``tokens.SecretVault``).

The key (``[oauth2] key_file`` or ``$POP3_GATEWAY_TOKEN_KEYS``) is read at the first login that needs it,
not at start: a gateway without mapped secrets needs no key, and an account added to the accounts file
while the gateway runs works without a restart. ``serve`` calls ``check()`` at start when the accounts
file already holds accounts that need the key, so a missing key is a start-up error there, not a
``[SYS/PERM]`` at the first poll. The HTTP client for the token endpoints is made with the token source
and closed by ``aclose()``.

Failures map to what the login gate answers: no stored secret -> ``AuthFailed`` (``[AUTH]``) with a log
line naming the account and the command that stores one; an unreadable key or record -> ``PermFailure``
(``[SYS/PERM]``); a vault file that cannot be read for now -> ``TempFailure`` (``[SYS/TEMP]``). Nothing
here logs or reprs a secret.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Literal

import httpx
import trio

from gateway.backends.base import AuthFailed, PermFailure, TempFailure
from gateway.config import Config, ConfigError
from gateway.metrics import Metrics
from gateway.oauth2 import flows, tokens
from gateway.oauth2.vault import KeyFileError, Keyring, RecordError

__all__ = ["Credentials"]

log = logging.getLogger("gateway.oauth2")


class Credentials:
    def __init__(
        self,
        config: Config,
        *,
        metrics: Metrics | None = None,
        environ: Mapping[str, str] | None = None,
        keys: Keyring | None = None,
    ) -> None:
        self._config = config
        self._metrics = metrics
        self._environ = environ
        self._keys = keys
        self._source: tokens.TokenSource | None = None
        self._secrets: tokens.SecretVault | None = None
        self._http: httpx.AsyncClient | None = None
        self._setup = trio.Lock()

    def __repr__(self) -> str:
        return f"Credentials(keys={'loaded' if self._keys is not None else 'not loaded'})"

    def check(self) -> None:
        """Load the key now (``serve`` at start). Raises ``KeyFileError`` or ``ConfigError``."""
        if self._keys is None:
            self._keys = tokens.load_keyring(self._config, self._environ)

    async def _keyring(self) -> Keyring:
        if self._keys is None:
            try:
                self._keys = await trio.to_thread.run_sync(tokens.load_keyring, self._config, self._environ)
            except (KeyFileError, ConfigError, OSError) as exc:
                log.error("oauth2: the token key cannot be loaded: %s", exc)
                raise PermFailure(f"the token key cannot be loaded: {exc}") from None
        return self._keys

    async def _token_source(self) -> tokens.TokenSource:
        async with self._setup:
            if self._source is None:
                keys = await self._keyring()
                self._http = flows.open_http()
                registry = tokens.ProviderRegistry.from_config(self._config.oauth2, self._http)
                self._source = tokens.TokenSource(
                    tokens.token_vault(self._config, keys),
                    registry,
                    self._metrics,
                    margin=self._config.oauth2.refresh_margin,
                    timeout=self._config.oauth2.token_timeout,
                )
            return self._source

    async def _secret_vault(self) -> tokens.SecretVault:
        async with self._setup:
            if self._secrets is None:
                self._secrets = tokens.secret_vault(self._config, await self._keyring())
            return self._secrets

    # -- TokenProvider

    async def access_token(self, account_name: str, provider: str, *, force: bool = False) -> str:
        source = await self._token_source()
        return await source.access_token(account_name, provider, force=force)

    # -- SecretReader

    async def get(self, account_name: str, kind: Literal["password", "bearer"]) -> str:
        vault = await self._secret_vault()
        try:
            value = await vault.get(account_name, kind)
        except RecordError as exc:
            log.error("mapped: %s", exc)
            raise PermFailure(str(exc)) from None
        except OSError as exc:
            raise TempFailure(f"the {kind} record of an account cannot be read: {exc.strerror}") from None
        if value is None:
            log.error(
                "mapped: account %s has no stored %s; run: pop3-gateway account set-secret %s",
                account_name,
                "upstream password" if kind == "password" else "bearer token",
                account_name,
            )
            raise AuthFailed(f"mapped: no stored {kind} for the account")
        return value

    # -- the SecretWriter of ``account add``

    async def put(self, account: str, kind: Literal["password", "bearer"], value: str) -> None:
        vault = await self._secret_vault()
        await vault.put(account, kind, value)

    async def delete(self, account: str, kind: Literal["password", "bearer"]) -> bool:
        vault = await self._secret_vault()
        return await vault.delete(account, kind)

    async def aclose(self) -> None:
        if self._http is not None:
            with trio.CancelScope(shield=True):
                await self._http.aclose()
            self._http = None
        self._source = None
