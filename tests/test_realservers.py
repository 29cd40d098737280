"""Self-checks of the real-server test infrastructure, against Dovecot's own POP3 (no gateway involved).

If these fail, the helpers in tests/realservers are wrong (or a program is missing), not the gateway.
"""

from __future__ import annotations

import poplib
import ssl
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest
import trustme

from tests.realservers import MissingProgram
from tests.realservers.clients import (
    ClientError,
    Tls,
    curl_pop3,
    delivered_messages,
    pop3_url,
    run_fetchmail,
    run_getmail,
    run_mpop,
)
from tests.realservers.corpus import (
    big_message,
    message_id,
    normalize_crlf,
    pop3_size,
    pop3_view,
    sized_message,
    sized_messages,
    tricky_messages,
)
from tests.realservers.dovecot import Dovecot, MailUser
from tests.realservers.fs import require_program

pytestmark = pytest.mark.realserver

PopMode = Literal["plain", "stls", "pop3s"]
Client = Callable[..., int]
CLIENTS: dict[str, Client] = {"fetchmail": run_fetchmail, "mpop": run_mpop, "getmail": run_getmail}


@dataclass
class Filled:
    user: MailUser
    messages: list[bytes]
    uids: list[int]


@pytest.fixture
def filled(dovecot: Dovecot, mail_user: MailUser) -> Filled:
    messages = tricky_messages()
    uids = dovecot.append(mail_user.name, mail_user.password, messages)
    return Filled(mail_user, messages, uids)


@contextmanager
def pop3_session(dovecot: Dovecot, user: MailUser, mode: PopMode = "plain") -> Iterator[poplib.POP3]:
    conn: poplib.POP3
    if mode == "pop3s":
        conn = poplib.POP3_SSL(dovecot.host, dovecot.pop3s_port, context=dovecot.ssl_context(), timeout=10)
    else:
        conn = poplib.POP3(dovecot.host, dovecot.pop3_port, timeout=10)
        if mode == "stls":
            conn.stls(dovecot.ssl_context())
    try:
        conn.user(user.name)
        conn.pass_(user.password)
        yield conn
    finally:
        conn.quit()


def retr(conn: poplib.POP3, number: int) -> bytes:
    _, lines, _ = conn.retr(number)
    return b"".join(line + b"\r\n" for line in lines)


def login_lines(dovecot: Dovecot, user: MailUser, count: int) -> list[str]:
    """Dovecot's `pop3-login: ... Login: user=<name>` lines, waiting briefly for `count` of them."""
    deadline = time.monotonic() + 5
    while True:
        lines = [
            line
            for line in dovecot.log_text().splitlines()
            if "pop3-login: Info: Login:" in line and f"user=<{user.name}>" in line
        ]
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(0.02)


def by_message_id(messages: list[bytes]) -> dict[bytes, bytes]:
    return {message_id(raw): raw for raw in messages}


# --- the private Dovecot itself --------------------------------------------------------------------------


def test_append_returns_uids_in_order(dovecot: Dovecot, filled: Filled) -> None:
    assert filled.uids == list(range(1, len(filled.messages) + 1))
    more = dovecot.append(filled.user.name, filled.user.password, sized_messages(3, 2000))
    assert more == [len(filled.messages) + 1, len(filled.messages) + 2, len(filled.messages) + 3]


def test_append_into_another_mailbox(dovecot: Dovecot, mail_user: MailUser) -> None:
    assert dovecot.append(mail_user.name, mail_user.password, tricky_messages()[:2], mailbox="Archive") == [
        1,
        2,
    ]
    assert dovecot.append(mail_user.name, mail_user.password, tricky_messages()[:1], mailbox="Archive") == [3]
    assert dovecot.mailbox_status(mail_user.name, "Archive")["messages"] == 3
    assert dovecot.mailbox_status(mail_user.name)["messages"] == 0


def test_pop3_stat_list_and_uidl_follow_the_appended_messages(dovecot: Dovecot, filled: Filled) -> None:
    uidvalidity = dovecot.mailbox_status(filled.user.name)["uidvalidity"]
    with pop3_session(dovecot, filled.user) as conn:
        count, total = conn.stat()
        _, listing, _ = conn.list()
        _, uidls, _ = conn.uidl()
    sizes = [pop3_size(raw) for raw in filled.messages]
    assert (count, total) == (len(filled.messages), sum(sizes))
    assert listing == [b"%d %d" % (n, size) for n, size in enumerate(sizes, 1)]
    # pop3_uidl_format = %08Xu%08Xv, and yet Dovecot writes the hex digits in lower case.
    assert uidls == [b"%d %08x%08x" % (n, uid, uidvalidity) for n, uid in enumerate(filled.uids, 1)]


