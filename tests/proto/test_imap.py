"""The sans-IO IMAP client core: server bytes in, events out; commands in, bytes out. No sockets."""

from __future__ import annotations

import base64
import contextlib
import itertools
import re
from collections.abc import Callable, Iterable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.proto import imap
from gateway.proto.imap import (
    NEED_DATA,
    Atom,
    Capability,
    Client,
    Condition,
    ConnectionClosed,
    Continuation,
    Exists,
    Fetch,
    FetchBodyChunk,
    FetchBodyEnd,
    FetchBodyStart,
    ImapProtocolError,
    LocalProtocolError,
    NeedData,
    Raw,
    ResponseCode,
    ResponseParser,
    Search,
    State,
    Streamed,
    Tagged,
    Untagged,
    UntaggedStatus,
)

# --------------------------------------------------------------------------------------------------
# helpers


def drain(conn: ResponseParser | Client) -> list[imap.Event]:
    out: list[imap.Event] = []
    while not isinstance(event := conn.next_event(), NeedData):
        out.append(event)
    return out


def parse(data: bytes, **caps: int) -> list[imap.Event]:
    parser = ResponseParser(**caps)
    parser.receive_data(data)
    return drain(parser)


def parse_one(data: bytes) -> imap.Event:
    (event,) = parse(data)
    return event


def merged(events: Iterable[imap.Event]) -> list[imap.Event]:
    """Consecutive body chunks joined: the events as they would be had the body come in one read."""
    out: list[imap.Event] = []
    for event in events:
        if isinstance(event, FetchBodyChunk) and out and isinstance(out[-1], FetchBodyChunk):
            out[-1] = FetchBodyChunk(out[-1].data + event.data)
        else:
            out.append(event)
    return out


def feed_in_pieces(data: bytes, cuts: Iterable[int], **caps: int) -> tuple[list[imap.Event], bool]:
    """Feed ``data`` cut at ``cuts``, draining after each piece; (events, whether it raised)."""
    parser = ResponseParser(**caps)
    events: list[imap.Event] = []
    start = 0
    try:
        for end in [*sorted(cuts), len(data)]:
            if end > start:  # b"" would mean the end of the stream
                parser.receive_data(data[start:end])
                start = end
                while not isinstance(event := parser.next_event(), NeedData):
                    events.append(event)  # kept even when a later one raises
    except ImapProtocolError:
        return events, True
    return events, False


def greeted(capabilities: str = "IMAP4rev1") -> Client:
    client = Client()
    client.receive_data(b"* OK [CAPABILITY %b] ready\r\n" % capabilities.encode())
    (greeting,) = drain(client)
    assert isinstance(greeting, UntaggedStatus)
    return client


def reply(client: Client, data: bytes) -> list[imap.Event]:
    client.receive_data(data)
    return drain(client)


def logged_in(capabilities: str = "IMAP4rev1") -> Client:
    client = greeted(capabilities)
    tag, _ = client.send_command("LOGIN", "alice", "secret")
    reply(client, b"%b OK Logged in\r\n" % tag.encode())
    assert client.state is State.AUTHENTICATED
    return client


def selected() -> Client:
    client = logged_in()
    tag, _ = client.send_command("SELECT", "INBOX")
    reply(client, b"* 1 EXISTS\r\n%b OK [READ-WRITE] Select completed.\r\n" % tag.encode())
    assert client.state is State.SELECTED
    return client


def a(*values: str) -> tuple[Atom, ...]:
    return tuple(Atom(v) for v in values)


# --------------------------------------------------------------------------------------------------
# A Dovecot 2.3 session, as recorded on the wire

CAPS_BEFORE = b"IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ STARTTLS AUTH=PLAIN AUTH=LOGIN"
CAPS_AFTER = (
    b"IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE SORT SORT=DISPLAY THREAD=REFERENCES THREAD=REFS "
    b"THREAD=ORDEREDSUBJECT MULTIAPPEND URL-PARTIAL CATENATE UNSELECT CHILDREN NAMESPACE UIDPLUS "
    b"LIST-EXTENDED I18NLEVEL=1 CONDSTORE QRESYNC ESEARCH ESORT SEARCHRES WITHIN CONTEXT=SEARCH "
    b"LIST-STATUS BINARY MOVE SNIPPET=FUZZY PREVIEW=FUZZY PREVIEW STATUS=SIZE SAVEDATE LITERAL+ NOTIFY "
    b"SPECIAL-USE"
)
N_MESSAGES = 200
# Everything that could fool a parser that searches inside literals.
BODY = (
    b"From: Bob <bob@example.org>\r\nSubject: a ) b {3}\r\n\r\n"
    b"* 1 FETCH (UID 1 BODY[] {2}\r\nhi)\r\nA0004 OK Fetch completed.\r\n)\r\n{3}\r\n\r\n"
)
GREETING = b"* OK [CAPABILITY " + CAPS_BEFORE + b"] Dovecot (Debian) ready.\r\n"
LOGIN_REPLY = b"A0001 OK [CAPABILITY " + CAPS_AFTER + b"] Logged in\r\n"
SELECT_REPLY = (
    b"* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft)\r\n"
    b"* OK [PERMANENTFLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft \\*)] Flags permitted.\r\n"
    b"* %d EXISTS\r\n"
    b"* 0 RECENT\r\n"
    b"* OK [UIDVALIDITY 1700000000] UIDs valid\r\n"
    b"* OK [UIDNEXT 401] Predicted next UID\r\n"
    b"* OK [HIGHESTMODSEQ 7] Highest\r\n"
    b"A0002 OK [READ-WRITE] Select completed (0.001 + 0.000 secs).\r\n" % N_MESSAGES
)
SIZES_REPLY = (
    b"".join(
        b"* %d FETCH (UID %d RFC822.SIZE %d)\r\n" % (i, 2 * i, 1000 + i) for i in range(1, N_MESSAGES + 1)
    )
    + b"A0003 OK Fetch completed (0.002 + 0.000 + 0.001 secs).\r\n"
)
BODY_REPLY = (
    b"* 3 FETCH (UID 6 BODY[] {%d}\r\n" % len(BODY)
    + BODY
    + b")\r\nA0004 OK Fetch completed (0.001 + 0.000 secs).\r\n"
)
STORE_REPLY = b"A0005 OK Store completed (0.001 + 0.000 secs).\r\n"
EXPUNGE_REPLY = b"* 3 EXPUNGE\r\nA0006 OK Expunge completed (0.001 + 0.000 + 0.000 secs).\r\n"
LOGOUT_REPLY = b"* BYE Logging out\r\nA0007 OK Logout completed (0.001 + 0.000 secs).\r\n"
TRANSCRIPT = (
    GREETING
    + LOGIN_REPLY
    + SELECT_REPLY
    + SIZES_REPLY
    + BODY_REPLY
    + STORE_REPLY
    + EXPUNGE_REPLY
    + LOGOUT_REPLY
)


def ok(tag: str, code: ResponseCode | None, text: str) -> Tagged:
    return Tagged(tag, Condition.OK, code, text)


