"""The JMAP upstream (RFC 8620 / RFC 8621): every POP3 session becomes a few HTTP requests.

- URLs: ``jmap+http://host:port/`` and ``jmap+https://host/`` discover the session resource at
  ``/.well-known/jmap``, following redirects (at most 5). A URL with another path
  (``jmap+https://host/jmap/session``) names the session resource itself. Relative ``apiUrl``/``downloadUrl``
  are resolved against the session's URL.
- Credentials go only where ``jmap.CredentialScope`` allows: the configured URL's origin and the
  operator's ``allowed_origins``, never http under ``jmap+https``. Every request that carries them is
  checked in ``_Api.send``, the one place that adds the Authorization header, and the session's
  ``apiUrl`` and ``downloadUrl`` are checked at login, so a hostile or intercepted upstream that hands
  out (or redirects to) another origin fails the login with PermFailure and a warning, and the other
  origin never sees a password or the token.
- One pooled keep-alive ``httpx.AsyncClient`` per backend, closed by ``aclose``. TLS is verified unless
  ``insecure``; ``ca_file`` adds trust anchors. No proxy or netrc from the environment. httpx gets
  timeouts of its own (``timeout``); the shell bounds every call with ``fail_after`` as well.
- Login: the POP3 credentials go upstream as HTTP Basic. With a ``token`` configured the upstream sees
  the bearer token instead, the POP3 password is checked against the users file (as the maildir backend
  does), and the account is ``jmap.choose_account``'s: the operator's ``token_accounts`` mapping, else
  the one account named exactly like the POP3 user (two are refused as ambiguous), else the primary one
  when the session's username is the POP3 user. APOP is refused: it cannot be passed through. A
  ``TokenLogin`` (a mapped account) sends its own token as Bearer for that session, with the same account
  choice for its upstream user name; a 401 at login is TokenRejected.
- Identity: the maildrop's ``identity`` is the mail accountId the session gave, so every spelling of a
  user name the upstream accepts (Cyrus lowercases ``ALICE``) is one account for locks and UIDLs.
- Snapshot: Mailbox/get finds the folder (``INBOX`` = role inbox, else a name or ``A/B`` path), then
  Email/query pages (``position`` + ``limit``, oldest ``receivedAt`` first), each followed in the same
  request by an Email/get of ``id``, ``blobId`` and ``size`` through a back-reference; a page never
  exceeds the server's ``maxObjectsInGet``, and several pages share one request up to
  ``maxCallsInRequest``. If the query state changes between requests the snapshot starts again. A window:
  ``since`` adds an ``after`` condition, ``newest`` queries newest first and stops at N.
  The UIDL proposal is ``jmap.uidl_for(Email id)``; Email ids are immutable (Cyrus: a SHA-1 of the bytes).
- RETR/TOP stream the blob download in bounded chunks. A Content-Length other than the size the snapshot
  saw is SizeChanged before the first byte; a connection that dies mid-body is TempFailure (never a clean
  end). A TOP that stops early drains a short remainder so that the connection stays pooled.
- Deletions at QUIT, by policy: ``expunge`` = Email/set destroy; ``move:<name>`` = a mailboxIds patch (out
  of the folder, into the target); ``flag:<keyword>`` = a keywords patch, and later snapshots leave such
  Emails out (``notKeyword``). Anything not applied (notDestroyed / notUpdated other than notFound) is
  TempFailure; ids are only ever those of the snapshot, so nothing else is touched.
- Errors: 401/403 at login = AuthFailed; 5xx, 408, 429, timeouts, refused or broken connections,
  malformed JSON, a wrong content type and oversized bodies = TempFailure; JMAP method errors become
  TempFailure or PermFailure by type (``jmap.MethodError.temporary``). Credentials are never logged.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime
import logging
import re
import ssl
import urllib.parse
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import NoReturn

import httpx
import trio

from gateway import __version__, accounts, tls
from gateway.backends import httpnet
from gateway.backends.base import (
    ApopLogin,
    ApopUnavailable,
    AuthFailed,
    BackendError,
    Entry,
    Login,
    MessageGone,
    PermFailure,
    SizeChanged,
    TempFailure,
    TokenLogin,
    TokenRejected,
    tcp_probe,
)
from gateway.backends.readahead import ReadAhead, chunks
from gateway.config import EXPUNGE, DeletePolicy
from gateway.proto import jmap

log = logging.getLogger("gateway.jmap")

WELL_KNOWN = "/.well-known/jmap"
MAX_REDIRECTS = 5
MAX_JSON_BYTES = 32 * 1024 * 1024  # one API response; pages keep real ones far smaller
MAX_ERROR_BYTES = 64 * 1024
DRAIN_LIMIT = 256 * 1024  # a TOP that stops early reads at most this much more to keep the connection
DRAIN_SECONDS = 2.0
READ_AHEAD_MAX_MESSAGE = 256 * 1024  # messages up to this size are read ahead, whole
READ_AHEAD_BUDGET = 2 * 1024 * 1024
READ_AHEAD_FIRST_WINDOW = 4
READ_AHEAD_MAX_COUNT = 32
READ_AHEAD_CONNECTIONS = 4
DEFAULT_PAGE_SIZE = 1024
MAX_PAGES_PER_REQUEST = 16
SNAPSHOT_ATTEMPTS = 3
MAX_USERNAME_OCTETS = 256
MAX_PASSWORD_OCTETS = 1024
MAX_TOKEN_OCTETS = 8 * 1024  # a login's bearer token (an OAuth2 access token, an API token)
MAX_SIZE_FIXES = 100_000
JSON_TYPE = "application/json"
_TOKEN = re.compile(r"[A-Za-z0-9._~+/-]+=*")  # RFC 6750 b64token


@dataclasses.dataclass(frozen=True, slots=True)
class JmapSettings:
    session_url: str  # http(s)://host[:port]/.well-known/jmap, or the configured session resource
    folder: str = "INBOX"
    ca_file: str = ""
    insecure: bool = False
    delete_policy: DeletePolicy = EXPUNGE  # a "move:Archive"-style text is parsed here, once
    mark_seen: bool = False
    token: str = dataclasses.field(default="", repr=False)
    users_file: str = ""  # with a token: the POP3 passwords (gateway.accounts format)
    timeout: float = 30.0
    page_size: int = DEFAULT_PAGE_SIZE
    allowed_origins: tuple[str, ...] = ()  # origins besides the session URL's that may get credentials
    token_accounts: tuple[str, ...] = ()  # with a token: POP3USER=ACCOUNTID lines
    # The visibility window (a mapped account's): only Emails received on or after ``since`` (00:00 UTC;
    # see jmap_after),
    # then only the newest N of those by receivedAt. Deletion indexes refer to this filtered snapshot.
    since: datetime.date | None = None
    newest: int | None = None
    scope: jmap.CredentialScope = dataclasses.field(init=False, repr=False, compare=False)
    account_map: dict[str, str] = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        """ValueError for an allowed origin, a mapping line or a delete policy that cannot be used."""
        object.__setattr__(self, "delete_policy", DeletePolicy.of(self.delete_policy))
        object.__setattr__(self, "scope", jmap.CredentialScope.build(self.session_url, self.allowed_origins))
        object.__setattr__(self, "account_map", jmap.parse_account_map(self.token_accounts))
        if self.newest is not None and self.newest < 1:
            raise ValueError("newest must be at least 1")

    @classmethod
    def from_url(cls, url: str, **kwargs: object) -> JmapSettings:
        parts = urllib.parse.urlsplit(url)
        scheme = {"jmap+http": "http", "jmap+https": "https"}.get(parts.scheme.lower())
        if scheme is None:
            raise ValueError(f"not a JMAP URL: {url!r}")
        if not parts.hostname:
            raise ValueError(f"the JMAP URL needs a host: {url!r}")
        if parts.username or parts.password:
            raise ValueError("put no credentials in the upstream URL: POP3 logins are passed through")
        if parts.query or parts.fragment:
            raise ValueError("the JMAP URL takes no query or fragment")
        path = parts.path if parts.path not in ("", "/") else WELL_KNOWN
        session_url = urllib.parse.urlunsplit((scheme, parts.netloc, path, "", ""))
        return cls(session_url=session_url, **kwargs)  # type: ignore[arg-type]

    @property
    def origin(self) -> str:
        parts = urllib.parse.urlsplit(self.session_url)
        return f"{parts.scheme}://{parts.netloc}"

    @property
    def hide_keyword(self) -> str | None:
        policy = self.delete_policy
        return policy.target.lower() if policy.kind == "flag" else None


class _Credentials:
    """The Authorization header value, kept out of every repr and log line. ``per_login``: a token the
    login brought (``TokenLogin``), which a 401 at login refuses as TokenRejected."""

    __slots__ = ("_header", "per_login")

    def __init__(self, header: str, *, per_login: bool = False) -> None:
        self._header = header
        self.per_login = per_login

    def headers(self) -> dict[str, str]:
        return {"Authorization": self._header}

    def __repr__(self) -> str:
        return "<credentials>"

    @classmethod
    def basic(cls, username: str, password: str) -> _Credentials:
        raw = username.encode() + b":" + password.encode()
        return cls("Basic " + base64.b64encode(raw).decode("ascii"))

    @classmethod
    def bearer(cls, token: str, *, per_login: bool = False) -> _Credentials:
        return cls("Bearer " + token, per_login=per_login)


def client_tls_context(settings: JmapSettings) -> ssl.SSLContext:
    return tls.client_context(settings.ca_file, settings.insecure)


def _jmap_failure(exc: jmap.JmapError, what: str) -> TempFailure | PermFailure:
    cls = TempFailure if exc.temporary else PermFailure
    return cls(f"{what}: {exc}")


class _Api:
    """HTTP for one backend: the pooled client, status mapping and capped reads."""

    def __init__(self, settings: JmapSettings, transport: httpx.AsyncBaseTransport | None) -> None:
        self.settings = settings
        timeout = httpx.Timeout(settings.timeout, connect=min(settings.timeout, 15.0))
        limits = httpx.Limits(max_connections=100, max_keepalive_connections=20, keepalive_expiry=30)
        verify = client_tls_context(settings)
        self.client = httpx.AsyncClient(
            verify=verify,
            timeout=timeout,
            limits=limits,
            transport=transport if transport is not None else httpnet.transport(verify, limits),
            trust_env=False,  # no proxies or netrc credentials from the environment
            follow_redirects=False,
            headers={"User-Agent": f"pop3-gateway/{__version__}"},
        )

    @contextlib.asynccontextmanager
    async def send(
        self, method: str, url: str, creds: _Credentials, *, content: bytes | None = None, accept: str
    ) -> AsyncIterator[_Body]:
        headers = {"Accept": accept, "Accept-Encoding": "identity"}
        if content is not None:
            headers["Content-Type"] = JSON_TYPE
        try:
            request = self.client.build_request(method, url, content=content, headers=headers)
            self.check_scope(str(request.url), f"{method} {_safe(url)}")
            request.headers.update(creds.headers())  # only here, and only after the check
            response = await self.client.send(request, stream=True)
        except httpx.TimeoutException:
            raise TempFailure(f"{method} {_safe(url)}: timed out") from None
        except (httpx.HTTPError, httpx.InvalidURL, OSError, ssl.SSLError) as exc:
            raise TempFailure(f"{method} {_safe(url)}: {exc.__class__.__name__}: {exc}") from None
        body = _Body(response)
        try:
            yield body
        except httpx.TimeoutException:
            raise TempFailure(f"{method} {_safe(url)}: timed out reading the body") from None
        except (httpx.HTTPError, OSError, ssl.SSLError) as exc:
            raise TempFailure(f"{method} {_safe(url)}: {exc.__class__.__name__}: {exc}") from None
        finally:
            await body.aclose()

    def check_scope(self, url: str, what: str) -> None:
        """PermFailure (and a warning) unless ``url`` may receive the credentials; TempFailure, as a
        request to it would be, when it is no URL at all. The check reads httpx's own form of the URL,
        the one a request would go to."""
        try:
            parsed = httpx.URL(url)
        except httpx.InvalidURL as exc:
            raise TempFailure(f"{what}: InvalidURL: {exc}") from None
        reason = self.settings.scope.refusal(str(parsed))
        if reason is not None:
            log.warning("%s: refusing to send credentials: %s (upstream.allowed_origins)", what, reason)
            raise PermFailure(f"{what}: refusing to send credentials: {reason}")

    async def json(self, body: _Body, what: str) -> bytes:
        """The body of a 200 JSON response, capped; TempFailure for anything else."""
        ctype = body.response.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != JSON_TYPE:
            raise TempFailure(f"{what}: upstream answered {ctype[:60] or 'no content type'!r}, not JSON")
        return await body.read_capped(MAX_JSON_BYTES, what)

    async def fail(self, body: _Body, what: str, *, login: bool, token_login: bool = False) -> NoReturn:
        """Raise the backend error for a response that is not 200. ``token_login``: the credentials are
        the login's own token, so a 401 at login is TokenRejected (refresh it and try once more)."""
        status = body.response.status_code
        if status == 401 and login and token_login:
            raise TokenRejected(f"{what}: upstream refused the login's token (HTTP 401)", status="401")
        if status in (401, 403):
            if login:
                raise AuthFailed(f"{what}: upstream refused the credentials (HTTP {status})")
            raise TempFailure(f"{what}: upstream refused the credentials mid-session (HTTP {status})")
        if status in (408, 429) or status >= 500:
            raise TempFailure(f"{what}: HTTP {status}")
        data = b""
        with contextlib.suppress(TempFailure):
            data = await body.read_capped(MAX_ERROR_BYTES, what)
        raise _jmap_failure(jmap.parse_problem(data, status), what)


