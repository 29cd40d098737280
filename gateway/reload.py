"""What a configuration builds, and whether a new one may replace the running one (SIGHUP).

A reload is decided here and applied by the server with plain assignments that cannot fail:

- ``build(config) -> Built`` validates ``config`` as strictly as ``serve`` uses it and builds every object
  that can fail: the TLS server context of each TLS listener, the trusted networks, the plaintext policy,
  the throttle policy and the session limits. It raises ``ConfigError`` naming the key at fault
  (``listen[1].key_file``), and nothing is half built. ``check-config`` and ``serve`` call it too, so a
  file that passes ``check-config`` starts.
- ``plan_reload(running, new, open_sessions=n) -> Reload`` builds everything for ``new`` first, then
  refuses with ``ReloadRefused`` (one sentence, for the log) when ``new`` changes what cannot change live:

  - ``listen``: the number, order, address, ``tls`` mode or ``proxy_protocol`` of any listener (the
    sockets are bound and each session finds its TLS context by the listener's index). A listener's
    ``cert_file`` and ``key_file`` do reload: that is how certificates are renewed.
  - ``server.state_dir`` (the UIDL store is open there), every ``upstream`` key (the backend is built
    once), every ``admin`` key (its listener is bound) and every ``log`` key (set up once at start).
  - ``limits.ipv6_prefix`` while sessions are open: they hold per-client slots counted under keys made
    with the old prefix, and each is released under the key it was acquired with.

  Everything else in ``server`` and ``limits`` applies to sessions that start after the reload; sessions
  already running keep what they started with.

A refused reload changes nothing: the server goes on with the running configuration.
"""

from __future__ import annotations

import dataclasses
import ssl
from collections.abc import Iterator, Mapping
from typing import Any

from gateway import config as cfg
from gateway import files, tls
from gateway.limits import PlaintextAuthPolicy, SessionLimits, ThrottlePolicy, TrustedNetworks

# Sections whose keys apply live, with the keys inside them that do not.
# which names are one account keys locks, limits and UIDL namespaces: never changed under open sessions
_LIVE_SECTIONS = {"server": {"state_dir", "username_case", "default_realm"}, "limits": set[str]()}
_LIVE_LISTENER_KEYS = {"cert_file", "key_file"}


class ReloadRefused(ValueError):
    """A reload that changes what cannot change live. ``str(exc)`` is one sentence for the log."""

    def __init__(self, reason: str, keys: tuple[str, ...] = ()) -> None:
        super().__init__(reason)
        self.reason = reason
        self.keys = keys


@dataclasses.dataclass(frozen=True, slots=True, repr=False)
class Built:
    """Everything a config decides that can fail to build, built whole."""

    tls_contexts: Mapping[int, ssl.SSLContext]  # by listener index, for each listener with tls != "none"
    trusted_proxies: TrustedNetworks
    plaintext: PlaintextAuthPolicy
    throttle_policy: ThrottlePolicy
    limits: SessionLimits  # fresh: no slot taken; the server carries the running counts over
    warnings: tuple[str, ...]  # valid but risky settings, one sentence each, to log

    def __repr__(self) -> str:
        return f"Built(tls_listeners={sorted(self.tls_contexts)}, warnings={len(self.warnings)})"


@dataclasses.dataclass(frozen=True, slots=True, repr=False)
class Reload:
    """An accepted reload: the config to run and what it built. ``changed`` lists the dotted keys."""

    config: cfg.Config
    built: Built
    changed: tuple[str, ...]

    def describe(self) -> str:
        if not self.changed:
            return "configuration unchanged; TLS certificates re-read"
        shown = ", ".join(self.changed[:10]) + (
            f" and {len(self.changed) - 10} more" if len(self.changed) > 10 else ""
        )
        return f"configuration reloaded ({shown}); TLS certificates re-read"

    def __repr__(self) -> str:  # the config may hold a token: keys only
        return f"Reload(changed={list(self.changed)!r})"