GREETING_EVENTS: list[imap.Event] = [
    UntaggedStatus(Condition.OK, ResponseCode("CAPABILITY", CAPS_BEFORE), "Dovecot (Debian) ready.")
]
LOGIN_EVENTS: list[imap.Event] = [ok("A0001", ResponseCode("CAPABILITY", CAPS_AFTER), "Logged in")]
SELECT_EVENTS: list[imap.Event] = [
    Untagged(
        "FLAGS",
        None,
        ((Atom("\\Answered"), Atom("\\Flagged"), Atom("\\Deleted"), Atom("\\Seen"), Atom("\\Draft")),),
    ),
    UntaggedStatus(
        Condition.OK,
        ResponseCode("PERMANENTFLAGS", b"(\\Answered \\Flagged \\Deleted \\Seen \\Draft \\*)"),
        "Flags permitted.",
    ),
    Exists(N_MESSAGES),
    Untagged("RECENT", 0, ()),
    UntaggedStatus(Condition.OK, ResponseCode("UIDVALIDITY", b"1700000000"), "UIDs valid"),
    UntaggedStatus(Condition.OK, ResponseCode("UIDNEXT", b"401"), "Predicted next UID"),
    UntaggedStatus(Condition.OK, ResponseCode("HIGHESTMODSEQ", b"7"), "Highest"),
    ok("A0002", ResponseCode("READ-WRITE"), "Select completed (0.001 + 0.000 secs)."),
]
SIZES_EVENTS: list[imap.Event] = [
    *(Fetch(i, {"UID": 2 * i, "RFC822.SIZE": 1000 + i}) for i in range(1, N_MESSAGES + 1)),
    ok("A0003", None, "Fetch completed (0.002 + 0.000 + 0.001 secs)."),
]
BODY_EVENTS: list[imap.Event] = [
    FetchBodyStart(3, "BODY[]", len(BODY)),
    FetchBodyChunk(BODY),
    FetchBodyEnd(),
    Fetch(3, {"UID": 6, "BODY[]": Streamed(len(BODY))}),
    ok("A0004", None, "Fetch completed (0.001 + 0.000 secs)."),
]
STORE_EVENTS: list[imap.Event] = [ok("A0005", None, "Store completed (0.001 + 0.000 secs).")]
EXPUNGE_EVENTS: list[imap.Event] = [
    Untagged("EXPUNGE", 3, ()),
    ok("A0006", None, "Expunge completed (0.001 + 0.000 + 0.000 secs)."),
]
LOGOUT_EVENTS: list[imap.Event] = [
    UntaggedStatus(Condition.BYE, None, "Logging out"),
    ok("A0007", None, "Logout completed (0.001 + 0.000 secs)."),
]
TRANSCRIPT_EVENTS = (
    GREETING_EVENTS
    + LOGIN_EVENTS
    + SELECT_EVENTS
    + SIZES_EVENTS
    + BODY_EVENTS
    + STORE_EVENTS
    + EXPUNGE_EVENTS
    + LOGOUT_EVENTS
)


def test_transcript_fed_whole() -> None:
    assert parse(TRANSCRIPT) == TRANSCRIPT_EVENTS


def test_transcript_fed_one_byte_at_a_time() -> None:
    parser = ResponseParser()
    events: list[imap.Event] = []
    for i in range(len(TRANSCRIPT)):
        parser.receive_data(TRANSCRIPT[i : i + 1])
        events += drain(parser)
    chunks = [e for e in events if isinstance(e, FetchBodyChunk)]
    assert len(chunks) == len(BODY)  # never more than what one read brought
    assert merged(events) == TRANSCRIPT_EVENTS


@pytest.mark.parametrize("trailing", [b"* 4 FET", b"A0008 OK [UIDN", b"* 9 FETCH (BODY[] {10}\r\n"])
def test_transcript_with_trailing_data_keeps_the_rest_buffered(trailing: bytes) -> None:
    parser = ResponseParser()
    parser.receive_data(TRANSCRIPT + trailing)
    events = drain(parser)
    if trailing.endswith(b"}\r\n"):  # a body may start streaming before its bytes arrive
        assert events[-1] == FetchBodyStart(9, "BODY[]", 10)
        events.pop()
    assert events == TRANSCRIPT_EVENTS
    assert parser.next_event() is NEED_DATA


def test_transcript_then_close() -> None:
    parser = ResponseParser()
    parser.receive_data(TRANSCRIPT)
    parser.receive_data(b"")
    assert drain_until_closed(parser) == [*TRANSCRIPT_EVENTS, ConnectionClosed()]
    assert parser.next_event() == ConnectionClosed()  # and it stays closed


def drain_until_closed(parser: ResponseParser) -> list[imap.Event]:
    out: list[imap.Event] = []
    while not isinstance(event := parser.next_event(), ConnectionClosed):
        assert not isinstance(event, NeedData)
        out.append(event)
    return [*out, event]


SESSION: list[tuple[str, tuple[imap.Arg, ...], bytes, list[imap.Event]]] = [
    ("LOGIN", ("alice", 's3cr"et\\'), b'A0001 LOGIN "alice" "s3cr\\"et\\\\"\r\n', LOGIN_EVENTS),
    ("SELECT", ("INBOX",), b'A0002 SELECT "INBOX"\r\n', SELECT_EVENTS),
    (
        "UID FETCH",
        (Atom("1:*"), Raw("(UID RFC822.SIZE)")),
        b"A0003 UID FETCH 1:* (UID RFC822.SIZE)\r\n",
        SIZES_EVENTS,
    ),
    ("UID FETCH", (Atom("6"), Raw("(BODY.PEEK[])")), b"A0004 UID FETCH 6 (BODY.PEEK[])\r\n", BODY_EVENTS),
    (
        "UID STORE",
        (Atom("6"), Atom("+FLAGS.SILENT"), Raw("(\\Deleted)")),
        b"A0005 UID STORE 6 +FLAGS.SILENT (\\Deleted)\r\n",
        STORE_EVENTS,
    ),
    ("UID EXPUNGE", (imap.sequence_set([6]),), b"A0006 UID EXPUNGE 6\r\n", EXPUNGE_EVENTS),
    ("LOGOUT", (), b"A0007 LOGOUT\r\n", LOGOUT_EVENTS),
]


@pytest.mark.parametrize("read_size", [len(TRANSCRIPT), 1, 7, 4096])
def test_client_session_in_lockstep(read_size: int) -> None:
    """The client reads until each command's tagged reply; the rest of the stream waits unparsed."""
    client = Client()
    stream = TRANSCRIPT
    offset = 0

    def until(done: Callable[[imap.Event], bool]) -> list[imap.Event]:
        nonlocal offset
        events: list[imap.Event] = []
        while True:
            event = client.next_event()
            if isinstance(event, NeedData):
                assert offset < len(stream)
                client.receive_data(stream[offset : offset + read_size])
                offset += read_size
                continue
            events.append(event)
            if done(event):
                return merged(events)

    assert until(lambda e: True) == GREETING_EVENTS
    assert client.state is State.NOT_AUTHENTICATED
    assert "LITERAL+" in client.capabilities
    assert "SORT" not in client.capabilities
    for name, args, wire, expected in SESSION:
        tag, data = client.send_command(name, *args)
        assert data == wire
        assert not client.awaiting_continuation
        assert until(lambda e, tag=tag: isinstance(e, Tagged) and e.tag == tag) == expected
        if name == "LOGIN":
            assert client.state is State.AUTHENTICATED
            assert "SORT" in client.capabilities
        if name == "SELECT":
            assert client.state is State.SELECTED
            codes = {e.code.name: e.code for e in expected if isinstance(e, UntaggedStatus) and e.code}
            assert codes["UIDVALIDITY"].int_value() == 1700000000
            assert codes["UIDNEXT"].int_value() == 401
            assert codes["PERMANENTFLAGS"].values() == (
                a("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft", "\\*"),
            )
    assert client.state is State.LOGOUT
    assert offset >= len(stream)
    client.receive_data(b"")
    assert client.next_event() == ConnectionClosed()


# --------------------------------------------------------------------------------------------------
# Response shapes


def test_tagged_replies() -> None:
    assert parse_one(b"a1 no [AUTHENTICATIONFAILED] Authentication failed.\r\n") == Tagged(
        "a1", Condition.NO, ResponseCode("AUTHENTICATIONFAILED"), "Authentication failed."
    )
    assert parse_one(b"A2 BAD Error in IMAP command\r\n") == Tagged(
        "A2", Condition.BAD, None, "Error in IMAP command"
    )
    assert parse_one(b"A3 OK\r\n") == Tagged("A3", Condition.OK, None, "")
    assert parse_one(b"A4 OK [ALERT]\r\n") == Tagged("A4", Condition.OK, ResponseCode("ALERT"), "")
    assert parse_one(b"A5 OK [ALERT]no space\n") == Tagged(
        "A5", Condition.OK, ResponseCode("ALERT"), "no space"
    )


