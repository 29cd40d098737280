"""The IMAP upstream: every POP3 session becomes one IMAP session on the user's folder.

- Connect: ``imap://`` (plain), ``imap+starttls://`` (STARTTLS, required) or ``imaps://`` (TLS from the
  first byte). Certificates are verified unless ``insecure`` is set; ``ca_file`` adds a trust anchor.
- Login: the POP3 credentials are passed through, with LOGIN, or AUTHENTICATE PLAIN when the server
  disabled LOGIN. The sans-IO encoder turns them into quoted strings or literals, so no byte of them can
  become a command. ID is sent when offered. A ``TokenLogin`` (a mapped account's OAuth2 token) is
  ``AUTHENTICATE OAUTHBEARER`` or ``XOAUTH2`` (``ImapConnection.authenticate_token``): SASL-IR when
  offered, the error challenge answered with the dummy response, the NO raised as TokenRejected.
- Identity: IMAP names no canonical user (Dovecot 2.3 and Cyrus 3.6 answer LOGIN, ID and NAMESPACE
  without it), so the maildrop's ``identity`` is the typed name normalised by ``settings.identity``.
- Snapshot: SELECT, then ONE ``UID FETCH 1:* (UID RFC822.SIZE)``: the round trips do not grow with the
  mailbox. Ordered by UID. A visibility window (``since``/``newest``) first narrows the UIDs with
  ``UID SEARCH`` over bounded ranges (``_search_window``), or takes the last N by number. UIDLs are
  Dovecot's default: ``%08x`` UID + ``%08x`` UIDVALIDITY. A UID or UIDVALIDITY outside 1..2**32-1 is a
  malformed upstream (TempFailure at login). The store key is the EMAILID (OBJECTID) when there is one,
  unique per snapshot (``_emailid_keys``), else UIDVALIDITY+UID.
- Bounds against a hostile upstream (all TempFailure for that session only): more messages than
  ``max_snapshot_rows``; more untagged responses or octets in one command than its budget
  (``ImapConnection._budget``: grows with the mailbox SELECT reported; requested bodies do not count).
  Untagged responses are never collected: each command hands them to a callback that keeps what it
  needs. A body nobody asked for (another section, another UID, a second one) is dropped chunk by chunk
  as the parser frames it.
- RETR streams ``UID FETCH uid (BODY.PEEK[])`` from the literal to the client; TOP fetches bounded ranges
  (``BODY.PEEK[]<start.len>``) until the caller has the lines it needs. A message that vanished
  upstream is MessageGone; a connection that dies mid-message is TempFailure (never a clean end).
- Deletions at QUIT, by policy:
  ``expunge``: ``UID STORE +FLAGS.SILENT (\\Deleted)`` then ``UID EXPUNGE`` (UIDPLUS). Without UIDPLUS
  the deletions are refused (TempFailure before anything changes): between any check and a plain
  EXPUNGE another client may flag a message, and EXPUNGE would remove it. ``expunge_without_uidplus``
  opts in to the checked plain EXPUNGE (``UID SEARCH DELETED`` before and after our STORE; another
  client's pending ``\\Deleted`` refuses it and only the flags we set are taken back).
  ``move:<folder>``: UID MOVE, or UID COPY + the expunge above (a COPY that succeeded is remembered, so a
  retry after a failed expunge copies nothing twice). ``flag:<keyword>``: the keyword is set, and later
  snapshots leave such messages out.
- Any exception inside one IMAP exchange marks the connection broken; later calls fail fast.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime
import logging
import ssl
import urllib.parse
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from typing import TypeAlias

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
    TokenLogin,
    TokenRejected,
    tcp_probe,
)
from gateway.backends.readahead import ReadAhead, chunks
from gateway.config import EXPUNGE, DeletePolicy, TlsMode
from gateway.identity import DEFAULT_POLICY, IdentityPolicy, normalize
from gateway.oauth2 import sasl
from gateway.proto import imap
from gateway.proto import uidl as rules
from gateway.proto.logins import TokenMechanism

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
# An access token, before base64 and the SASL framing: Microsoft's JWTs with many claims reach a few KiB.
# The AUTHENTICATE line stays under 16 KiB, which Dovecot's and Cyrus's pre-login limits take.
MAX_TOKEN_OCTETS = 8 * 1024
MAX_SIZE_FIXES = 100_000
ENTRIES_CACHE_MESSAGES = 500_000  # snapshot entries kept for the next login (~100 B each)
DEFAULT_MAX_SNAPSHOT_ROWS = 500_000  # upstream.max_snapshot_rows: messages one snapshot may hold
# The untagged budget of one command: what a server may send besides the tagged reply and the bodies we
# asked for. A mailbox of n messages legitimately adds about one EXPUNGE and one FLAGS update per message
# (and one FETCH line per message to the snapshot), so the budget grows with the mailbox SELECT reported.
UNTAGGED_BASE_EVENTS = 10_000
UNTAGGED_EVENTS_PER_MESSAGE = 2
UNTAGGED_BASE_OCTETS = 16 * 1024 * 1024
UNTAGGED_OCTETS_PER_MESSAGE = 1024
MAX_COPIED_MEMORY = 100_000
# Message numbers per window UID SEARCH: the answer (up to 11 octets a UID) stays under the parser's
# 64 KiB line and 20,000-item caps.
SEARCH_CHUNK = 4000  # (mailbox, UIDVALIDITY, UID, target) copies remembered across retries


@dataclasses.dataclass(frozen=True, slots=True)
class ImapSettings:
    host: str
    port: int
    tls: TlsMode
    folder: str = "INBOX"
    ca_file: str = ""
    insecure: bool = False
    delete_policy: DeletePolicy = EXPUNGE  # a "move:Trash"-style text is parsed here, once
    mark_seen: bool = False
    connect_timeout: float = 15.0
    identity: IdentityPolicy = DEFAULT_POLICY  # IMAP reports no canonical user name: normalise ours
    max_snapshot_rows: int = DEFAULT_MAX_SNAPSHOT_ROWS
    # Without UIDPLUS a plain EXPUNGE also removes what another client flagged \Deleted between our check
    # and the EXPUNGE. Off: deletions that need it are refused with [SYS/TEMP]. On: for mailboxes that
    # only the gateway changes.
    expunge_without_uidplus: bool = False
    # The visibility window (a mapped account's): only messages whose internal date is on or after
    # ``since`` (IMAP SEARCH SINCE: the date part, in the date's own zone), then only the newest N of
    # those by UID. Entries keep their order; deletion indexes refer to this filtered snapshot.
    since: datetime.date | None = None
    newest: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "delete_policy", DeletePolicy.of(self.delete_policy))
        if self.newest is not None and self.newest < 1:
            raise ValueError("newest must be at least 1")

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


OnUntagged: TypeAlias = Callable[[imap.Event], None]


@dataclasses.dataclass(slots=True)
class Snapshot:
    """What ``UID FETCH 1:*`` left: the tagged reply, the (UID, size) rows and the EMAILIDs by UID."""

    tagged: imap.Tagged
    rows: list[tuple[int, int]]
    emailids: dict[int, str]


@dataclasses.dataclass(frozen=True, slots=True)
class TokenOutcome:
    """How an ``AUTHENTICATE`` with a token ended: the tagged reply, and the error challenge the server
    sent before it (None when it sent none, or ``malformed`` when it sent one that did not parse)."""

    tagged: imap.Tagged
    challenge: sasl.Challenge | None = None
    malformed: bool = False


def _body_base(item: str) -> str:
    """The body a FETCH item names, as the server echoes it: BODY.PEEK[]<0.100> and BODY[]<0> are BODY[]."""
    return item.upper().replace(".PEEK", "", 1).split("<", 1)[0]


def client_tls_context(settings: ImapSettings) -> ssl.SSLContext:
    return tls.client_context(settings.ca_file, settings.insecure)


class _Broken(Exception):
    pass


class _Overrun(_Broken):
    """The upstream sent more than one command may: a hostile or broken server, or an interception."""


# Parts of a FETCH response count once, with its Fetch event; a tagged reply or a continuation ends or
# steps the command: none of these spends the untagged budget.
_UNCOUNTED: frozenset[type] = frozenset(
    {imap.Tagged, imap.Continuation, imap.FetchBodyStart, imap.FetchBodyChunk, imap.FetchBodyEnd}
)


class ImapConnection:
    """One upstream connection: a trio stream driving the sans-IO client, one exchange at a time."""

    def __init__(self, stream: trio.abc.Stream, client: imap.Client) -> None:
        self.stream = stream
        self.client = client
        self.broken = False
        self._unfinished: str | None = None  # a tag whose response was abandoned (TOP cut)
        self.uidvalidity = 0
        self.exists = 0
        self._events_left = 0  # the current command's untagged budget (see _budget)
        self._octets_left = 0
        self._budget()

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
        tagged = await self.command("STARTTLS")
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

    def _budget(self) -> None:
        """A fresh untagged budget for the next command (the only place the budget is set)."""
        self._events_left = UNTAGGED_BASE_EVENTS + UNTAGGED_EVENTS_PER_MESSAGE * self.exists
        self._octets_left = UNTAGGED_BASE_OCTETS + UNTAGGED_OCTETS_PER_MESSAGE * self.exists

    def _spend(self, events: int) -> None:
        self._events_left -= events
        if self._events_left < 0:
            raise _Overrun("upstream sent too many untagged responses for one command")

    def accepted(self, octets: int) -> None:
        """Body bytes that were asked for: they do not count against the untagged budget."""
        self._octets_left += octets

    async def _receive(self) -> None:
        data = await self.stream.receive_some(READ_SIZE)
        self._octets_left -= len(data)
        if self._octets_left < 0:
            raise _Overrun("upstream sent too many octets for one command")
        self.client.receive_data(bytes(data))

    async def _event(self) -> imap.Event:
        while True:
            event = self.client.next_event()
            if type(event) in _UNCOUNTED:  # the common case (body chunks): one set lookup per event
                return event  # type: ignore[return-value]
            if isinstance(event, imap.NeedData):
                await self._receive()
                continue
            match event:
                case imap.ConnectionClosed():
                    raise _Broken("upstream closed the connection")
                case imap.UntaggedStatus() if event.condition is imap.Condition.BYE:
                    raise _Broken(f"upstream said BYE: {event.text}")
                case _:
                    self._spend(1)
            return event

    async def _finish(self, tag: str, on_untagged: OnUntagged | None = None) -> imap.Tagged:
        """Read up to the tagged reply to ``tag``; untagged responses go to ``on_untagged`` (never kept
        here: bodies nobody asked for are dropped chunk by chunk as they arrive)."""
        while True:
            event = await self._event()
            if isinstance(event, imap.Tagged) and event.tag == tag:
                return event
            if on_untagged is not None and not isinstance(event, imap.FetchBodyChunk):
                on_untagged(event)

    async def _drain_unfinished(self) -> None:
        if self._unfinished is not None:
            tag, self._unfinished = self._unfinished, None
            await self._finish(tag)
            self._budget()  # the drained response had its own budget; the next command gets a fresh one

    # -- commands

    @contextlib.asynccontextmanager
    async def _exchange(self) -> AsyncIterator[None]:
        if self.broken:
            raise TempFailure("the upstream connection is broken")
        self._budget()
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

    async def command(self, name: str, *args: imap.Arg, on_untagged: OnUntagged | None = None) -> imap.Tagged:
        """Send one command and return its tagged reply; ``on_untagged`` sees each untagged response."""
        async with self._exchange():
            await self._drain_unfinished()
            tag, data = self.client.send_command(name, *args)
            await self.stream.send_all(data)
            while self.client.awaiting_continuation:
                event = await self._event()
                if isinstance(event, imap.Continuation):
                    await self.stream.send_all(self.client.continue_command())
                elif isinstance(event, imap.Tagged) and event.tag == tag:
                    return event
            return await self._finish(tag, on_untagged)

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
            return await self._finish(tag)

    async def authenticate_token(self, response: sasl.InitialResponse) -> TokenOutcome:
        """``AUTHENTICATE XOAUTH2|OAUTHBEARER``: the initial response as the SASL-IR argument when the
        server offers SASL-IR, else after its ``+``. A ``+`` after the payload is the error challenge
        (RFC 7628 3.2.3): answered with the dummy response the mechanism needs, so the server ends with
        its tagged NO; a challenge that does not parse is cancelled (``*``). At most those two steps: a
        server that goes on challenging breaks the connection. The payload leaves only as bytes on the
        wire: no log line, exception or repr here shows it."""
        mechanism = response.mechanism
        async with self._exchange():
            await self._drain_unfinished()
            if "SASL-IR" in self.client.capabilities:
                tag, data = self.client.send_command(
                    f"AUTHENTICATE {mechanism}", imap.Atom(response.b64().decode("ascii"))
                )
                await self.stream.send_all(data)
            else:
                tag, data = self.client.send_command(f"AUTHENTICATE {mechanism}")
                await self.stream.send_all(data)
                step = await self._auth_step(tag)
                if isinstance(step, imap.Tagged):
                    return TokenOutcome(step)
                # the initial "+" carries nothing for these mechanisms; whatever it holds, the parser has
                # already bounded it (max_line_length) and it is not looked at
                await self.stream.send_all(self.client.authenticate_response(response.b64()))
            step = await self._auth_step(tag)
            if isinstance(step, imap.Tagged):
                return TokenOutcome(step)
            challenge: sasl.Challenge | None = None
            try:
                challenge = sasl.parse_challenge(step.data)
            except sasl.SaslError:
                await self.stream.send_all(self.client.authenticate_response(b"*"))
            else:
                await self.stream.send_all(self.client.authenticate_response(sasl.ERROR_ACK[mechanism]))
            step = await self._auth_step(tag)
            if isinstance(step, imap.Tagged):
                return TokenOutcome(step, challenge, malformed=challenge is None)
            raise _Broken("upstream sent a second AUTHENTICATE challenge after the error challenge")

    async def _auth_step(self, tag: str) -> imap.Tagged | imap.Continuation:
        """The next ``+`` or the tagged reply of an AUTHENTICATE; untagged responses in between are
        dropped (and spend the untagged budget, as in any command)."""
        while True:
            event = await self._event()
            if isinstance(event, imap.Continuation):
                return event
            if isinstance(event, imap.Tagged) and event.tag == tag:
                return event

    async def fetch_body(
        self, uid: int, section: str, expect_size: int | None = None
    ) -> AsyncGenerator[bytes, None]:
        """Yield the literal of ``UID FETCH uid (section)``; MessageGone if the server sends none;
        SizeChanged (before the first byte) if the literal is not ``expect_size`` octets."""
        async with self._exchange():
            await self._drain_unfinished()
            tag, data = self.client.send_command("UID FETCH", uid, imap.Raw(f"({section})"))
            await self.stream.send_all(data)
            item = _body_base(section)
            seen_body = False
            streaming = False  # inside the one body that answers us; any other body is dropped unread
            while True:
                event = await self._event()
                match event:
                    case imap.FetchBodyStart(size=size):
                        streaming = (
                            not seen_body and _body_base(event.item) == item and event.uid in (None, uid)
                        )
                        if not streaming:
                            continue
                        seen_body = True
                        self._unfinished = tag  # if the consumer stops early, drain before the next command
                        if expect_size is not None and size != expect_size:
                            raise SizeChanged(f"UID {uid}: listed {expect_size}, upstream sends {size}", size)
                    case imap.FetchBodyChunk(chunk):
                        if streaming:
                            self.accepted(len(chunk))
                            yield chunk
                    case imap.FetchBodyEnd():
                        streaming = False
                    case imap.Tagged() if event.tag == tag:
                        self._unfinished = None
                        if event.condition is not imap.Condition.OK:
                            raise MessageGone(f"UID {uid}: {event.text}")
                        if not seen_body:
                            raise MessageGone(f"UID {uid} is gone")
                        return
                    case _:
                        pass

    async def fetch_snapshot(
        self, items: str, *, hide: str | None, max_rows: int, command: str = "UID FETCH", which: str = "1:*"
    ) -> Snapshot:
        """``UID FETCH 1:* items``: plain (UID, RFC822.SIZE) lines through the parser's fast path, the
        others (FLAGS, EMAILID) one event at a time. One round trip whatever the mailbox size. Nothing but
        the rows is kept: more than ``max_rows`` of them is TempFailure, and the untagged budget bounds
        everything else the server sends."""
        snap = Snapshot(imap.Tagged("", imap.Condition.OK, None, ""), [], {})
        rows, emailids = snap.rows, snap.emailids

        def row(uid: int, size: int) -> None:
            if len(rows) >= max_rows:
                raise TempFailure(
                    f"the folder holds more than upstream.max_snapshot_rows={max_rows} messages"
                )
            rows.append((uid, size))

        async with self._exchange():
            await self._drain_unfinished()
            tag, data = self.client.send_command(command, imap.Atom(which), imap.Raw(items))
            await self.stream.send_all(data)
            while True:
                plain = self.client.next_size_fetches()
                if plain:  # only ever lines with exactly UID and RFC822.SIZE, taken as one batch
                    self._spend(len(plain))
                    if len(rows) + len(plain) > max_rows:
                        row(*plain[max_rows - len(rows)])  # raises
                    rows.extend(plain)
                    continue
                event = self.client.next_event()
                if isinstance(event, imap.NeedData):
                    await self._receive()
                    continue
                match event:
                    case imap.ConnectionClosed():
                        raise _Broken("upstream closed the connection")
                    case imap.UntaggedStatus() if event.condition is imap.Condition.BYE:
                        raise _Broken(f"upstream said BYE: {event.text}")
                    case imap.Tagged() if event.tag == tag:
                        snap.tagged = event
                        return snap
                    case imap.Fetch():
                        self._spend(1)
                        got, octets = event.uid, event.rfc822_size
                        if got is None or octets is None:
                            continue  # an unsolicited FLAGS update, say
                        if hide and any(f.lower() == hide for f in event.flags or ()):
                            continue
                        row(got, octets)
                        emailid = _emailid(event.items.get("EMAILID"))
                        if emailid:
                            emailids[got] = emailid
                    case imap.FetchBodyStart() | imap.FetchBodyChunk() | imap.FetchBodyEnd():
                        pass  # a body nobody asked for: dropped as it arrives
                    case _:
                        self._spend(1)

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
            wanted = set(uids)
            block = bytearray()
            keeping = False  # inside a body that may answer us; any other is dropped as it arrives
            pending: bytes | None = None
            while True:
                event = await self._event()
                match event:
                    case imap.FetchBodyStart():
                        block.clear()
                        pending = None
                        keeping = (
                            event.item == "BODY[]"
                            and event.size <= max_each
                            and (event.uid is None or (event.uid in wanted and event.uid not in bodies))
                        )
                    case imap.FetchBodyChunk(chunk):
                        if keeping:
                            self.accepted(len(chunk))
                            block += chunk
                    case imap.FetchBodyEnd():
                        pending = bytes(block) if keeping else None
                        keeping = False
                        block.clear()
                    case imap.Fetch():
                        uid = event.uid
                        if uid in wanted and uid not in bodies and pending is not None:
                            bodies[uid] = pending
                        pending = None
                    case imap.Tagged() if event.tag == tag:
                        return bodies  # a NO just means fewer bodies: the caller fetches the rest itself
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
            wanted = set(uids)
            block = bytearray()
            keeping = False  # inside a header block that may answer us; any other body is dropped
            pending: str | None = None
            while True:
                event = await self._event()
                match event:
                    case imap.FetchBodyStart():
                        block.clear()
                        pending = None
                        keeping = (
                            event.item == "BODY[HEADER]"
                            and event.size <= rules.MAX_HEADER_BLOCK
                            and (event.uid is None or (event.uid in wanted and event.uid not in hashes))
                        )
                    case imap.FetchBodyChunk(chunk):
                        if keeping:
                            self.accepted(len(chunk))
                            block += chunk
                    case imap.FetchBodyEnd():
                        pending = rules.header_hash(bytes(block)) if keeping else None
                        keeping = False
                        block.clear()
                    case imap.Fetch():
                        uid = event.uid
                        if uid in wanted and uid not in hashes and pending is not None:
                            hashes[uid] = pending
                        pending = None
                    case imap.Tagged() if event.tag == tag:
                        if event.condition is not imap.Condition.OK:
                            raise TempFailure(f"header fetch failed: {event.text}")
                        return hashes
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
        copied: collections.OrderedDict[tuple[str, int, int, str], None] | None = None,
    ) -> None:
        self.conn = conn
        # UID COPY (move: without MOVE) done in an earlier session whose expunge then failed: never again
        self._copied = copied if copied is not None else collections.OrderedDict()
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
        ours = {self._uids[i] for i in indexes}
        uids = imap.sequence_set(ours)
        policy = self.settings.delete_policy
        if policy.kind == "flag":
            keyword = imap.Atom(policy.target)
            await self._ok("UID STORE", uids, imap.Atom("+FLAGS.SILENT"), [keyword])
            return
        caps = self.conn.client.capabilities
        target = policy.target if policy.kind == "move" else None
        if target is not None and "MOVE" in caps:
            await self._ok("UID MOVE", uids, target)  # RFC 6851: expunges exactly the moved messages
            return
        uidplus = "UIDPLUS" in caps or "IMAP4REV2" in caps
        if not uidplus and not self.settings.expunge_without_uidplus:
            # Refused before anything changes (no copy, no flag): see docs/backends.md.
            raise TempFailure(
                f"not deleted: the upstream lacks UIDPLUS, so an EXPUNGE could remove another client's "
                f"mail; {len(ours)} message(s) left in place (use a move:/flag: delete_policy, or "
                f"upstream.expunge_without_uidplus for a mailbox only the gateway changes)"
            )
        already: set[int] = set()
        if not uidplus:
            already = await self._deleted_flags(ours)  # refuses if another client has a pending \Deleted
        if target is not None:
            await self._copy(ours, target)
        mine = ours - already  # the \Deleted flags we set, and the only ones we ever take back
        if mine:
            await self._ok("UID STORE", imap.sequence_set(mine), imap.Atom("+FLAGS.SILENT"), [_DELETED])
        if uidplus:
            await self._ok("UID EXPUNGE", uids)
        else:
            try:
                await self._deleted_flags(ours)
            except TempFailure:
                if mine:
                    await self._ok(
                        "UID STORE", imap.sequence_set(mine), imap.Atom("-FLAGS.SILENT"), [_DELETED]
                    )
                raise
            await self._ok("EXPUNGE")  # the window between the check and this is why it is opt-in
        if target is not None:
            for uid in ours:
                self._copied.pop(self._copy_key(uid, target), None)

    def _copy_key(self, uid: int, target: str) -> tuple[str, int, int, str]:
        return (self._fix_key, self.conn.uidvalidity, uid, target)

    async def _copy(self, ours: set[int], target: str) -> None:
        """UID COPY what an earlier, failed attempt has not copied yet: a retry leaves no second copy."""
        todo = {uid for uid in ours if self._copy_key(uid, target) not in self._copied}
        if not todo:
            return
        await self._ok("UID COPY", imap.sequence_set(todo), target)
        for uid in sorted(todo):
            self._copied[self._copy_key(uid, target)] = None
        while len(self._copied) > MAX_COPIED_MEMORY:
            self._copied.popitem(last=False)

    async def _deleted_flags(self, ours: set[int]) -> set[int]:
        """Which of ``ours`` carry \\Deleted already (``UID SEARCH DELETED``, no UIDPLUS). TempFailure,
        changing nothing, if any other message does: a plain EXPUNGE would remove it too."""
        found: set[int] = set()
        others = 0

        def collect(event: imap.Event) -> None:
            nonlocal others
            if isinstance(event, imap.Search):
                found.update(n for n in event.numbers if n in ours)
                others += sum(1 for n in event.numbers if n not in ours)

        await self._ok("NOOP")  # a server may search its last synced view (Dovecot does): sync first
        await self._ok("UID SEARCH", imap.Atom("DELETED"), on_untagged=collect)
        if others:
            raise TempFailure(
                f"not expunged: the upstream lacks UIDPLUS and {others} other message(s) are flagged "
                f"\\Deleted; {len(ours)} message(s) left in place"
            )
        return found

    async def _ok(self, name: str, *args: imap.Arg, on_untagged: OnUntagged | None = None) -> imap.Tagged:
        tagged = await self.conn.command(name, *args, on_untagged=on_untagged)
        if tagged.condition is not imap.Condition.OK:
            raise TempFailure(f"{name} failed upstream: {tagged.condition.value} {tagged.text}")
        return tagged


_DELETED = imap.Atom("\\Deleted")


def _emailid(value: imap.Value) -> str | None:
    """RFC 8474 EMAILID is a parenthesised objectid: ``EMAILID (M6d99ac3275bb4e)``."""
    if isinstance(value, tuple) and len(value) == 1:
        value = value[0]
    if isinstance(value, imap.Atom):
        return value.value
    if isinstance(value, bytes):
        return value.decode("ascii", "replace")
    return None


def _emailid_keys(emailids: dict[int, str], uidvalidity: int) -> dict[int, str]:
    """The store key of each message that has an EMAILID: ``e:<emailid>``, unique within the snapshot.

    Cyrus gives byte-identical messages one EMAILID, so the copy with the lowest UID keys by it and every
    later copy by ``e:<emailid>:<uidvalidity>:<uid>``. A new copy never takes the key (and so the UIDL)
    of one that was there before, and the first copy keeps its key when a second one arrives."""
    keys: dict[int, str] = {}
    seen: set[str] = set()
    for uid in sorted(emailids):
        emailid = emailids[uid]
        keys[uid] = f"e:{emailid}:{uidvalidity}:{uid}" if emailid in seen else f"e:{emailid}"
        seen.add(emailid)
    return keys


def token_mechanism(wanted: TokenMechanism, caps: frozenset[str]) -> sasl.Mechanism:
    """The SASL mechanism for a token login: ``auto`` is OAUTHBEARER when advertised, else XOAUTH2.
    PermFailure when the upstream does not offer the one needed (trying again will not help)."""
    offered = [m for m in ("OAUTHBEARER", "XOAUTH2") if f"AUTH={m}" in caps]
    if wanted == "auto":
        if not offered:
            raise PermFailure(
                "the upstream offers neither AUTH=OAUTHBEARER nor AUTH=XOAUTH2 for token logins"
            )
        return "OAUTHBEARER" if "OAUTHBEARER" in offered else "XOAUTH2"
    mechanism: sasl.Mechanism = "OAUTHBEARER" if wanted == "oauthbearer" else "XOAUTH2"
    if mechanism not in offered:
        raise PermFailure(f"the upstream does not offer AUTH={mechanism} (offered: {offered or 'none'})")
    return mechanism


class ImapBackend:
    name = "imap"

    async def apop_available(self) -> bool:
        return False  # the upstream needs the password itself

    def __init__(self, settings: ImapSettings) -> None:
        self.settings = settings
        self._tls = client_tls_context(settings) if settings.tls != "none" else None
        self._size_fixes: dict[tuple[str, int, int], int] = {}
        self._copied: collections.OrderedDict[tuple[str, int, int, str], None] = collections.OrderedDict()
        self._warned_uidplus = False
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
        secret = login.token if isinstance(login, TokenLogin) else login.password
        limit = MAX_TOKEN_OCTETS if isinstance(login, TokenLogin) else MAX_PASSWORD_OCTETS
        if len(login.username.encode()) > MAX_USERNAME_OCTETS or len(secret.encode()) > limit:
            # IMAP servers cap pre-login input (Dovecot answers BYE): refuse here, as bad credentials.
            raise AuthFailed("credentials too long to pass through")
        conn = await ImapConnection.connect(self.settings, self._tls)
        try:
            if isinstance(login, TokenLogin):
                await self._login_token(conn, login)
            else:
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
                tagged = await conn.command("LOGIN", user, password)
        except imap.LocalProtocolError:
            raise AuthFailed("credentials that cannot be sent to IMAP (NUL)") from None
        if tagged.condition is not imap.Condition.OK:
            code = tagged.code.name if tagged.code else ""
            if code in ("UNAVAILABLE", "SERVERBUG", "INUSE", "LIMIT"):
                raise TempFailure(f"upstream login unavailable: [{code}] {tagged.text}")
            raise AuthFailed(f"upstream refused the login: [{code}] {tagged.text}")
        await self._after_login(conn, tagged)

    async def _after_login(self, conn: ImapConnection, tagged: imap.Tagged) -> None:
        """The capabilities change at login (RFC 9051 6.2.3): read them again unless the OK carried them."""
        if not tagged.code or tagged.code.name != "CAPABILITY":
            await conn.command("CAPABILITY")
        if "ID" in conn.client.capabilities:
            await conn.command("ID", ["name", "pop3-gateway", "version", __version__])
        self._warn_without_uidplus(conn.client.capabilities)

    async def _login_token(self, conn: ImapConnection, login: TokenLogin) -> None:
        """``AUTHENTICATE OAUTHBEARER`` (RFC 7628) or ``XOAUTH2`` with the token; the user name is the
        upstream identity (OAUTHBEARER's authzid, XOAUTH2's ``user=``), which may be a shared mailbox the
        token's subject may open. A refusal is TokenRejected (the caller may refresh once and retry)."""
        mechanism = token_mechanism(login.mechanism, conn.client.capabilities)
        try:
            if mechanism == "OAUTHBEARER":
                response = sasl.oauthbearer(
                    login.token, authzid=login.username, host=self.settings.host, port=self.settings.port
                )
            else:
                response = sasl.xoauth2(login.username, login.token)
        except sasl.SaslError as exc:
            raise AuthFailed(f"cannot send this token login to IMAP: {exc}") from None  # names no token
        outcome = await conn.authenticate_token(response)
        tagged = outcome.tagged
        if tagged.condition is not imap.Condition.OK:
            code = tagged.code.name if tagged.code else ""
            if code in ("UNAVAILABLE", "SERVERBUG", "INUSE", "LIMIT"):
                raise TempFailure(f"upstream {mechanism} login unavailable: [{code}] {tagged.text}")
            if outcome.malformed:
                raise AuthFailed(f"upstream {mechanism}: a malformed error challenge, cancelled: [{code}]")
            if tagged.condition is imap.Condition.BAD:
                raise AuthFailed(f"upstream {mechanism}: BAD [{code}] {tagged.text}")
            status = outcome.challenge.status if outcome.challenge is not None else None
            reason = f" (status {status})" if status else ""
            raise TokenRejected(
                f"upstream refused the {mechanism} token{reason}: [{code}] {tagged.text}", status=status
            )
        await self._after_login(conn, tagged)

    def _warn_without_uidplus(self, caps: frozenset[str]) -> None:
        """Once per backend: deletions this upstream cannot do safely will be refused at QUIT."""
        if self._warned_uidplus or "UIDPLUS" in caps or "IMAP4REV2" in caps:
            return
        policy = self.settings.delete_policy
        if policy.kind == "flag" or (policy.kind == "move" and "MOVE" in caps):
            return
        self._warned_uidplus = True
        if self.settings.expunge_without_uidplus:
            log.warning(
                "upstream %s:%d lacks UIDPLUS: delete_policy=%s uses a plain EXPUNGE "
                "(upstream.expunge_without_uidplus), which also removes messages another client flags "
                "\\Deleted at that moment",
                self.settings.host,
                self.settings.port,
                policy,
            )
        else:
            log.warning(
                "upstream %s:%d lacks UIDPLUS: delete_policy=%s cannot delete without risking another "
                "client's mail, so DELE+QUIT gets -ERR [SYS/TEMP]; use a flag:/move: policy (move: needs "
                "MOVE) or set upstream.expunge_without_uidplus",
                self.settings.host,
                self.settings.port,
                policy,
            )

    async def _snapshot(self, conn: ImapConnection, identity: str) -> ImapMaildrop:
        uidvalidity = 0
        exists = 0

        def collect(event: imap.Event) -> None:
            nonlocal uidvalidity, exists
            if isinstance(event, imap.UntaggedStatus) and event.code and event.code.name == "UIDVALIDITY":
                uidvalidity = event.code.int_value()
            elif isinstance(event, imap.Exists):
                exists = event.count

        tagged = await conn.command("SELECT", self.settings.folder, on_untagged=collect)
        if tagged.condition is not imap.Condition.OK:
            raise PermFailure(f"cannot select {self.settings.folder!r}: {tagged.text}")
        if not 1 <= uidvalidity <= imap.MAX_UID:
            raise TempFailure(f"malformed upstream: UIDVALIDITY {uidvalidity} is not 1 .. 2**32-1")
        max_rows = self.settings.max_snapshot_rows
        if exists > max_rows:
            raise TempFailure(
                f"{exists} messages in {self.settings.folder!r}, over upstream.max_snapshot_rows={max_rows}"
            )
        conn.uidvalidity, conn.exists = uidvalidity, exists
        policy = self.settings.delete_policy
        hide = policy.target.lower() if policy.kind == "flag" else None
        rows: list[tuple[int, int]] = []
        emailids: dict[int, str] = {}
        objectid = "OBJECTID" in conn.client.capabilities
        since, newest = self.settings.since, self.settings.newest
        wanted: set[int] | None = None  # with a window: the UIDs it lets through (None: all)
        command, which = "UID FETCH", "1:*"
        if exists and since is None and newest is not None and hide is None:
            command, which = "FETCH", f"{max(1, exists - newest + 1)}:*"  # the newest N by number
        elif exists and (since is not None or newest is not None):
            found = await self._search_window(conn, exists, hide)
            wanted = set(found)
            which = f"{found[0]}:*" if found else ""  # one FETCH from the oldest wanted UID up, filtered
        if exists and which:
            items = "(UID RFC822.SIZE" + (" FLAGS" if hide else "") + (" EMAILID" if objectid else "") + ")"
            snap = await conn.fetch_snapshot(
                items, hide=hide, max_rows=max_rows, command=command, which=which
            )
            if snap.tagged.condition is not imap.Condition.OK:
                raise TempFailure(f"snapshot fetch failed: {snap.tagged.text}")
            rows, emailids = snap.rows, snap.emailids
        rows = sorted(dict(rows).items())
        if wanted is not None:
            rows = [row for row in rows if row[0] in wanted]
        if newest is not None:
            rows = rows[-newest:]
        if wanted is not None or newest is not None:
            kept = {uid for uid, _ in rows}
            emailids = {uid: e for uid, e in emailids.items() if uid in kept}
        fix_key = self.lock_key(identity)
        fixes = self._size_fixes
        uids = [uid for uid, _ in rows]
        # The same mailbox as last time (same UIDs and sizes, UIDVALIDITY, no new size correction): the
        # entries are the same tuples, and 100,000 of them need not be built again.
        fingerprint = (uidvalidity, len(fixes), tuple(sorted(emailids.items())))
        cached = self._entries_cache.get(fix_key)
        if cached is not None and cached[0] == fingerprint and cached[1] == rows:
            self._entries_cache.move_to_end(fix_key)
            return ImapMaildrop(conn, self.settings, cached[2], uids, fixes, fix_key, identity, self._copied)
        # This runs for every message at every login: the constant parts are formatted once.
        suffix = f"{uidvalidity:08x}"
        key_prefix = f"u:{uidvalidity}:"
        keys = _emailid_keys(emailids, uidvalidity)
        entries = [
            Entry(
                str(uid),
                fixes.get((fix_key, uidvalidity, uid), size) if fixes else size,
                f"{uid:08x}{suffix}",  # Dovecot's default POP3 UIDL: %08Xu%08Xv, printed in lowercase
                keys.get(uid) or key_prefix + str(uid),
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
        return ImapMaildrop(conn, self.settings, entries, uids, fixes, fix_key, identity, self._copied)

    async def _search_window(self, conn: ImapConnection, exists: int, hide: str | None) -> list[int]:
        """The UIDs the visibility window lets through, ascending: ``UID SEARCH <lo:hi> [NOT KEYWORD k]
        [SINCE date]`` over ranges of SEARCH_CHUNK message numbers, newest range first, so that every
        answer stays a short line (the parser caps lines and items) and ``newest`` stops the search as
        soon as it has its N."""
        criteria: list[imap.Arg] = []
        if hide is not None:
            criteria += [
                imap.Atom("NOT"),
                imap.Atom("KEYWORD"),
                imap.Atom(self.settings.delete_policy.target),
            ]
        if self.settings.since is not None:
            criteria += [imap.Atom("SINCE"), imap.Atom(imap_date(self.settings.since))]
        newest, max_rows = self.settings.newest, self.settings.max_snapshot_rows
        found: set[int] = set()

        def collect(event: imap.Event) -> None:
            if isinstance(event, imap.Search):
                found.update(event.numbers)
                if len(found) > max_rows:
                    raise TempFailure(f"the window holds more than upstream.max_snapshot_rows={max_rows}")

        high = exists
        while high >= 1 and (newest is None or len(found) < newest):
            low = max(1, high - SEARCH_CHUNK + 1)
            tagged = await conn.command(
                "UID SEARCH", imap.Atom(f"{low}:{high}"), *criteria, on_untagged=collect
            )
            if tagged.condition is not imap.Condition.OK:
                raise TempFailure(f"window search failed: {tagged.condition.value} {tagged.text}")
            high = low - 1
        return sorted(found)

    async def aclose(self) -> None:
        pass


_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def imap_date(day: datetime.date) -> str:
    """RFC 3501 ``date`` (``1-Feb-2024``), in English whatever the locale."""
    return f"{day.day}-{_MONTHS[day.month - 1]}-{day.year:04d}"
