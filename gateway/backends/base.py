"""The one async interface every upstream (maildir, imap, jmap) implements.

A session's life against a backend:

    async with backend.open_maildrop(login) as drop:     # at PASS / APOP / AUTH
        drop.entries                                       # fixed for the session
        backend.lock_key(drop.identity)                    # one key per account, however it was typed
        async for chunk in drop.stream(index, top_lines=None):   # RETR / TOP
            ...
        await drop.apply_deletions(indexes)               # only at QUIT, once
    # leaving the block closes the upstream session (no deletions applied)
    await backend.probe()                                  # /readyz: NotReachable when it cannot serve

Rules every backend keeps:
- ``entries`` is the snapshot taken at login: ordered, each with the upstream id, the exact size in
  octets (CRLF line ends, as RETR will send it before dot-stuffing, without the CRLF that may be added
  to close an unterminated last line) and a UIDL.
- ``stream`` yields the raw message (or more than its top: the caller cuts at ``top_lines``; the backend
  may use the hint to fetch less). Chunks are bounded; the whole message is never held in memory.
  Bare LF line ends are allowed in the chunks: the caller's encoder normalises them.
- Nothing is deleted before ``apply_deletions``; leaving the context without calling it deletes nothing.
- Errors are the exceptions below, never raw library errors: the shell turns them into RFC 3206 replies.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from contextlib import AbstractAsyncContextManager
from typing import NamedTuple, Protocol

import trio

from gateway.proto.logins import ApopLogin, Login, PasswordLogin, TokenLogin

__all__ = [
    "ApopLogin",
    "ApopUnavailable",
    "AuthFailed",
    "Backend",
    "BackendError",
    "Entry",
    "Login",
    "Maildrop",
    "MessageGone",
    "NotReachable",
    "PasswordLogin",
    "PermFailure",
    "SizeChanged",
    "TempFailure",
    "TokenLogin",
    "TokenRejected",
    "tcp_probe",
]


class Entry(NamedTuple):
    """One message of a snapshot. A NamedTuple, not a dataclass: a 100,000-message snapshot builds
    100,000 of them at every login, and a tuple is several times cheaper to make."""

    upstream_id: str
    size: int
    uidl: str  # the backend's proposal (the "native" UIDL format); the UIDL store has the last word
    key: str = ""  # the most stable identity (EMAILID, UIDVALIDITY+UID, Email id...); "" = upstream_id
    uid: int = 0  # IMAP UID and UIDVALIDITY, for the UIDL formats built from them; 0 when none
    uidvalidity: int = 0

    @property
    def stable_key(self) -> str:
        return self.key or self.upstream_id


class BackendError(Exception):
    """Base of the errors a backend may raise. ``str(exc)`` is for logs only, never for clients."""


class AuthFailed(BackendError):
    """Bad credentials, or a login method this backend cannot check (RFC 3206 [AUTH])."""


class ApopUnavailable(AuthFailed):
    """APOP for an account that has no APOP secret (or a backend that cannot check APOP): it can never
    succeed, so the login gate does not count it as a guess."""


class TokenRejected(AuthFailed):
    """The upstream refused a ``TokenLogin``'s token: the token layer may refresh once and retry."""


class TempFailure(BackendError):
    """Upstream unreachable, slow, broken or busy; trying later may work ([SYS/TEMP])."""


class PermFailure(BackendError):
    """Trying again will not help ([SYS/PERM])."""


class NotReachable(BackendError):
    """From ``Backend.probe``: the upstream cannot serve logins now. Its text is shown to readiness
    probers, so it names only a host:port or a fixed phrase, never a credential."""


class MessageGone(BackendError):
    """The message left the upstream during the session (expunged by another client)."""


class SizeChanged(BackendError):
    """Before anything was sent: the upstream is about to deliver a size other than the one listed.

    The backend has already remembered the true size for later snapshots; this RETR gets -ERR so the
    client never receives a message that disagrees with the LIST of its session."""

    def __init__(self, message: str, actual: int) -> None:
        super().__init__(message)
        self.actual = actual


class Maildrop(Protocol):
    @property
    def entries(self) -> Sequence[Entry]: ...

    @property
    def identity(self) -> str:
        """The account this maildrop belongs to, the same for every spelling of the user name that opens
        it: the upstream's own name where it gives one (JMAP: the mail accountId), else the user name
        normalised by the configured policy (see ``gateway.identity``). ``Backend.lock_key`` takes it."""
        ...

    def stream(self, index: int, *, top_lines: int | None = None) -> AsyncGenerator[bytes, None]:
        """Yield the message at 0-based ``index`` of ``entries``. Raises MessageGone or TempFailure.

        Callers close it with ``contextlib.aclosing`` (they may stop early, at a TOP cut). An index out
        of range is a caller bug: IndexError."""
        ...

    def note_size(self, index: int, octets: int) -> None:
        """The shell sent ``octets`` for a whole message listed with another size: remember the true size
        so later snapshots list what RETR sends."""
        ...

    async def apply_deletions(self, indexes: Sequence[int]) -> None:
        """Delete (by the configured policy) the 0-based indexes, as one batch. Raises TempFailure when
        not all of them could be applied; what was not applied must still be there upstream."""
        ...


class Backend(Protocol):
    name: str

    async def apop_available(self) -> bool:
        """Whether APOP can succeed for some account: only then does the greeting offer it."""
        ...

    def open_maildrop(self, login: Login) -> AbstractAsyncContextManager[Maildrop]:
        """Authenticate and snapshot. Raises AuthFailed, TempFailure or PermFailure on entry. (The
        [IN-USE] lock is the login gate's, keyed by ``lock_key``; a backend never raises it.)"""
        ...

    def lock_key(self, identity: str) -> str:
        """The key of the maildrop of the account ``identity`` (a ``Maildrop.identity``): upstream +
        account + folder, for the [IN-USE] lock, the per-account limits and the UIDL namespace. Before
        identities it was given the typed user name: ``gateway.identity.account_key`` still asks for that
        form too, to carry old UIDL namespaces over."""
        ...

    async def probe(self) -> None:
        """Readiness: raise NotReachable when the upstream cannot serve a login now (IMAP and JMAP: a
        TCP connect to the upstream's host and port; Maildir: the root readable). Cheap, logs nothing,
        needs no credentials; the caller bounds it with ``fail_after``."""
        ...

    async def aclose(self) -> None: ...


async def tcp_probe(host: str, port: int) -> None:
    """Open and close a TCP connection to ``host:port``: NotReachable when that fails."""
    try:
        stream = await trio.open_tcp_stream(host, port)
    except OSError as exc:
        raise NotReachable(f"upstream {host}:{port} unreachable: {exc.__class__.__name__}") from None
    await stream.aclose()