def test_untagged_conditions() -> None:
    assert parse_one(b"* PREAUTH [CAPABILITY IMAP4rev2] hi\r\n") == UntaggedStatus(
        Condition.PREAUTH, ResponseCode("CAPABILITY", b"IMAP4rev2"), "hi"
    )
    assert parse_one(b"* BYE [UNAVAILABLE] Server shutting down\r\n") == UntaggedStatus(
        Condition.BYE, ResponseCode("UNAVAILABLE"), "Server shutting down"
    )
    assert parse_one(b"* NO [OVERQUOTA] Quota exceeded\r\n") == UntaggedStatus(
        Condition.NO, ResponseCode("OVERQUOTA"), "Quota exceeded"
    )
    assert parse_one(b"* BAD\r\n") == UntaggedStatus(Condition.BAD, None, "")


def test_status_text_is_text_even_when_it_ends_like_a_literal() -> None:
    assert parse(b"A1 OK done {5}\r\n* 1 EXISTS\r\n") == [
        Tagged("A1", Condition.OK, None, "done {5}"),
        Exists(1),
    ]


def test_text_that_is_not_a_response_code_stays_text() -> None:
    assert parse_one(b"* OK [ not a code\r\n") == UntaggedStatus(Condition.OK, None, "[ not a code")
    assert parse_one(b"* OK [] empty\r\n") == UntaggedStatus(Condition.OK, None, "[] empty")
    assert parse_one(b"* OK caf\xc3\xa9 \xff\r\n") == UntaggedStatus(Condition.OK, None, "café \ufffd")


def test_response_codes() -> None:
    appenduid = parse_one(b"A1 OK [APPENDUID 38505 3955] APPEND completed\r\n")
    assert isinstance(appenduid, Tagged) and appenduid.code is not None
    assert appenduid.code.values() == (38505, 3955)
    copyuid = parse_one(b"A2 OK [COPYUID 38505 304,319:320 3956:3958] Done\r\n")
    assert isinstance(copyuid, Tagged) and copyuid.code is not None
    assert copyuid.code.name == "COPYUID"
    assert copyuid.code.values() == (38505, Atom("304,319:320"), Atom("3956:3958"))
    assert imap.parse_sequence_set(str(copyuid.code.values()[1])) == ((304, 304), (319, 320))
    lower = parse_one(b"* OK [uidvalidity 3857529045] UIDs valid\r\n")
    assert isinstance(lower, UntaggedStatus) and lower.code is not None
    assert lower.code.name == "UIDVALIDITY"
    assert lower.code.int_value() == 3857529045


@pytest.mark.parametrize("raw", [b"", b"abc", b"-1", b"007", b"1 2"])
def test_response_code_int_value_refuses_what_is_not_a_number(raw: bytes) -> None:
    with pytest.raises(ImapProtocolError):
        ResponseCode("UIDNEXT", raw).int_value()


def test_response_code_values_refuse_literals_and_garbage() -> None:
    with pytest.raises(ImapProtocolError):
        ResponseCode("X", b"{5}").values()
    with pytest.raises(ImapProtocolError):
        ResponseCode("X", b"(unbalanced").values()


def test_continuation() -> None:
    assert parse_one(b"+ Ready for literal data\r\n") == Continuation(b"Ready for literal data")
    assert parse_one(b"+\r\n") == Continuation(b"")
    assert parse_one(b"+ \r\n") == Continuation(b"")
    assert parse_one(b"+ YmFzZTY0\r\n") == Continuation(b"YmFzZTY0")


def test_capability() -> None:
    assert parse_one(b"* CAPABILITY IMAP4rev1 auth=plain LITERAL- 2\r\n") == Capability(
        frozenset({"IMAP4REV1", "AUTH=PLAIN", "LITERAL-", "2"})
    )


def test_numbered_responses() -> None:
    assert parse(b"* 0 EXISTS\r\n* 2 RECENT\r\n* 44 EXPUNGE\r\n") == [
        Exists(0),
        Untagged("RECENT", 2, ()),
        Untagged("EXPUNGE", 44, ()),
    ]


def test_responses_the_gateway_does_not_read_parse_as_values() -> None:
    """LIST, STATUS, FLAGS, ENABLED, ESEARCH, ID, VANISHED: framed and parsed, typed by nobody."""
    assert parse(
        b'* LIST (\\HasNoChildren) "." INBOX\r\n'
        b"* LIST (\\Noselect \\HasChildren) NIL {9}\r\nf\xc3\xbc)\r\n{2}\r\n"
        b'* STATUS "blurdy bloop" (MESSAGES 231 uidnext 44292 APPENDLIMIT NIL)\r\n'
        b"* FLAGS (\\Seen $Forwarded)\r\n* ENABLED CONDSTORE\r\n"
        b'* ESEARCH (TAG "A282") UID MIN 2 ALL 2,10:11\r\n* ID NIL\r\n* VANISHED (EARLIER) 41,43:116\r\n'
    ) == [
        Untagged("LIST", None, ((Atom("\\HasNoChildren"),), b".", Atom("INBOX"))),
        Untagged("LIST", None, ((Atom("\\Noselect"), Atom("\\HasChildren")), None, b"f\xc3\xbc)\r\n{2}")),
        Untagged(
            "STATUS",
            None,
            (b"blurdy bloop", (Atom("MESSAGES"), 231, Atom("uidnext"), 44292, Atom("APPENDLIMIT"), None)),
        ),
        Untagged("FLAGS", None, ((Atom("\\Seen"), Atom("$Forwarded")),)),
        Untagged("ENABLED", None, (Atom("CONDSTORE"),)),
        Untagged(
            "ESEARCH",
            None,
            ((Atom("TAG"), b"A282"), Atom("UID"), Atom("MIN"), 2, Atom("ALL"), Atom("2,10:11")),
        ),
        Untagged("ID", None, (None,)),
        Untagged("VANISHED", None, ((Atom("EARLIER"),), Atom("41,43:116"))),
    ]


def test_search() -> None:
    assert parse_one(b"* SEARCH\r\n") == Search((), None)
    assert parse_one(b"* SEARCH 2 84 882\r\n") == Search((2, 84, 882), None)
    assert parse_one(b"* SEARCH 2 5 (MODSEQ 917162500)\r\n") == Search((2, 5), 917162500)


def test_unknown_responses_parse_generically() -> None:
    assert parse(
        b'* NAMESPACE (("" "/")) NIL NIL\r\n* 3 XFOO bar\r\n* EXISTS\r\n* QUOTA "" (STORAGE 10 512)\r\n'
    ) == [
        Untagged("NAMESPACE", None, (((b"", b"/"),), None, None)),
        Untagged("XFOO", 3, (Atom("bar"),)),
        Untagged("EXISTS", None, ()),
        Untagged("QUOTA", None, (b"", (Atom("STORAGE"), 10, 512))),
    ]


def test_values() -> None:
    (event,) = parse(
        b'* X 0 7 007 12345678901234567890 123456789012345678901 nil "" "a\\\\b\\"c" ~{2}\r\n\x00\x01'
        b" {1+}\r\n) ((1 (2)) ()) \\Seen ~/Mail 1:* %\r\n"
    )
    assert event == Untagged(
        "X",
        None,
        (
            0,
            7,
            Atom("007"),
            12345678901234567890,
            Atom("123456789012345678901"),
            None,
            b"",
            b'a\\b"c',
            b"\x00\x01",
            b")",
            ((1, (2,)), ()),
            Atom("\\Seen"),
            Atom("~/Mail"),
            Atom("1:*"),
            Atom("%"),
        ),
    )


def test_bare_lf_and_repeated_spaces_are_tolerated() -> None:
    assert parse(b"* 1 FETCH ( UID  4 )\n* 2 EXISTS\n") == [Fetch(1, {"UID": 4}), Exists(2)]


# --------------------------------------------------------------------------------------------------
# FETCH and body streaming


