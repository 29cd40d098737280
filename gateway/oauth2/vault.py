"""OAuth2 tokens at rest: encrypted with a server-side key, one file per account, replaced atomically.

Keys (``Keyring``):

- A key file (``Keyring.from_file``), refused unless it is a regular file owned by this user (or root)
  with no permission for its group or others (0600 or stricter), or the environment variable
  ``POP3_GATEWAY_TOKEN_KEYS`` (``Keyring.from_env``). Both hold entries ``<key id>:<base64url of 32
  bytes>``, one per line (or separated by spaces in the variable). The first entry is the current key,
  which writes; the others only read, so a key is rotated by putting a new entry first and rewriting
  the records (``TokenVault.rewrap``) before the old entry goes. ``new_key_entry()`` makes an entry,
  ``create_key_file(path)`` a fresh file (mode 0600, never over an existing one).
- The key is never the POP3 password: a typo or a password change costs no re-authorisation.

Records (``<state>/oauth2/<sha256 of the account>.token``): one line
``p3gt1.<key id>.<nonce>.<ciphertext>`` (base64url), AES-256-GCM with a random 96-bit nonce, and as
associated data the format version, the key id and the account name. So a record copied to another
account's file, a record with an edited key id, a flipped bit, a wrong or missing key and an unknown
version all fail closed with ``RecordError``; nothing half-decrypted is ever returned.

Writes: a temporary file in the same directory (0600), written, fsync'd, renamed over the record, then
the directory fsync'd. A crash before the rename leaves the old record whole and readable, so a rotated
refresh token is on disk before the old one is gone, and never neither. A leftover temporary file is
never read, and the account's next write removes it.

Refresh: ``async with vault.refreshing(account):`` holds a per-account ``trio.Lock`` (one refresher per
account in this process) and an ``flock`` on the account's lock file (one across processes sharing the
state directory). Inside, load again (another refresher may have finished), check ``needs_refresh``,
refresh, store. ``needs_refresh(token, now)`` is pure: true from ``margin`` (600 s) before expiry.

The sync methods (``*_sync``) do the file work; the async ones run them on a worker thread, one at a
time per vault. Nothing here logs or reprs a token or a key.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import re
import secrets
import stat
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from pathlib import Path

import trio
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from gateway.files import make_private_dir
from gateway.oauth2.flows import TokenSet

ENV_VAR = "POP3_GATEWAY_TOKEN_KEYS"
VERSION = "p3gt1"
KEY_BYTES = 32
NONCE_BYTES = 12
MAX_RECORD_BYTES = 64 * 1024
MAX_KEY_FILE_BYTES = 16 * 1024
REFRESH_MARGIN = 600.0
LOCK_POLL_SECONDS = 0.05
_KID = re.compile(r"[A-Za-z0-9_-]{1,32}")


class VaultError(Exception):
    """Base of the vault's errors; the text never holds a key or a token."""


class KeyFileError(VaultError):
    """No usable key: a missing, unsafe or malformed key file or variable."""


class RecordError(VaultError):
    """A record that cannot be read: wrong key, tampered, another account's, or an unknown format."""


def _b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64d(text: str) -> bytes:
    if not re.fullmatch(r"[A-Za-z0-9_-]*", text):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def new_key_entry(kid: str = "k1") -> str:
    if not _KID.fullmatch(kid):
        raise ValueError("a key id is 1 to 32 of A-Z a-z 0-9 _ -")
    return f"{kid}:{_b64e(secrets.token_bytes(KEY_BYTES))}"


