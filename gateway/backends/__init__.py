"""Upstream backends behind one async interface (see ``base``)."""

from __future__ import annotations

import urllib.parse
from pathlib import Path
from typing import Any

from gateway.backends.base import Backend
from gateway.config import Config, ConfigError, upstream_scheme
from gateway.identity import IdentityPolicy


def make_backend(config: Config) -> Backend:
    """The backend for ``config.upstream.url`` (empty: the embedded demo Maildir in the state dir)."""
    url = config.upstream.url
    users_file = (
        Path(config.upstream.users_file) if config.upstream.users_file else config.state_path / "users"
    )
    try:
        scheme = upstream_scheme(url) if url else ""
    except ValueError as exc:
        raise ConfigError(str(exc), key="upstream.url") from None
    up = config.upstream
    jmap_only = [k for k in ("allowed_origins", "token_accounts") if getattr(up, k)]
    if jmap_only and scheme not in ("jmap+http", "jmap+https"):
        raise ConfigError(f"only a JMAP upstream takes {jmap_only[0]}", key=f"upstream.{jmap_only[0]}")
    if up.token_accounts and not up.token:
        raise ConfigError(
            "maps POP3 users to the accounts of a token: set upstream.token", key="upstream.token_accounts"
        )
    if not url:
        from gateway.backends.maildir import MaildirBackend

        return MaildirBackend(config.state_path / "mail", users_file)
    if scheme == "maildir":
        from gateway.backends.maildir import MaildirBackend

        parts = urllib.parse.urlsplit(url)
        root = urllib.parse.unquote(parts.netloc + parts.path)
        if not root:
            raise ConfigError("maildir:// needs a path, e.g. maildir:///var/mail", key="upstream.url")
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

            session_url = JmapSettings.from_url(url).session_url
            for key, check in (
                ("allowed_origins", lambda: jmap.CredentialScope.build(session_url, up.allowed_origins)),
                ("token_accounts", lambda: jmap.parse_account_map(up.token_accounts)),
            ):
                try:
                    check()
                except ValueError as exc:
                    raise ConfigError(str(exc), key=f"upstream.{key}") from None

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
        raise ConfigError(str(exc), key="upstream.url") from None
    raise ConfigError(f"the {scheme}:// upstream is not available in this version", key="upstream.url")