def test_fetch_items_and_accessors() -> None:
    event = parse_one(
        b'* 12 FETCH (FLAGS (\\Seen 1) UID 42 rfc822.size 4423 INTERNALDATE "17-Jul-1996 02:44:25 -0700"'
        b" EMAILID (M6d99ac3275bb4e) X-GM-MSGID 1278455344230334865 MODSEQ (12121231000))\r\n"
    )
    assert event == Fetch(
        12,
        {
            "FLAGS": (Atom("\\Seen"), 1),
            "UID": 42,
            "RFC822.SIZE": 4423,
            "INTERNALDATE": b"17-Jul-1996 02:44:25 -0700",
            "EMAILID": (Atom("M6d99ac3275bb4e"),),
            "X-GM-MSGID": 1278455344230334865,
            "MODSEQ": (12121231000,),
        },
    )
    assert isinstance(event, Fetch)
    assert (event.uid, event.rfc822_size, event.flags) == (42, 4423, ("\\Seen", "1"))
    empty = Fetch(1, {})
    assert (empty.uid, empty.rfc822_size, empty.flags) == (None, None, None)


def test_body_before_and_after_uid() -> None:
    assert parse(
        b"* 1 FETCH (BODY[] {3}\r\nabc UID 7)\r\n* 2 FETCH (UID 8 BODY[TEXT]<0> {2}\r\nde FLAGS ())\r\n"
    ) == [
        FetchBodyStart(1, "BODY[]", 3),
        FetchBodyChunk(b"abc"),
        FetchBodyEnd(),
        Fetch(1, {"BODY[]": Streamed(3), "UID": 7}),
        FetchBodyStart(2, "BODY[TEXT]<0>", 2),
        FetchBodyChunk(b"de"),
        FetchBodyEnd(),
        Fetch(2, {"UID": 8, "BODY[TEXT]<0>": Streamed(2), "FLAGS": ()}),
    ]


@pytest.mark.parametrize(
    "item",
    [
        b"BODY[HEADER.FIELDS (FROM TO)]",
        b"BODY.PEEK[]",
        b"BINARY[1]",
        b"BINARY.PEEK[]<0>",
        b"RFC822",
        b"rfc822.text",
        b"RFC822.HEADER",
    ],
)
def test_every_body_item_streams(item: bytes) -> None:
    events = parse(b"* 5 FETCH (%b {4}\r\nwxyz)\r\n" % item)
    assert events == [
        FetchBodyStart(5, item.decode().upper(), 4),
        FetchBodyChunk(b"wxyz"),
        FetchBodyEnd(),
        Fetch(5, {item.decode().upper(): Streamed(4)}),
    ]


def test_binary_literal_body_may_hold_nul() -> None:
    assert parse(b"* 1 FETCH (BINARY[] ~{3}\r\n\x00\r\n UID 2)\r\n") == [
        FetchBodyStart(1, "BINARY[]", 3),
        FetchBodyChunk(b"\x00\r\n"),
        FetchBodyEnd(),
        Fetch(1, {"BINARY[]": Streamed(3), "UID": 2}),
    ]


def test_quoted_empty_and_nil_bodies() -> None:
    """Quoted bodies stream like literals (one chunk, none when empty); NIL bodies do not stream."""
    assert parse(b'* 1 FETCH (BODY[HEADER] "a\\"b" BODY[TEXT] "" BODY[1] NIL BODY[2] {0}\r\n)\r\n') == [
        FetchBodyStart(1, "BODY[HEADER]", 3),
        FetchBodyChunk(b'a"b'),
        FetchBodyEnd(),
        FetchBodyStart(1, "BODY[TEXT]", 0),
        FetchBodyEnd(),
        FetchBodyStart(1, "BODY[2]", 0),
        FetchBodyEnd(),
        Fetch(
            1,
            {"BODY[HEADER]": Streamed(3), "BODY[TEXT]": Streamed(0), "BODY[1]": None, "BODY[2]": Streamed(0)},
        ),
    ]


def test_literals_that_are_not_bodies_are_values() -> None:
    assert parse(
        b'* 1 FETCH (X-HEADER {3}\r\nabc ENVELOPE ({2}\r\nxy NIL) BODYSTRUCTURE ("TEXT" {5}\r\nPLAIN))\r\n'
    ) == [
        Fetch(1, {"X-HEADER": b"abc", "ENVELOPE": (b"xy", None), "BODYSTRUCTURE": (b"TEXT", b"PLAIN")}),
    ]


def test_literal_in_the_key_position_is_not_streamed() -> None:
    with pytest.raises(ImapProtocolError):
        parse(b"* 1 FETCH ({6}\r\nBODY[] {1}\r\nx)\r\n")
    with pytest.raises(ImapProtocolError):
        parse(b"* 1 FETCH (7 {1}\r\nx)\r\n")
    with pytest.raises(ImapProtocolError):  # the second list after FETCH is not the attributes
        parse(b"* 1 FETCH () (BODY[] {1}\r\nx)\r\n")


def test_a_large_body_streams_in_bounded_chunks_past_the_literal_cap() -> None:
    body = bytes(range(256)) * 20_000  # 5 MB
    parser = ResponseParser(max_literal_size=1024, max_line_length=256)
    parser.receive_data(b"* 1 FETCH (UID 9 BODY[] {%d}\r\n" % len(body))
    assert drain(parser) == [FetchBodyStart(1, "BODY[]", len(body))]
    received = bytearray()
    data = body + b")\r\n"
    for i in range(0, len(data), 65536):
        parser.receive_data(data[i : i + 65536])
        for event in drain(parser):
            if isinstance(event, FetchBodyChunk):
                assert len(event.data) <= 65536
                received += event.data
            else:
                assert event in (FetchBodyEnd(), Fetch(1, {"UID": 9, "BODY[]": Streamed(len(body))}))
        assert parser.buffered < 65536
    assert received == body


# --------------------------------------------------------------------------------------------------
# Malformed responses and caps


@pytest.mark.parametrize(
    "data",
    [
        b"\r\n",
        b"\n",
        b"garbage\r\n",
        b"A1 MAYBE fine\r\n",
        b"A1 OKAY\r\n",
        b"*\r\n",
        b"* \r\n",
        b"*  OK hi\r\n",
        b"* 12\r\n",
        b"* 007 EXISTS\r\n",
        b"* OK[ALERT] x\r\n",
        b"* 1 EXISTS 2\r\n",
        b"* X (a\r\n",
        b"* X a)\r\n",
        b'* X "unterminated\r\n',
        b'* X "bad \\n escape"\r\n',
        b'* X "cr \r inside"\r\n',
        b"* X {3}x\r\n",
        b"* X {3} a\r\n",
        b"* X {abc}\r\n",
        b"* X \xff\r\n",
        b"* X [\r\n",
        b"* X a\x00b\r\n",
        b"* 1 FETCH\r\n",
        b"* 1 FETCH UID 5\r\n",
        b"* 1 FETCH (UID)\r\n",
        b"* 1 FETCH (UID 5) ()\r\n",
        b'* 1 FETCH ("UID" 5)\r\n',
        b'* 1 FETCH (UID "5")\r\n',
        b"* 1 FETCH (UID 0)\r\n",
        b"* 1 FETCH (UID 4294967296 RFC822.SIZE 1 FLAGS ())\r\n",
        b"* 1 FETCH (RFC822.SIZE NIL)\r\n",
        b"* 1 FETCH (FLAGS \\Seen)\r\n",
        b'* 1 FETCH (FLAGS ("Seen"))\r\n',
        b'* CAPABILITY "IMAP4rev1"\r\n',
        b"* SEARCH 1 two\r\n",
        b"* SEARCH 1 (MODSEQ x)\r\n",
        b"* SEARCH 1 (HIGHESTMODSEQ 1)\r\n",
    ],
)
def test_malformed_responses_raise(data: bytes) -> None:
    with pytest.raises(ImapProtocolError):
        parse(data)


def test_after_an_error_the_parser_stays_failed() -> None:
    parser = ResponseParser()
    parser.receive_data(b"* 1 EXISTS\r\nbogus\r\n* 2 EXISTS\r\n")
    assert parser.next_event() == Exists(1)
    with pytest.raises(ImapProtocolError):
        parser.next_event()
    parser.receive_data(b"* 3 EXISTS\r\n")
    with pytest.raises(ImapProtocolError):
        parser.next_event()


