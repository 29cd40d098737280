"""Configuration: TOML into frozen dataclasses. Unknown keys and bad values are errors naming key and line.

Every field below is a config key; ``docs/configuration.md`` documents each one and a test checks that the
two list the same keys. Command-line flags override the file (see ``with_overrides``).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
import types
import typing
import urllib.parse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from gateway.identity import realm_problem
from gateway.routing import glob_problem

DEFAULT_STATE_DIR = Path("state")
_T = typing.TypeVar("_T")
UidlFormat = Literal["native", "dovecot", "uidvalidity-uid", "gmail", "hash"]
UIDL_FORMATS: tuple[str, ...] = typing.get_args(UidlFormat)
TlsMode = Literal["none", "starttls", "implicit"]


@dataclasses.dataclass(frozen=True, slots=True)
class DeletePolicy:
    """What DELE + QUIT does upstream, parsed once from ``"expunge"``, ``"move:<folder>"`` or
    ``"flag:<keyword>"`` (the config loader and every backend take this, never the text)."""

    kind: Literal["expunge", "move", "flag"] = "expunge"
    target: str = ""  # the folder for move, the keyword for flag

    @classmethod
    def parse(cls, text: str) -> DeletePolicy:
        if text == "expunge":
            return cls()
        kind, sep, target = text.partition(":")
        if sep and target and kind in ("move", "flag"):
            return cls(kind, target)  # type: ignore[arg-type]
        raise ValueError('must be "expunge", "move:<folder>" or "flag:<keyword>"')

    @classmethod
    def of(cls, value: DeletePolicy | str) -> DeletePolicy:
        return value if isinstance(value, DeletePolicy) else cls.parse(value)

    def __str__(self) -> str:
        return "expunge" if self.kind == "expunge" else f"{self.kind}:{self.target}"


EXPUNGE = DeletePolicy()  # the default policy


UPSTREAM_SCHEMES = ("maildir", "imap", "imap+starttls", "imaps", "jmap+http", "jmap+https")


class ConfigError(Exception):
    def __init__(self, message: str, *, key: str | None = None, line: int | None = None) -> None:
        where = ""
        if key is not None:
            where = f"{key}: "
        if line is not None:
            where = f"line {line}: " + where
        super().__init__(where + message)
        self.key = key
        self.line = line


@dataclasses.dataclass(frozen=True, slots=True)
class ListenConfig:
    address: str = "127.0.0.1:1110"
    tls: TlsMode = "none"
    cert_file: str = ""
    key_file: str = ""
    proxy_protocol: bool = False  # expect a PROXY v1/v2 header, from server.trusted_proxies only

    def host_port(self) -> tuple[str, int]:
        return parse_host_port(self.address)


@dataclasses.dataclass(frozen=True, slots=True)
class ServerConfig:
    state_dir: str = str(DEFAULT_STATE_DIR)
    max_sessions: int = 1000
    idle_timeout: float = 600.0  # RFC 1939: at least 10 minutes
    login_timeout: float = 60.0  # before a successful login
    shutdown_grace: float = 30.0
    upstream_timeout: float = 30.0
    login_delay: int = 0
    expire: str = "NEVER"
    in_use_lock: bool = True
    # USER/PASS and AUTH without TLS: always from loopback; from anywhere with allow_plaintext_auth, or
    # from the networks listed (legacy devices on a LAN).
    allow_plaintext_auth: bool = False
    plaintext_auth_networks: tuple[str, ...] = ()
    trusted_proxies: tuple[str, ...] = ()  # peers whose PROXY headers are believed
    max_auth_failures: int = 3
    implementation: str = "pop3-gateway"
    max_unauthenticated: int = 0  # sessions not logged in yet at once; 0 = half of max_sessions
    max_bad_commands: int = 20  # unknown or malformed commands before login, then the session is closed
    apop: bool = True  # offer APOP (a greeting timestamp) where the account source can check it

    # Which typed names are one account (see gateway/identity.py): locks, limits, throttle, UIDL namespace.
    username_case: Literal["lower", "exact"] = "lower"  # "lower": ASCII A-Z lowercased, as Dovecot's %Lu
    default_realm: str = ""  # when set, "alice" and "alice@<realm>" are one account

    @property
    def unauthenticated_cap(self) -> int:
        return self.max_unauthenticated or max(1, self.max_sessions // 2)


@dataclasses.dataclass(frozen=True, slots=True)
class UpstreamConfig:
    url: str = ""  # empty: the embedded demo Maildir under state_dir
    users_file: str = ""  # maildir: default state_dir/users
    folder: str = "INBOX"
    ca_file: str = ""
    insecure: bool = False
    delete_policy: DeletePolicy = EXPUNGE  # TOML: "expunge", "move:<folder>" or "flag:<keyword>"
    mark_seen: bool = False
    uidl_format: UidlFormat = "native"  # for new messages
    max_snapshot_rows: int = 500_000  # imap: messages one login may list; more is [SYS/TEMP]
    expunge_without_uidplus: bool = False  # imap: allow the racy plain EXPUNGE when UIDPLUS is missing
    token: str = dataclasses.field(default="", repr=False)  # jmap: a bearer token instead of Basic
    allowed_origins: tuple[str, ...] = ()  # jmap: origins besides the URL's that may get credentials
    token_accounts: tuple[str, ...] = ()  # jmap with a token: "POP3USER=ACCOUNTID" lines

    def __post_init__(self) -> None:  # a policy given as text (tests, callers) is parsed here, once
        object.__setattr__(self, "delete_policy", DeletePolicy.of(self.delete_policy))


ADMIN_TOKEN_ENV = "POP3_GATEWAY_ADMIN_TOKEN"  # noqa: S105 - the name of the variable, no secret


@dataclasses.dataclass(frozen=True, slots=True)
class AdminConfig:
    address: str = "127.0.0.1:9110"  # /healthz, /readyz, /metrics; "" disables; port 0 picks one
    read_timeout: float = 10.0  # to send one request
    idle_timeout: float = 5.0  # a connection with no request begun (new or keep-alive) is closed after
    max_connections: int = 32  # at the cap, the oldest idle connection is closed for the new one
    max_connections_per_ip: int = 8
    token_file: str = ""  # the bearer token for /metrics (and /readyz reasons); mode 0600 or stricter
    allow_unauthenticated: bool = False  # beyond loopback without a token: only if this says so


@dataclasses.dataclass(frozen=True, slots=True)
class StoreConfig:
    retention_days: float = 90.0  # a vanished (not deleted) message's row waits this long to be rematched
    max_fingerprints: int = 1000  # messages read per login to match a renumbered upstream; the rest are new
    fingerprint_concurrency: int = 4  # of those reads at once


@dataclasses.dataclass(frozen=True, slots=True)
class LimitsConfig:
    max_sessions_per_ip: int = 50  # 0 = unlimited
    max_sessions_per_account: int = 5
    ipv6_prefix: int = 64  # IPv6 clients are counted per prefix
    auth_delay_base: float = 1.0  # the delay after the first failure; doubles per failure
    auth_delay_max: float = 30.0
    auth_failure_window: float = 900.0  # failures older than this are forgotten
    lockout_after: int = 0  # failures in the window that lock the account or IP out; 0 = never
    lockout_duration: float = 900.0


@dataclasses.dataclass(frozen=True, slots=True)
class LogConfig:
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["text", "json"] = "text"


OAuthFlow = Literal["device", "code", "client-credentials"]
OAUTH_FLOWS: tuple[str, ...] = typing.get_args(OAuthFlow)
ProviderKind = Literal["microsoft", "google", "oidc"]
PROVIDER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
MICROSOFT_TENANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,252}")
MICROSOFT_GENERIC_TENANTS = ("common", "organizations", "consumers")


@dataclasses.dataclass(frozen=True, slots=True)
class OAuth2ProviderConfig:
    """One ``[oauth2.providers.NAME]`` table: a registered client at one provider."""

    kind: ProviderKind = "oidc"
    tenant: str = ""  # microsoft: a tenant id or domain; "" = "organizations"
    issuer: str = ""  # oidc: the issuer URL (discovery); required for kind = "oidc"
    client_id: str = ""  # required
    client_secret_file: str = ""  # mode 0600 or stricter; "" = a public client
    scope: str = ""  # the delegated scope; "" = the provider's mail scope
    app_scope: str = ""  # the client-credentials scope; "" = the provider's
    flow: OAuthFlow = "device"  # what `oauth login` uses without --flow
    redirect_uri: str = "http://localhost"  # code flow: registered with the provider


@dataclasses.dataclass(frozen=True, slots=True)
class OAuth2Config:
    key_file: str = ""  # "" = $POP3_GATEWAY_TOKEN_KEYS when set, else <state_dir>/token.key
    refresh_margin: float = 600.0  # refresh this many seconds before the access token expires
    token_timeout: float = 10.0  # bound on one token endpoint call (and a discovery fetch)
    providers: dict[str, OAuth2ProviderConfig] = dataclasses.field(default_factory=dict)


DEFAULT_PROFILE = "default"  # the profile name of [upstream]
PROFILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
TABLE_NAME_RULE = "a name is 1 to 64 of A-Z a-z 0-9 _ . - (starting with a letter or digit)"


@dataclasses.dataclass(frozen=True, slots=True)
class RouteConfig:
    """One ``[[routes]]`` entry: logins whose account key matches the glob go to that profile."""

    match: str = ""  # a glob on the account key: "*@example.org"; * and ? only
    upstream: str = DEFAULT_PROFILE  # "default" ([upstream]) or the NAME of an [upstreams.NAME]


@dataclasses.dataclass(frozen=True, slots=True)
class AccountsConfig:
    file: str = ""  # the mapped accounts (JSON); "" = <state_dir>/accounts.json
    default_upstream: str = DEFAULT_PROFILE  # where unmapped, unrouted logins go; "" = refuse them


@dataclasses.dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig = dataclasses.field(default_factory=ServerConfig)
    listen: tuple[ListenConfig, ...] = (ListenConfig(),)
    upstream: UpstreamConfig = dataclasses.field(default_factory=UpstreamConfig)
    upstreams: dict[str, UpstreamConfig] = dataclasses.field(default_factory=dict)  # [upstreams.NAME]
    routes: tuple[RouteConfig, ...] = ()
    accounts: AccountsConfig = dataclasses.field(default_factory=AccountsConfig)
    log: LogConfig = dataclasses.field(default_factory=LogConfig)
    admin: AdminConfig = dataclasses.field(default_factory=AdminConfig)
    limits: LimitsConfig = dataclasses.field(default_factory=LimitsConfig)
    store: StoreConfig = dataclasses.field(default_factory=StoreConfig)
    oauth2: OAuth2Config = dataclasses.field(default_factory=OAuth2Config)

    @property
    def state_path(self) -> Path:
        return Path(self.server.state_dir)

    @property
    def accounts_path(self) -> Path:
        return Path(self.accounts.file) if self.accounts.file else self.state_path / "accounts.json"

    def profiles(self) -> dict[str, UpstreamConfig]:
        """Every upstream profile by name: ``"default"`` is ``[upstream]``, then the ``[upstreams.NAME]``."""
        return {DEFAULT_PROFILE: self.upstream, **self.upstreams}


# ------------------------------------------------------------------ loading


def load(path: str | Path) -> Config:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {p}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{p} is not UTF-8") from None
    return loads(text)


def loads(text: str) -> Config:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        found = re.search(r"at line (\d+)", str(exc))
        line = int(found.group(1)) if found else None
        message = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(exc))
        raise ConfigError(f"invalid TOML: {message}", line=line) from None
    config = _build(Config, raw, (), text)
    validate(config, text)
    return config


def _build(cls: type[_T], raw: Mapping[str, Any], path: tuple[str | int, ...], text: str) -> _T:
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        keypath = (*path, key)
        if key not in fields:
            raise ConfigError("unknown key", key=_dotted(keypath), line=_find_line(text, keypath))
        kwargs[key] = _convert(hints[key], value, keypath, text)
    return cls(**kwargs)


def _convert(tp: Any, value: Any, keypath: tuple[str | int, ...], text: str) -> Any:
    def bad(expected: str) -> ConfigError:
        return ConfigError(
            f"expected {expected}, got {value!r}", key=_dotted(keypath), line=_find_line(text, keypath)
        )

    origin = typing.get_origin(tp)
    if tp is DeletePolicy:
        if not isinstance(value, str):
            raise bad("a string")
        try:
            return DeletePolicy.parse(value)
        except ValueError as exc:
            raise ConfigError(str(exc), key=_dotted(keypath), line=_find_line(text, keypath)) from None
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad("a table")
        return _build(tp, value, keypath, text)  # type: ignore[arg-type]
    if origin is dict:  # named tables: [section.NAME]
        (_, item_tp) = typing.get_args(tp)
        if not isinstance(value, dict):
            raise bad("a table of named tables")
        out = {}
        for name, item in value.items():
            if not PROFILE_NAME.fullmatch(name):
                header = next(
                    (
                        i
                        for i, ln in enumerate(text.splitlines(), 1)
                        if ln.lstrip().startswith("[") and name in ln
                    ),
                    None,
                )
                raise ConfigError(TABLE_NAME_RULE, key=_dotted((*keypath, name)), line=header)
            out[name] = _convert(item_tp, item, (*keypath, name), text)
        return out
    if origin is tuple:
        (item_tp, _) = typing.get_args(tp)
        if not isinstance(value, list):
            raise bad("an array")
        return tuple(_convert(item_tp, v, (*keypath, i), text) for i, v in enumerate(value))
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise bad("one of " + ", ".join(repr(c) for c in choices))
        return value
    if origin in (typing.Union, types.UnionType):
        raise bad("a supported type")  # pragma: no cover - no union fields
    if tp is bool:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad("a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad("a string")
        return value
    raise bad(str(tp))  # pragma: no cover


def _dotted(keypath: Sequence[str | int]) -> str:
    out = ""
    for part in keypath:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def _find_line(text: str, keypath: Sequence[str | int]) -> int | None:
    """Best effort: the line where ``keypath`` is set in ``text`` (tomllib keeps no positions)."""
    if not text:
        return None
    lines = text.splitlines()
    names = [p for p in keypath if isinstance(p, str)]
    index = next((p for p in keypath if isinstance(p, int)), 0)
    leaf = names[-1]
    tables = names[:-1]
    start = 0
    if tables:
        header = re.compile(
            r"^\s*\[\[?\s*" + r"\s*\.\s*".join(map(re.escape, tables)) + r"\s*\]\]?\s*(#.*)?$"
        )
        hits = [i for i, line in enumerate(lines) if header.match(line)]
        if len(hits) > index:
            start = hits[index] + 1
        elif hits:
            start = hits[-1] + 1
    key_re = re.compile(r"^\s*(" + re.escape(leaf) + r'|"' + re.escape(leaf) + r'")\s*=')
    for i in range(start, len(lines)):
        if i > start and tables and lines[i].lstrip().startswith("["):
            break
        if key_re.match(lines[i]):
            return i + 1
    if tables and start:
        return start  # the table header: the best we can point at
    joined = r"\s*\.\s*".join(map(re.escape, names))
    dotted = re.compile(r"^\s*" + joined + r"\s*=")
    as_table = re.compile(r"^\s*\[\[?\s*" + joined + r"\s*\]")
    for i, line in enumerate(lines):
        if dotted.match(line) or as_table.match(line):
            return i + 1
    return None


# ------------------------------------------------------------------ validation


def parse_host_port(address: str) -> tuple[str, int]:
    host, sep, port_s = address.rpartition(":")
    if not sep or not port_s.isdigit() or not host:
        raise ValueError(f"expected HOST:PORT, got {address!r}")
    port = int(port_s)
    if not 0 <= port <= 65535:
        raise ValueError(f"port out of range in {address!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, port


def validate(config: Config, text: str = "") -> None:
    def fail(keypath: tuple[str | int, ...], message: str) -> typing.NoReturn:
        raise ConfigError(message, key=_dotted(keypath), line=_find_line(text, keypath))

    s = config.server
    if not config.listen:
        fail(("listen",), "at least one listener is needed")
    seen: dict[tuple[str, int], int] = {}
    for i, listener in enumerate(config.listen):
        try:
            host_port = listener.host_port()
        except ValueError as exc:
            fail(("listen", i, "address"), str(exc))
        if host_port[1] != 0 and host_port in seen:
            fail(
                ("listen", i, "address"), f"{listener.address} is already listen[{seen[host_port]}]'s address"
            )
        seen[host_port] = i
        if listener.tls != "none" and not (listener.cert_file and listener.key_file):
            fail(("listen", i, "tls"), f"tls = {listener.tls!r} needs cert_file and key_file")
    for name in ("idle_timeout", "login_timeout", "upstream_timeout"):
        if getattr(s, name) <= 0:
            fail(("server", name), "must be > 0")
    if s.shutdown_grace < 0:
        fail(("server", "shutdown_grace"), "must be >= 0")
    if s.max_sessions < 1:
        fail(("server", "max_sessions"), "must be >= 1")
    if s.max_auth_failures < 1:
        fail(("server", "max_auth_failures"), "must be >= 1")
    if not 0 <= s.max_unauthenticated <= s.max_sessions:
        fail(("server", "max_unauthenticated"), "must be within 0..max_sessions")
    if s.max_bad_commands < 0:
        fail(("server", "max_bad_commands"), "must be >= 0")
    if s.login_delay < 0:
        fail(("server", "login_delay"), "must be >= 0")
    if s.expire != "NEVER" and not s.expire.isdigit():
        fail(("server", "expire"), 'must be "NEVER" or a number of days')
    if not s.implementation.isprintable() or len(s.implementation) > 100:
        fail(("server", "implementation"), "must be printable and at most 100 characters")
    if problem := realm_problem(s.default_realm):
        fail(("server", "default_realm"), problem)
    if DEFAULT_PROFILE in config.upstreams:
        fail(("upstreams", DEFAULT_PROFILE), '"default" is [upstream] itself: give this profile another name')
    for name, up in config.profiles().items():
        where: tuple[str, ...] = ("upstream",) if name == DEFAULT_PROFILE else ("upstreams", name)
        if up.url:
            try:
                upstream_scheme(up.url)
            except ValueError as exc:
                fail((*where, "url"), str(exc))
        elif where != ("upstream",):
            fail((*where, "url"), "a named upstream needs a url (only [upstream] may be the embedded demo)")
        if up.max_snapshot_rows < 1:
            fail((*where, "max_snapshot_rows"), "must be >= 1")
    _validate_routes(config, fail)
    for name in ("plaintext_auth_networks", "trusted_proxies"):
        for i, net in enumerate(getattr(s, name)):
            if (net_problem := network_problem(net)) is not None:
                fail(("server", name, i), net_problem)
    _validate_admin(config.admin, fail)
    lim = config.limits
    for name in ("max_sessions_per_ip", "max_sessions_per_account", "lockout_after"):
        if getattr(lim, name) < 0:
            fail(("limits", name), "must be >= 0")
    if not 0 <= lim.ipv6_prefix <= 128:
        fail(("limits", "ipv6_prefix"), "must be 0..128")
    if lim.auth_delay_base < 0 or lim.auth_delay_max < lim.auth_delay_base:
        fail(("limits", "auth_delay_max"), "needs 0 <= auth_delay_base <= auth_delay_max")
    if lim.auth_failure_window <= 0 or lim.lockout_duration <= 0:
        fail(("limits", "auth_failure_window"), "windows and durations must be > 0")
    st = config.store
    if st.retention_days <= 0:
        fail(("store", "retention_days"), "must be > 0")
    if st.max_fingerprints < 0:
        fail(("store", "max_fingerprints"), "must be >= 0")
    if st.fingerprint_concurrency < 1:
        fail(("store", "fingerprint_concurrency"), "must be >= 1")
    _validate_oauth2(config.oauth2, fail)


def _validate_oauth2(
    oauth2: OAuth2Config, fail: typing.Callable[[tuple[str | int, ...], str], typing.NoReturn]
) -> None:
    if oauth2.refresh_margin < 0:
        fail(("oauth2", "refresh_margin"), "must be >= 0")
    if oauth2.token_timeout <= 0:
        fail(("oauth2", "token_timeout"), "must be > 0")
    for name, p in oauth2.providers.items():
        where = ("oauth2", "providers", name)
        if not p.client_id or not p.client_id.isprintable() or len(p.client_id) > 512:
            fail(
                (*where, "client_id"), "is required: the client (application) id registered with the provider"
            )
        for key in ("scope", "app_scope"):
            value = getattr(p, key)
            if len(value) > 2048 or not all(0x21 <= ord(c) <= 0x7E or c == " " for c in value):
                fail((*where, key), "must be printable ASCII scope tokens separated by spaces")
        if p.kind != "microsoft" and p.tenant:
            fail((*where, "tenant"), 'is for kind = "microsoft" only')
        if p.kind != "oidc" and p.issuer:
            fail((*where, "issuer"), 'is for kind = "oidc" only (Microsoft and Google have fixed endpoints)')
        if p.kind == "microsoft" and p.tenant and not MICROSOFT_TENANT.fullmatch(p.tenant):
            fail((*where, "tenant"), "must be a tenant id, a domain, or organizations/consumers/common")
        if p.kind == "oidc":
            if not p.issuer:
                fail((*where, "issuer"), 'is required for kind = "oidc" (the issuer URL, for discovery)')
            if (problem := _issuer_problem(p.issuer)) is not None:
                fail((*where, "issuer"), problem)
        if p.kind == "google" and p.flow == "device":
            fail(
                (*where, "flow"),
                'Google\'s device flow does not allow the Gmail scope: set flow = "code" for kind = "google"',
            )
        if p.flow == "client-credentials":
            if p.kind == "google":
                fail((*where, "flow"), "Google has no client-credentials grant for mailboxes")
            if not p.client_secret_file:
                fail((*where, "client_secret_file"), "client credentials need a client secret")
            if p.kind == "microsoft" and (p.tenant or "organizations").lower() in MICROSOFT_GENERIC_TENANTS:
                fail(
                    (*where, "tenant"),
                    "app-only access (client credentials) needs the tenant's id or domain, "
                    "not common/organizations/consumers",
                )
        parts = urllib.parse.urlsplit(p.redirect_uri)
        if parts.scheme not in ("http", "https") or not parts.netloc or len(p.redirect_uri) > 2048:
            fail((*where, "redirect_uri"), "must be an http(s) URL registered with the provider")


def _issuer_problem(issuer: str) -> str | None:
    parts = urllib.parse.urlsplit(issuer)
    if len(issuer) > 2048 or not parts.hostname or parts.query or parts.fragment:
        return "must be the issuer's URL, e.g. https://login.example.org/realms/mail"
    if parts.scheme == "https" or (parts.scheme == "http" and is_loopback_host(parts.hostname)):
        return None
    return "must be an https URL (http only on loopback)"


def _validate_routes(
    config: Config, fail: typing.Callable[[tuple[str | int, ...], str], typing.NoReturn]
) -> None:
    profiles = config.profiles()
    known = ", ".join(repr(p) for p in profiles)
    seen: dict[str, int] = {}
    for i, route in enumerate(config.routes):
        if problem := glob_problem(route.match):
            fail(("routes", i, "match"), f"{route.match!r} {problem}")
        folded = route.match.lower()
        if folded in seen:
            fail(("routes", i, "match"), f"{route.match!r} is already routes[{seen[folded]}]'s match")
        seen[folded] = i
        if route.upstream not in profiles:
            fail(("routes", i, "upstream"), f"no upstream profile {route.upstream!r} (known: {known})")
    default = config.accounts.default_upstream
    if default and default not in profiles:
        fail(("accounts", "default_upstream"), f'no upstream profile {default!r} (known: {known}; "" = none)')


def _validate_admin(
    admin: AdminConfig, fail: typing.Callable[[tuple[str | int, ...], str], typing.NoReturn]
) -> None:
    for name in ("read_timeout", "idle_timeout"):
        if getattr(admin, name) <= 0:
            fail(("admin", name), "must be > 0")
    for name in ("max_connections", "max_connections_per_ip"):
        if getattr(admin, name) < 1:
            fail(("admin", name), "must be >= 1")
    if not admin.address:
        return
    try:
        host, _ = parse_host_port(admin.address)
    except ValueError as exc:
        fail(("admin", "address"), str(exc))
    has_token = bool(admin.token_file or os.environ.get(ADMIN_TOKEN_ENV))
    if not (is_loopback_host(host) or has_token or admin.allow_unauthenticated):
        fail(
            ("admin", "address"),
            f"{admin.address!r} is reachable beyond loopback: set admin.token_file (or the "
            f"{ADMIN_TOKEN_ENV} environment variable), or admin.allow_unauthenticated = true",
        )


def is_loopback_host(host: str) -> bool:
    """Whether HOST (as in HOST:PORT) binds loopback only: ``localhost`` or a loopback address."""
    if host.lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return False  # any other host name may resolve beyond loopback
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def network_problem(text: str) -> str | None:
    """Why ``text`` is no network for an allow-list, or None. Strict: ``10.0.0.1/8`` has host bits set,
    which means a typo more often than ``10.0.0.0/8``, so it is refused with the network it would be."""
    try:
        ipaddress.ip_network(text, strict=True)
    except ValueError:
        try:
            loose = ipaddress.ip_network(text.strip(), strict=False)
        except ValueError:
            return f"not an IP network: {text!r}"
        if loose.with_prefixlen == text.strip():  # only the white space was wrong
            return f"not an IP network: {text!r} (remove the spaces)"
        return f"{text!r} has host bits set; write the network {loose.with_prefixlen!r} or one address"
    return None


def warnings(config: Config) -> list[str]:
    """Valid but risky settings, one sentence each, for ``check-config`` and the log at start and reload."""
    out: list[str] = []
    for i, text in enumerate(config.server.trusted_proxies):
        net = ipaddress.ip_network(text, strict=True)
        if net.num_addresses > 1:
            out.append(
                f"server.trusted_proxies[{i}]: {text} is {net.num_addresses} addresses; every one of them "
                "may claim any client address in a PROXY header (list the balancers one by one)"
            )
    return out


def upstream_scheme(url: str) -> str:
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in UPSTREAM_SCHEMES:
        raise ValueError(
            f"unknown upstream scheme {scheme + '://' if scheme else url!r}; known: "
            + ", ".join(s + "://" for s in UPSTREAM_SCHEMES)
        )
    return scheme


def with_overrides(
    config: Config,
    *,
    listen: str | None = None,
    upstream: str | None = None,
    state_dir: str | None = None,
    admin: str | None = None,
) -> Config:
    """Command-line flags win over the file: --listen replaces every listener with one plain one."""
    if listen is not None:
        config = dataclasses.replace(config, listen=(ListenConfig(address=listen),))
    if upstream is not None:
        config = dataclasses.replace(config, upstream=dataclasses.replace(config.upstream, url=upstream))
    if state_dir is not None:
        config = dataclasses.replace(config, server=dataclasses.replace(config.server, state_dir=state_dir))
    if admin is not None:
        config = dataclasses.replace(config, admin=dataclasses.replace(config.admin, address=admin))
    validate(config)
    return config