class Keyring:
    """The keys by id; ``current`` encrypts. The repr names the ids only."""

    __slots__ = ("_keys", "current", "source")

    def __init__(self, keys: Mapping[str, bytes], current: str, source: str = "") -> None:
        if current not in keys:
            raise KeyFileError("the current key id has no key")
        self._keys = dict(keys)
        self.current = current
        self.source = source

    def __repr__(self) -> str:
        return f"Keyring(current={self.current!r}, ids={sorted(self._keys)!r}, source={self.source!r})"

    @property
    def ids(self) -> list[str]:
        return list(self._keys)

    def key(self, kid: str) -> bytes | None:
        return self._keys.get(kid)

    @classmethod
    def parse(cls, entries: Iterable[str], source: str) -> Keyring:
        keys: dict[str, bytes] = {}
        first: str | None = None
        for number, raw in enumerate(entries, 1):
            entry = raw.strip()
            if not entry or entry.startswith("#"):
                continue
            kid, sep, encoded = entry.partition(":")
            if not sep or not _KID.fullmatch(kid):
                raise KeyFileError(f"{source}: entry {number} is not <key id>:<base64url key>")
            try:
                key = _b64d(encoded)
            except (ValueError, binascii.Error):
                raise KeyFileError(f"{source}: entry {number} ({kid}) is not base64url") from None
            if len(key) != KEY_BYTES:
                raise KeyFileError(f"{source}: key {kid} is {len(key)} bytes, not {KEY_BYTES}")
            if kid in keys:
                raise KeyFileError(f"{source}: key id {kid} appears twice")
            keys[kid] = key
            first = first or kid
        if first is None:
            raise KeyFileError(f"{source}: no key")
        return cls(keys, first, source)

    @classmethod
    def from_file(cls, path: Path | str) -> Keyring:
        source = str(path)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)  # a FIFO cannot hang us
        except OSError as exc:
            raise KeyFileError(f"{source}: cannot open the key file: {exc.strerror}") from None
        st = os.fstat(fd)  # of the file opened, so nothing can swap it after the check
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise KeyFileError(f"{source}: the key file is not a regular file")
        with os.fdopen(fd, "rb") as f:
            if st.st_mode & 0o077:
                raise KeyFileError(
                    f"{source}: the key file has mode {stat.S_IMODE(st.st_mode):04o}; "
                    "chmod 600 it (no access for group or others)"
                )
            if st.st_uid not in (os.geteuid(), 0):
                raise KeyFileError(f"{source}: the key file belongs to another user")
            data = f.read(MAX_KEY_FILE_BYTES + 1)
        if len(data) > MAX_KEY_FILE_BYTES:
            raise KeyFileError(f"{source}: the key file is too large")
        try:
            text = data.decode("ascii")
        except UnicodeDecodeError:
            raise KeyFileError(f"{source}: the key file is not ASCII") from None
        return cls.parse(text.splitlines(), source)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, var: str = ENV_VAR) -> Keyring:
        env = os.environ if environ is None else environ
        value = env.get(var)
        if not value:
            raise KeyFileError(f"${var} is not set")
        return cls.parse(value.split(), f"${var}")

    @classmethod
    def load(cls, path: Path | str | None, environ: Mapping[str, str] | None = None) -> Keyring:
        """The key file when one is configured, else the environment variable."""
        return cls.from_file(path) if path else cls.from_env(environ)