def test_events_of_a_failing_response_are_dropped() -> None:
    parser = ResponseParser()
    parser.receive_data(b'* 1 FETCH (BODY[] "abc" UID x y)\r\n')
    with pytest.raises(ImapProtocolError):
        parser.next_event()


def test_line_cap() -> None:
    line = b"* X " + b"a" * 90 + b"\r\n"  # 96 bytes
    assert parse(line, max_line_length=96) == [Untagged("X", None, (Atom("a" * 90),))]
    with pytest.raises(ImapProtocolError, match="too long"):
        parse(line, max_line_length=95)
    with pytest.raises(ImapProtocolError, match="too long"):  # refused before the LF ever comes
        parse(line[:-2] + b"a" * 10, max_line_length=95)


def test_line_cap_counts_every_segment_of_a_response() -> None:
    data = b"* X" + b" {1}\r\na" * 10 + b"\r\n"  # 75 bytes, 65 outside literals
    assert parse(data, max_line_length=65) == [Untagged("X", None, (b"a",) * 10)]
    with pytest.raises(ImapProtocolError, match="too long"):
        parse(data, max_line_length=64)


def test_literal_cap_counts_every_literal_of_a_response() -> None:
    data = b"* X {4}\r\nabcd {6}\r\nefghij\r\n"
    assert parse(data, max_literal_size=10) == [Untagged("X", None, (b"abcd", b"efghij"))]
    with pytest.raises(ImapProtocolError, match="literal too large"):
        parse(data, max_literal_size=9)
    with pytest.raises(ImapProtocolError, match="literal too large"):  # before any byte of it
        parse(b"* X {99999999999999999999}\r\n")


