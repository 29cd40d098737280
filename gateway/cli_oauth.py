"""``pop3-gateway oauth keygen|login|status|logout``: authorising mapped accounts from a terminal.

- ``keygen`` creates the token key file (0600) when it is missing; it never replaces one.
- ``login --account A [--provider P] [--flow device|code|client-credentials]`` runs one flow and stores
  the token set: device (RFC 8628: the verification URI and user code go to stdout, then it polls until
  the code is approved, denied or expired), authorisation code with PKCE (the URL goes to stdout, the
  redirect URL the browser ended on is read from stdin), or client credentials (fetched at once).
- ``status [--account A ...]`` shows each account's provider, flow, token state (``ok``, ``expiring``,
  ``expired``, ``no-refresh-token``, ``no-token``, ``unreadable``) and expiry; never a token.
- ``logout --account A`` revokes the grant where the provider has a revocation endpoint, then deletes the
  stored token.

The provider (and default flow) of an account come from ``--provider`` / ``--flow``, else from the
account book (``gateway.mapping``) when it names them, else from the provider's ``flow``. Account names
are normalised as logins are (``server.username_case``, ``server.default_realm``). Exit status: 0 done,
1 the flow or a provider failed, 2 a usage or configuration error.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal, TextIO

import trio

from gateway import config as cfg
from gateway.identity import IdentityPolicy, normalize
from gateway.lazy import lazy_module

if TYPE_CHECKING:
    from gateway.oauth2 import flows, providers, tokens, vault
else:  # imported at first use: `serve` and every other command build this parser, and httpx and the
    # AEAD (about 10 MiB and 60 ms) are for the oauth commands and mapped accounts only
    flows = lazy_module("gateway.oauth2.flows")
    providers = lazy_module("gateway.oauth2.providers")
    tokens = lazy_module("gateway.oauth2.tokens")
    vault = lazy_module("gateway.oauth2.vault")

FLOWS = ("device", "code", "client-credentials")
DEVICE_START_TIMEOUT = 30.0


def register(subparsers: Any) -> None:
    """Add ``oauth`` and its actions to the ``pop3-gateway`` parser's subparsers."""
    oauth = subparsers.add_parser(
        "oauth",
        help="authorise mapped accounts with an OAuth2 provider",
        description="OAuth2 tokens of mapped accounts (docs/oauth2.md).",
    )
    actions = oauth.add_subparsers(dest="oauth_command", required=True, metavar="ACTION")
    keygen = actions.add_parser(
        "keygen",
        help="create the token key file",
        description="Create the key file that encrypts tokens and stored secrets (mode 0600), "
        "unless it exists: a key is never replaced.",
    )
    login = actions.add_parser(
        "login",
        help="authorise an account",
        description="Run an OAuth2 flow for ACCOUNT and store its tokens.",
    )
    login.add_argument("--account", required=True, help="the gateway account (its POP3 user name)")
    login.add_argument("--provider", help="an [oauth2.providers.NAME] (default: the account's)")
    login.add_argument("--flow", choices=FLOWS, help="default: the account's, else the provider's flow")
    status = actions.add_parser(
        "status", help="show token states", description="Show each account's token state and expiry."
    )
    status.add_argument(
        "--account", action="append", default=[], help="this account (repeatable; default: every one)"
    )
    logout = actions.add_parser(
        "logout",
        help="revoke and delete an account's token",
        description="Revoke the account's grant where the provider allows it, then delete its token.",
    )
    logout.add_argument("--account", required=True)
    logout.add_argument("--provider", help="for revocation when the stored token names none")
    for p in (keygen, login, status, logout):
        p.add_argument("--config", metavar="FILE", help="TOML configuration file")
        p.add_argument("--state-dir", metavar="DIR", help="the state directory (tokens live under it)")
        p.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    config = cfg.load(args.config) if args.config else cfg.Config()
    if args.state_dir:
        config = cfg.with_overrides(config, state_dir=args.state_dir)
    if args.oauth_command == "keygen":
        return keygen(config)
    if args.oauth_command == "login":
        return login(config, args.account, args.provider, args.flow)
    if args.oauth_command == "status":
        return status(config, args.account)
    if args.oauth_command == "logout":
        return logout(config, args.account, args.provider)
    raise AssertionError(args.oauth_command)  # pragma: no cover


def _fail(message: str, code: int = 1) -> int:
    print(f"pop3-gateway: {message}", file=sys.stderr)
    return code


def _account(config: cfg.Config, typed: str) -> str:
    return normalize(typed, IdentityPolicy.from_config(config.server))


def _when(epoch: float | None) -> str:
    if epoch is None:
        return "unknown"
    moment = datetime.datetime.fromtimestamp(epoch, datetime.UTC).replace(microsecond=0)
    return moment.isoformat().replace("+00:00", "Z")