def policies(lim: cfg.LimitsConfig) -> tuple[ThrottlePolicy, SessionLimits]:
    """The throttle policy and fresh session limits of ``[limits]`` (ValueError when they are wrong)."""
    policy = ThrottlePolicy(
        base_delay=lim.auth_delay_base,
        max_delay=lim.auth_delay_max,
        window=lim.auth_failure_window,
        lockout_after=lim.lockout_after,
        lockout_duration=lim.lockout_duration,
    )
    limits = SessionLimits(
        max_per_ip=lim.max_sessions_per_ip,
        max_per_account=lim.max_sessions_per_account,
        ipv6_prefix=lim.ipv6_prefix,
    )
    return policy, limits


def build(config: cfg.Config) -> Built:
    cfg.validate(config)
    contexts: dict[int, ssl.SSLContext] = {}
    for i, lc in enumerate(config.listen):
        if lc.tls == "none":
            continue
        try:
            contexts[i] = tls.server_context(lc.cert_file, lc.key_file)
        except tls.TlsFileError as exc:
            raise cfg.ConfigError(str(exc), key=f"listen[{i}].{exc.which}") from None
    s, lim = config.server, config.limits
    try:
        trusted = TrustedNetworks(s.trusted_proxies)
    except ValueError as exc:
        raise cfg.ConfigError(str(exc), key="server.trusted_proxies") from None
    try:
        plaintext = PlaintextAuthPolicy(
            everywhere=s.allow_plaintext_auth, networks=TrustedNetworks(s.plaintext_auth_networks)
        )
    except ValueError as exc:
        raise cfg.ConfigError(str(exc), key="server.plaintext_auth_networks") from None
    try:
        policy, limits = policies(lim)
    except ValueError as exc:
        raise cfg.ConfigError(str(exc), key="limits") from None
    warnings = (*cfg.warnings(config), *files.config_warnings(config))
    return Built(contexts, trusted, plaintext, policy, limits, warnings)


def plan_reload(running: cfg.Config, new: cfg.Config, *, open_sessions: int) -> Reload:
    """Build everything ``new`` needs, then accept it or raise ``ReloadRefused``; raises ``ConfigError``
    when ``new`` cannot be built. ``open_sessions``: sessions open now (they hold per-client slots)."""
    built = build(new)
    changed = tuple(_changed(running, new))
    restart = [key for key in changed if not _live(key)]
    if restart:
        raise ReloadRefused(
            "reload refused, the running configuration stays: "
            + ", ".join(restart)
            + (" changes" if len(restart) == 1 else " change")
            + " only with a restart",
            tuple(restart),
        )
    if "limits.ipv6_prefix" in changed and open_sessions > 0:
        raise ReloadRefused(
            f"reload refused, the running configuration stays: limits.ipv6_prefix changes only with no "
            f"session open ({open_sessions} open), or with a restart",
            ("limits.ipv6_prefix",),
        )
    return Reload(new, built, changed)


def _live(key: str) -> bool:
    if key.startswith("listen["):
        _, _, leaf = key.partition("].")
        return leaf in _LIVE_LISTENER_KEYS
    section, _, leaf = key.partition(".")
    fixed = _LIVE_SECTIONS.get(section)
    return fixed is not None and bool(leaf) and leaf.split(".")[0].split("[")[0] not in fixed


def _changed(old: Any, new: Any, path: str = "") -> Iterator[str]:
    """The dotted keys whose values differ (a listener count that differs is ``listen`` itself)."""
    if dataclasses.is_dataclass(old) and type(old) is type(new):
        for f in dataclasses.fields(old):
            yield from _changed(
                getattr(old, f.name), getattr(new, f.name), f"{path}.{f.name}" if path else f.name
            )
    elif (
        isinstance(old, tuple)
        and isinstance(new, tuple)
        and len(old) == len(new)
        and any(dataclasses.is_dataclass(v) for v in old)
    ):
        for i, (a, b) in enumerate(zip(old, new, strict=True)):
            yield from _changed(a, b, f"{path}[{i}]")
    elif old != new:
        yield path


__all__ = ["Built", "Reload", "ReloadRefused", "build", "plan_reload"]