class _Body:
    """A streamed response body, read chunk by chunk and closed without leaving generators behind.

    httpx streams through a chain of async generators that nothing closes when a reader stops early
    (trio warns when they are collected). ``aclose`` closes the connection first and then runs the chain
    to its end, which now fails at once, so every generator in it finishes."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.received = 0
        self.finished = False
        self._chunks: AsyncIterator[bytes] | None = None

    async def next(self) -> bytes | None:
        """The next chunk (as large as one network read), or None at the end of the body."""
        if self._chunks is None:
            self._chunks = self.response.aiter_bytes()
        try:
            chunk = await self._chunks.__anext__()
        except StopAsyncIteration:
            self.finished = True
            return None
        self.received += len(chunk)
        return chunk

    async def read_capped(self, cap: int, what: str) -> bytes:
        declared = self.response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > cap:
            raise TempFailure(f"{what}: response of {declared} bytes is over the {cap}-byte cap")
        data = bytearray()
        while (chunk := await self.next()) is not None:
            data += chunk
            if len(data) > cap:
                raise TempFailure(f"{what}: response over the {cap}-byte cap")
        return bytes(data)

    async def drain(self, limit: int) -> None:
        """Read what is left when it is at most ``limit`` bytes, so that the connection is reused."""
        length = self.response.headers.get("content-length", "")
        if self.finished or not length.isdigit() or int(length) - self.received > limit:
            return
        with trio.move_on_after(DRAIN_SECONDS), contextlib.suppress(httpx.HTTPError):
            while await self.next() is not None:
                pass

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await self.response.aclose()
            if self._chunks is not None and not self.finished:
                self.finished = True
                with contextlib.suppress(httpx.HTTPError, httpx.StreamError, OSError):
                    async for _ in self._chunks:
                        pass


def jmap_after(since: datetime.date) -> str:
    """The Email/query ``after`` UTCDate for "received on or after ``since``": 00:00 UTC of that day.
    RFC 8621 4.4.1 calls ``after`` strict; Cyrus 3.6 includes the instant itself (checked by the tests),
    so there midnight is in, and on a strict server a message received exactly at 00:00:00 is left out."""
    start = datetime.datetime.combine(since, datetime.time(), tzinfo=datetime.UTC)
    return start.isoformat().replace("+00:00", "Z")  # strftime's %Y does not pad year 1 to 0001


def _safe(url: str) -> str:
    """A URL for a log line: no query string (download URLs carry nothing secret, but keep lines short)."""
    return url.split("?", 1)[0][:200]


@dataclasses.dataclass(slots=True)
class _Account:
    """One logged-in view: who, how to authenticate, and the session's URLs and limits."""

    creds: _Credentials
    session: jmap.Session
    account: jmap.Account