def _keys(config: cfg.Config) -> vault.Keyring | None:
    try:
        return tokens.load_keyring(config)
    except vault.KeyFileError as exc:
        _fail(f"{exc} (create one with: pop3-gateway oauth keygen)")
        return None


# ------------------------------------------------------------------ the account book (gateway.mapping)


def mapped_accounts(config: cfg.Config) -> dict[str, tuple[str | None, str | None]]:
    """The account book's OAuth2 accounts: name -> (provider, flow). Empty without a book; an unreadable
    book is a warning here (``--provider`` still names the provider) and an error at ``serve``."""
    from gateway import mapping

    path = config.accounts_path
    try:
        book = mapping.AccountBook.load(path)
    except (mapping.MappingError, OSError) as exc:
        print(f"pop3-gateway: warning: the account book {path} cannot be read: {exc}", file=sys.stderr)
        return {}
    return {
        account.name: (account.provider, account.flow)
        for account in book.accounts.values()
        if account.credential == "oauth2"
    }


# ------------------------------------------------------------------ keygen


def keygen(config: cfg.Config) -> int:
    path = tokens.key_file_path(config)
    if path is None:
        return _fail(
            f"the key comes from ${vault.ENV_VAR}; no key file to create (set oauth2.key_file to use one)", 2
        )
    from gateway.files import make_private_dir

    make_private_dir(path.parent)
    try:
        vault.create_key_file(path)
    except FileExistsError:
        print(f"{path} exists; left as it is (a key is never replaced)")
        return 0
    except OSError as exc:
        return _fail(f"cannot create {path}: {exc.strerror}")
    print(f"key file {path} created (mode 0600); back it up: without it no stored token can be read")
    return 0


# ------------------------------------------------------------------ login


def login(
    config: cfg.Config,
    typed: str,
    provider: str | None,
    flow: str | None,
    *,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
) -> int:
    account = _account(config, typed)
    mapped_provider, mapped_flow = mapped_accounts(config).get(account, (None, None))
    name = provider or mapped_provider
    if not name and len(config.oauth2.providers) == 1:
        (name,) = config.oauth2.providers  # the only one there is
    if not name:
        return _fail(f"account {account!r}: no provider: give --provider NAME", 2)
    if name not in config.oauth2.providers:
        known = ", ".join(sorted(config.oauth2.providers)) or "none configured"
        return _fail(f"no provider {name!r} in [oauth2.providers] ({known})", 2)
    chosen = flow or (mapped_flow if provider is None else None) or config.oauth2.providers[name].flow
    if chosen not in FLOWS:
        return _fail(f"unknown flow {chosen!r}", 2)
    keys = _keys(config)
    if keys is None:
        return 2
    try:
        return trio.run(_login, config, keys, account, name, chosen, stdin or sys.stdin, stdout or sys.stdout)
    except (flows.OAuthError, providers.DiscoveryError) as exc:
        return _fail(f"oauth login of {account!r} failed: {exc}")
    except trio.TooSlowError:
        return _fail(f"oauth login of {account!r} failed: the provider did not answer in time")


async def _login(
    config: cfg.Config,
    keys: vault.Keyring,
    account: str,
    name: str,
    flow: str,
    stdin: TextIO,
    stdout: TextIO,
) -> int:
    async with flows.open_http() as http:
        registry = tokens.ProviderRegistry.from_config(config.oauth2, http)
        handle = await registry.get(name)
        client, timeout = handle.client, config.oauth2.token_timeout
        if flow == "device":
            with trio.fail_after(DEVICE_START_TIMEOUT):
                device = await client.start_device(handle.scope)
            print(f"To authorise {account}, open {device.verification_uri}", file=stdout)
            print(f"and enter the code: {device.user_code}", file=stdout)
            if device.verification_uri_complete:
                print(f"(or open {device.verification_uri_complete})", file=stdout)
            print("Waiting for the approval...", file=stdout, flush=True)
            got = await client.poll_device(device)
        elif flow == "code":
            url, pending = client.authorization_url(
                handle.scope, handle.redirect_uri, extra=handle.provider.authorization_params
            )
            print(f"To authorise {account}, open this URL in a browser:\n\n{url}\n", file=stdout)
            print(
                f"After the consent, the browser goes to {handle.redirect_uri} (nothing needs to answer "
                "there). Paste the whole URL from its address bar here and press Enter:",
                file=stdout,
                flush=True,
            )
            pasted = await trio.to_thread.run_sync(stdin.readline)
            if not pasted.strip():
                print("pop3-gateway: nothing pasted; nothing stored", file=sys.stderr)
                return 1
            with trio.fail_after(timeout):
                got = await client.exchange_redirect(pending, pasted)
        else:
            if handle.app_scope is None:
                print(f"pop3-gateway: provider {name!r} has no client-credentials scope", file=sys.stderr)
                return 2
            with trio.fail_after(timeout):
                got = await client.client_credentials(handle.app_scope)
        store = tokens.token_vault(config, keys)
        async with store.refreshing(account):
            await store.store(account, got, name, flow)
    print(
        f"account {account}: authorised with provider {name} ({flow}); "
        f"the access token expires {_when(got.expires_at)}",
        file=stdout,
    )
    if not got.refresh_token and flow != "client-credentials":
        print(
            "pop3-gateway: warning: the provider sent no refresh token; the account needs `oauth login` "
            "again when the access token expires (ask for offline access: docs/oauth2.md)",
            file=sys.stderr,
        )
    return 0


