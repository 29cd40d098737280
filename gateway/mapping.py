"""Mapped accounts: which POP3 account is served from which upstream identity, with which credential.

An account is keyed by its *account key*: ``gateway.identity.normalize`` of the name, so with the default
policy ``ALICE`` and ``alice`` are one account. Its local POP3 password hash (and optional APOP secret) is
not here: it lives in the users file (``gateway.accounts``), under the same name.

The accounts file (default ``<state_dir>/accounts.json``) is JSON, UTF-8, mode 0600::

    {"version": 1,
     "accounts": {
       "scanner@example.org": {
         "upstream": "o365",                  # a profile: "default" ([upstream]) or an [upstreams.NAME]
         "upstream_user": "shared-scans@example.org",
         "credential": "oauth2",              # pass-through | stored | oauth2 | bearer
         "provider": "m365",                  # oauth2: an [oauth2.providers.NAME]; else null
         "flow": null,                        # oauth2: device | code | client-credentials; null = provider's
         "folder": null, "delete_policy": null, "mark_seen": null, "uidl_format": null,   # null = profile's
         "window": "all"                      # all | since:YYYY-MM-DD | days:N | newest:N
       }}}

Every field but ``upstream_user`` may be left out (the values above are the defaults, ``upstream`` is
``"default"``). Unknown fields, unknown versions, a file over ``MAX_FILE_BYTES`` or with more than
``MAX_ACCOUNTS`` accounts, and two names with one key are refused with ``MappingError`` naming the account
and field, never a traceback. ``AccountBook.save`` writes a temporary file in the same directory (0600,
fsync), then ``os.replace``, then fsyncs the directory: a reader sees the old file or the new one.
Two writers are not serialised: the last one wins.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import re
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Final, Literal, get_args

from gateway.accounts import validate_username
from gateway.config import PROFILE_NAME, UIDL_FORMATS, DeletePolicy, UidlFormat
from gateway.identity import DEFAULT_POLICY, MAX_USERNAME_OCTETS, IdentityPolicy, normalize

__all__ = [
    "CREDENTIALS",
    "FLOWS",
    "FORMAT_VERSION",
    "MAX_ACCOUNTS",
    "MAX_FILE_BYTES",
    "Account",
    "AccountBook",
    "CredentialKind",
    "MappingError",
    "Window",
]

FORMAT_VERSION: Final = 1
MAX_FILE_BYTES: Final = 16 * 1024 * 1024
MAX_ACCOUNTS: Final = 100_000
MAX_WINDOW_DAYS: Final = 100_000
MAX_WINDOW_NEWEST: Final = 10_000_000

CredentialKind = Literal["pass-through", "stored", "oauth2", "bearer"]
CREDENTIALS: Final[tuple[str, ...]] = get_args(CredentialKind)
Flow = Literal["device", "code", "client-credentials"]
FLOWS: Final[tuple[str, ...]] = get_args(Flow)
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_COUNT = re.compile(r"[0-9]{1,9}")


class MappingError(ValueError):
    """A bad accounts file or account; ``str(exc)`` names the file, account and field, never a secret."""


@dataclasses.dataclass(frozen=True, slots=True)
class Window:
    """Which messages a login sees: all, those since a date, those of the last N days, the newest N."""

    kind: Literal["all", "since", "days", "newest"] = "all"
    date: datetime.date | None = None  # since
    count: int = 0  # days, newest

    @classmethod
    def parse(cls, text: str) -> Window:
        kind, sep, arg = text.partition(":")
        if text == "all":
            return cls()
        if sep and kind == "since" and _DATE.fullmatch(arg):
            try:
                return cls("since", datetime.date.fromisoformat(arg))
            except ValueError:
                pass
        elif sep and kind in ("days", "newest") and _COUNT.fullmatch(arg):
            n = int(arg)
            cap = MAX_WINDOW_DAYS if kind == "days" else MAX_WINDOW_NEWEST
            if 1 <= n <= cap:
                return cls(kind, None, n)  # type: ignore[arg-type]
            raise ValueError(f"{kind}:N needs 1 <= N <= {cap}")
        raise ValueError('must be "all", "since:YYYY-MM-DD", "days:N" or "newest:N"')

    def __str__(self) -> str:
        if self.kind == "all":
            return "all"
        if self.kind == "since":
            assert self.date is not None
            return f"since:{self.date.isoformat()}"
        return f"{self.kind}:{self.count}"

    def since(self, today: datetime.date) -> datetime.date | None:
        """The first day a login on ``today`` sees (None: no date limit)."""
        if self.kind == "since":
            return self.date
        if self.kind == "days":
            return today - datetime.timedelta(days=self.count - 1)  # days:1 is today
        return None

    @property
    def newest(self) -> int | None:
        return self.count if self.kind == "newest" else None


@dataclasses.dataclass(frozen=True, slots=True)
class Account:
    name: str  # the account key (identity-normalised POP3 user name)
    upstream_user: str  # the identity sent upstream
    upstream: str = "default"  # the profile
    credential: CredentialKind = "pass-through"
    provider: str | None = None  # oauth2: the [oauth2.providers.NAME]
    flow: Flow | None = None  # oauth2: how `oauth login` authorises it; None = the provider's default
    folder: str | None = None  # None: the profile's
    delete_policy: DeletePolicy | None = None
    mark_seen: bool | None = None
    uidl_format: UidlFormat | None = None
    window: Window = Window()

    def __post_init__(self) -> None:
        if isinstance(self.delete_policy, str):
            object.__setattr__(self, "delete_policy", DeletePolicy.parse(self.delete_policy))
        problem = self.problem()
        if problem:
            raise MappingError(f"account {self.name!r}: {problem}")

    def problem(self) -> str:
        try:
            validate_username(self.name)
        except ValueError as exc:
            return f"name: {exc}"
        if not self.upstream_user or not self.upstream_user.isprintable():
            return "upstream_user: must be a non-empty printable name"
        if len(self.upstream_user.encode()) > MAX_USERNAME_OCTETS:
            return f"upstream_user: longer than {MAX_USERNAME_OCTETS} octets"
        if not PROFILE_NAME.fullmatch(self.upstream):
            return f"upstream: {self.upstream!r} is no profile name"
        if self.credential not in CREDENTIALS:
            return f"credential: must be one of {', '.join(CREDENTIALS)}"
        if self.credential == "oauth2":
            if not self.provider or not PROFILE_NAME.fullmatch(self.provider):
                return "provider: an oauth2 account needs a provider profile name"
        elif self.provider is not None or self.flow is not None:
            return "provider/flow: only for credential = oauth2"
        if self.flow is not None and self.flow not in FLOWS:
            return f"flow: must be one of {', '.join(FLOWS)}"
        if self.folder is not None and (not self.folder or not self.folder.isprintable()):
            return "folder: must be a non-empty printable name"
        if self.uidl_format is not None and self.uidl_format not in UIDL_FORMATS:
            return f"uidl_format: must be one of {', '.join(UIDL_FORMATS)}"
        return ""

    def to_json(self) -> dict[str, Any]:
        return {
            "upstream": self.upstream,
            "upstream_user": self.upstream_user,
            "credential": self.credential,
            "provider": self.provider,
            "flow": self.flow,
            "folder": self.folder,
            "delete_policy": None if self.delete_policy is None else str(self.delete_policy),
            "mark_seen": self.mark_seen,
            "uidl_format": self.uidl_format,
            "window": str(self.window),
        }

    @classmethod
    def from_json(cls, name: str, raw: object) -> Account:
        if not isinstance(raw, dict):
            raise MappingError(f"account {name!r}: expected an object")
        unknown = sorted(set(raw) - set(_FIELD_TYPES))
        if unknown:
            raise MappingError(f"account {name!r}: unknown field {unknown[0]!r}")
        for key, types in _FIELD_TYPES.items():
            if key in raw and not isinstance(raw[key], types):
                raise MappingError(f"account {name!r}: {key}: wrong type {type(raw[key]).__name__}")
        if "upstream_user" not in raw:
            raise MappingError(f"account {name!r}: upstream_user is missing")
        kwargs: dict[str, Any] = {k: v for k, v in raw.items() if k not in ("window", "delete_policy")}
        try:
            if raw.get("window") is not None:
                kwargs["window"] = Window.parse(raw["window"])
            if raw.get("delete_policy") is not None:
                kwargs["delete_policy"] = DeletePolicy.parse(raw["delete_policy"])
        except ValueError as exc:
            raise MappingError(f"account {name!r}: {exc}") from None
        return cls(name=name, **kwargs)


_OPT_STR = (str, type(None))
_FIELD_TYPES: Final[dict[str, tuple[type, ...]]] = {
    "upstream": (str,),
    "upstream_user": (str,),
    "credential": (str,),
    "provider": _OPT_STR,
    "flow": _OPT_STR,
    "folder": _OPT_STR,
    "delete_policy": _OPT_STR,
    "mark_seen": (bool, type(None)),
    "uidl_format": _OPT_STR,
    "window": _OPT_STR,
}


class AccountBook:
    """The accounts of one file, by account key. Not thread-safe; the gateway reads, the CLI writes."""

    def __init__(self, path: Path, policy: IdentityPolicy = DEFAULT_POLICY) -> None:
        self.path = Path(path)
        self.policy = policy
        self._accounts: dict[str, Account] = {}
        self._stamp: tuple[int, int, int, int] | None = None  # (dev, ino, mtime_ns, size) last read

    # -- reading

    @classmethod
    def load(cls, path: Path, policy: IdentityPolicy = DEFAULT_POLICY) -> AccountBook:
        """The book in ``path``; a missing file is an empty book. Raises MappingError."""
        book = cls(path, policy)
        book.refresh()
        return book

    def refresh(self) -> bool:
        """Re-read the file if it changed since the last read (True then). On MappingError the book keeps
        what it had."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            changed = self._stamp is not None or bool(self._accounts)
            self._accounts, self._stamp = {}, None
            return changed
        except OSError as exc:
            raise MappingError(f"{self.path}: cannot read: {exc.strerror}") from None
        stamp = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return False
        if st.st_size > MAX_FILE_BYTES:
            raise MappingError(f"{self.path}: larger than {MAX_FILE_BYTES} bytes")
        try:
            with open(self.path, "rb") as f:
                data = f.read(MAX_FILE_BYTES + 1)
        except OSError as exc:
            raise MappingError(f"{self.path}: cannot read: {exc.strerror}") from None
        if len(data) > MAX_FILE_BYTES:
            raise MappingError(f"{self.path}: larger than {MAX_FILE_BYTES} bytes")
        self._accounts = self._parse(data)
        self._stamp = stamp
        return True

    def _parse(self, data: bytes) -> dict[str, Account]:
        where = str(self.path)
        try:
            raw = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError:
            raise MappingError(f"{where}: not UTF-8") from None
        except json.JSONDecodeError as exc:
            raise MappingError(f"{where}: not JSON (line {exc.lineno}: {exc.msg})") from None
        if not isinstance(raw, dict) or "version" not in raw:
            raise MappingError(f'{where}: expected {{"version": {FORMAT_VERSION}, "accounts": {{...}}}}')
        if raw["version"] != FORMAT_VERSION or isinstance(raw["version"], bool):
            raise MappingError(
                f"{where}: format version {raw['version']!r} is not {FORMAT_VERSION} "
                "(written by another version of pop3-gateway?)"
            )
        unknown = sorted(set(raw) - {"version", "accounts"})
        if unknown:
            raise MappingError(f"{where}: unknown key {unknown[0]!r}")
        entries = raw.get("accounts", {})
        if not isinstance(entries, dict):
            raise MappingError(f"{where}: accounts: expected an object")
        if len(entries) > MAX_ACCOUNTS:
            raise MappingError(f"{where}: more than {MAX_ACCOUNTS} accounts")
        out: dict[str, Account] = {}
        for name, entry in entries.items():
            key = normalize(name, self.policy)
            if key in out:
                raise MappingError(
                    f"{where}: accounts {out[key].name!r} and {name!r} are one account ({key!r})"
                )
            try:
                account = Account.from_json(key, entry)
            except MappingError as exc:
                raise MappingError(f"{where}: {exc}") from None
            out[key] = account
        return out

    def get(self, username: str) -> Account | None:
        """The account ``username`` (as typed) stands for, or None. No I/O."""
        return self._accounts.get(normalize(username, self.policy))

    def __iter__(self) -> Iterator[Account]:
        return iter(sorted(self._accounts.values(), key=lambda a: a.name))

    def __len__(self) -> int:
        return len(self._accounts)

    @property
    def accounts(self) -> Mapping[str, Account]:
        return self._accounts

    # -- writing (the CLI)

    def key(self, username: str) -> str:
        return normalize(username, self.policy)

    def add(self, account: Account, *, replace: bool = False) -> Account:
        """Add ``account`` under its key (the name is normalised first); raises MappingError if present
        and not ``replace``. Call ``save`` to write."""
        key = self.key(account.name)
        if key != account.name:
            account = dataclasses.replace(account, name=key)
        if key in self._accounts and not replace:
            raise MappingError(f"account {key!r} exists already")
        if key not in self._accounts and len(self._accounts) >= MAX_ACCOUNTS:
            raise MappingError(f"{self.path}: at most {MAX_ACCOUNTS} accounts")
        self._accounts[key] = account
        return account

    def remove(self, username: str) -> Account:
        key = self.key(username)
        try:
            return self._accounts.pop(key)
        except KeyError:
            raise MappingError(f"no account {key!r}") from None

    def dumps(self) -> str:
        body = {"version": FORMAT_VERSION, "accounts": {a.name: a.to_json() for a in self}}
        return json.dumps(body, indent=2, ensure_ascii=False) + "\n"

    def save(self) -> None:
        """Write the book atomically (see the module docstring), mode 0600."""
        text = self.dumps().encode("utf-8")
        if len(text) > MAX_FILE_BYTES:
            raise MappingError(f"{self.path}: would be larger than {MAX_FILE_BYTES} bytes")
        parent = self.path.parent
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{self.path.name}.", suffix=".tmp")
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        with contextlib.suppress(OSError):
            dir_fd = os.open(parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        st = os.stat(self.path)
        self._stamp = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
