"""The IMAP upstream: every POP3 session becomes one IMAP session on the user's folder.

- Connect: ``imap://`` (plain), ``imap+starttls://`` (STARTTLS, required) or ``imaps://`` (TLS from the
  first byte). Certificates are verified unless ``insecure`` is set; ``ca_file`` adds a trust anchor.
- Login: the POP3 credentials are passed through, with LOGIN, or AUTHENTICATE PLAIN when the server
  disabled LOGIN. The sans-IO encoder turns them into quoted strings or literals, so no byte of them can
  become a command. ID is sent when offered.
- Identity: IMAP names no canonical user (Dovecot 2.3 and Cyrus 3.6 answer LOGIN, ID and NAMESPACE
  without it), so the maildrop's ``identity`` is the typed name normalised by ``settings.identity``.
- Snapshot: SELECT, then ONE ``UID FETCH 1:* (UID RFC822.SIZE)``: the round trips do not grow with the
  mailbox. Ordered by UID. UIDLs are Dovecot's default: ``%08x`` UID + ``%08x`` UIDVALIDITY.
- RETR streams ``UID FETCH uid (BODY.PEEK[])`` from the literal to the client; TOP fetches bounded ranges
  (``BODY.PEEK[]<start.len>``) until the caller has the lines it needs. A message that vanished
  upstream is MessageGone; a connection that dies mid-message is TempFailure (never a clean end).
- Deletions at QUIT, by policy:
  ``expunge``: ``UID STORE +FLAGS.SILENT (\\Deleted)`` then ``UID EXPUNGE`` (UIDPLUS). Without UIDPLUS a
  plain EXPUNGE is used only when no other message in the folder carries ``\\Deleted``; otherwise our
  flags are taken back and the client gets -ERR [SYS/TEMP]: another client's pending deletions are never
  expunged by us. ``move:<folder>``: UID MOVE, or UID COPY + the expunge above. ``flag:<keyword>``:
  the keyword is set, and later snapshots leave such messages out.
- Any exception inside one IMAP exchange marks the connection broken; later calls fail fast.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import ssl
import urllib.parse
from collections.abc import AsyncGenerator, AsyncIterator, Sequence

import trio

from gateway import __version__, tls
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
    tcp_probe,
)
from gateway.backends.readahead import ReadAhead, chunks
from gateway.identity import DEFAULT_POLICY, IdentityPolicy, normalize
from gateway.proto import imap
from gateway.proto import uidl as rules

log = logging.getLogger("gateway.imap")

READ_SIZE = 256 * 1024
PREFETCH_MAX_MESSAGE = 256 * 1024
PREFETCH_BUDGET = 2 * 1024 * 1024
PREFETCH_FIRST_WINDOW = 8
PREFETCH_MAX_COUNT = 128
TOP_FIRST_RANGE = 64 * 1024
TOP_MAX_RANGE = 4 * 1024 * 1024
LOGOUT_SECONDS = 2.0
MAX_USERNAME_OCTETS = 256
MAX_PASSWORD_OCTETS = 1024
MAX_SIZE_FIXES = 100_000
ENTRIES_CACHE_MESSAGES = 500_000  # snapshot entries kept for the next login (~100 B each)


@dataclasses.dataclass(frozen=True, slots=True)
class ImapSettings:
    host: str
    port: int
    tls: str  # "none", "starttls", "implicit"
    folder: str = "INBOX"
    ca_file: str = ""
    insecure: bool = False
    delete_policy: str = "expunge"
    mark_seen: bool = False
    connect_timeout: float = 15.0
    identity: IdentityPolicy = DEFAULT_POLICY  # IMAP reports no canonical user name: normalise ours

    @classmethod
    def from_url(cls, url: str, **kwargs: object) -> ImapSettings:
        parts = urllib.parse.urlsplit(url)
        scheme = parts.scheme.lower()
        tls = {"imap": "none", "imap+starttls": "starttls", "imaps": "implicit"}.get(scheme)
        if tls is None:
            raise ValueError(f"not an IMAP URL: {url!r}")
        if not parts.hostname:
            raise ValueError(f"the IMAP URL needs a host: {url!r}")
        if parts.username or parts.password:
            raise ValueError("put no credentials in the upstream URL: POP3 logins are passed through")
        port = parts.port or (993 if tls == "implicit" else 143)
        return cls(host=parts.hostname, port=port, tls=tls, **kwargs)  # type: ignore[arg-type]


def client_tls_context(settings: ImapSettings) -> ssl.SSLContext:
    return tls.client_context(settings.ca_file, settings.insecure)


class _Broken(Exception):
    pass


class ImapConnection:
    """One upstream connection: a trio stream driving the sans-IO client, one exchange at a time."""

    def __init__(self, stream: trio.abc.Stream, client: imap.Client) -> None:
        self.stream = stream
        self.client = client
        self.broken = False
        self._unfinished: str | None = None  # a tag whose response was abandoned (TOP cut)
        self.uidvalidity = 0
        self.exists = 0

    @classmethod
    async def connect(cls, settings: ImapSettings, tls_context: ssl.SSLContext | None) -> ImapConnection:
        conn: ImapConnection | None = None
        try:
            with trio.fail_after(settings.connect_timeout):
                conn = cls(await trio.open_tcp_stream(settings.host, settings.port), imap.Client())
                if settings.tls == "implicit":
                    assert tls_context is not None
                    conn.stream = trio.SSLStream(conn.stream, tls_context, server_hostname=settings.host)
                    await conn.stream.do_handshake()
                greeting = await conn._event()
                if (
                    not isinstance(greeting, imap.UntaggedStatus)
                    or greeting.condition is not imap.Condition.OK
                ):
                    raise _Broken(f"upstream greeting refused: {greeting!r}")
                if settings.tls == "starttls":
                    await conn._starttls(settings, tls_context)
                if not conn.client.capabilities:
                    await conn.command("CAPABILITY")
        except (OSError, trio.BrokenResourceError, ssl.SSLError, imap.ImapProtocolError, _Broken) as exc:
            if conn is not None:
                await conn.aclose()
            raise TempFailure(f"cannot connect to {settings.host}:{settings.port}: {exc!r}") from None
        except trio.TooSlowError:
            if conn is not None:
                await conn.aclose()
            raise TempFailure(f"connecting to {settings.host}:{settings.port} timed out") from None
        except BaseException:
            if conn is not None:
                await conn.aclose()
            raise
        return conn

    async def _starttls(self, settings: ImapSettings, tls_context: ssl.SSLContext | None) -> None:
        if not self.client.capabilities:
            await self.command("CAPABILITY")
        if "STARTTLS" not in self.client.capabilities:
            raise TempFailure("the upstream does not offer STARTTLS")
        tagged, _ = await self.command("STARTTLS")
        if tagged.condition is not imap.Condition.OK:
            raise TempFailure("the upstream refused STARTTLS")
        assert tls_context is not None
        tls = trio.SSLStream(self.stream, tls_context, server_hostname=settings.host)
        await tls.do_handshake()
        self.stream = tls
        await self.command("CAPABILITY")

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(self.stream)

    async def logout(self) -> None:
        try:
            if not self.broken:
                with trio.move_on_after(LOGOUT_SECONDS), contextlib.suppress(Exception):
                    await self.command("LOGOUT")
        finally:
            await self.aclose()

    # -- reading

    async def _event(self) -> imap.Event:
        while True:
            event = self.client.next_event()
            if not isinstance(event, imap.NeedData):
                if isinstance(event, imap.ConnectionClosed):
                    raise _Broken("upstream closed the connection")
                return event
            data = await self.stream.receive_some(READ_SIZE)
            self.client.receive_data(bytes(data))

    async def _finish(self, tag: str) -> tuple[imap.Tagged, list[imap.Event]]:
        untagged: list[imap.Event] = []
        while True:
            event = await self._event()
            if isinstance(event, imap.Tagged) and event.tag == tag:
                return event, untagged
            if isinstance(event, imap.UntaggedStatus) and event.condition is imap.Condition.BYE:
                raise _Broken(f"upstream said BYE: {event.text}")
            if isinstance(event, imap.FetchBodyChunk):
                continue  # never keep body bytes we did not ask to stream
            untagged.append(event)

    async def _drain_unfinished(self) -> None:
        if self._unfinished is not None:
            tag, self._unfinished = self._unfinished, None
            await self._finish(tag)

    # -- commands

    @contextlib.asynccontextmanager
    async def _exchange(self) -> AsyncIterator[None]:
        if self.broken:
            raise TempFailure("the upstream connection is broken")
        try:
            yield
        except (
            _Broken,
            imap.ImapProtocolError,
            trio.BrokenResourceError,
            trio.ClosedResourceError,
            OSError,
            ssl.SSLError,
        ) as exc:
            self.broken = True
            raise TempFailure(f"upstream failure: {exc!r}") from None
        except BackendError:
            raise  # a complete exchange with a clear answer (MessageGone): the connection is fine
        except GeneratorExit:
            raise  # the consumer stopped reading a body early: the rest is drained before the next command
        except BaseException:
            self.broken = True  # cancelled or timed out in the middle of a response
            raise

    async def command(self, name: str, *args: imap.Arg) -> tuple[imap.Tagged, list[imap.Event]]:
        async with self._exchange():
            await self._drain_unfinished()
            tag, data = self.client.send_command(name, *args)
            await self.stream.send_all(data)
            while self.client.awaiting_continuation:
                event = await self._event()
                if isinstance(event, imap.Continuation):
                    await self.stream.send_all(self.client.continue_command())
                elif isinstance(event, imap.Tagged) and event.tag == tag:
                    return event, []
            return await self._finish(tag)

    async def authenticate_plain(self, user: str, password: str) -> imap.Tagged:
        payload = imap.encode_authenticate_plain("", user, password)
        async with self._exchange():
            await self._drain_unfinished()
            if "SASL-IR" in self.client.capabilities:
                tag, data = self.client.send_command("AUTHENTICATE PLAIN", imap.Atom(payload.decode("ascii")))
                await self.stream.send_all(data)
            else:
                tag, data = self.client.send_command("AUTHENTICATE PLAIN")
                await self.stream.send_all(data)
                event = await self._event()
                if isinstance(event, imap.Tagged) and event.tag == tag:
                    return event
                await self.stream.send_all(self.client.authenticate_response(payload))
            tagged, _ = await self._finish(tag)
            return tagged

    async def fetch_body(
        self, uid: int, section: str, expect_size: int | None = None
    ) -> AsyncGenerator[bytes, None]:
        """Yield the literal of ``UID FETCH uid (section)``; MessageGone if the server sends none;
        SizeChanged (before the first byte) if the literal is not ``expect_size`` octets."""
        async with self._exchange():
            await self._drain_unfinished()
            tag, data = self.client.send_command("UID FETCH", uid, imap.Raw(f"({section})"))
            await self.stream.send_all(data)
            seen_body = False
            while True:
                event = await self._event()
                match event:
                    case imap.FetchBodyStart(size=size):
                        seen_body = True
                        self._unfinished = tag  # if the consumer stops early, drain before the next command
                        if expect_size is not None and size != expect_size:
                            raise SizeChanged(f"UID {uid}: listed {expect_size}, upstream sends {size}", size)
                    case imap.FetchBodyChunk(chunk):
                        yield chunk
                    case imap.Tagged() if event.tag == tag:
                        self._unfinished = None
                        if event.condition is not imap.Condition.OK:
                            raise MessageGone(f"UID {uid}: {event.text}")
                        if not seen_body:
                            raise MessageGone(f"UID {uid} is gone")
                        return
                    case imap.UntaggedStatus() if event.condition is imap.Condition.BYE:
                        raise _Broken(f"upstream said BYE: {event.text}")
                    case _:
                        pass

    async def fetch_snapshot(self, items: str) -> tuple[imap.Tagged, list[tuple[int, int]], list[imap.Event]]:
        """``UID FETCH 1:* items``: plain (UID, RFC822.SIZE) lines through the parser's fast path, anything
        else as events. One round trip whatever the mailbox size."""
        rows: list[tuple[int, int]] = []
        other: list[imap.Event] = []
        async with self._exchange():
            await self._drain_unfinished()
            tag, data = self.client.send_command("UID FETCH", imap.Atom("1:*"), imap.Raw(items))
            await self.stream.send_all(data)
            while True:
                rows.extend(self.client.next_size_fetches())
                event = self.client.next_event()
                if isinstance(event, imap.NeedData):
                    self.client.receive_data(bytes(await self.stream.receive_some(READ_SIZE)))
                    continue
                match event:
                    case imap.ConnectionClosed():
                        raise _Broken("upstream closed the connection")
                    case imap.Tagged() if event.tag == tag:
                        return event, rows, other
                    case imap.UntaggedStatus() if event.condition is imap.Condition.BYE:
                        raise _Broken(f"upstream said BYE: {event.text}")
                    case imap.FetchBodyChunk():
                        pass
                    case _:
                        other.append(event)

    async def fetch_small_bodies(self, uids: Sequence[int], max_each: int) -> dict[int, bytes]:
        """One ``UID FETCH set (UID BODY.PEEK[])`` for small messages, kept whole (each at most
        ``max_each`` octets: a bigger literal is dropped and fetched again the streaming way)."""
        bodies: dict[int, bytes] = {}
        async with self._exchange():
            await self._drain_unfinished()
            tag, data = self.client.send_command(
                "UID FETCH", imap.sequence_set(uids), imap.Raw("(UID BODY.PEEK[])")
            )
            await self.stream.send_all(data)
            block = bytearray()
            pending: bytes | None = None
            while True:
                event = await self._event()
                match event:
                    case imap.FetchBodyStart():
                        block.clear()
                        pending = None
                    case imap.FetchBodyChunk(chunk):
                        if len(block) <= max_each:
                            block += chunk
                    case imap.FetchBodyEnd():
                        pending = bytes(block) if len(block) <= max_each else None
                        block.clear()
                    case imap.Fetch():
                        if event.uid is not None and pending is not None:
                            bodies[event.uid] = pending
                        pending = None
                    case imap.Tagged() if event.tag == tag:
                        return bodies  # a NO just means fewer bodies: the caller fetches the rest itself
                    case imap.UntaggedStatus() if event.condition is imap.Condition.BYE:
                        raise _Broken(f"upstream said BYE: {event.text}")
                    case _:
                        pass

    async def fetch_header_hashes(self, uids: Sequence[int]) -> dict[int, str]:
        """One ``UID FETCH set (BODY.PEEK[HEADER])``: each header block hashed as it completes (only the
        hashes are kept, so memory stays small for any number of messages)."""
        hashes: dict[int, str] = {}
        if not uids:
            return hashes
        async with self._exchange():
            await self._drain_unfinished()
            tag, data = self.client.send_command(
                "UID FETCH", imap.sequence_set(uids), imap.Raw("(UID BODY.PEEK[HEADER])")
            )
            await self.stream.send_all(data)
            block = bytearray()
            pending: str | None = None
            while True:
                event = await self._event()
                match event:
                    case imap.FetchBodyStart():
                        block.clear()
                    case imap.FetchBodyChunk(chunk):
                        if len(block) <= rules.MAX_HEADER_BLOCK:
                            block += chunk
                    case imap.FetchBodyEnd():
                        pending = (
                            rules.header_hash(bytes(block)) if len(block) <= rules.MAX_HEADER_BLOCK else None
                        )
                    case imap.Fetch():
                        if event.uid is not None and pending is not None:
                            hashes[event.uid] = pending
                        pending = None
                    case imap.Tagged() if event.tag == tag:
                        if event.condition is not imap.Condition.OK:
                            raise TempFailure(f"header fetch failed: {event.text}")
                        return hashes
                    case imap.UntaggedStatus() if event.condition is imap.Condition.BYE:
                        raise _Broken(f"upstream said BYE: {event.text}")
                    case _:
                        pass


class ImapMaildrop:
    def __init__(
        self,
        conn: ImapConnection,
        settings: ImapSettings,
        entries: list[Entry],
        uids: list[int],
        fixes: dict[tuple[str, int, int], int],
        fix_key: str,
        identity: str,
    ) -> None:
        self.conn = conn
        self.identity = identity
        self.settings = settings
        self._entries = entries
        self._uids = uids
        self._fixes = fixes  # the backend's size corrections, shared by all sessions
        self._fix_key = fix_key
        # Read-ahead of small messages: one UID FETCH for many saves a round trip each. Never with
        # mark_seen (BODY[] would flag messages the client has not retrieved).
        self._ahead = ReadAhead(
            [e.size for e in entries],
            max_message=PREFETCH_MAX_MESSAGE,
            budget=PREFETCH_BUDGET,
            first_window=PREFETCH_FIRST_WINDOW,
            max_count=PREFETCH_MAX_COUNT,
        )

    async def _small_body(self, index: int) -> bytes | None:
        if self.settings.mark_seen or not self._ahead.eligible(index):
            return None
        body = self._ahead.take(index)
        if body is not None:
            return body
        by_uid = {self._uids[i]: i for i in self._ahead.batch(index)}
        bodies = await self.conn.fetch_small_bodies(list(by_uid), PREFETCH_MAX_MESSAGE)
        for uid, raw in bodies.items():
            if uid in by_uid:
                self._ahead.put(by_uid[uid], raw)
        return self._ahead.take(index)

    def note_size(self, index: int, octets: int) -> None:
        """Remember the size RETR really sent, so later snapshots list it (RFC822.SIZE was wrong)."""
        if len(self._fixes) < MAX_SIZE_FIXES:
            self._fixes[(self._fix_key, self.conn.uidvalidity, self._uids[index])] = octets

    @property
    def entries(self) -> Sequence[Entry]:
        return self._entries

    async def stream(self, index: int, *, top_lines: int | None = None) -> AsyncGenerator[bytes, None]:
        uid = self._uids[index]
        small = await self._small_body(index)
        if small is not None:
            if top_lines is None and len(small) != self._entries[index].size:
                exc = SizeChanged(
                    f"UID {uid}: listed {self._entries[index].size}, upstream sends {len(small)}", len(small)
                )
                log.warning("size mismatch upstream: %s; later sessions list the true size", exc)
                self.note_size(index, exc.actual)
                raise exc
            for piece in chunks(small):
                yield piece
            return
        if top_lines is None:
            section = "BODY[]" if self.settings.mark_seen else "BODY.PEEK[]"
            expected = self._entries[index].size
            try:
                async with contextlib.aclosing(self.conn.fetch_body(uid, section, expected)) as body:
                    async for chunk in body:
                        yield chunk
            except SizeChanged as exc:
                log.warning("size mismatch upstream: %s; later sessions list the true size", exc)
                self.note_size(index, exc.actual)
                raise
            return
        # TOP: bounded ranges, growing, so a TOP n 0 of a 50 MB message reads only its start.
        start, length = 0, TOP_FIRST_RANGE
        while True:
            got = 0
            async with contextlib.aclosing(
                self.conn.fetch_body(uid, f"BODY.PEEK[]<{start}.{length}>")
            ) as body:
                async for chunk in body:
                    got += len(chunk)
                    yield chunk
            if got < length:
                return
            start += got
            length = min(length * 4, TOP_MAX_RANGE)

    async def header_hashes(self, indexes: Sequence[int]) -> dict[int, str]:
        """Header SHA-1 of many messages in one round trip (for matching a renumbered mailbox)."""
        by_uid = {self._uids[i]: i for i in indexes}
        hashes = await self.conn.fetch_header_hashes(list(by_uid))
        return {by_uid[uid]: h for uid, h in hashes.items() if uid in by_uid}

    async def apply_deletions(self, indexes: Sequence[int]) -> None:
        if not indexes:
            return
        uids = imap.sequence_set(self._uids[i] for i in indexes)
        policy = self.settings.delete_policy
        if policy.startswith("flag:"):
            keyword = imap.Atom(policy[5:])
            await self._ok("UID STORE", uids, imap.Atom("+FLAGS.SILENT"), [keyword])
            return
        if policy.startswith("move:"):
            target = policy[5:]
            if "MOVE" in self.conn.client.capabilities:
                await self._ok("UID MOVE", uids, target)
                return
            await self._ok("UID COPY", uids, target)
        await self._ok("UID STORE", uids, imap.Atom("+FLAGS.SILENT"), [imap.Atom("\\Deleted")])
        await self._expunge(uids, len(indexes))

    async def _expunge(self, uids: imap.Atom, count: int) -> None:
        caps = self.conn.client.capabilities
        if "UIDPLUS" in caps or "IMAP4REV2" in caps:
            await self._ok("UID EXPUNGE", uids)
            return
        # No UIDPLUS: a plain EXPUNGE would also remove what other clients flagged \Deleted.
        _, untagged = await self._ok("UID SEARCH", imap.Atom("DELETED"))
        flagged: set[int] = set()
        for event in untagged:
            if isinstance(event, imap.Search):
                flagged.update(event.numbers)
        ours = {u for lo, hi in imap.parse_sequence_set(uids.value) for u in range(lo, hi + 1)}
        if flagged <= ours:
            await self._ok("EXPUNGE")
            return
        await self._ok("UID STORE", uids, imap.Atom("-FLAGS.SILENT"), [imap.Atom("\\Deleted")])
        raise TempFailure(
            f"not expunged: the upstream lacks UIDPLUS and {len(flagged - ours)} other message(s) are "
            f"flagged \\Deleted; {count} message(s) left in place"
        )

    async def _ok(self, name: str, *args: imap.Arg) -> tuple[imap.Tagged, list[imap.Event]]:
        tagged, untagged = await self.conn.command(name, *args)
        if tagged.condition is not imap.Condition.OK:
            raise TempFailure(f"{name} failed upstream: {tagged.condition.value} {tagged.text}")
        return tagged, untagged


def _emailid(value: imap.Value) -> str | None:
    """RFC 8474 EMAILID is a parenthesised objectid: ``EMAILID (M6d99ac3275bb4e)``."""
    if isinstance(value, tuple) and len(value) == 1:
        value = value[0]
    if isinstance(value, imap.Atom):
        return value.value
    if isinstance(value, bytes):
        return value.decode("ascii", "replace")
    return None


def dovecot_uidl(uid: int, uidvalidity: int) -> str:
    """Dovecot's default POP3 UIDL (pop3_uidl_format = %08Xu%08Xv, which Dovecot prints in lowercase)."""
    return f"{uid:08x}{uidvalidity:08x}"


