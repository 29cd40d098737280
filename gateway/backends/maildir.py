"""The embedded backend: local Maildirs, one per user, with the users file of ``gateway.accounts``.

Layout: user ``name`` owns ``<root>/<name>/{cur,new,tmp}``; the directory is created (empty) at the
user's first login. Logins are checked against the users file, which is re-read whenever its inode,
mtime or size changes.

Snapshot (taken at login, fixed for the session):
- every regular file of ``new/`` and ``cur/`` whose name does not start with ``.``; ``tmp/``,
  subdirectories and symlinks are skipped. ``new/`` is listed before ``cur/``, so a message another
  client moves from one to the other meanwhile is seen twice rather than never; files are keyed by
  their *base name* (the name before ``:2,``), which dedupes it.
- order: by the base name's leading decimal timestamp (the seconds of ``1700000000.M1P2.host``),
  then by the base name as a string; base names without a leading number come last, by name. This
  is the delivery order for the usual ``time.unique.host`` names and is stable across logins.
- ``upstream_id`` is the base name; the UIDL is the base name when it is 1-70 characters of
  0x21-0x7E, else the 40 hex digits of the SHA-1 of its bytes (``common.uidl_or_sha1``).
- the size is the size with every bare LF counted as CRLF (no CRLF counted for an unterminated last
  line). It comes from the Dovecot ``,W=<n>`` field of the base name when there is one; otherwise
  the file is scanned once and the result is cached per (maildir, base name, mtime, size), so flag
  changes and later logins do not rescan.

Messages are read and deleted by path; when another client has moved the file (``new/`` to
``cur/``, or changed its ``:2,`` flags) it is found again by base name. All file-system work runs in
worker threads.

Only the snapshot's own files are ever read. The snapshot records each file's device and inode; a
message is opened relative to a directory descriptor of its ``new/`` or ``cur/`` with ``O_NOFOLLOW``
(and ``O_NONBLOCK``, so a FIFO cannot hang the worker), then ``fstat`` must show a regular file with the
snapshot's device and inode. A name swapped meanwhile for a symlink (to the users file, a TLS key, the
UIDL store), a hard link to another file, a FIFO or a directory is refused with TempFailure and a
warning; nothing of it is read.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import hashlib
import hmac
import logging
import os
import re
import stat
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final, assert_never

import trio

from gateway import accounts
from gateway.backends.base import (
    ApopLogin,
    ApopUnavailable,
    AuthFailed,
    Backend,
    Entry,
    Login,
    MessageGone,
    NotReachable,
    PasswordLogin,
    TempFailure,
    TokenLogin,
)
from gateway.proto.common import uidl_or_sha1

__all__ = ["CHUNK_SIZE", "MaildirBackend"]

log = logging.getLogger("gateway.maildir")

CHUNK_SIZE: Final = 64 * 1024
_SCAN_SIZE: Final = 256 * 1024
_SIZE_CACHE_MAX: Final = 100_000
_SUBDIRS: Final = ("new", "cur")  # listing order matters, see the module docstring

_W_FIELD = re.compile(r",W=([0-9]{1,18})(?=,|$)")
_LEADING_NUMBER = re.compile(r"[0-9]+")

_SizeKey = tuple[str, str, int, int]  # (maildir, base name, st_mtime_ns, st_size)
_UsersKey = tuple[int, int, int, int]  # (st_dev, st_ino, st_mtime_ns, st_size)


def _base_name(file_name: str) -> str:
    cut = file_name.find(":2,")
    return file_name if cut < 0 else file_name[:cut]


def _order_key(base: str) -> tuple[int, int, str]:
    m = _LEADING_NUMBER.match(base)
    return (0, int(m[0]), base) if m else (1, 0, base)


def _w_size(base: str) -> int | None:
    m = _W_FIELD.search(base)
    return int(m[1]) if m else None


@dataclasses.dataclass(slots=True)
class _File:
    base: str
    path: Path
    mtime_ns: int
    raw_size: int
    size: int | None  # CRLF size, once known
    inode: tuple[int, int] = (0, 0)  # (st_dev, st_ino) at the listing: the only file this message is


class _Swapped(Exception):
    """The name no longer leads to the snapshot's regular file (a symlink, FIFO, other inode...)."""


_OPEN_FLAGS: Final = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_DIR_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


# --- blocking helpers, run in worker threads ----------------------------------------------------


def _ensure_maildir(maildir: Path) -> None:
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(mode=0o700, parents=True, exist_ok=True)