def test_the_caps_reset_between_responses() -> None:
    data = b"* X {4}\r\nabcd\r\n" * 3
    assert len(parse(data, max_literal_size=4, max_line_length=len(data) // 3 - 4)) == 3


def test_depth_cap() -> None:
    assert parse(b"* X (((a)))\r\n", max_depth=3) == [Untagged("X", None, ((((Atom("a"),),),),))]
    with pytest.raises(ImapProtocolError, match="too deep"):
        parse(b"* X ((((a))))\r\n", max_depth=3)


def test_items_cap() -> None:
    assert parse(b"* X (1 2) 3\r\n", max_items=4) == [Untagged("X", None, ((1, 2), 3))]
    with pytest.raises(ImapProtocolError, match="too many"):
        parse(b"* X (1 2) 3 4\r\n", max_items=4)


# --------------------------------------------------------------------------------------------------
# End of stream


def test_close_between_responses() -> None:
    parser = ResponseParser()
    parser.receive_data(b"* 1 EXISTS\r\n")
    parser.receive_data(b"")
    parser.receive_data(b"")  # harmless
    assert drain_until_closed(parser) == [Exists(1), ConnectionClosed()]


@pytest.mark.parametrize(
    "data",
    [
        b"* 1 EXI",
        b"* X {3}\r\nab",
        b"* X {3}\r\nabc",
        b"* 1 FETCH (BODY[] {3}\r\nab",
        b"* 1 FETCH (BODY[] {3}\r\nabc",
    ],
)
def test_close_in_the_middle_of_a_response_is_an_error(data: bytes) -> None:
    parser = ResponseParser()
    parser.receive_data(data)
    parser.receive_data(b"")
    with pytest.raises(ImapProtocolError, match="closed"):
        drain(parser)


def test_data_after_close_is_our_mistake() -> None:
    parser = ResponseParser()
    parser.receive_data(b"")
    with pytest.raises(LocalProtocolError):
        parser.receive_data(b"* 1 EXISTS\r\n")


# --------------------------------------------------------------------------------------------------
# Commands


def login_wire(client: Client, user: str | bytes, password: str | bytes) -> tuple[str, bytes]:
    """Everything the client writes for LOGIN, answering each synchronising literal with '+'."""
    tag, wire = client.send_command("LOGIN", user, password)
    while client.awaiting_continuation:
        client.receive_data(b"+ OK\r\n")
        assert drain(client) == [Continuation(b"OK")]
        wire += client.continue_command()
    return tag, wire


def read_one_command(wire: bytes) -> tuple[list[bytes], bytes]:
    """Read one command as a server does: lines; after a line ending in {n} or {n+}, n octets."""
    lines = []
    pos = 0
    while True:
        eol = wire.index(b"\r\n", pos)
        line = wire[pos:eol]
        assert b"\r" not in line
        assert b"\n" not in line
        lines.append(line)
        pos = eol + 2
        marker = re.search(rb"\{([0-9]+)\+?\}\Z", line)
        if marker is None:
            return lines, wire[pos:]
        pos += int(marker[1])


def as_server_reads(tag: str, wire: bytes) -> list[imap.Event]:
    """Our parser reading the command with its tag replaced by '*': the arguments as values."""
    assert wire.startswith(tag.encode() + b" ")
    return parse(b"* " + wire[len(tag) + 1 :], max_line_length=1 << 20, max_literal_size=1 << 20)


CAPABILITY_SETS = ["IMAP4rev1", "IMAP4rev1 LITERAL+", "IMAP4rev1 LITERAL-"]


@pytest.mark.parametrize("capabilities", CAPABILITY_SETS)
@pytest.mark.parametrize(
    ("user", "password"),
    [
        ("alice", "secret"),
        ("", ""),
        ("NIL", "1"),
        ('a"b', "c\\d"),
        ("user\r\nA0002 LOGOUT", "pass\nword\r"),
        ("{5}", "x {5}\r\n12345"),
        ("jörg", "pässwörd€"),
        ("x" * 2048, "y" * 2048 + "\r\n"),
        (b"\xff\xfe", b"\x80\r\n\x01"),
        ("a) (b", '"'),
    ],
)
def test_login_strings_are_read_back_as_exactly_two_strings(
    capabilities: str, user: str | bytes, password: str | bytes
) -> None:
    check_login_round_trip(capabilities, user, password)


def check_login_round_trip(capabilities: str, user: str | bytes, password: str | bytes) -> None:
    client = greeted(capabilities)
    tag, wire = login_wire(client, user, password)
    lines, rest = read_one_command(wire)
    assert rest == b""
    assert lines[0].startswith(tag.encode() + b" LOGIN ")
    expected = tuple(s.encode() if isinstance(s, str) else s for s in (user, password))
    assert as_server_reads(tag, wire) == [Untagged("LOGIN", None, expected)]


def test_printable_strings_are_quoted_and_others_are_literals() -> None:
    client = greeted()
    assert client.send_command("LOGIN", 'a"b\\c', "") == ("A0001", b'A0001 LOGIN "a\\"b\\\\c" ""\r\n')
    client = greeted()
    assert client.send_command("LOGIN", "me", "p\xe4ss") == ("A0001", b'A0001 LOGIN "me" {5}\r\n')
    assert client.awaiting_continuation


def test_synchronising_literals_wait_for_continuations() -> None:
    client = greeted()
    tag, first = client.send_command("LOGIN", "j\xf6rg", "p\r\nw")
    assert first == b"A0001 LOGIN {5}\r\n"
    with pytest.raises(LocalProtocolError, match="'\\+'"):
        client.continue_command()  # before the server said "+"
    with pytest.raises(LocalProtocolError, match="waits"):
        client.send_command("NOOP")
    assert reply(client, b"+ Ready for literal data\r\n") == [Continuation(b"Ready for literal data")]
    assert client.continue_command() == b"j\xc3\xb6rg {4}\r\n"
    assert client.awaiting_continuation
    with pytest.raises(LocalProtocolError):
        client.continue_command()  # one '+' per literal
    reply(client, b"+ OK\r\n")
    assert client.continue_command() == b"p\r\nw\r\n"
    assert not client.awaiting_continuation
    with pytest.raises(LocalProtocolError, match="no command"):
        client.continue_command()
    assert reply(client, b"A0001 OK Logged in\r\n") == [Tagged(tag, Condition.OK, None, "Logged in")]
    assert client.state is State.AUTHENTICATED


def test_a_refusal_instead_of_continuation_drops_the_rest_of_the_command() -> None:
    client = greeted()
    client.send_command("LOGIN", "me", "p\xe4ss")
    assert reply(client, b"A0001 NO [UNAVAILABLE] not now\r\n") == [
        Tagged("A0001", Condition.NO, ResponseCode("UNAVAILABLE"), "not now")
    ]
    assert not client.awaiting_continuation
    with pytest.raises(LocalProtocolError):
        client.continue_command()
    assert client.state is State.NOT_AUTHENTICATED
    assert client.send_command("LOGOUT") == ("A0002", b"A0002 LOGOUT\r\n")


def test_literal_plus_sends_everything_at_once() -> None:
    client = greeted("IMAP4rev1 LITERAL+")
    big = "\xe9" * 3000  # 6000 bytes
    _, data = client.send_command("LOGIN", "me", big)
    assert data == b'A0001 LOGIN "me" {6000+}\r\n' + big.encode() + b"\r\n"
    assert not client.awaiting_continuation


def test_literal_minus_is_non_synchronising_only_up_to_4096_bytes() -> None:
    client = greeted("IMAP4rev1 LITERAL-")
    small, large = b"\x80" * 4096, b"\x80" * 4097
    _, data = client.send_command("LOGIN", small, large)
    assert data == b"A0001 LOGIN {4096+}\r\n" + small + b" {4097}\r\n"
    assert client.awaiting_continuation
    reply(client, b"+ go\r\n")
    assert client.continue_command() == large + b"\r\n"


def test_nul_is_refused_in_strings() -> None:
    client = greeted()
    for user, password in [("a\x00b", "x"), ("a", b"\x00"), ("a", "x" * 5000 + "\x00")]:
        with pytest.raises(LocalProtocolError, match="NUL") as caught:
            client.send_command("LOGIN", user, password)
        assert "x" * 10 not in str(caught.value)
    with pytest.raises(LocalProtocolError, match="Unicode"):
        client.send_command("LOGIN", "a", "\ud800")
    assert client.send_command("NOOP") == ("A0001", b"A0001 NOOP\r\n")  # no tag was used up


def test_argument_kinds() -> None:
    client = selected()
    tag, data = client.send_command(
        "UID FETCH", imap.sequence_set([3, 1, 2, 9]), Raw("(UID BODY.PEEK[HEADER.FIELDS (FROM)])")
    )
    assert data == b"%b UID FETCH 1:3,9 (UID BODY.PEEK[HEADER.FIELDS (FROM)])\r\n" % tag.encode()
    tag, data = client.send_command("ID", [("name", "pop3-gateway"), None, 0, 42, []])
    assert data == b'%b ID (("name" "pop3-gateway") NIL 0 42 ())\r\n' % tag.encode()


@pytest.mark.parametrize(
    "arg",
    [
        Atom(""),
        Atom("a b"),
        Atom("a\r\nb"),
        Atom("(a"),
        Atom('"'),
        Atom("{5}"),
        Atom("\xe9"),
        Raw(""),
        Raw("(a\r\nb)"),
        Raw("{5}"),
        Raw("\xe9"),
        -1,
        True,
    ],
)
def test_unsafe_arguments_are_refused(arg: imap.Arg) -> None:
    client = logged_in()
    with pytest.raises(LocalProtocolError):
        client.send_command("STATUS", arg)


@pytest.mark.parametrize("name", ["", "1ABC", "NOOP\r\nA1 LOGOUT", "UID  FETCH", "X Y ", "caf\xe9"])
def test_bad_command_names_are_refused(name: str) -> None:
    with pytest.raises(LocalProtocolError):
        greeted().send_command(name)


def test_tags_are_unique() -> None:
    client = greeted()
    tags = [client.send_command("NOOP")[0] for _ in range(10_001)]
    assert len(set(tags)) == len(tags)
    assert tags[:2] == ["A0001", "A0002"]
    assert tags[-1] == "A10001"


def test_commands_are_checked_against_the_state() -> None:
    client = Client()
    with pytest.raises(LocalProtocolError, match="AWAITING_GREETING"):
        client.send_command("CAPABILITY")
    client = greeted()
    for name in ["SELECT", "FETCH", "UID FETCH", "ENABLE"]:
        with pytest.raises(LocalProtocolError, match="NOT_AUTHENTICATED"):
            client.send_command(name)
    client.send_command("XAPPLEPUSHSERVICE")  # extensions are not in the table
    client = logged_in()
    for name in ["LOGIN", "AUTHENTICATE", "STARTTLS", "EXPUNGE", "uid expunge"]:
        with pytest.raises(LocalProtocolError, match="AUTHENTICATED"):
            client.send_command(name)
    client.send_command("ENABLE", Atom("CONDSTORE"))


def test_login_is_refused_when_the_server_disabled_it() -> None:
    client = greeted("IMAP4rev1 STARTTLS LOGINDISABLED")
    with pytest.raises(LocalProtocolError, match="disabled"):
        client.send_command("LOGIN", "a", "b")
    client.send_command("AUTHENTICATE", Atom("PLAIN"))


# --------------------------------------------------------------------------------------------------
# Client state


def test_greetings() -> None:
    client = Client()
    assert reply(client, b"* PREAUTH ready\r\n") == [UntaggedStatus(Condition.PREAUTH, None, "ready")]
    assert client.state is State.AUTHENTICATED
    client = Client()
    reply(client, b"* BYE [UNAVAILABLE] go away\r\n")
    assert client.state is State.LOGOUT
    with pytest.raises(LocalProtocolError, match="LOGOUT"):
        client.send_command("NOOP")
    client = Client()
    client.receive_data(b"")
    assert client.next_event() == ConnectionClosed()
    assert client.state is State.AWAITING_GREETING


@pytest.mark.parametrize(
    "data", [b"* NO go away\r\n", b"* BAD what\r\n", b"* 1 EXISTS\r\n", b"+ hi\r\n", b"A1 OK hi\r\n"]
)
def test_anything_but_a_greeting_first_is_an_error(data: bytes) -> None:
    client = Client()
    client.receive_data(data + b"* OK hi\r\n")
    with pytest.raises(ImapProtocolError):
        client.next_event()
    with pytest.raises(ImapProtocolError, match="failed"):
        client.next_event()


def test_preauth_after_the_greeting_is_an_error() -> None:
    client = greeted()
    with pytest.raises(ImapProtocolError):
        reply(client, b"* PREAUTH sneaky\r\n")


def test_a_tag_we_did_not_send_is_an_error() -> None:
    client = greeted()
    client.send_command("NOOP")
    reply(client, b"A0001 OK NOOP done\r\n")
    with pytest.raises(ImapProtocolError, match="did not send"):
        reply(client, b"A0001 OK again\r\n")
    client = greeted()
    with pytest.raises(ImapProtocolError):
        reply(client, b"A0001 OK never sent\r\n")


def test_capabilities_follow_the_server() -> None:
    client = greeted("IMAP4rev1 AUTH=PLAIN")
    assert client.capabilities == {"IMAP4REV1", "AUTH=PLAIN"}
    tag, _ = client.send_command("CAPABILITY")
    reply(client, b"* CAPABILITY IMAP4rev2 literal+\r\n%b OK done\r\n" % tag.encode())
    assert client.capabilities == {"IMAP4REV2", "LITERAL+"}
    reply(client, b"* OK [CAPABILITY IMAP4rev1 ID] changed\r\n")
    assert client.capabilities == {"IMAP4REV1", "ID"}
    reply(client, b"* OK [ALERT] no change\r\n")
    assert client.capabilities == {"IMAP4REV1", "ID"}


def test_select_close_unselect_and_failed_select() -> None:
    client = selected()
    tag, _ = client.send_command("CLOSE")
    reply(client, b"%b OK Close completed.\r\n" % tag.encode())
    assert client.state is State.AUTHENTICATED
    tag, _ = client.send_command("EXAMINE", "Nope")
    reply(client, b"%b NO Mailbox doesn't exist\r\n" % tag.encode())
    assert client.state is State.AUTHENTICATED
    tag, _ = client.send_command("EXAMINE", "INBOX")
    reply(client, b"%b OK [READ-ONLY] done\r\n" % tag.encode())
    assert client.state is State.SELECTED
    tag, _ = client.send_command("SELECT", "Nope")
    reply(client, b"%b NO Mailbox doesn't exist\r\n" % tag.encode())
    assert client.state is State.AUTHENTICATED  # a failed SELECT leaves no mailbox selected
    tag, _ = client.send_command("SELECT", "INBOX")
    reply(client, b"%b OK done\r\n" % tag.encode())
    tag, _ = client.send_command("UNSELECT")
    reply(client, b"%b OK done\r\n" % tag.encode())
    assert client.state is State.AUTHENTICATED


def test_failed_login_and_failed_close_change_nothing() -> None:
    client = greeted()
    tag, _ = client.send_command("LOGIN", "alice", "wrong")
    reply(client, b"%b NO [AUTHENTICATIONFAILED] Authentication failed.\r\n" % tag.encode())
    assert client.state is State.NOT_AUTHENTICATED
    client = selected()
    tag, _ = client.send_command("CLOSE")
    reply(client, b"%b BAD no\r\n" % tag.encode())
    assert client.state is State.SELECTED


def test_logout_without_bye_and_replies_after_bye() -> None:
    client = logged_in()
    tag, _ = client.send_command("LOGOUT")
    reply(client, b"%b OK bye\r\n" % tag.encode())
    assert client.state is State.LOGOUT
    client = selected()
    tag, _ = client.send_command("SELECT", "INBOX")
    reply(client, b"* BYE shutting down\r\n%b OK [READ-WRITE] done\r\n" % tag.encode())
    assert client.state is State.LOGOUT


def test_starttls_forgets_plaintext_capabilities() -> None:
    client = greeted("IMAP4rev1 STARTTLS LOGINDISABLED")
    tag, _ = client.send_command("STARTTLS")
    reply(client, b"%b OK Begin TLS negotiation now.\r\n" % tag.encode())
    assert client.capabilities == frozenset()
    assert client.state is State.NOT_AUTHENTICATED
    client.send_command("LOGIN", "alice", "secret")  # LOGINDISABLED was said in plaintext


def test_starttls_refuses_bytes_injected_before_the_handshake() -> None:
    client = greeted("IMAP4rev1 STARTTLS")
    tag, _ = client.send_command("STARTTLS")
    client.receive_data(b"%b OK Begin TLS\r\n* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\n" % tag.encode())
    with pytest.raises(ImapProtocolError, match="STARTTLS"):
        client.next_event()


def test_starttls_refused() -> None:
    client = greeted("IMAP4rev1 STARTTLS")
    tag, _ = client.send_command("STARTTLS")
    reply(client, b"%b BAD TLS not available\r\n" % tag.encode())
    assert "STARTTLS" in client.capabilities


def test_authenticate_plain_with_a_continuation() -> None:
    client = greeted("IMAP4rev1 AUTH=PLAIN")
    with pytest.raises(LocalProtocolError, match="AUTHENTICATE"):
        client.authenticate_response(b"")
    tag, data = client.send_command("AUTHENTICATE", Atom("PLAIN"))
    assert data == b"A0001 AUTHENTICATE PLAIN\r\n"
    assert reply(client, b"+ \r\n") == [Continuation(b"")]
    assert not client.awaiting_continuation  # that '+' was for AUTHENTICATE, not for a literal
    response = imap.encode_authenticate_plain("", "alice", "s\xe9cret")
    assert client.authenticate_response(response) == response + b"\r\n"
    assert client.authenticate_response(b"*") == b"*\r\n"
    for bad in [b"abc\r\nA0002 LOGOUT", b"a b", b"==="]:
        with pytest.raises(LocalProtocolError, match="base64"):
            client.authenticate_response(bad)
    reply(client, b"%b OK Logged in\r\n" % tag.encode())
    assert client.state is State.AUTHENTICATED


def test_authenticate_with_sasl_ir() -> None:
    client = greeted("IMAP4rev1 SASL-IR AUTH=PLAIN")
    response = imap.encode_authenticate_plain("", "alice", "secret")
    _, data = client.send_command("AUTHENTICATE", Atom("PLAIN"), Atom(response.decode()))
    assert data == b"A0001 AUTHENTICATE PLAIN AGFsaWNlAHNlY3JldA==\r\n"


def test_untagged_data_passes_through_the_client() -> None:
    client = selected()
    tag, _ = client.send_command("UID FETCH", Atom("1"), Raw("(BODY.PEEK[])"))
    data = (
        b'* 2 EXISTS\r\n* 1 RECENT\r\n* 1 EXPUNGE\r\n* FLAGS ()\r\n* LIST () "/" x\r\n'
        b"* STATUS x (MESSAGES 1)\r\n* SEARCH\r\n* ESEARCH\r\n* ID NIL\r\n* VANISHED 1\r\n"
        b"* 1 FETCH (BODY[] {1}\r\nx)\r\n* NAMESPACE NIL NIL NIL\r\n"
        b"%b OK done\r\n" % tag.encode()
    )
    assert [type(e) for e in reply(client, data)] == [
        Exists,
        Untagged,
        Untagged,
        Untagged,
        Untagged,
        Untagged,
        Search,
        Untagged,
        Untagged,
        Untagged,
        FetchBodyStart,
        FetchBodyChunk,
        FetchBodyEnd,
        Fetch,
        Untagged,
        Tagged,
    ]


# --------------------------------------------------------------------------------------------------
# Helpers


def test_encode_authenticate_plain() -> None:
    assert (
        base64.b64decode(imap.encode_authenticate_plain("", "alice", "s\xe9cret"))
        == b"\x00alice\x00s\xc3\xa9cret"
    )
    assert (
        base64.b64decode(imap.encode_authenticate_plain(b"admin", b"alice", b"pw")) == b"admin\x00alice\x00pw"
    )
    with pytest.raises(LocalProtocolError):
        imap.encode_authenticate_plain("", "alice", "pw\x00")


def test_sequence_set() -> None:
    assert imap.sequence_set([1, 2, 3, 4, 5, 7, 9, 10]) == Atom("1:5,7,9:10")
    assert imap.sequence_set([10, 9, 1, 5, 4, 3, 2, 7, 7]) == Atom("1:5,7,9:10")
    assert imap.sequence_set([42]) == Atom("42")
    assert imap.sequence_set(iter([4294967295, 1])) == Atom("1,4294967295")
    for bad in [[], [0], [-1], [4294967296]]:
        with pytest.raises(LocalProtocolError):
            imap.sequence_set(bad)


def test_parse_sequence_set() -> None:
    assert imap.parse_sequence_set("1:5,7,10:9") == ((1, 5), (7, 7), (9, 10))
    for bad in ["", "1,", "a", "1:*", "0", "3:0", "1 2", "12345678901"]:
        with pytest.raises(ValueError):
            imap.parse_sequence_set(bad)


@given(st.sets(st.integers(1, 300), min_size=1))
def test_sequence_set_round_trip(numbers: set[int]) -> None:
    ranges = imap.parse_sequence_set(str(imap.sequence_set(numbers)))
    assert {n for low, high in ranges for n in range(low, high + 1)} == numbers
    assert all(b[0] > a[1] + 1 for a, b in itertools.pairwise(ranges))  # runs are maximal


def test_reprs() -> None:
    assert repr(NEED_DATA) == "NEED_DATA"
    assert str(Atom("1:*")) == "1:*"


# --------------------------------------------------------------------------------------------------
# Properties

FRAGMENTS = [
    b"* ", b"+ ", b"A0001 ", b"OK ", b"NO ", b"BAD ", b"BYE ", b"PREAUTH ", b"1 ", b"3 ", b"0 ", b"FETCH ",
    b"EXISTS", b"EXPUNGE", b"RECENT", b"(", b")", b" ", b"\r\n", b"\n", b"\r", b"{3}\r\n", b"{0}\r\n",
    b"~{2}\r\n", b"{2+}\r\n", b"{1}", b"abc", b"BODY[]", b"BODY[HEADER.FIELDS (FROM)]<0>", b"RFC822",
    b"BINARY[1]", b"UID ", b"RFC822.SIZE ", b"FLAGS ", b"\\Seen", b'"q\\"s"', b'"', b"\\", b"NIL",
    b"[", b"]", b"[UIDVALIDITY 5] ", b"[CAPABILITY IMAP4rev1 LITERAL+]", b"CAPABILITY ", b"LIST ",
    b"STATUS ", b"SEARCH ", b"ESEARCH ", b"ID ", b"ENABLED ", b"VANISHED ", b"(EARLIER) ", b"1:5,7",
    b"(TAG \"x\") ", b"MODSEQ", b"00", b"\x00", b"\xff", b"99999999999999999999999",
]  # fmt: skip
imap_like = st.lists(st.sampled_from(FRAGMENTS) | st.binary(max_size=3), max_size=60).map(b"".join)
any_input = st.binary(max_size=300) | imap_like | st.just(TRANSCRIPT)
SMALL_CAPS = {"max_line_length": 120, "max_literal_size": 8, "max_depth": 3, "max_items": 12}


def exercise(event: imap.Event) -> None:
    """Touch the lazily-parsed parts of an event: they too may only raise ImapProtocolError."""
    code = event.code if isinstance(event, Tagged | UntaggedStatus) else None
    if code is not None:
        for method in (code.int_value, code.values):
            with contextlib.suppress(ImapProtocolError):
                method()
    if isinstance(event, Fetch):
        assert (event.uid, event.rfc822_size, event.flags) is not None


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(data=any_input, small=st.booleans(), close=st.booleans())
def test_arbitrary_bytes_give_events_or_a_protocol_error(data: bytes, small: bool, close: bool) -> None:
    parser = ResponseParser(**(SMALL_CAPS if small else {}))
    parser.receive_data(data)
    if close:
        parser.receive_data(b"")
    try:
        for _ in range(len(data) + 3):
            event = parser.next_event()
            if isinstance(event, NeedData | ConnectionClosed):
                break
            exercise(event)
    except ImapProtocolError:
        pass


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(data=any_input, greeting=st.sampled_from([b"", b"* OK hi\r\n", b"* PREAUTH hi\r\n"]))
def test_arbitrary_bytes_into_a_client_give_events_or_a_protocol_error(data: bytes, greeting: bytes) -> None:
    client = Client()
    if greeting:
        client.receive_data(greeting)
    for name in ["NOOP", "LOGIN", "SELECT", "STARTTLS"]:  # some tags the server may answer
        with contextlib.suppress(LocalProtocolError):
            client.send_command(name, "a", "b\xe9") if name == "LOGIN" else client.send_command(name)
    client.receive_data(data)
    client.receive_data(b"")
    try:
        while not isinstance(client.next_event(), NeedData | ConnectionClosed):
            if client.awaiting_continuation:
                with contextlib.suppress(LocalProtocolError):
                    client.continue_command()
    except ImapProtocolError:
        pass


login_string = st.text(
    st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=80
) | st.binary(max_size=80).filter(lambda b: b"\x00" not in b)


@settings(max_examples=300)
@given(capabilities=st.sampled_from(CAPABILITY_SETS), user=login_string, password=login_string)
def test_any_login_string_is_read_back_identical(
    capabilities: str, user: str | bytes, password: str | bytes
) -> None:
    check_login_round_trip(capabilities, user, password)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), source=st.sampled_from(["transcript", "fuzz"]), small=st.booleans())