class ImapBackend:
    name = "imap"

    async def apop_available(self) -> bool:
        return False  # the upstream needs the password itself

    def __init__(self, settings: ImapSettings) -> None:
        self.settings = settings
        self._tls = client_tls_context(settings) if settings.tls != "none" else None
        self._size_fixes: dict[tuple[str, int, int], int] = {}
        # per mailbox: (uidvalidity etc., the snapshot's (uid, size) rows, its entries); LRU, bounded
        self._entries_cache: collections.OrderedDict[
            str, tuple[tuple[int, int, tuple[tuple[int, str], ...]], list[tuple[int, int]], list[Entry]]
        ] = collections.OrderedDict()

    def lock_key(self, identity: str) -> str:
        s = self.settings
        return f"imap:{s.host}:{s.port}:{identity}:{s.folder}"

    async def probe(self) -> None:
        await tcp_probe(self.settings.host, self.settings.port)

    @contextlib.asynccontextmanager
    async def open_maildrop(self, login: Login) -> AsyncIterator[ImapMaildrop]:
        if isinstance(login, ApopLogin):
            raise ApopUnavailable("APOP cannot be passed through to IMAP")
        if (
            len(login.username.encode()) > MAX_USERNAME_OCTETS
            or len(login.password.encode()) > MAX_PASSWORD_OCTETS
        ):
            # IMAP servers cap pre-login input (Dovecot answers BYE): refuse here, as bad credentials.
            raise AuthFailed("credentials too long to pass through")
        conn = await ImapConnection.connect(self.settings, self._tls)
        try:
            await self._login(conn, login.username, login.password)
            drop = await self._snapshot(conn, normalize(login.username, self.settings.identity))
            yield drop
        finally:
            await conn.logout()

    async def _login(self, conn: ImapConnection, user: str, password: str) -> None:
        caps = conn.client.capabilities
        try:
            if "LOGINDISABLED" in caps:
                if "AUTH=PLAIN" not in caps:
                    raise TempFailure("the upstream allows no plaintext login on this connection")
                tagged = await conn.authenticate_plain(user, password)
            else:
                tagged, _ = await conn.command("LOGIN", user, password)
        except imap.LocalProtocolError:
            raise AuthFailed("credentials that cannot be sent to IMAP (NUL)") from None
        if tagged.condition is not imap.Condition.OK:
            code = tagged.code.name if tagged.code else ""
            if code in ("UNAVAILABLE", "SERVERBUG", "INUSE", "LIMIT"):
                raise TempFailure(f"upstream login unavailable: [{code}] {tagged.text}")
            raise AuthFailed(f"upstream refused the login: [{code}] {tagged.text}")
        if not tagged.code or tagged.code.name != "CAPABILITY":
            await conn.command("CAPABILITY")
        if "ID" in conn.client.capabilities:
            await conn.command("ID", ["name", "pop3-gateway", "version", __version__])

    async def _snapshot(self, conn: ImapConnection, identity: str) -> ImapMaildrop:
        tagged, untagged = await conn.command("SELECT", self.settings.folder)
        if tagged.condition is not imap.Condition.OK:
            raise PermFailure(f"cannot select {self.settings.folder!r}: {tagged.text}")
        uidvalidity = 0
        exists = 0
        for event in untagged:
            if isinstance(event, imap.UntaggedStatus) and event.code and event.code.name == "UIDVALIDITY":
                uidvalidity = event.code.int_value()
            elif isinstance(event, imap.Exists):
                exists = event.count
        conn.uidvalidity, conn.exists = uidvalidity, exists
        hide = (
            self.settings.delete_policy[5:].lower()
            if self.settings.delete_policy.startswith("flag:")
            else None
        )
        rows: list[tuple[int, int]] = []
        emailids: dict[int, str] = {}
        objectid = "OBJECTID" in conn.client.capabilities
        if exists:
            items = "(UID RFC822.SIZE" + (" FLAGS" if hide else "") + (" EMAILID" if objectid else "") + ")"
            tagged, plain, untagged = await conn.fetch_snapshot(items)
            if tagged.condition is not imap.Condition.OK:
                raise TempFailure(f"snapshot fetch failed: {tagged.text}")
            rows.extend(plain)  # only ever lines with exactly UID and RFC822.SIZE: no flags, no EMAILID
            for event in untagged:
                if not isinstance(event, imap.Fetch):
                    continue
                uid, size = event.uid, event.rfc822_size
                if uid is None or size is None:
                    continue
                if hide and any(f.lower() == hide for f in event.flags or ()):
                    continue
                rows.append((uid, size))
                emailid = _emailid(event.items.get("EMAILID"))
                if emailid:
                    emailids[uid] = emailid
        rows = sorted(dict(rows).items())
        fix_key = self.lock_key(identity)
        fixes = self._size_fixes
        uids = [uid for uid, _ in rows]
        # The same mailbox as last time (same UIDs and sizes, UIDVALIDITY, no new size correction): the
        # entries are the same tuples, and 100,000 of them need not be built again.
        fingerprint = (uidvalidity, len(fixes), tuple(sorted(emailids.items())))
        cached = self._entries_cache.get(fix_key)
        if cached is not None and cached[0] == fingerprint and cached[1] == rows:
            self._entries_cache.move_to_end(fix_key)
            return ImapMaildrop(conn, self.settings, cached[2], uids, fixes, fix_key, identity)
        # This runs for every message at every login: the constant parts are formatted once.
        suffix = f"{uidvalidity:08x}"
        key_prefix = f"u:{uidvalidity}:"
        entries = [
            Entry(
                str(uid),
                fixes.get((fix_key, uidvalidity, uid), size) if fixes else size,
                f"{uid:08x}{suffix}",  # dovecot_uidl(uid, uidvalidity)
                f"e:{emailids[uid]}" if uid in emailids else key_prefix + str(uid),
                uid,
                uidvalidity,
            )
            for uid, size in rows
        ]
        self._entries_cache[fix_key] = (fingerprint, rows, entries)
        cached_messages = sum(len(c[2]) for c in self._entries_cache.values())
        while cached_messages > ENTRIES_CACHE_MESSAGES and len(self._entries_cache) > 1:
            _, (_, _, dropped) = self._entries_cache.popitem(last=False)
            cached_messages -= len(dropped)
        return ImapMaildrop(conn, self.settings, entries, uids, fixes, fix_key, identity)

    async def aclose(self) -> None:
        pass