class JmapMaildrop:
    def __init__(
        self,
        backend: JmapBackend,
        view: _Account,
        mailbox_id: str,
        records: list[jmap.EmailRecord],
    ) -> None:
        self._backend = backend
        self._view = view
        self._mailbox_id = mailbox_id
        self._records = records
        account = view.account.id
        # the upstream's own name for the account, however the user name was typed (Cyrus: ALICE -> alice)
        self.identity = account
        pop3_sizes = backend._pop3_sizes
        self._entries = [
            Entry(r.id, pop3_sizes.get((account, r.id), r.size), jmap.uidl_for(r.id)) for r in records
        ]
        self._ahead = ReadAhead(
            [e.size for e in self._entries],
            max_message=READ_AHEAD_MAX_MESSAGE,
            budget=READ_AHEAD_BUDGET,
            first_window=READ_AHEAD_FIRST_WINDOW,
            max_count=READ_AHEAD_MAX_COUNT,
        )

    @property
    def entries(self) -> Sequence[Entry]:
        return self._entries

    def note_size(self, index: int, octets: int) -> None:
        """Remember the size RETR really sent (the upstream's ``size`` was not it) for later snapshots."""
        self._backend._remember(
            self._backend._pop3_sizes, (self._view.account.id, self._records[index].id), octets
        )

    async def _download_whole(self, index: int) -> None:
        """Read-ahead of one small message: whole, exact, or not at all (the streaming path then runs and
        reports whatever went wrong)."""
        record = self._records[index]
        expected = self._backend._blob_sizes.get((self._view.account.id, record.id), record.size)
        url = jmap.download_url(self._view.session.download_url, self._view.account.id, record.blob_id)
        try:
            async with self._backend._api.send("GET", url, self._view.creds, accept="*/*") as body:
                if body.response.status_code != 200:
                    return
                data = await body.read_capped(READ_AHEAD_MAX_MESSAGE, f"download of {record.id}")
        except BackendError:
            return
        if len(data) == expected:
            self._ahead.put(index, data)

    async def _small_body(self, index: int) -> bytes | None:
        """Small messages are downloaded a few at a time, concurrently, so the per-request round trip is
        paid once per batch."""
        if not self._ahead.eligible(index):
            return None
        body = self._ahead.take(index)
        if body is not None:
            return body
        limiter = trio.CapacityLimiter(READ_AHEAD_CONNECTIONS)

        async def one(i: int) -> None:
            async with limiter:
                await self._download_whole(i)

        async with trio.open_nursery() as nursery:
            for i in self._ahead.batch(index):
                nursery.start_soon(one, i)
        return self._ahead.take(index)

    async def stream(self, index: int, *, top_lines: int | None = None) -> AsyncGenerator[bytes, None]:
        small = await self._small_body(index)
        if small is not None:
            for piece in chunks(small):
                yield piece
            if top_lines is None and self._backend.settings.mark_seen:
                await self._mark_seen(self._records[index].id)
            return
        record = self._records[index]
        account = self._view.account.id
        key = (account, record.id)
        expected = self._backend._blob_sizes.get(key, record.size)
        url = jmap.download_url(self._view.session.download_url, account, record.blob_id)
        api = self._backend._api
        what = f"download of {record.id}"
        async with api.send("GET", url, self._view.creds, accept="*/*") as body:
            response = body.response
            if response.status_code == 404:
                raise MessageGone(f"{record.id}: the upstream has no blob {record.blob_id}")
            if response.status_code != 200:
                await api.fail(body, what, login=False)
            length = response.headers.get("content-length", "")
            encoded = response.headers.get("content-encoding", "identity").lower() not in ("", "identity")
            declared = int(length) if length.isdigit() and not encoded else None
            if declared is not None and declared != expected:
                self._backend._remember(self._backend._blob_sizes, key, declared)
                self._backend._remember(self._backend._pop3_sizes, key, declared)
                log.warning(
                    "size mismatch upstream: %s listed %d, the download has %d; later sessions list it",
                    record.id,
                    self._entries[index].size,
                    declared,
                )
                raise SizeChanged(f"{record.id}: listed {expected}, upstream sends {declared}", declared)
            try:
                while (chunk := await body.next()) is not None:
                    yield chunk
            except GeneratorExit:
                # The caller stopped early (a TOP cut): read a short rest so the connection is reused.
                await body.drain(DRAIN_LIMIT)
                raise
            got = body.received
        if declared is None and got < expected:
            # Without a Content-Length a cut connection looks like a clean end: never pretend it is one.
            raise TempFailure(f"{record.id}: {got} of {expected} bytes arrived and no length was declared")
        if top_lines is None and self._backend.settings.mark_seen:
            await self._mark_seen(record.id)

    async def _mark_seen(self, email_id: str) -> None:
        account = self._view.account.id
        try:
            await self._set([email_id], lambda req, ids: jmap.email_set_seen(req, account, ids))
        except (TempFailure, PermFailure) as exc:
            log.warning("could not mark %s $seen: %s", email_id, exc)

    async def apply_deletions(self, indexes: Sequence[int]) -> None:
        if not indexes:
            return
        ids = [self._records[i].id for i in indexes]
        account = self._view.account.id
        policy = self._backend.settings.delete_policy
        build: Callable[[jmap.Request, Sequence[str]], str]
        if policy.kind == "expunge":

            def build(req: jmap.Request, chunk: Sequence[str]) -> str:
                return jmap.email_destroy(req, account, chunk)

        elif policy.kind == "move":
            target = await self._target_mailbox(policy.target)

            def build(req: jmap.Request, chunk: Sequence[str]) -> str:
                return jmap.email_move(req, account, chunk, self._mailbox_id, target)

        else:
            keyword = policy.target

            def build(req: jmap.Request, chunk: Sequence[str]) -> str:
                return jmap.email_add_keyword(req, account, chunk, keyword)

        await self._set(ids, build)

    async def _set(self, ids: Sequence[str], build: Callable[[jmap.Request, Sequence[str]], str]) -> None:
        """Apply one Email/set per chunk of ``ids``; TempFailure names what was not applied."""
        session = self._view.session
        per_set = max(1, min(session.max_objects_in_set, 1000))
        per_request = max(1, min(session.max_calls_in_request, MAX_PAGES_PER_REQUEST))
        chunks = [ids[i : i + per_set] for i in range(0, len(ids), per_set)]
        failed: dict[str, str] = {}
        for start in range(0, len(chunks), per_request):
            request = jmap.Request()
            calls = [build(request, chunk) for chunk in chunks[start : start + per_request]]
            response = await self._backend._call(self._view, request, login=False)
            for call_id, chunk in zip(calls, chunks[start : start + per_request], strict=True):
                try:
                    outcome = jmap.set_outcome(response, call_id)
                except jmap.JmapError as exc:
                    raise _jmap_failure(exc, "Email/set") from None
                for email_id in chunk:
                    kind = outcome.failed.get(email_id)
                    if kind == "notFound":
                        continue  # gone already: nothing left to do for it
                    if kind is not None or email_id not in outcome.done:
                        failed[email_id] = kind or "not reported"
        if failed:
            sample = ", ".join(f"{i}: {k}" for i, k in list(failed.items())[:5])
            raise TempFailure(f"{len(failed)} of {len(ids)} message(s) not changed upstream ({sample})")

    async def _target_mailbox(self, name: str) -> str:
        request = jmap.Request()
        call = jmap.mailbox_get(request, self._view.account.id)
        response = await self._backend._call(self._view, request, login=False)
        try:
            found = jmap.find_mailbox(jmap.mailboxes(response, call), name)
        except jmap.JmapError as exc:
            raise _jmap_failure(exc, "Mailbox/get") from None
        if found is None:
            raise TempFailure(f"move: the upstream has no mailbox {name!r}; nothing was moved")
        return found.id