# ------------------------------------------------------------------ status


def token_state(stored: vault.StoredToken, now: float, margin: float) -> str:
    token = stored.token
    if not token.refresh_token and stored.flow != "client-credentials":
        return "no-refresh-token"
    if token.expires_at is None:
        return "ok"
    if now >= token.expires_at:
        return "expired"
    if now >= token.expires_at - tokens.effective_margin(stored, margin):
        return "expiring"
    return "ok"


def status(config: cfg.Config, typed: Sequence[str], *, stdout: TextIO | None = None) -> int:
    out = stdout or sys.stdout
    keys = _keys(config)
    if keys is None:
        return 2
    book = mapped_accounts(config)
    names = [_account(config, t) for t in typed] or sorted(book)
    store = tokens.token_vault(config, keys)
    if not names:
        print("no accounts listed: give --account NAME (the account book names no OAuth2 account)", file=out)
    now = time.time()
    rows = [("ACCOUNT", "PROVIDER", "FLOW", "STATE", "EXPIRES")]
    for name in names:
        mapped = book.get(name, (None, None))[0] or "-"
        try:
            stored = store.load_sync(name)
        except vault.RecordError:
            rows.append((name, mapped, "-", "unreadable", "-"))
            continue
        if stored is None:
            rows.append((name, mapped, "-", "no-token", "-"))
            continue
        state = token_state(stored, now, config.oauth2.refresh_margin)
        rows.append((name, stored.provider or "-", stored.flow or "-", state, _when(stored.token.expires_at)))
    if names:
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        for row in rows:
            print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip(), file=out)
    listed = {store.path(n).name for n in names}
    others = (
        [p for p in store.directory.glob("*.token") if p.name not in listed]
        if store.directory.is_dir()
        else []
    )
    if others:
        print(f"{len(others)} other token record(s) whose account is not listed here", file=out)
    return 0


# ------------------------------------------------------------------ logout


def logout(config: cfg.Config, typed: str, provider: str | None, *, stdout: TextIO | None = None) -> int:
    out = stdout or sys.stdout
    account = _account(config, typed)
    keys = _keys(config)
    if keys is None:
        return 2
    store = tokens.token_vault(config, keys)
    try:
        stored = store.load_sync(account)
    except vault.RecordError as exc:
        print(f"pop3-gateway: warning: {exc}; deleting it without revoking", file=sys.stderr)
        stored = None
    if stored is not None:
        name = stored.provider or provider
        if name and name in config.oauth2.providers:
            trio.run(_revoke, config, name, stored, out)
        else:
            print("pop3-gateway: warning: no configured provider to revoke the grant at", file=sys.stderr)
    if store.delete_sync(account):
        print(f"account {account}: token deleted", file=out)
        return 0
    print(f"account {account}: no token stored", file=out)
    return 1 if stored is None else 0


async def _revoke(config: cfg.Config, name: str, stored: vault.StoredToken, out: TextIO) -> None:
    token = stored.token
    hint: Literal["refresh_token", "access_token"] = (
        "refresh_token" if token.refresh_token else "access_token"
    )
    value = token.refresh_token or token.access_token
    try:
        async with flows.open_http() as http:
            handle = await tokens.ProviderRegistry.from_config(config.oauth2, http).get(name)
            with trio.fail_after(config.oauth2.token_timeout):
                await handle.client.revoke(value, hint)
    except flows.Unsupported:
        print(
            f"provider {name} has no revocation endpoint: the grant stays valid there until it expires "
            "or is revoked at the provider (docs/oauth2.md)",
            file=out,
        )
    except (flows.OAuthError, providers.DiscoveryError, trio.TooSlowError) as exc:
        why = str(exc) or "timed out"
        print(f"pop3-gateway: warning: revocation failed ({why}); deleting the token anyway", file=sys.stderr)
    else:
        print(f"grant revoked at provider {name}", file=out)