def test_splitting_the_input_anywhere_gives_the_same_events(
    data: st.DataObject, source: str, small: bool
) -> None:
    stream = TRANSCRIPT if source == "transcript" else data.draw(imap_like)
    caps = SMALL_CAPS if small else {}
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=40))
    whole, whole_failed = feed_in_pieces(stream, [], **caps)
    pieces, pieces_failed = feed_in_pieces(stream, cuts, **caps)
    assert merged(pieces) == merged(whole)
    assert pieces_failed == whole_failed
    if source == "transcript" and not small:
        assert merged(pieces) == TRANSCRIPT_EVENTS


def test_size_fetch_fast_path_matches_the_general_parser() -> None:
    from gateway.proto import imap as m

    lines = b"".join(b"* %d FETCH (UID %d RFC822.SIZE %d)\r\n" % (i, i * 3, 1000 + i) for i in range(1, 301))
    tail = b"* 301 FETCH (UID 999 RFC822.SIZE 5 FLAGS (\\Seen))\r\nA0001 OK done\r\n"

    fast = m.ResponseParser()
    fast.receive_data(b"* OK ready\r\n" + lines + tail)
    assert fast.next_size_fetches() == []  # the greeting is first: not a size line
    assert isinstance(fast.next_event(), m.UntaggedStatus)
    got = fast.next_size_fetches()
    assert got == [(i * 3, 1000 + i) for i in range(1, 301)]
    assert fast.next_size_fetches() == []  # the line with FLAGS goes the general way
    event = fast.next_event()
    assert isinstance(event, m.Fetch) and event.uid == 999 and event.flags == ("\\Seen",)
    assert isinstance(fast.next_event(), m.Tagged)

    slow = m.ResponseParser()
    slow.receive_data(b"* OK ready\r\n" + lines)
    slow.next_event()
    events = [slow.next_event() for _ in range(300)]
    assert [(e.uid, e.rfc822_size) for e in events if isinstance(e, m.Fetch)] == got


