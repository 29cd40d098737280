"""Token logins to IMAP (issue 11) against a scripted fake server on loopback: AUTHENTICATE OAUTHBEARER
and XOAUTH2, with SASL-IR or after the continuation, the error challenge and its dummy response, what a
hostile server may send, and that no token reaches a log line, an exception or a repr. The same against
real Dovecot is in tests/test_imap_oauth2.py; the visibility window's search ranges are checked here too."""

from __future__ import annotations

import base64
import datetime
import logging
import re
from collections.abc import Awaitable, Callable

import pytest
import trio

from gateway.backends.base import AuthFailed, PermFailure, TempFailure, TokenLogin, TokenRejected
from gateway.backends.imap import ImapBackend, ImapSettings, imap_date, token_mechanism
from gateway.oauth2 import sasl
from tests.test_imap_hostile import Wire

TOKEN = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl-_x"  # JWT-shaped, b64token alphabet
OB = b"IMAP4rev1 UIDPLUS SASL-IR AUTH=PLAIN AUTH=OAUTHBEARER AUTH=XOAUTH2"
AuthHandler = Callable[["TokenImap", Wire, bytes, bytes], Awaitable[None]]


def invalid_token_challenge() -> bytes:
    return sasl.format_challenge(sasl.Challenge(sasl.ChallengeKind.INVALID_TOKEN, "invalid_token", "imap"))


