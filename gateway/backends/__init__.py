"""Upstream backends behind one async interface (see ``base``)."""

from __future__ import annotations

import dataclasses
import datetime
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.backends.base import Backend
from gateway.config import Config, ConfigError, UpstreamConfig, upstream_scheme

if TYPE_CHECKING:
    from gateway.backends.mapped import SecretReader, TokenProvider
from gateway.identity import IdentityPolicy


def make_backend(
    config: Config, *, tokens: TokenProvider | None = None, secrets: SecretReader | None = None
) -> Backend:
    """The backend for ``config.upstream.url`` (empty: the embedded demo Maildir in the state dir); a
    ``MappedBackend`` instead when the config has routes, named upstreams or an accounts file with
    accounts (``tokens`` and ``secrets`` serve its oauth2, stored and bearer accounts)."""
    from gateway.backends import mapped

    if not mapped.wanted(config):
        return build_backend(config.upstream, config)
    return mapped.MappedBackend.from_config(config, tokens=tokens, secrets=secrets)


def build_backend(
    up: UpstreamConfig,
    config: Config,
    *,
    where: str = "upstream",
    since: datetime.date | None = None,
    newest: int | None = None,
) -> Backend:
    """The backend of one upstream profile ``up`` (``where`` names its table in errors). ``since`` and
    ``newest`` go into the backend's settings where it has those fields (see ``window_fields``)."""
    url = up.url
    users_file = Path(up.users_file) if up.users_file else config.state_path / "users"
    try:
        scheme = upstream_scheme(url) if url else ""
    except ValueError as exc:
        raise ConfigError(str(exc), key=f"{where}.url") from None
    jmap_only = [k for k in ("allowed_origins", "token_accounts") if getattr(up, k)]
    if jmap_only and scheme not in ("jmap+http", "jmap+https"):
        raise ConfigError(f"only a JMAP upstream takes {jmap_only[0]}", key=f"{where}.{jmap_only[0]}")
    if up.token_accounts and not up.token:
        raise ConfigError(
            f"maps POP3 users to the accounts of a token: set {where}.token", key=f"{where}.token_accounts"
        )
    if not url:
        from gateway.backends.maildir import MaildirBackend

        return MaildirBackend(config.state_path / "mail", users_file)
    if scheme == "maildir":
        from gateway.backends.maildir import MaildirBackend

        parts = urllib.parse.urlsplit(url)
        root = urllib.parse.unquote(parts.netloc + parts.path)
        if not root:
            raise ConfigError("maildir:// needs a path, e.g. maildir:///var/mail", key=f"{where}.url")
        return MaildirBackend(Path(root), users_file)
    common: dict[str, Any] = {
        "folder": up.folder,
        "ca_file": up.ca_file,
        "insecure": up.insecure,
        "delete_policy": up.delete_policy,
        "mark_seen": up.mark_seen,
    }
    try:
        if scheme in ("imap", "imap+starttls", "imaps"):
            from gateway.backends.imap import ImapBackend, ImapSettings

            common.update(_window(ImapSettings, since, newest))
            return ImapBackend(
                ImapSettings.from_url(
                    url,
                    connect_timeout=config.server.upstream_timeout,
                    identity=IdentityPolicy.from_config(config.server),
                    max_snapshot_rows=up.max_snapshot_rows,
                    expunge_without_uidplus=up.expunge_without_uidplus,
                    **common,
                )
            )
        if scheme in ("jmap+http", "jmap+https"):
            from gateway.backends.jmap import JmapBackend, JmapSettings
            from gateway.proto import jmap

            common.update(_window(JmapSettings, since, newest))
            session_url = JmapSettings.from_url(url).session_url
            for key, check in (
                ("allowed_origins", lambda: jmap.CredentialScope.build(session_url, up.allowed_origins)),
                ("token_accounts", lambda: jmap.parse_account_map(up.token_accounts)),
            ):
                try:
                    check()
                except ValueError as exc:
                    raise ConfigError(str(exc), key=f"{where}.{key}") from None

            return JmapBackend(
                JmapSettings.from_url(
                    url,
                    token=up.token,
                    users_file=str(users_file) if up.token else "",
                    timeout=config.server.upstream_timeout,
                    allowed_origins=up.allowed_origins,
                    token_accounts=up.token_accounts,
                    **common,
                )
            )
    except (ValueError, OSError) as exc:
        raise ConfigError(str(exc), key=f"{where}.url") from None
    raise ConfigError(f"the {scheme}:// upstream is not available in this version", key=f"{where}.url")


def window_fields(scheme: str) -> frozenset[str]:
    """Which of ``since`` / ``newest`` the settings of the backend for ``scheme`` carry ("" = demo)."""
    if scheme in ("imap", "imap+starttls", "imaps"):
        from gateway.backends.imap import ImapSettings

        return _fields(ImapSettings)
    if scheme in ("jmap+http", "jmap+https"):
        from gateway.backends.jmap import JmapSettings

        return _fields(JmapSettings)
    return frozenset()


def _fields(settings: type) -> frozenset[str]:
    return frozenset(f.name for f in dataclasses.fields(settings)) & {"since", "newest"}


def _window(settings: type, since: datetime.date | None, newest: int | None) -> dict[str, Any]:
    have = _fields(settings)
    out: dict[str, Any] = {}
    if since is not None and "since" in have:
        out["since"] = since
    if newest is not None and "newest" in have:
        out["newest"] = newest
    return out
