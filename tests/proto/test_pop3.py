"""The sans-IO POP3 core: bytes in, events out. No sockets, no trio."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.proto import pop3
from gateway.proto.logins import ApopLogin, PasswordLogin
from gateway.proto.maildrop import MessageInfo

TS = "<1.2.3@test>"
MESSAGES = [MessageInfo(120, "uid-a"), MessageInfo(300, "uid-b"), MessageInfo(45, "uid-c")]


def new(settings: pop3.Settings, **kwargs: Any) -> pop3.Connection:
    """A connection whose greeting has been sent."""
    conn = pop3.Connection(settings, **kwargs)
    assert sent(conn).startswith(b"+OK")
    return conn


def sent(conn: pop3.Connection) -> bytes:
    """Everything the core has queued for the client (the one way bytes leave it)."""
    out = b""
    while data := conn.data_to_send():
        out += data
    return out


def events(conn: pop3.Connection, data: bytes = b"") -> list[pop3.Event]:
    if data:
        conn.receive_data(data)
    out: list[pop3.Event] = []
    while (ev := conn.next_event()) is not pop3.NEED_DATA:
        assert not isinstance(ev, pop3.NeedData)
        if not isinstance(ev, pop3.Flush):  # a hint to write what is queued; sent() reads it all anyway
            out.append(ev)
    return out


def replies(conn: pop3.Connection, data: bytes) -> bytes:
    """Feed ``data``; the replies it got (no event may need the caller)."""
    for ev in events(conn, data):
        assert isinstance(ev, pop3.Close), ev
    return sent(conn)


def logged_in(
    settings: pop3.Settings | None = None, messages: list[MessageInfo] = MESSAGES
) -> pop3.Connection:
    conn = new(settings or pop3.Settings(), apop_timestamp=TS)
    assert replies(conn, b"USER alice\r\n").startswith(b"+OK")
    [ev] = events(conn, b"PASS secret\r\n")
    assert isinstance(ev, pop3.Authenticate)
    conn.auth_succeeded(messages, "alice")
    assert sent(conn).startswith(b"+OK")
    assert conn.state is pop3.State.TRANSACTION
    return conn


def test_greeting_carries_the_apop_timestamp() -> None:
    conn = pop3.Connection(pop3.Settings(), apop_timestamp=TS)
    assert sent(conn) == b"+OK POP3 gateway ready <1.2.3@test>\r\n"


def test_user_pass_asks_the_caller_to_authenticate_without_showing_the_password() -> None:
    conn = new(pop3.Settings(), apop_timestamp=TS)
    replies(conn, b"USER alice\r\n")
    [ev] = events(conn, b"PASS s3cr3t with spaces\r\n")
    assert ev == pop3.Authenticate(PasswordLogin("alice", "s3cr3t with spaces"))
    assert "s3cr3t" not in repr(ev)
    # lockstep: nothing is parsed until the caller reports back
    assert events(conn, b"STAT\r\n") == []
    conn.auth_succeeded(MESSAGES, "alice")
    assert replies(conn, b"") == b"+OK Logged in, 3 messages (465 octets)\r\n+OK 3 465\r\n"


def test_utf8_credentials_are_accepted_and_invalid_utf8_refused() -> None:
    conn = new(pop3.Settings(), apop_timestamp=TS)
    assert replies(conn, "USER j\u00f6rg\r\n".encode()).startswith(b"+OK")
    [ev] = events(conn, "PASS p\u00e4ss w\u00f6rd\r\n".encode())
    assert ev == pop3.Authenticate(PasswordLogin("j\u00f6rg", "p\u00e4ss w\u00f6rd"))
    conn = new(pop3.Settings(), apop_timestamp=TS)
    assert replies(conn, b"USER \xff\r\n") == b"-ERR Credentials are not UTF-8\r\n"
    assert replies(conn, b"CAPA \xc3\xa9\r\n") == b"-ERR Non-ASCII command\r\n"


def test_pass_without_user_is_refused() -> None:
    conn = new(pop3.Settings(), apop_timestamp=TS)
    assert replies(conn, b"PASS x\r\n") == b"-ERR USER first\r\n"


def test_bad_credentials_get_auth_code_and_session_goes_on() -> None:
    conn = new(pop3.Settings(), apop_timestamp=TS)
    replies(conn, b"USER alice\r\n")
    events(conn, b"PASS wrong\r\n")
    conn.auth_failed()
    assert sent(conn) == b"-ERR [AUTH] Authentication failed\r\n"
    assert conn.state is pop3.State.AUTHORIZATION
    assert replies(conn, b"PASS again\r\n") == b"-ERR USER first\r\n"


def test_too_many_auth_failures_close_the_connection() -> None:
    conn = new(pop3.Settings(max_auth_failures=2), apop_timestamp=TS)
    for _ in range(2):
        replies(conn, b"USER a\r\n")
        events(conn, b"PASS b\r\n")
        conn.auth_failed()
    [ev] = events(conn)
    assert ev == pop3.Close(refused=True)
    assert sent(conn).endswith(b"-ERR [AUTH] Authentication failed\r\n")
    assert conn.state is pop3.State.CLOSED


def test_in_use_and_login_delay_codes() -> None:
    conn = new(pop3.Settings(), apop_timestamp=TS)
    replies(conn, b"USER a\r\n")
    events(conn, b"PASS b\r\n")
    conn.auth_failed(pop3.Refusal.IN_USE)
    assert sent(conn) == b"-ERR [IN-USE] Maildrop is locked by another session\r\n"
    replies(conn, b"USER a\r\n")
    events(conn, b"PASS b\r\n")
    conn.auth_failed(pop3.Refusal.LOGIN_DELAY)
    assert sent(conn) == b"-ERR [LOGIN-DELAY] Logins are too frequent\r\n"


def test_apop_gives_digest_and_timestamp() -> None:
    conn = new(pop3.Settings(), apop_timestamp=TS)
    [ev] = events(conn, b"APOP bob C4C9334BAC560ECC979E58001B3E22FB\r\n")
    assert ev == pop3.Authenticate(ApopLogin("bob", TS, "c4c9334bac560ecc979e58001b3e22fb"))
    conn2 = new(pop3.Settings(), apop_timestamp=TS)
    assert replies(conn2, b"APOP bob nothex\r\n") == b"-ERR Invalid APOP digest\r\n"


def test_stat_list_uidl() -> None:
    conn = logged_in()
    assert replies(conn, b"STAT\r\n") == b"+OK 3 465\r\n"
    assert replies(conn, b"LIST\r\n") == b"+OK 3 messages (465 octets)\r\n1 120\r\n2 300\r\n3 45\r\n.\r\n"
    assert replies(conn, b"LIST 2\r\n") == b"+OK 2 300\r\n"
    assert (
        replies(conn, b"UIDL\r\n")
        == b"+OK Unique-ID listing follows\r\n1 uid-a\r\n2 uid-b\r\n3 uid-c\r\n.\r\n"
    )
    assert replies(conn, b"uidl 3\r\n") == b"+OK 3 uid-c\r\n"


def test_empty_maildrop_lists_nothing() -> None:
    conn = logged_in(messages=[])
    assert replies(conn, b"STAT\r\nLIST\r\nUIDL\r\n") == (
        b"+OK 0 0\r\n+OK 0 messages (0 octets)\r\n.\r\n+OK Unique-ID listing follows\r\n.\r\n"
    )


def test_deleted_message_is_hidden_and_refused() -> None:
    conn = logged_in()
    assert replies(conn, b"DELE 2\r\n") == b"+OK Message 2 deleted\r\n"
    assert replies(conn, b"DELE 2\r\n") == b"-ERR Message is deleted\r\n"
    assert replies(conn, b"STAT\r\n") == b"+OK 2 165\r\n"
    assert replies(conn, b"LIST\r\n") == b"+OK 2 messages (165 octets)\r\n1 120\r\n3 45\r\n.\r\n"
    assert replies(conn, b"LIST 2\r\n") == b"-ERR Message is deleted\r\n"
    assert replies(conn, b"UIDL 2\r\n") == b"-ERR Message is deleted\r\n"
    assert replies(conn, b"RETR 2\r\n") == b"-ERR Message is deleted\r\n"
    assert replies(conn, b"TOP 2 0\r\n") == b"-ERR Message is deleted\r\n"
    assert replies(conn, b"NOOP\r\n") == b"+OK\r\n"


def test_dele_is_undone_by_rset() -> None:
    conn = logged_in()
    replies(conn, b"DELE 1\r\nDELE 3\r\n")
    assert replies(conn, b"RSET\r\n") == b"+OK Maildrop has 3 messages (465 octets)\r\n"
    [ev] = events(conn, b"QUIT\r\n")
    assert ev == pop3.Commit(())
    conn.update_finished(True)
    assert sent(conn) == b"+OK Logging out\r\n"


def test_quit_commits_exactly_the_marked_messages() -> None:
    conn = logged_in()
    replies(conn, b"DELE 3\r\nDELE 1\r\n")
    [ev] = events(conn, b"QUIT\r\n")
    assert ev == pop3.Commit((0, 2))
    assert conn.state is pop3.State.UPDATE
    conn.update_finished(True)
    assert sent(conn) == b"+OK Logging out, messages deleted\r\n"
    assert conn.state is pop3.State.CLOSED


def test_failed_update_reports_sys_temp() -> None:
    conn = logged_in()
    replies(conn, b"DELE 1\r\n")
    events(conn, b"QUIT\r\n")
    conn.update_finished(False)
    assert sent(conn) == b"-ERR [SYS/TEMP] Some deleted messages were not removed\r\n"


def test_dropped_connection_deletes_nothing() -> None:
    conn = logged_in()
    replies(conn, b"DELE 1\r\n")
    conn.receive_data(b"")
    assert events(conn) == [pop3.ConnectionClosed()]


def test_autologout_never_enters_update() -> None:
    conn = logged_in()
    replies(conn, b"DELE 1\r\n")
    conn.autologout()
    assert sent(conn).startswith(b"-ERR")
    assert conn.state is pop3.State.CLOSED
    assert events(conn, b"QUIT\r\n") == []


def test_quit_in_authorization_closes_without_update() -> None:
    conn = new(pop3.Settings(), apop_timestamp=TS)
    assert events(conn, b"QUIT\r\n") == [pop3.Close()]
    assert sent(conn) == b"+OK Logging out\r\n"


def test_retr_and_top_ask_the_caller_to_stream() -> None:
    conn = logged_in()
    ev = pop3.Fetch(2, 1, None, 300)
    assert events(conn, b"RETR 2\r\n") == [ev]
    conn.begin_body(ev)
    assert sent(conn) == b"+OK 300 octets\r\n"
    assert conn.end_body() == pop3.Sent(0, True)
    assert sent(conn) == b".\r\n"
    ev = pop3.Fetch(1, 0, 0, 120)
    assert events(conn, b"TOP 1 0\r\n") == [ev]
    conn.begin_body(ev)
    assert sent(conn) == b"+OK Top of message follows\r\n"
    conn.end_body()
    sent(conn)
    [ev] = events(conn, b"TOP 1 99999999\r\n")
    assert isinstance(ev, pop3.Fetch) and ev.top_lines == 99999999
    conn.fetch_failed()
    [ev] = events(conn, b"TOP 1 123456789012345678901234567890\r\n")
    assert isinstance(ev, pop3.Fetch) and ev.top_lines == 10**18


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        (b"RETR 0", b"-ERR No such message\r\n"),
        (b"RETR 4", b"-ERR No such message\r\n"),
        (b"RETR -1", b"-ERR Invalid message number\r\n"),
        (b"RETR 99999999999999999999", b"-ERR No such message\r\n"),
        (b"RETR 1x", b"-ERR Invalid message number\r\n"),
        (b"RETR", b"-ERR Wrong number of arguments\r\n"),
        (b"RETR 1 2", b"-ERR Wrong number of arguments\r\n"),
        (b"TOP 1 -1", b"-ERR Invalid line count\r\n"),
        (b"LIST 0", b"-ERR No such message\r\n"),
        (b"DELE 9", b"-ERR No such message\r\n"),
        (b"UIDL abc", b"-ERR Invalid message number\r\n"),
        (b"FOO", b"-ERR Unknown command\r\n"),
        (b"", b"-ERR Unknown command\r\n"),
        (b"RETR \x001", b"-ERR NUL in command\r\n"),
        (b"USER \xc3\xa9", b"-ERR Command not valid in TRANSACTION state\r\n"),
        (b"STAT \xff", b"-ERR Non-ASCII command\r\n"),
        (b"USER bob", b"-ERR Command not valid in TRANSACTION state\r\n"),
        (b"STLS", b"-ERR Command not valid in TRANSACTION state\r\n"),
    ],
)
def test_bad_input_gets_err_and_session_goes_on(line: bytes, reply: bytes) -> None:
    conn = logged_in()
    assert replies(conn, line + b"\r\n") == reply
    assert replies(conn, b"STAT\r\n") == b"+OK 3 465\r\n"


@pytest.mark.parametrize(
    "line", [b"STAT", b"LIST", b"RETR 1", b"DELE 1", b"RSET", b"NOOP", b"TOP 1 1", b"UIDL"]
)
def test_transaction_commands_are_refused_before_login(line: bytes) -> None:
    conn = new(pop3.Settings(), apop_timestamp=TS)
    assert replies(conn, line + b"\r\n") == b"-ERR Command not valid in AUTHORIZATION state\r\n"


def test_line_over_255_octets_is_refused_and_discarded() -> None:
    conn = logged_in()
    long_line = b"NOOP " + b"x" * 300 + b"\r\n"
    assert replies(conn, long_line + b"STAT\r\n") == b"-ERR Line too long\r\n+OK 3 465\r\n"


def test_line_of_exactly_255_octets_is_accepted() -> None:
    conn = logged_in()
    line = b"LIST " + b"0" * 247 + b"1\r\n"
    assert len(line) == 255
    assert replies(conn, line) == b"+OK 1 120\r\n"
    assert replies(conn, b"LIST " + b"0" * 248 + b"1\r\n") == b"-ERR Line too long\r\n"


def test_endless_line_is_never_buffered() -> None:
    conn = logged_in()
    for _ in range(1000):
        conn.receive_data(b"A" * 4096)
        assert conn.next_event() is pop3.NEED_DATA
        assert len(conn._buf) < 4096 + 255
    assert replies(conn, b"\r\nSTAT\r\n") == b"-ERR Line too long\r\n+OK 3 465\r\n"


def test_byte_at_a_time_equals_whole() -> None:
    script = b"USER alice\r\nPASS pw\r\n"
    whole = new(pop3.Settings(), apop_timestamp=TS)
    bytewise = new(pop3.Settings(), apop_timestamp=TS)
    a = events(whole, script)
    b: list[pop3.Event] = []
    for i in range(len(script)):
        b += events(bytewise, script[i : i + 1])
    assert a == b
    # the USER reply went out the one way replies leave the core; PASS became the one event
    assert len(a) == 1
    assert sent(whole) == sent(bytewise) == b"+OK Send your password\r\n"


def test_bare_lf_line_ends_are_accepted() -> None:
    conn = logged_in()
    assert replies(conn, b"STAT\nNOOP\n") == b"+OK 3 465\r\n+OK\r\n"


def test_one_thousand_pipelined_commands_answer_in_order() -> None:
    conn = logged_in()
    script = b"".join(b"LIST %d\r\n" % (i % 4) for i in range(1000))
    out = replies(conn, script)
    lines = out.split(b"\r\n")[:-1]
    assert len(lines) == 1000
    for i, line in enumerate(lines):
        n = i % 4
        assert line == (b"-ERR No such message" if n == 0 else b"+OK %d %d" % (n, MESSAGES[n - 1].size))


def test_capa_lists_the_capabilities() -> None:
    settings = pop3.Settings(login_delay=60, expire="30", tls_available=True)
    conn = new(settings, apop_timestamp=TS)
    out = replies(conn, b"CAPA\r\n")
    assert out.startswith(b"+OK") and out.endswith(b"\r\n.\r\n")
    caps = out.split(b"\r\n")[1:-2]
    for cap in [
        b"TOP",
        b"UIDL",
        b"USER",
        b"SASL PLAIN LOGIN",
        b"RESP-CODES",
        b"AUTH-RESP-CODE",
        b"PIPELINING",
        b"LOGIN-DELAY 60",
        b"EXPIRE 30",
        b"IMPLEMENTATION pop3-gateway",
        b"STLS",
    ]:
        assert cap in caps
    plain = new(pop3.Settings(), apop_timestamp=TS)
    caps = replies(plain, b"CAPA\r\n").split(b"\r\n")
    assert b"STLS" not in caps and not any(c.startswith(b"LOGIN-DELAY") for c in caps)
    assert b"EXPIRE NEVER" in caps


def test_stls_then_capa_no_longer_offers_stls() -> None:
    conn = new(pop3.Settings(tls_available=True), apop_timestamp=TS)
    [ev] = events(conn, b"STLS\r\n")
    assert ev == pop3.StartTls()
    assert sent(conn) == b"+OK Begin TLS negotiation\r\n"
    conn.tls_started()
    assert b"STLS" not in replies(conn, b"CAPA\r\n").split(b"\r\n")
    assert replies(conn, b"STLS\r\n") == b"-ERR Already in TLS\r\n"


def test_plaintext_pipelined_after_stls_is_refused() -> None:
    conn = new(pop3.Settings(tls_available=True), apop_timestamp=TS)
    [ev] = events(conn, b"STLS\r\nUSER mallory\r\n")
    assert isinstance(ev, pop3.Close) and sent(conn).startswith(b"-ERR")
    assert conn.state is pop3.State.CLOSED


def test_stls_without_tls_configured() -> None:
    conn = new(pop3.Settings(), apop_timestamp=TS)
    assert replies(conn, b"STLS\r\n") == b"-ERR [SYS/PERM] STLS not available\r\n"


def test_plaintext_auth_refused_when_policy_says_so() -> None:
    conn = new(pop3.Settings(allow_plaintext_auth=False, tls_available=True), apop_timestamp=TS)
    assert replies(conn, b"USER a\r\n").startswith(b"-ERR [AUTH]")
    assert replies(conn, b"AUTH PLAIN\r\n").startswith(b"-ERR [AUTH]")
    assert b"USER" not in replies(conn, b"CAPA\r\n").split(b"\r\n")
    secure = new(pop3.Settings(allow_plaintext_auth=False), apop_timestamp=TS, tls_active=True)
    assert replies(secure, b"USER a\r\n").startswith(b"+OK")


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def test_auth_plain_with_initial_response() -> None:
    conn = new(pop3.Settings(), apop_timestamp=TS)
    [ev] = events(conn, b"AUTH PLAIN " + b64(b"\x00alice\x00pw") + b"\r\n")
    assert ev == pop3.Authenticate(PasswordLogin("alice", "pw"))


def test_auth_plain_without_initial_response() -> None:
    conn = new(pop3.Settings(), apop_timestamp=TS)
    assert replies(conn, b"AUTH PLAIN\r\n") == b"+ \r\n"
    [ev] = events(conn, b64(b"alice\x00alice\x00p\xc3\xa9") + b"\r\n")
    assert ev == pop3.Authenticate(PasswordLogin("alice", "p\u00e9"))


def test_auth_plain_refuses_another_authzid() -> None:
    conn = new(pop3.Settings(), apop_timestamp=TS)
    assert replies(conn, b"AUTH PLAIN " + b64(b"root\x00alice\x00pw") + b"\r\n").startswith(b"-ERR [AUTH]")


def test_auth_login_both_ways() -> None:
    conn = new(pop3.Settings(), apop_timestamp=TS)
    assert replies(conn, b"AUTH LOGIN\r\n") == b"+ VXNlcm5hbWU6\r\n"
    assert replies(conn, b64(b"alice") + b"\r\n") == b"+ UGFzc3dvcmQ6\r\n"
    [ev] = events(conn, b64(b"pw") + b"\r\n")
    assert ev == pop3.Authenticate(PasswordLogin("alice", "pw"))
    conn = new(pop3.Settings(), apop_timestamp=TS)
    assert replies(conn, b"AUTH LOGIN " + b64(b"bob") + b"\r\n") == b"+ UGFzc3dvcmQ6\r\n"
    [ev] = events(conn, b64(b"pw2") + b"\r\n")
    assert ev == pop3.Authenticate(PasswordLogin("bob", "pw2"))


def test_auth_star_cancels() -> None:
    conn = new(pop3.Settings(), apop_timestamp=TS)
    replies(conn, b"AUTH LOGIN\r\n")
    assert replies(conn, b"*\r\n") == b"-ERR Authentication cancelled\r\n"
    assert replies(conn, b"CAPA\r\n").startswith(b"+OK")


@pytest.mark.parametrize("bad", [b"!!!notbase64", b"YWJj=", b"\xff"])
def test_auth_with_bad_base64_gets_err(bad: bytes) -> None:
    conn = new(pop3.Settings(), apop_timestamp=TS)
    replies(conn, b"AUTH PLAIN\r\n")
    assert replies(conn, bad + b"\r\n") == b"-ERR Invalid base64\r\n"
    assert replies(conn, b"NOOP\r\n") == b"-ERR Command not valid in AUTHORIZATION state\r\n"


def test_auth_malformed_plain_and_unknown_mechanism() -> None:
    conn = new(pop3.Settings(), apop_timestamp=TS)
    assert replies(conn, b"AUTH PLAIN " + b64(b"no-nuls") + b"\r\n") == b"-ERR Malformed PLAIN response\r\n"
    assert replies(conn, b"AUTH CRAM-MD5\r\n") == b"-ERR Unsupported authentication mechanism\r\n"
    assert replies(conn, b"AUTH PLAIN " + b64(b"\x00\xff\x00x") + b"\r\n").startswith(b"-ERR [AUTH]")
    assert replies(conn, b"AUTH\r\n") == b"+OK Supported mechanisms\r\nPLAIN\r\nLOGIN\r\n.\r\n"


def test_auth_login_non_utf8() -> None:
    conn = new(pop3.Settings(), apop_timestamp=TS)
    replies(conn, b"AUTH LOGIN\r\n")
    assert replies(conn, b64(b"\xff") + b"\r\n").startswith(b"-ERR [AUTH]")
    replies(conn, b"AUTH LOGIN\r\n")
    replies(conn, b64(b"u") + b"\r\n")
    assert replies(conn, b64(b"\xff") + b"\r\n").startswith(b"-ERR [AUTH]")


def test_auth_plain_empty_initial_response_is_equals_sign() -> None:
    conn = new(pop3.Settings(), apop_timestamp=TS)
    assert replies(conn, b"AUTH PLAIN =\r\n") == b"-ERR Malformed PLAIN response\r\n"


def test_sasl_response_may_exceed_255_octets() -> None:
    conn = new(pop3.Settings(), apop_timestamp=TS)
    replies(conn, b"AUTH PLAIN\r\n")
    long_pw = "p" * 600
    [ev] = events(conn, b64(b"\x00u\x00" + long_pw.encode()) + b"\r\n")
    assert ev == pop3.Authenticate(PasswordLogin("u", long_pw))


def test_caller_misuse_raises_local_error() -> None:
    conn = new(pop3.Settings(), apop_timestamp=TS)
    with pytest.raises(pop3.LocalProtocolError):
        conn.auth_succeeded([], "x")
    with pytest.raises(pop3.LocalProtocolError):
        conn.update_finished(True)


def test_message_unavailable_reply() -> None:
    conn = logged_in()
    events(conn, b"RETR 1\r\n")
    conn.fetch_failed()
    assert sent(conn).startswith(b"-ERR [SYS/TEMP]")


def test_closed_connection_ignores_input() -> None:
    conn = new(pop3.Settings(), apop_timestamp=TS)
    events(conn, b"QUIT\r\n")
    conn.receive_data(b"USER x\r\n")
    assert events(conn) == []


def test_eof_with_partial_line() -> None:
    conn = new(pop3.Settings(), apop_timestamp=TS)
    conn.receive_data(b"USER al")
    conn.receive_data(b"")
    assert events(conn) == [pop3.ConnectionClosed()]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=20), st.booleans())
def test_any_bytes_give_events_never_exceptions(chunks: list[bytes], login: bool) -> None:
    conn = logged_in() if login else new(pop3.Settings(tls_available=True), apop_timestamp=TS)
    for chunk in chunks:
        for ev in events(conn, chunk):
            match ev:
                case pop3.Authenticate():
                    conn.auth_failed()
                case pop3.StartTls():
                    conn.tls_started()
                case pop3.Commit():
                    conn.update_finished(True)
                case pop3.Fetch():
                    conn.fetch_failed()
                case _:
                    pass
        data = sent(conn)
        assert not data or data.endswith(b"\r\n")
        assert data[:1] in (b"+", b"-", b"")
        assert len(conn._buf) <= 8192 + 300


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            [
                b"STAT",
                b"LIST",
                b"LIST 1",
                b"UIDL",
                b"UIDL 2",
                b"DELE 1",
                b"DELE 3",
                b"RSET",
                b"NOOP",
                b"RETR 9",
                b"CAPA",
            ]
        ),
        max_size=30,
    ),
    st.integers(1, 7),
)
def test_split_anywhere_gives_same_replies(commands: list[bytes], step: int) -> None:
    script = b"".join(c + b"\r\n" for c in commands)
    whole = logged_in()
    split = logged_in()
    a = replies(whole, script)
    b = b"".join(replies(split, script[i : i + step]) for i in range(0, len(script), step))
    assert a == b