def create_key_file(path: Path | str, kid: str = "k1") -> None:
    """A new key file with one fresh key, mode 0600; FileExistsError rather than replace a key."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(new_key_entry(kid) + "\n")
        f.flush()
        os.fsync(f.fileno())


def needs_refresh(token: TokenSet, now: float, margin: float = REFRESH_MARGIN) -> bool:
    """True from ``margin`` seconds before the access token expires. A token whose lifetime the server
    did not say is used until the upstream refuses it."""
    return token.expires_at is not None and now >= token.expires_at - margin


@dataclasses.dataclass(frozen=True, slots=True)
class StoredToken:
    token: TokenSet
    provider: str
    stored_at: float
    kid: str  # the key that encrypted it: not the current one means ``rewrap`` is due
    flow: str = ""  # the grant that got it ("device", "code", "client-credentials"; "" in older records)


def _associated(kid: str, account: str) -> bytes:
    return b"\x00".join([VERSION.encode(), kid.encode(), account.encode("utf-8")])


def seal(keys: Keyring, account: str, token: TokenSet, provider: str, now: float, flow: str = "") -> bytes:
    """One record line."""
    kid = keys.current
    key = keys.key(kid)
    assert key is not None
    doc = {"account": account, "provider": provider, "flow": flow, "stored_at": now, "token": token.to_json()}
    nonce = secrets.token_bytes(NONCE_BYTES)
    sealed = AESGCM(key).encrypt(nonce, json.dumps(doc).encode(), _associated(kid, account))
    return f"{VERSION}.{kid}.{_b64e(nonce)}.{_b64e(sealed)}\n".encode()


def unseal(keys: Keyring, account: str, record: bytes) -> StoredToken:
    try:
        version, kid, nonce_text, sealed_text = record.decode("ascii").strip().split(".")
    except (UnicodeDecodeError, ValueError):
        raise RecordError(f"the token record of {account!r} is not a record") from None
    if version != VERSION:
        raise RecordError(f"the token record of {account!r} has an unknown format {version[:16]!r}")
    key = keys.key(kid)
    if key is None:
        raise RecordError(f"the token record of {account!r} needs key {kid[:32]!r}, which is not loaded")
    try:
        nonce, sealed = _b64d(nonce_text), _b64d(sealed_text)
        if len(nonce) != NONCE_BYTES:
            raise ValueError("nonce length")
        plain = AESGCM(key).decrypt(nonce, sealed, _associated(kid, account))
    except (ValueError, binascii.Error, InvalidTag):
        raise RecordError(
            f"the token record of {account!r} does not decrypt (another key, another account's, or altered)"
        ) from None
    try:
        doc = json.loads(plain)
        if doc["account"] != account:  # already bound by the associated data; checked again for clarity
            raise ValueError("account")
        stored_at = doc["stored_at"]
        flow = doc.get("flow", "")
        if not isinstance(stored_at, int | float) or not isinstance(doc["provider"], str):
            raise ValueError("fields")
        if not isinstance(flow, str):
            raise ValueError("flow")
        return StoredToken(TokenSet.from_json(doc["token"]), doc["provider"], float(stored_at), kid, flow)
    except (ValueError, KeyError, TypeError):
        raise RecordError(f"the token record of {account!r} decrypts to something unexpected") from None


# Indirections for the crash tests: an exception here is a crash between the write and the rename.
_replace = os.replace
_fsync = os.fsync


class TokenVault:
    """The accounts' token records under ``directory`` (created 0700)."""

    def __init__(
        self, directory: Path | str, keys: Keyring, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.directory = Path(directory)
        self.keys = keys
        self._locks: weakref.WeakValueDictionary[str, trio.Lock] = weakref.WeakValueDictionary()
        self._io = trio.CapacityLimiter(1)
        self._clock = clock

    def __repr__(self) -> str:
        return f"TokenVault({str(self.directory)!r}, {self.keys!r})"

    def _base(self, account: str) -> str:
        return hashlib.sha256(account.encode("utf-8")).hexdigest()[:40]

    def path(self, account: str) -> Path:
        return self.directory / f"{self._base(account)}.token"

    # ------------------------------------------------------------------ sync, for a worker thread

    def load_sync(self, account: str) -> StoredToken | None:
        """The account's record, or None when it has none. RecordError when it cannot be trusted."""
        try:
            fd = os.open(self.path(account), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise RecordError(f"the token record of {account!r} cannot be opened: {exc.strerror}") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise RecordError(f"the token record of {account!r} is not a regular file")
        with os.fdopen(fd, "rb") as f:
            data = f.read(MAX_RECORD_BYTES + 1)
        if len(data) > MAX_RECORD_BYTES:
            raise RecordError(f"the token record of {account!r} is too large")
        return unseal(self.keys, account, data)

    def store_sync(self, account: str, token: TokenSet, provider: str = "", flow: str = "") -> None:
        """Replace the account's record, atomically and durably."""
        make_private_dir(self.directory)
        base = self._base(account)
        self._sweep(base)
        record = seal(self.keys, account, token, provider, self._clock(), flow)
        tmp = self.directory / f".{base}.{secrets.token_hex(6)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(record)
                f.flush()
                _fsync(f.fileno())
            _replace(tmp, self.path(account))
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        self._fsync_dir()

    def delete_sync(self, account: str) -> bool:
        try:
            self.path(account).unlink()
        except FileNotFoundError:
            return False
        self._fsync_dir()
        return True

    def rewrap_sync(self, account: str) -> bool:
        """Re-encrypt the account's record with the current key; True when it was rewritten."""
        stored = self.load_sync(account)
        if stored is None or stored.kid == self.keys.current:
            return False
        self.store_sync(account, stored.token, stored.provider, stored.flow)
        return True

    def _sweep(self, base: str) -> None:
        """Remove temporary files a crash left for this account (never read, so only space)."""
        with contextlib.suppress(OSError):
            for leftover in self.directory.glob(f".{base}.*.tmp"):
                with contextlib.suppress(OSError):
                    leftover.unlink()

    def _fsync_dir(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            _fsync(fd)
        finally:
            os.close(fd)

    # ------------------------------------------------------------------ async, for trio code

    async def load(self, account: str) -> StoredToken | None:
        return await trio.to_thread.run_sync(self.load_sync, account, limiter=self._io)

    async def store(self, account: str, token: TokenSet, provider: str = "", flow: str = "") -> None:
        await trio.to_thread.run_sync(self.store_sync, account, token, provider, flow, limiter=self._io)

    async def delete(self, account: str) -> bool:
        return await trio.to_thread.run_sync(self.delete_sync, account, limiter=self._io)

    async def rewrap(self, account: str) -> bool:
        return await trio.to_thread.run_sync(self.rewrap_sync, account, limiter=self._io)

    @contextlib.asynccontextmanager
    async def refreshing(self, account: str) -> AsyncIterator[None]:
        """One refresher of ``account``: in this process (a trio.Lock), and across processes that share
        the directory (an flock on the account's lock file, polled, so the wait can be cancelled)."""
        lock = self._locks.get(account)
        if lock is None:
            lock = self._locks[account] = trio.Lock()
        async with lock:
            make_private_dir(self.directory)
            path = self.directory / f"{self._base(account)}.lock"
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except OSError as exc:
                        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                            raise
                    await trio.sleep(LOCK_POLL_SECONDS)
                yield
            finally:
                os.close(fd)  # releases the flock