class JmapBackend:
    name = "jmap"

    async def apop_available(self) -> bool:
        return False  # the upstream needs the password itself

    def __init__(self, settings: JmapSettings, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        if settings.page_size < 1:
            raise ValueError("page_size must be >= 1")
        self.settings = settings
        self._api = _Api(settings, transport)
        # the true sizes learnt by downloads, by (account id, Email id); shared by all sessions
        self._blob_sizes: dict[tuple[str, str], int] = {}
        self._pop3_sizes: dict[tuple[str, str], int] = {}
        self._scrypt_limiter = trio.CapacityLimiter(2)

    def lock_key(self, identity: str) -> str:
        return f"jmap:{self.settings.origin}:{identity}:{self.settings.folder}"

    async def probe(self) -> None:
        """A TCP connect to the session resource's host and port (no request: that needs credentials)."""
        home = self.settings.scope.home
        await tcp_probe(home.host, home.port)

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await self._api.client.aclose()

    @staticmethod
    def _remember(table: dict[tuple[str, str], int], key: tuple[str, str], value: int) -> None:
        if key in table or len(table) < MAX_SIZE_FIXES:
            table[key] = value

    @contextlib.asynccontextmanager
    async def open_maildrop(self, login: Login) -> AsyncIterator[JmapMaildrop]:
        if isinstance(login, ApopLogin):
            raise ApopUnavailable("APOP cannot be passed through to JMAP")
        if isinstance(login, TokenLogin):
            # a per-login token (a mapped account's API or OAuth2 access token), not the configured one
            user = login.username
            if len(user.encode()) > MAX_USERNAME_OCTETS or len(login.token.encode()) > MAX_TOKEN_OCTETS:
                raise AuthFailed("credentials too long to pass through")
            if not _TOKEN.fullmatch(login.token):
                raise AuthFailed("the login's token is not a valid bearer token (RFC 6750 b64token)")
            view = await self._login(_Credentials.bearer(login.token, per_login=True), user)
            yield await self._snapshot(view)
            return
        user, password = login.username, login.password
        if len(user.encode()) > MAX_USERNAME_OCTETS or len(password.encode()) > MAX_PASSWORD_OCTETS:
            raise AuthFailed("credentials too long to pass through")
        if self.settings.token:
            if not _TOKEN.fullmatch(self.settings.token):
                raise PermFailure("the configured token is not a valid bearer token (RFC 6750 b64token)")
            await self._check_local_password(user, password)
            creds = _Credentials.bearer(self.settings.token)
        else:
            if ":" in user or not user:
                raise AuthFailed("a user name with ':' cannot be sent as HTTP Basic")
            creds = _Credentials.basic(user, password)
        view = await self._login(creds, user)
        yield await self._snapshot(view)

    async def _check_local_password(self, user: str, password: str) -> None:
        if not self.settings.users_file:
            raise PermFailure("a bearer token needs a users file for the POP3 passwords")
        path = Path(self.settings.users_file)
        try:
            users = await trio.to_thread.run_sync(accounts.load_users, path)
        except (OSError, ValueError) as exc:
            raise TempFailure(f"cannot read the users file: {exc}") from None
        record = users.get(user)
        stored = record.password_hash if record is not None else accounts.DUMMY_HASH
        ok = await trio.to_thread.run_sync(
            accounts.verify_password, password, stored, limiter=self._scrypt_limiter
        )
        if record is None or not ok:
            raise AuthFailed("bad POP3 credentials (users file)")

    async def _login(self, creds: _Credentials, user: str) -> _Account:
        """Fetch the session resource, following redirects; pick the mail account."""
        url = httpx.URL(self.settings.session_url)
        for _ in range(MAX_REDIRECTS + 1):
            async with self._api.send("GET", str(url), creds, accept=JSON_TYPE) as reply:
                response = reply.response
                if response.status_code in (301, 302, 303, 307, 308):
                    location = response.headers.get("location", "")
                    if not location:
                        raise TempFailure("session discovery: a redirect without a Location")
                    target = url.join(location)
                    if target.scheme not in ("http", "https"):
                        raise PermFailure("session discovery: a redirect to a non-http URL")
                    if url.scheme == "https" and target.scheme != "https":
                        raise PermFailure("session discovery: refusing a redirect from https to http")
                    self._api.check_scope(str(target), "session discovery: a redirect")
                    url = target
                    continue
                if response.status_code != 200:
                    await self._api.fail(reply, "session discovery", login=True, token_login=creds.per_login)
                body = await self._api.json(reply, "session")
                break
        else:
            raise PermFailure(f"session discovery: more than {MAX_REDIRECTS} redirects")
        try:
            session = jmap.parse_session(body, str(url))
        except jmap.JmapError as exc:
            raise _jmap_failure(exc, "session") from None
        if self.settings.token or creds.per_login:
            try:
                account = jmap.choose_account(session, user, self.settings.account_map)
            except jmap.NoAccount as exc:
                if exc.misconfigured:
                    log.warning("JMAP token mode: %s", exc)
                    raise PermFailure(f"token mode: {exc}") from None
                raise AuthFailed(f"token mode: {exc}") from None
        else:
            found = session.account(None)
            if found is None:
                raise PermFailure("the upstream session has no primary mail account")
            account = found
        # the URLs the session hands out get the credentials too: refuse them now, not at the first RETR
        self._api.check_scope(session.api_url, "session apiUrl")
        self._api.check_scope(jmap.download_url(session.download_url, account.id, "B"), "session downloadUrl")
        return _Account(creds, session, account)

    async def _call(self, view: _Account, request: jmap.Request, *, login: bool) -> jmap.Response:
        body = request.encode()
        if len(body) > view.session.max_size_request:
            raise PermFailure(f"a request of {len(body)} bytes is over the server's maxSizeRequest")
        what = "JMAP API request"
        api_url = view.session.api_url
        async with self._api.send("POST", api_url, view.creds, content=body, accept=JSON_TYPE) as reply:
            if reply.response.status_code != 200:
                await self._api.fail(reply, what, login=login, token_login=view.creds.per_login)
            data = await self._api.json(reply, what)
        try:
            return jmap.parse_response(data, request)
        except jmap.JmapError as exc:
            raise _jmap_failure(exc, what) from None

    async def _snapshot(self, view: _Account) -> JmapMaildrop:
        account = view.account.id
        request = jmap.Request()
        call = jmap.mailbox_get(request, account)
        response = await self._call(view, request, login=True)
        try:
            mailbox = jmap.find_mailbox(jmap.mailboxes(response, call), self.settings.folder)
        except jmap.JmapError as exc:
            raise _jmap_failure(exc, "Mailbox/get") from None
        if mailbox is None:
            raise PermFailure(f"the upstream has no mailbox {self.settings.folder!r}")
        newest = self.settings.newest
        for _attempt in range(SNAPSHOT_ATTEMPTS):
            records = await self._list(view, mailbox.id)
            if records is not None:
                if newest is not None:  # listed newest first, and at most a page more than needed
                    records = records[:newest][::-1]
                return JmapMaildrop(self, view, mailbox.id, records)
        raise TempFailure("the mailbox kept changing while its listing was read")

    async def _list(self, view: _Account, mailbox_id: str) -> list[jmap.EmailRecord] | None:
        """Every Email of the mailbox in the window, oldest first (with ``newest``: newest first, stopping
        once it has N); None if it changed between two requests."""
        session, account = view.session, view.account
        limit = max(1, min(self.settings.page_size, session.max_objects_in_get))
        cap = self.settings.newest
        if cap is not None:
            limit = min(limit, cap)
        after = jmap_after(self.settings.since) if self.settings.since is not None else None
        per_request = max(1, min(session.max_calls_in_request // 2, MAX_PAGES_PER_REQUEST))
        sort_by_id = "id" in account.sort_options
        records: list[jmap.EmailRecord] = []
        seen: set[str] = set()
        total: int | None = None
        state: str | None = None
        while True:
            start = len(seen)
            pages = 1 if total is None else max(1, min(per_request, -(-(total - start) // limit)))
            if cap is not None:  # no page past the newest N
                pages = max(1, min(pages, -(-(cap - len(records)) // limit)))
            request = jmap.Request()
            calls = []
            for n in range(pages):
                query = jmap.email_query(
                    request,
                    account.id,
                    mailbox_id,
                    position=start + n * limit,
                    limit=limit,
                    hide_keyword=self.settings.hide_keyword,
                    sort_by_id=sort_by_id,
                    after=after,
                    newest_first=cap is not None,
                )
                calls.append((query, jmap.email_get(request, account.id, query)))
            response = await self._call(view, request, login=True)
            try:
                for query, get in calls:
                    page = jmap.query_page(response, query)
                    if state is not None and page.query_state != state:
                        return None
                    state = page.query_state
                    if page.position != len(seen):
                        break  # an earlier page of this request was short: go on from where we are
                    if page.total is not None:
                        if total is not None and page.total != total:
                            return None  # the same query state cannot count differently: it changed
                        total = page.total
                    found = {r.id: r for r in jmap.email_records(response, get)}
                    for email_id in page.ids:
                        if email_id in seen:
                            return None  # one id on two pages: the order moved under us
                        seen.add(email_id)
                        if email_id in found:  # else destroyed between the query and the get
                            records.append(found[email_id])
                    if cap is not None and len(records) >= cap:
                        return records
                    if len(page.ids) < limit:
                        if total is None or len(seen) == total:
                            return records
                        if not page.ids:
                            return None  # fewer than the total said: it shrank meanwhile
                        limit = len(page.ids)  # the server caps pages lower than maxObjectsInGet
                        break
            except jmap.JmapError as exc:
                raise _jmap_failure(exc, "Email/query") from None
            if total is not None and len(seen) >= total:
                return records if len(seen) == total else None
            if len(seen) == start:
                return None