@pytest.mark.parametrize("mode", ["plain", "stls", "pop3s"])
def test_poplib_retr_returns_the_appended_bytes(dovecot: Dovecot, filled: Filled, mode: PopMode) -> None:
    with pop3_session(dovecot, filled.user, mode) as conn:
        got = [retr(conn, n) for n in range(1, len(filled.messages) + 1)]
    assert got == [pop3_view(raw) for raw in filled.messages]
    tls_logins = [line for line in login_lines(dovecot, filled.user, 1) if ", TLS" in line]
    assert len(tls_logins) == (0 if mode == "plain" else 1)


def test_poplib_retr_of_a_10_mib_message(dovecot: Dovecot, mail_user: MailUser) -> None:
    raw = big_message()
    assert len(raw) == 10 * 1024 * 1024
    dovecot.append(mail_user.name, mail_user.password, [raw])
    with pop3_session(dovecot, mail_user) as conn:
        assert conn.stat() == (1, len(raw))
        assert retr(conn, 1) == raw


def test_pop3s_refuses_a_certificate_from_another_ca(dovecot: Dovecot) -> None:
    stranger = ssl.create_default_context()
    trustme.CA().configure_trust(stranger)
    with pytest.raises(ssl.SSLCertVerificationError):
        poplib.POP3_SSL(dovecot.host, dovecot.pop3s_port, context=stranger, timeout=10)


def test_bad_password_is_refused_fast(dovecot: Dovecot, mail_user: MailUser) -> None:
    conn = poplib.POP3(dovecot.host, dovecot.pop3_port, timeout=10)
    try:
        conn.user(mail_user.name)
        started = time.monotonic()
        with pytest.raises(poplib.error_proto, match="AUTH"):
            conn.pass_("wrong-" + mail_user.password)
        assert time.monotonic() - started < 0.25
    finally:
        conn.quit()


def test_a_new_user_can_log_in_at_once(dovecot: Dovecot, mail_user: MailUser) -> None:
    # Dovecot re-reads a passwd-file at most once a second; users added back to back must still work.
    for n in range(3):
        user = MailUser(f"{mail_user.name}-{n}", "pw")
        dovecot.add_user(user.name, user.password)
        dovecot.add_user(user.name, user.password)
        with pop3_session(dovecot, user) as conn:
            assert conn.stat() == (0, 0)


def test_expunge_all_empties_the_maildrop(dovecot: Dovecot, filled: Filled) -> None:
    dovecot.expunge_all(filled.user.name)
    with pop3_session(dovecot, filled.user) as conn:
        assert conn.stat() == (0, 0)


def test_new_uidvalidity_changes_every_uidl(dovecot: Dovecot, filled: Filled) -> None:
    with pop3_session(dovecot, filled.user) as conn:
        before = conn.uidl()[1]
    dovecot.set_uidvalidity(filled.user.name, 12345)
    with pop3_session(dovecot, filled.user) as conn:
        after = conn.uidl()[1]
    assert len(after) == len(before)
    assert all(line.endswith(b"%08x" % 12345) for line in after)
    assert not set(before) & set(after)


def test_log_text_records_logins_and_failures(dovecot: Dovecot, filled: Filled) -> None:
    with pop3_session(dovecot, filled.user):
        pass
    assert login_lines(dovecot, filled.user, 1)
    with pytest.raises(poplib.error_proto), pop3_session(dovecot, MailUser(filled.user.name, "wrong")):
        pass
    deadline = time.monotonic() + 5
    while f"auth failed, 1 attempts in 0 secs): user=<{filled.user.name}>" not in dovecot.log_text():
        assert time.monotonic() < deadline, dovecot.log_text()[-2000:]
        time.sleep(0.02)


def test_doveadm_failure_raises_with_its_message(dovecot: Dovecot) -> None:
    with pytest.raises(RuntimeError, match="exited"):
        dovecot.doveadm("mailbox", "status", "-u", "nobody-here", "messages", "INBOX")


def test_a_missing_program_is_an_error_not_a_skip() -> None:
    with pytest.raises(MissingProgram, match="make deps"):
        require_program("no-such-pop3-client")


# --- curl ------------------------------------------------------------------------------------------------


def test_curl_list_uidl_top_and_retr(dovecot: Dovecot, filled: Filled) -> None:
    url = pop3_url(dovecot.host, dovecot.pop3_port)
    user, password = filled.user.name, filled.user.password
    listing = curl_pop3(url, user=user, password=password)
    sizes = [pop3_size(raw) for raw in filled.messages]
    assert listing == b"".join(b"%d %d\r\n" % (n, size) for n, size in enumerate(sizes, 1))
    uidl = curl_pop3(url, "-X", "UIDL", user=user, password=password)
    assert uidl.count(b"\r\n") == len(filled.messages)
    top = curl_pop3(url, "-X", "TOP 2 0", user=user, password=password)
    assert top == pop3_view(filled.messages[1]).split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"
    for n, raw in enumerate(filled.messages, 1):
        assert curl_pop3(pop3_url(dovecot.host, dovecot.pop3_port, str(n)), user=user, password=password) == (
            pop3_view(raw)
        )