def test_size_fetch_fast_path_stops_at_a_partial_line_and_in_a_literal() -> None:
    from gateway.proto import imap as m

    p = m.ResponseParser()
    p.receive_data(b"* 1 FETCH (UID 1 RFC822.SIZE 10)\r\n* 2 FETCH (UID 2 RFC8")
    assert p.next_size_fetches() == [(1, 10)]
    p.receive_data(b"22.SIZE 20)\r\n* 3 FETCH (UID 3 BODY[] {2}\r\nab)\r\n")
    assert p.next_size_fetches() == [(2, 20)]
    assert isinstance(p.next_event(), m.FetchBodyStart)
    assert p.next_size_fetches() == []  # inside a body: never
    c = m.Client()
    assert c.next_size_fetches() == []  # before the greeting: never


def test_client_size_fetch_fast_path_after_the_greeting() -> None:
    from gateway.proto import imap as m

    c = m.Client()
    c.receive_data(b"* OK ready\r\n* 1 FETCH (UID 7 RFC822.SIZE 70)\r\n")
    assert isinstance(c.next_event(), m.UntaggedStatus)
    assert c.next_size_fetches() == [(7, 70)]


def test_the_size_fetch_fast_path_refuses_a_uid_beyond_2_32() -> None:
    parser = ResponseParser()
    parser.receive_data(b"* 1 FETCH (UID 5 RFC822.SIZE 10)\r\n* 2 FETCH (UID 4294967296 RFC822.SIZE 10)\r\n")
    with pytest.raises(ImapProtocolError, match="UID outside"):
        parser.next_size_fetches()
    with pytest.raises(ImapProtocolError):
        parser.next_event()
    general = ResponseParser()
    general.receive_data(b"* 1 FETCH (UID 4294967295 RFC822.SIZE 10)\r\n")
    assert general.next_size_fetches() == [(4294967295, 10)]


def test_a_body_start_names_the_uid_when_it_came_first() -> None:
    events = parse(
        b"* 1 FETCH (UID 7 BODY[] {2}\r\nab)\r\n* 2 FETCH (BODY[] {2}\r\nab UID 8)\r\n"
        b'* 3 FETCH (FLAGS () UID 9 BODY[HEADER] "x")\r\n'
    )
    starts = [e for e in events if isinstance(e, FetchBodyStart)]
    assert [(s.seq, s.uid) for s in starts] == [(1, 7), (2, None), (3, 9)]
    assert starts[0] == FetchBodyStart(1, "BODY[]", 2)  # the UID is a hint, not part of the event's value