def _open_message(path: Path, inode: tuple[int, int]) -> int:
    """A read-only descriptor of the file at ``path`` (``<maildir>/<new|cur>/<name>``), which must be the
    regular file ``inode`` names. FileNotFoundError when the name is gone (moved: look it up again),
    _Swapped when something else is there, OSError otherwise."""
    dir_fd = os.open(path.parent.parent, _DIR_FLAGS)
    try:
        sub_fd = os.open(path.parent.name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise _Swapped(f"{path.parent.name}/ is no longer a directory") from None
        raise
    finally:
        os.close(dir_fd)
    try:
        fd = os.open(path.name, _OPEN_FLAGS, dir_fd=sub_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _Swapped("it is a symlink now") from None
        raise
    finally:
        os.close(sub_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _Swapped("it is no regular file now")
        if (st.st_dev, st.st_ino) != inode:
            raise _Swapped("it is another file (another inode) now")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _list_maildir(maildir: Path) -> list[_File]:
    _ensure_maildir(maildir)
    found: dict[str, _File] = {}
    for sub in _SUBDIRS:
        with os.scandir(maildir / sub) as it:
            for de in it:
                if de.name.startswith("."):
                    continue
                try:
                    if not de.is_file(follow_symlinks=False):
                        continue
                    st = de.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue  # gone since the listing
                base = _base_name(de.name)
                # a base seen in new/ and again in cur/ was moved meanwhile: keep the newer place
                found[base] = _File(
                    base, Path(de.path), st.st_mtime_ns, st.st_size, _w_size(base), (st.st_dev, st.st_ino)
                )
    return list(found.values())


def _locate(maildir: Path, base: str) -> Path | None:
    """The current path of the message ``base``, or None. Raises OSError if the maildir is unreadable."""
    for sub in _SUBDIRS:
        with os.scandir(maildir / sub) as it:
            for de in it:
                if not de.name.startswith(".") and _base_name(de.name) == base:
                    return Path(de.path)
    return None


def _crlf_size(path: Path, inode: tuple[int, int]) -> int:
    total = 0
    prev_cr = False
    with open(_open_message(path, inode), "rb") as f:
        while chunk := f.read(_SCAN_SIZE):
            bare_lf = chunk.count(b"\n") - chunk.count(b"\r\n")
            if prev_cr and chunk[0] == 0x0A:
                bare_lf -= 1  # its CR ended the previous chunk
            total += len(chunk) + bare_lf
            prev_cr = chunk[-1] == 0x0D
    return total


def _measure(maildir: Path, files: list[_File]) -> None:
    """Fill in ``size`` of ``files`` in place; follows moved files, leaves vanished (or swapped) ones at
    None."""
    for f in files:
        for _attempt in range(2):
            try:
                f.size = _crlf_size(f.path, f.inode)
                break
            except _Swapped as exc:
                log.warning("maildir: %s left out of the snapshot: %s", f.path, exc)
                break
            except FileNotFoundError:
                moved = _locate(maildir, f.base)
                if moved is None:
                    break
                f.path = moved


def _unlink_all(maildir: Path, targets: list[tuple[Path, str]]) -> int:
    """Unlink every (path, base); returns how many could not be deleted. Gone counts as deleted."""
    failed = 0
    for path, base in targets:
        try:
            os.unlink(path)
            continue
        except FileNotFoundError:
            pass
        except OSError:
            failed += 1
            continue
        try:
            moved = _locate(maildir, base)
            if moved is not None:
                os.unlink(moved)
        except FileNotFoundError:
            pass  # the file (or the whole maildir) is gone: deleted
        except OSError:
            failed += 1
    return failed


class _TopCutter:
    """Tells when the header and ``top_lines`` body lines have gone by (LF or CRLF line ends).

    The header ends at the first empty line (nothing, or a lone CR, before the LF).
    """

    __slots__ = ("_first_is_cr", "_in_header", "_line_len", "_remaining")

    def __init__(self, top_lines: int) -> None:
        self._in_header = True
        self._remaining = top_lines
        self._line_len = 0  # bytes of the current line so far, capped at 2
        self._first_is_cr = False

    def feed(self, chunk: bytes) -> bool:
        """Account for ``chunk``; True once everything TOP needs is in the chunks fed so far."""
        pos = 0
        while (nl := chunk.find(b"\n", pos)) >= 0:
            seg = chunk[pos:nl]
            self._add(seg)
            empty = self._line_len == 0 or (self._line_len == 1 and self._first_is_cr)
            self._line_len = 0
            self._first_is_cr = False
            pos = nl + 1
            if self._in_header:
                if empty:
                    self._in_header = False
                    if self._remaining == 0:
                        return True
            else:
                self._remaining -= 1
                if self._remaining == 0:
                    return True
        self._add(chunk[pos:])
        return False

    def _add(self, seg: bytes) -> None:
        if seg and self._line_len == 0:
            self._first_is_cr = seg[0] == 0x0D
        self._line_len = min(2, self._line_len + len(seg))


# --- the maildrop -------------------------------------------------------------------------------


class _MaildirMaildrop:
    __slots__ = ("_entries", "_fixes", "_inodes", "_maildir", "_paths", "identity")

    def __init__(
        self,
        maildir: Path,
        entries: tuple[Entry, ...],
        paths: list[Path],
        inodes: list[tuple[int, int]],
        fixes: dict[tuple[str, str], int],
        identity: str,
    ) -> None:
        self.identity = identity
        self._maildir = maildir
        self._entries = entries
        self._paths = paths  # current known path of each entry; updated when found moved
        self._inodes = inodes  # (st_dev, st_ino) of each entry's file at the snapshot
        self._fixes = fixes  # the backend's size corrections, shared

    def note_size(self, index: int, octets: int) -> None:
        """RETR sent another size than listed (a wrong ,W= in the name): list the true size from now on."""
        self._check_index(index)
        if len(self._fixes) < _SIZE_CACHE_MAX:
            self._fixes[(str(self._maildir), self._entries[index].upstream_id)] = octets

    @property
    def entries(self) -> Sequence[Entry]:
        return self._entries

    def _check_index(self, index: int) -> None:
        if not 0 <= index < len(self._entries):
            raise IndexError(f"message index {index} out of range 0..{len(self._entries) - 1}")

    async def stream(self, index: int, *, top_lines: int | None = None) -> AsyncGenerator[bytes, None]:
        self._check_index(index)
        cutter = _TopCutter(top_lines) if top_lines is not None and top_lines >= 0 else None
        base = self._entries[index].upstream_id
        try:
            fd = await self._open(index)
        except FileNotFoundError:
            # moved to cur/ or re-flagged by another client since the snapshot?
            self._paths[index] = await self._relocate(base)
            try:
                fd = await self._open(index)
            except FileNotFoundError:
                raise MessageGone(f"maildir: message {base!r} vanished") from None
        async with trio.wrap_file(os.fdopen(fd, "rb")) as f:
            while True:
                try:
                    chunk = await f.read(CHUNK_SIZE)
                except OSError as exc:
                    raise TempFailure(f"maildir: cannot read message {base!r}: {exc}") from exc
                if not chunk:
                    return
                yield chunk
                if cutter is not None and cutter.feed(chunk):
                    return

    async def _open(self, index: int) -> int:
        """The descriptor of the snapshot's file of ``index``; FileNotFoundError when its name is gone."""
        path, base = self._paths[index], self._entries[index].upstream_id
        try:
            return await trio.to_thread.run_sync(_open_message, path, self._inodes[index])
        except FileNotFoundError:
            raise
        except _Swapped as exc:
            log.warning("maildir: refusing to read %s: not the file of the snapshot (%s)", path, exc)
            raise TempFailure(f"maildir: message {base!r} was replaced: {exc}") from None
        except OSError as exc:
            raise TempFailure(f"maildir: cannot open message {base!r}: {exc}") from exc

    async def _relocate(self, base: str) -> Path:
        try:
            moved = await trio.to_thread.run_sync(_locate, self._maildir, base)
        except FileNotFoundError:
            moved = None  # the whole maildir is gone
        except OSError as exc:
            raise TempFailure(f"maildir: cannot list {self._maildir}: {exc}") from exc
        if moved is None:
            raise MessageGone(f"maildir: message {base!r} was removed")
        return moved

    async def apply_deletions(self, indexes: Sequence[int]) -> None:
        unique = sorted(set(indexes))
        for index in unique:
            self._check_index(index)
        targets = [(self._paths[i], self._entries[i].upstream_id) for i in unique]
        if not targets:
            return
        failed = await trio.to_thread.run_sync(_unlink_all, self._maildir, targets)
        if failed:
            raise TempFailure(f"maildir: {failed} of {len(targets)} deletions failed in {self._maildir}")


# --- the backend --------------------------------------------------------------------------------


class MaildirBackend:
    name: str = "maildir"

    async def apop_available(self) -> bool:
        """Only when some account has an APOP secret: clients such as fdm switch to APOP whenever the
        greeting offers it, and give up when it fails."""
        try:
            users = await self._load_users()
        except TempFailure:
            return False
        return any(record.apop_secret is not None for record in users.values())

    def __init__(self, root: Path, users_file: Path) -> None:
        self._root = Path(root)
        self._users_file = Path(users_file)
        self._users: tuple[_UsersKey, dict[str, accounts.UserRecord]] | None = None
        self._sizes: collections.OrderedDict[_SizeKey, int] = collections.OrderedDict()
        self._size_fixes: dict[tuple[str, str], int] = {}
        # scrypt takes 16 MiB and a core for ~50 ms: do not run forty of them at once
        self._scrypt_limiter = trio.CapacityLimiter(max(1, min(4, os.cpu_count() or 1)))

    def lock_key(self, identity: str) -> str:
        return f"maildir:{self._root}:{identity}"

    async def probe(self) -> None:
        if not await trio.to_thread.run_sync(os.access, self._root, os.R_OK | os.X_OK):
            raise NotReachable("maildir root not readable")

    async def aclose(self) -> None:
        pass

    @contextlib.asynccontextmanager
    async def open_maildrop(self, login: Login) -> AsyncIterator[_MaildirMaildrop]:
        username = await self._authenticate(login)
        # the users file's own spelling is the identity: it names the account and its folder
        yield await self._snapshot(self._root / username, username)

    # -- authentication

    async def _load_users(self) -> dict[str, accounts.UserRecord]:
        cached = self._users

        def load() -> tuple[_UsersKey, dict[str, accounts.UserRecord]]:
            st = os.stat(self._users_file)
            key = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
            if cached is not None and cached[0] == key:
                return cached
            return key, accounts.load_users(self._users_file)

        try:
            self._users = await trio.to_thread.run_sync(load)
        except (OSError, ValueError) as exc:
            raise TempFailure(f"maildir: cannot read users file: {exc}") from exc
        return self._users[1]

    async def _authenticate(self, login: Login) -> str:
        users = await self._load_users()
        try:
            accounts.validate_username(login.username)
            record = users.get(login.username)
        except ValueError:
            record = None
        match login:
            case PasswordLogin():
                # the scrypt work is done for unknown users too: timing does not tell who exists
                stored = record.password_hash if record is not None else accounts.DUMMY_HASH
                ok = await trio.to_thread.run_sync(
                    accounts.verify_password, login.password, stored, limiter=self._scrypt_limiter
                )
                if record is None:
                    raise AuthFailed(f"maildir: unknown user {login.username!r}")
                if not ok:
                    raise AuthFailed(f"maildir: wrong password for {login.username!r}")
            case ApopLogin():
                secret = record.apop_secret if record is not None else None
                ok = _apop_matches(login.timestamp, secret or "", login.digest)
                if record is None:
                    raise AuthFailed(f"maildir: unknown user {login.username!r}")
                if secret is None:
                    raise ApopUnavailable(f"maildir: no APOP secret for {login.username!r}")
                if not ok:
                    raise AuthFailed(f"maildir: wrong APOP digest for {login.username!r}")
            case TokenLogin():
                raise AuthFailed("maildir: a token login cannot be checked against the users file")
            case _:
                assert_never(login)
        return record.name

    # -- snapshot

    async def _snapshot(self, maildir: Path, identity: str) -> _MaildirMaildrop:
        try:
            files = await trio.to_thread.run_sync(_list_maildir, maildir)
        except OSError as exc:
            raise TempFailure(f"maildir: cannot list {maildir}: {exc}") from exc

        def key(f: _File) -> _SizeKey:
            return (str(maildir), f.base, f.mtime_ns, f.raw_size)

        misses: list[_File] = []
        for f in files:
            if f.size is not None:
                continue
            cached = self._sizes.get(key(f))
            if cached is None:
                misses.append(f)
            else:
                self._sizes.move_to_end(key(f))
                f.size = cached
        if misses:
            try:
                await trio.to_thread.run_sync(_measure, maildir, misses)
            except OSError as exc:
                raise TempFailure(f"maildir: cannot read {maildir}: {exc}") from exc
            for f in misses:
                if f.size is not None:
                    self._sizes[key(f)] = f.size
            while len(self._sizes) > _SIZE_CACHE_MAX:
                self._sizes.popitem(last=False)

        # files that vanished while being measured are left out
        present = sorted(
            ((f, f.size) for f in files if f.size is not None), key=lambda pair: _order_key(pair[0].base)
        )
        fixes = self._size_fixes
        entries = tuple(
            Entry(f.base, fixes.get((str(maildir), f.base), size), uidl_or_sha1(f.base))
            for f, size in present
        )
        return _MaildirMaildrop(
            maildir, entries, [f.path for f, _ in present], [f.inode for f, _ in present], fixes, identity
        )


def _apop_matches(timestamp: str, secret: str, digest: str) -> bool:
    expected = hashlib.md5((timestamp + secret).encode("utf-8", "surrogatepass"), usedforsecurity=False)
    return hmac.compare_digest(
        expected.hexdigest().encode("ascii"), digest.lower().encode("utf-8", "surrogatepass")
    )


if TYPE_CHECKING:
    _check: type[Backend] = MaildirBackend