@pytest.mark.parametrize("mode", ["stls", "pop3s"])
def test_curl_over_tls_verifies_the_ca(
    dovecot: Dovecot, filled: Filled, mode: PopMode, tmp_path: Path
) -> None:
    if mode == "stls":
        url, extra = pop3_url(dovecot.host, dovecot.pop3_port, "2"), ["--ssl-reqd"]
    else:
        url, extra = pop3_url(dovecot.host, dovecot.pop3s_port, "2", implicit_tls=True), []
    user, password = filled.user.name, filled.user.password
    got = curl_pop3(url, *extra, user=user, password=password, ca_file=dovecot.ca_file)
    assert got == pop3_view(filled.messages[1])
    assert all(", TLS" in line for line in login_lines(dovecot, filled.user, 1))
    stranger = tmp_path / "stranger.pem"
    trustme.CA().cert_pem.write_to_path(str(stranger))
    with pytest.raises(ClientError, match="certificate"):
        curl_pop3(url, *extra, user=user, password=password, ca_file=stranger)


def test_curl_failure_raises_with_stderr(dovecot: Dovecot, mail_user: MailUser) -> None:
    with pytest.raises(ClientError, match=r"Login denied|Authentication"):
        curl_pop3(pop3_url(dovecot.host, dovecot.pop3_port), user=mail_user.name, password="wrong")


# --- fetchmail, mpop, getmail ----------------------------------------------------------------------------

CLIENT_MODES = [
    (client, tls)
    for client in CLIENTS
    for tls in ("none", "starttls", "implicit")
    if not (client == "getmail" and tls == "starttls")  # getmail6 has no POP3 STARTTLS
]


@pytest.mark.client
@pytest.mark.parametrize(("client", "tls"), CLIENT_MODES)
def test_client_fetches_everything_once_then_only_new_mail(
    dovecot: Dovecot, filled: Filled, client: str, tls: Tls, tmp_path: Path
) -> None:
    run = CLIENTS[client]
    port = dovecot.pop3s_port if tls == "implicit" else dovecot.pop3_port
    user, password = filled.user.name, filled.user.password

    def fetch() -> int:
        return run(dovecot.host, port, user, password, tmp_path, tls=tls, ca_file=dovecot.ca_file)

    assert fetch() == len(filled.messages)
    assert fetch() == 0
    late = sized_message(1, 5000, tag="late")
    dovecot.append(user, password, [late])
    assert fetch() == 1

    delivered = by_message_id([_undo_client_changes(client, raw) for raw in delivered_messages(tmp_path)])
    expected = by_message_id([pop3_view(raw) for raw in [*filled.messages, late]])
    assert delivered == expected
    logins = login_lines(dovecot, filled.user, 3)
    assert len(logins) == 3
    assert all((", TLS" in line) == (tls != "none") for line in logins)


def _undo_client_changes(client: str, raw: bytes) -> bytes:
    """Delivered files use LF line ends; getmail also puts a `Return-Path:` line on top."""
    text = normalize_crlf(raw)
    if client == "getmail":
        first, rest = text.split(b"\r\n", 1)
        assert first.startswith(b"Return-Path: ")
        text = rest
    return text


@pytest.mark.client
@pytest.mark.parametrize("client", list(CLIENTS))
def test_client_refuses_a_certificate_from_another_ca(
    dovecot: Dovecot, filled: Filled, client: str, tmp_path: Path
) -> None:
    stranger = tmp_path / "stranger.pem"
    trustme.CA().cert_pem.write_to_path(str(stranger))
    user, password = filled.user.name, filled.user.password
    with pytest.raises(ClientError):
        CLIENTS[client](
            dovecot.host, dovecot.pop3s_port, user, password, tmp_path / "w", tls="implicit", ca_file=stranger
        )
    assert delivered_messages(tmp_path / "w") == []


@pytest.mark.client
@pytest.mark.parametrize("client", list(CLIENTS))
def test_client_with_a_wrong_password_raises(
    dovecot: Dovecot, filled: Filled, client: str, tmp_path: Path
) -> None:
    with pytest.raises(ClientError):
        CLIENTS[client](dovecot.host, dovecot.pop3_port, filled.user.name, "wrong", tmp_path)
    assert delivered_messages(tmp_path) == []


# --- the corpus ------------------------------------------------------------------------------------------


def test_corpus_has_the_promised_edge_cases() -> None:
    messages = tricky_messages()
    assert len({message_id(raw) for raw in messages + tricky_messages()}) == 2 * len(messages)
    lines = {line for raw in messages for line in raw.split(b"\r\n")}
    assert {b".", b"..", b".x"} <= lines
    assert any(not raw.endswith(b"\r\n") for raw in messages)
    assert any(_invalid_utf8(raw) for raw in messages)
    assert all(b"\n" not in raw.replace(b"\r\n", b"") for raw in messages)
    assert [len(raw) for raw in sized_messages(3, 4096)] == [4096] * 3


def _invalid_utf8(raw: bytes) -> bool:
    try:
        raw.decode()
    except UnicodeDecodeError:
        return True
    return False