class TokenImap:
    """A fake upstream that records every line; AUTHENTICATE goes to ``auth`` (default: accept TOKEN)."""

    def __init__(self, caps: bytes = OB, auth: AuthHandler | None = None, exists: int = 2) -> None:
        self.caps = caps
        self.auth = auth or accept
        self.exists = exists
        self.lines: list[bytes] = []
        self.payloads: list[bytes] = []  # the decoded initial responses
        self.connections = 0
        self.searches: list[bytes] = []
        self.search_answer: Callable[[bytes], list[int]] = lambda line: []

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(self._handle, listeners)

    async def line(self, w: Wire) -> bytes:
        line = await w.line()
        self.lines.append(line)
        return line

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        w = Wire(stream)
        try:
            await w.send(b"* OK [CAPABILITY " + self.caps + b"] fake ready\r\n")
            while True:
                line = await self.line(w)
                tag, _, rest = line.partition(b" ")
                words = rest.split(b" ")
                verb = (b" ".join(words[:2]) if words[0].upper() == b"UID" else words[0]).upper()
                if verb == b"AUTHENTICATE":
                    await self.auth(self, w, tag, line)
                elif verb == b"CAPABILITY":
                    await w.send(b"* CAPABILITY " + self.caps + b"\r\n" + tag + b" OK done\r\n")
                elif verb == b"SELECT":
                    await w.send(
                        b"* %d EXISTS\r\n* OK [UIDVALIDITY 7] ok\r\n%s OK [READ-WRITE] done\r\n"
                        % (self.exists, tag)
                    )
                elif verb in (b"UID FETCH", b"FETCH"):
                    rows = b"".join(
                        b"* %d FETCH (UID %d RFC822.SIZE 10)\r\n" % (n, n) for n in range(1, self.exists + 1)
                    )
                    await w.send(rows + tag + b" OK done\r\n")
                elif verb == b"UID SEARCH":
                    self.searches.append(rest)
                    found = self.search_answer(rest)
                    await w.send(
                        b"* SEARCH" + b"".join(b" %d" % n for n in found) + b"\r\n" + tag + b" OK\r\n"
                    )
                elif verb == b"LOGOUT":
                    await w.send(b"* BYE bye\r\n" + tag + b" OK out\r\n")
                    return
                else:
                    await w.send(tag + b" OK fine\r\n")
        except (EOFError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await stream.aclose()


async def payload_of(fake: TokenImap, w: Wire, line: bytes) -> bytes:
    """The initial response: the SASL-IR argument, or the line after our ``+``."""
    words = line.split(b" ")
    if len(words) == 4:
        return base64.b64decode(words[3], validate=True)
    await w.send(b"+ \r\n")
    return base64.b64decode(await fake.line(w), validate=True)


def token_in(mechanism: bytes, raw: bytes) -> sasl.ClientResponse:
    return sasl.parse_oauthbearer(raw) if mechanism == b"OAUTHBEARER" else sasl.parse_xoauth2(raw)


async def accept(fake: TokenImap, w: Wire, tag: bytes, line: bytes) -> None:
    raw = await payload_of(fake, w, line)
    fake.payloads.append(raw)
    if token_in(line.split(b" ")[2], raw).token == TOKEN:
        await w.send(tag + b" OK [CAPABILITY IMAP4rev1 UIDPLUS] logged in\r\n")
    else:
        await w.send(b"+ " + invalid_token_challenge() + b"\r\n")
        await fake.line(w)
        await w.send(tag + b" NO [AUTHENTICATIONFAILED] nope\r\n")


def challenging(challenge: bytes, *, then: bytes = b"NO [AUTHENTICATIONFAILED] refused") -> AuthHandler:
    async def auth(fake: TokenImap, w: Wire, tag: bytes, line: bytes) -> None:
        fake.payloads.append(await payload_of(fake, w, line))
        await w.send(b"+ " + challenge + b"\r\n")
        await fake.line(w)
        await w.send(tag + b" " + then + b"\r\n")

    return auth


async def start(nursery: trio.Nursery, fake: TokenImap, **kw: object) -> ImapBackend:
    port = await nursery.start(fake.serve)
    return ImapBackend(ImapSettings("127.0.0.1", port, "none", connect_timeout=10.0, **kw))  # type: ignore[arg-type]


async def listed(backend: ImapBackend, login: TokenLogin) -> list[str]:
    async with backend.open_maildrop(login) as drop:
        return [e.upstream_id for e in drop.entries]


async def test_sasl_ir_sends_oauthbearer_on_the_command_line(nursery: trio.Nursery) -> None:
    fake = TokenImap()
    backend = await start(nursery, fake)
    assert await listed(backend, TokenLogin("shared@example.org", TOKEN)) == ["1", "2"]
    [auth] = [line for line in fake.lines if b"AUTHENTICATE" in line]
    assert re.fullmatch(rb"A\d{4} AUTHENTICATE OAUTHBEARER [A-Za-z0-9+/]+=*", auth)
    parsed = sasl.parse_oauthbearer(fake.payloads[0])
    # the upstream identity is the authzid, which may differ from the token's subject (a shared mailbox)
    assert parsed.user == "shared@example.org" and parsed.token == TOKEN
    assert (parsed.host, parsed.port) == ("127.0.0.1", backend.settings.port)


async def test_without_sasl_ir_the_payload_follows_the_continuation(nursery: trio.Nursery) -> None:
    fake = TokenImap(caps=b"IMAP4rev1 UIDPLUS AUTH=XOAUTH2")
    backend = await start(nursery, fake)
    assert await listed(backend, TokenLogin("alice", TOKEN)) == ["1", "2"]
    i = next(i for i, line in enumerate(fake.lines) if b"AUTHENTICATE" in line)
    assert re.fullmatch(rb"A\d{4} AUTHENTICATE XOAUTH2", fake.lines[i])
    assert sasl.parse_xoauth2(base64.b64decode(fake.lines[i + 1])).user == "alice"
    # the OK carried a CAPABILITY code, so it is not asked again; the next command is the SELECT
    assert b"SELECT" in fake.lines[i + 2]


async def test_capabilities_are_read_again_after_a_token_login(nursery: trio.Nursery) -> None:
    async def ok_without_code(fake: TokenImap, w: Wire, tag: bytes, line: bytes) -> None:
        fake.payloads.append(await payload_of(fake, w, line))
        await w.send(tag + b" OK logged in\r\n")

    fake = TokenImap(auth=ok_without_code)
    backend = await start(nursery, fake)
    await listed(backend, TokenLogin("alice", TOKEN))
    i = next(i for i, line in enumerate(fake.lines) if b"AUTHENTICATE" in line)
    assert fake.lines[i + 1].endswith(b" CAPABILITY")


@pytest.mark.parametrize(
    ("caps", "wanted", "chosen"),
    [
        (OB, "auto", "OAUTHBEARER"),
        (b"IMAP4rev1 AUTH=XOAUTH2", "auto", "XOAUTH2"),
        (b"IMAP4rev1 AUTH=OAUTHBEARER", "auto", "OAUTHBEARER"),
        (OB, "xoauth2", "XOAUTH2"),
        (OB, "oauthbearer", "OAUTHBEARER"),
    ],
)
async def test_the_mechanism_is_chosen_from_the_capabilities(
    nursery: trio.Nursery, caps: bytes, wanted: str, chosen: str
) -> None:
    fake = TokenImap(caps=caps)
    backend = await start(nursery, fake)
    await listed(backend, TokenLogin("alice", TOKEN, wanted))  # type: ignore[arg-type]
    [auth] = [line for line in fake.lines if b"AUTHENTICATE" in line]
    assert auth.split(b" ")[2] == chosen.encode()


@pytest.mark.parametrize(
    ("caps", "wanted"),
    [
        (b"IMAP4rev1 SASL-IR AUTH=PLAIN", "auto"),
        (b"IMAP4rev1 AUTH=XOAUTH2", "oauthbearer"),
        (b"IMAP4rev1 AUTH=OAUTHBEARER", "xoauth2"),
    ],
)
async def test_a_mechanism_the_upstream_lacks_is_a_clear_perm_failure(
    nursery: trio.Nursery, caps: bytes, wanted: str
) -> None:
    fake = TokenImap(caps=caps)
    backend = await start(nursery, fake)
    with pytest.raises(PermFailure, match="AUTH="):
        await listed(backend, TokenLogin("alice", TOKEN, wanted))  # type: ignore[arg-type]
    assert not any(b"AUTHENTICATE" in line for line in fake.lines)


def test_token_mechanism_prefers_oauthbearer() -> None:
    assert token_mechanism("auto", frozenset({"AUTH=XOAUTH2", "AUTH=OAUTHBEARER"})) == "OAUTHBEARER"
    assert token_mechanism("auto", frozenset({"AUTH=XOAUTH2"})) == "XOAUTH2"


@pytest.mark.parametrize(
    ("caps", "mechanism", "dummy"),
    [
        (OB, "oauthbearer", b"AQ=="),  # RFC 7628 3.2.3: %x01
        (OB, "xoauth2", b""),  # Google's and Microsoft's XOAUTH2: an empty line
        (b"IMAP4rev1 AUTH=OAUTHBEARER", "oauthbearer", b"AQ=="),
        (b"IMAP4rev1 AUTH=XOAUTH2", "xoauth2", b""),
    ],
)
async def test_an_error_challenge_gets_the_dummy_response_and_is_token_rejected(
    nursery: trio.Nursery, caps: bytes, mechanism: str, dummy: bytes
) -> None:
    fake = TokenImap(caps=caps)
    backend = await start(nursery, fake)
    with pytest.raises(TokenRejected) as refused:
        await listed(backend, TokenLogin("alice", "expired-token", mechanism))  # type: ignore[arg-type]
    assert refused.value.status == "invalid_token"
    assert isinstance(refused.value, AuthFailed)
    challenge_answer = fake.lines[-2] if fake.lines[-1].endswith(b"LOGOUT") else fake.lines[-1]
    assert challenge_answer == dummy


async def test_a_plain_no_without_challenge_is_token_rejected(nursery: trio.Nursery) -> None:
    async def refuse(fake: TokenImap, w: Wire, tag: bytes, line: bytes) -> None:
        await w.send(tag + b" NO [AUTHENTICATIONFAILED] no\r\n")

    backend = await start(nursery, TokenImap(auth=refuse))
    with pytest.raises(TokenRejected) as refused:
        await listed(backend, TokenLogin("alice", TOKEN))
    assert refused.value.status is None


async def test_an_unavailable_upstream_is_temp_failure_not_a_rejected_token(nursery: trio.Nursery) -> None:
    async def unavailable(fake: TokenImap, w: Wire, tag: bytes, line: bytes) -> None:
        await w.send(tag + b" NO [UNAVAILABLE] auth process down\r\n")

    backend = await start(nursery, TokenImap(auth=unavailable))
    with pytest.raises(TempFailure, match="UNAVAILABLE"):
        await listed(backend, TokenLogin("alice", TOKEN))


async def test_a_malformed_challenge_is_cancelled_and_plain_auth_failed(nursery: trio.Nursery) -> None:
    fake = TokenImap(auth=challenging(b"not-json!", then=b"BAD cancelled"))
    backend = await start(nursery, fake)
    with pytest.raises(AuthFailed, match="malformed") as refused:
        await listed(backend, TokenLogin("alice", TOKEN))
    assert not isinstance(refused.value, TokenRejected)
    assert b"*" in fake.lines


async def test_a_challenge_over_the_cap_is_cancelled(nursery: trio.Nursery) -> None:
    big = base64.b64encode(b'{"status":"invalid_token","scope":"' + b"x" * 20_000 + b'"}')
    assert sasl.MAX_CHALLENGE_BYTES < len(big) < 64 * 1024
    fake = TokenImap(auth=challenging(big, then=b"BAD cancelled"))
    backend = await start(nursery, fake)
    with pytest.raises(AuthFailed, match="malformed"):
        await listed(backend, TokenLogin("alice", TOKEN))
    assert b"*" in fake.lines


@pytest.mark.parametrize("where", ["initial", "error"])
async def test_a_continuation_over_the_line_cap_is_temp_failure(nursery: trio.Nursery, where: str) -> None:
    huge = b"A" * (200 * 1024)

    async def flood(fake: TokenImap, w: Wire, tag: bytes, line: bytes) -> None:
        if where == "error":
            fake.payloads.append(await payload_of(fake, w, line))
        await w.send(b"+ " + huge + b"\r\n")
        await fake.line(w)

    caps = OB if where == "error" else b"IMAP4rev1 AUTH=OAUTHBEARER"
    backend = await start(nursery, TokenImap(caps=caps, auth=flood))
    with pytest.raises(TempFailure, match="upstream failure"):
        await listed(backend, TokenLogin("alice", TOKEN))


async def test_a_server_that_keeps_challenging_breaks_the_connection(nursery: trio.Nursery) -> None:
    async def again(fake: TokenImap, w: Wire, tag: bytes, line: bytes) -> None:
        fake.payloads.append(await payload_of(fake, w, line))
        for _ in range(5):
            await w.send(b"+ " + invalid_token_challenge() + b"\r\n")
            await fake.line(w)

    backend = await start(nursery, TokenImap(auth=again))
    with pytest.raises(TempFailure, match="second AUTHENTICATE challenge"):
        await listed(backend, TokenLogin("alice", TOKEN))


@pytest.mark.parametrize(
    "login",
    [
        TokenLogin("alice", "t" * 9000),  # over MAX_TOKEN_OCTETS
        TokenLogin("alice", "not a b64token"),  # a space would end the auth field
        TokenLogin("al\x01ice", TOKEN),  # ^A would end the user field
    ],
)
async def test_a_token_login_that_cannot_be_sent_is_auth_failed(
    nursery: trio.Nursery, login: TokenLogin
) -> None:
    fake = TokenImap()
    backend = await start(nursery, fake)
    with pytest.raises(AuthFailed) as failed:
        await listed(backend, login)
    assert not isinstance(failed.value, TokenRejected)
    assert not any(b"AUTHENTICATE" in line for line in fake.lines)
    assert login.token not in str(failed.value)


async def test_no_token_in_logs_exceptions_or_reprs(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    fake = TokenImap()
    backend = await start(nursery, fake)
    bad = "bad-" + TOKEN
    with pytest.raises(TokenRejected) as refused:
        await listed(backend, TokenLogin("alice", bad))
    await listed(backend, TokenLogin("alice", TOKEN))
    secrets = [TOKEN, bad] + [base64.b64encode(p).decode() for p in fake.payloads]
    shown = [caplog.text, str(refused.value), repr(refused.value), repr(TokenLogin("alice", TOKEN))]
    for text in shown:
        for secret in secrets:
            assert secret not in text
    assert repr(TokenLogin("alice", TOKEN)) == "TokenLogin(username='alice', mechanism='auto')"


# -- the visibility window's search (the real-server side is in tests/test_imap_oauth2.py)


def test_imap_date_is_rfc_3501_in_english() -> None:
    assert imap_date(datetime.date(2024, 2, 1)) == "1-Feb-2024"
    assert imap_date(datetime.date(1999, 12, 31)) == "31-Dec-1999"


async def test_newest_alone_fetches_the_last_n_by_number_without_a_search(nursery: trio.Nursery) -> None:
    fake = TokenImap(exists=10)
    backend = await start(nursery, fake, newest=3)
    assert await listed(backend, TokenLogin("alice", TOKEN)) == ["8", "9", "10"]
    assert not fake.searches
    assert any(re.fullmatch(rb"A\d{4} FETCH 8:\* \(UID RFC822\.SIZE\)", line) for line in fake.lines)


async def test_since_searches_in_bounded_ranges_newest_first(nursery: trio.Nursery) -> None:
    fake = TokenImap(exists=9000)
    # the messages numbered 4001 .. 9000 are the ones on or after the date

    def answer(rest: bytes) -> list[int]:
        low, high = map(int, rest.split(b" ")[2].split(b":"))
        return [n for n in range(low, high + 1) if n > 4000]

    fake.search_answer = answer
    backend = await start(nursery, fake, since=datetime.date(2024, 2, 1))
    ids = await listed(backend, TokenLogin("alice", TOKEN))
    assert ids == [str(n) for n in range(4001, 9001)]
    assert fake.searches == [
        b"UID SEARCH 5001:9000 SINCE 1-Feb-2024",
        b"UID SEARCH 1001:5000 SINCE 1-Feb-2024",
        b"UID SEARCH 1:1000 SINCE 1-Feb-2024",
    ]
    assert any(line.endswith(b"UID FETCH 4001:* (UID RFC822.SIZE)") for line in fake.lines)


async def test_newest_with_since_stops_searching_once_it_has_n(nursery: trio.Nursery) -> None:
    fake = TokenImap(exists=9000)
    fake.search_answer = lambda rest: [8990, 8995, 9000] if b"5001:9000" in rest else [1, 2]
    backend = await start(nursery, fake, since=datetime.date(2024, 2, 1), newest=2)
    assert await listed(backend, TokenLogin("alice", TOKEN)) == ["8995", "9000"]
    assert len(fake.searches) == 1


async def test_a_window_with_a_flag_policy_searches_not_keyword(nursery: trio.Nursery) -> None:
    fake = TokenImap(exists=5)
    fake.search_answer = lambda rest: [2, 4]
    backend = await start(nursery, fake, newest=5, delete_policy="flag:$Popped")
    assert await listed(backend, TokenLogin("alice", TOKEN)) == ["2", "4"]  # rows 1, 3, 5 are not wanted
    assert fake.searches == [b"UID SEARCH 1:5 NOT KEYWORD $Popped"]


def test_newest_must_be_positive() -> None:
    with pytest.raises(ValueError, match="newest"):
        ImapSettings("h", 143, "none", newest=0)
