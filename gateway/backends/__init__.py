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
    if not url:
        from gateway.backends.maildir import MaildirBackend

        return MaildirBackend(config.state_path / "mail", users_file)
    try:
        scheme = upstream_scheme(url)
    except ValueError as exc:
        raise ConfigError(str(exc), key="upstream.url") from None
    if scheme == "maildir":
        from gateway.backends.maildir import MaildirBackend

        parts = urllib.parse.urlsplit(url)
        root = urllib.parse.unquote(parts.netloc + parts.path)
        if not root:
            raise ConfigError("maildir:// needs a path, e.g. maildir:///var/mail", key="upstream.url")
        return MaildirBackend(Path(root), users_file)
    up = config.upstream
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

            return JmapBackend(
                JmapSettings.from_url(
                    url,
                    token=up.token,
                    users_file=str(users_file) if up.token else "",
                    timeout=config.server.upstream_timeout,
                    **common,
                )
            )
    except (ValueError, OSError) as exc:
        raise ConfigError(str(exc), key="upstream.url") from None
    raise ConfigError(f"the {scheme}:// upstream is not available in this version", key="upstream.url")
