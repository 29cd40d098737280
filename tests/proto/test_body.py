"""Dot-stuffing, CRLF normalisation and the TOP cut, chunk by chunk."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.proto.body import BodyEncoder, wire_size
from gateway.proto.maildrop import Lookup, MessageInfo, SessionMaildrop


def encode(message: bytes, top: int | None = None, step: int | None = None) -> tuple[bytes, int]:
    enc = BodyEncoder(top)
    out = b""
    if step is None:
        out += enc.feed(message)
    else:
        for i in range(0, len(message), step):
            out += enc.feed(message[i : i + step])
    out += enc.finish()
    return out, enc.octets


def unstuff(wire: bytes) -> bytes:
    """What a client recovers from a multi-line reply body (RFC 1939 section 3)."""
    assert wire.endswith(b"\r\n.\r\n") or wire == b".\r\n"
    lines = wire[:-3].split(b"\r\n")
    return b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)


def test_dot_lines_are_stuffed() -> None:
    msg = b"Subject: x\r\n\r\n.\r\n..\r\n.x\r\nend.\r\n"
    out, octets = encode(msg)
    assert out == b"Subject: x\r\n\r\n..\r\n...\r\n..x\r\nend.\r\n.\r\n"
    assert octets == len(msg)


def test_message_starting_with_a_dot() -> None:
    out, _ = encode(b".hidden\r\n")
    assert out == b"..hidden\r\n.\r\n"


def test_missing_final_crlf_is_added_before_terminator_and_not_counted() -> None:
    msg = b"Subject: x\r\n\r\nno newline at end"
    out, octets = encode(msg)
    assert out == msg + b"\r\n.\r\n"
    assert octets == len(msg) == wire_size(msg)


def test_bare_lf_becomes_crlf_and_is_counted_as_crlf() -> None:
    msg = b"Subject: x\n\nline\n.dot\n"
    out, octets = encode(msg)
    assert out == b"Subject: x\r\n\r\nline\r\n..dot\r\n.\r\n"
    assert octets == len(msg) + 4 == wire_size(msg)


def test_crlf_split_across_chunks_is_not_doubled() -> None:
    msg = b"A: b\r\n\r\nx\r\ny\r\n"
    for step in range(1, len(msg) + 1):
        assert encode(msg, step=step) == encode(msg)


def test_bare_cr_stays_and_final_cr_gets_a_line_end() -> None:
    out, octets = encode(b"a\rb\r")
    assert out == b"a\rb\r\r\n.\r\n"
    assert octets == 4 == wire_size(b"a\rb\r")


def test_empty_message() -> None:
    assert encode(b"") == (b".\r\n", 0)
    assert encode(b"", top=0) == (b".\r\n", 0)


def test_top_zero_sends_headers_and_blank_line_only() -> None:
    msg = b"From: a\r\nSubject: b\r\n\r\nbody 1\r\nbody 2\r\n"
    out, _ = encode(msg, top=0)
    assert out == b"From: a\r\nSubject: b\r\n\r\n.\r\n"


def test_top_k_sends_k_body_lines() -> None:
    msg = b"From: a\r\n\r\n1\r\n.2\r\n3\r\n4\r\n"
    assert encode(msg, top=2)[0] == b"From: a\r\n\r\n1\r\n..2\r\n.\r\n"
    assert encode(msg, top=4)[0] == msg.replace(b".2", b"..2") + b".\r\n"


def test_top_huge_sends_the_whole_message() -> None:
    msg = b"From: a\r\n\r\n1\r\n.2\r\nlast without crlf"
    assert encode(msg, top=99999999) == encode(msg)


def test_top_of_message_without_body_separator_sends_everything() -> None:
    msg = b"From: a\r\nSubject: b\r\n"
    assert encode(msg, top=0)[0] == msg + b".\r\n"


def test_top_on_message_starting_with_blank_line() -> None:
    assert encode(b"\r\nbody\r\n", top=0)[0] == b"\r\n.\r\n"


def test_top_with_lf_message() -> None:
    assert encode(b"A: 1\n\nb1\nb2\n", top=1)[0] == b"A: 1\r\n\r\nb1\r\n.\r\n"


def test_encoder_marks_done_and_ignores_the_rest() -> None:
    enc = BodyEncoder(0)
    assert enc.feed(b"A: 1\r\n\r\nbody") == b"A: 1\r\n\r\n"
    assert enc.done
    assert enc.feed(b"more") == b""
    assert enc.finish() == b".\r\n"


def test_negative_top_is_a_caller_error() -> None:
    with pytest.raises(ValueError, match="top_lines"):
        BodyEncoder(-1)


def test_large_message_in_bounded_chunks() -> None:
    line = b"x" * 998 + b"\r\n"
    msg = b"Subject: big\r\n\r\n" + line * 10_000
    enc = BodyEncoder()
    biggest = 0
    total = 0
    for i in range(0, len(msg), 65536):
        out = enc.feed(msg[i : i + 65536])
        biggest = max(biggest, len(out))
        total += len(out)
    total += len(enc.finish())
    assert biggest <= 65536 + 100
    assert enc.octets == len(msg)
    assert total == len(msg) + 3


message_bytes = st.lists(
    st.sampled_from([b"a", b".", b"\r", b"\n", b"\r\n", b"..", b"\xff", b"Subject: x", b" "]), max_size=60
).map(b"".join)


@settings(max_examples=400, deadline=None)
@given(message_bytes, st.integers(1, 9), st.one_of(st.none(), st.integers(0, 5)))
def test_chunking_never_changes_the_output(msg: bytes, step: int, top: int | None) -> None:
    assert encode(msg, top=top, step=step) == encode(msg, top=top)


@settings(max_examples=400, deadline=None)
@given(message_bytes)
def test_client_recovers_the_normalised_message(msg: bytes) -> None:
    out, octets = encode(msg)
    normalised = msg.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    assert octets == len(normalised) == wire_size(msg)
    expected = normalised + (b"\r\n" if normalised and not normalised.endswith(b"\n") else b"")
    assert unstuff(out) == expected


def test_maildrop_lookup_and_plan() -> None:
    md = SessionMaildrop([MessageInfo(1, "a"), MessageInfo(2, "b")])
    assert len(md) == 2
    assert md.lookup(0) is Lookup.NO_SUCH_MESSAGE
    assert md.lookup(3) is Lookup.NO_SUCH_MESSAGE
    assert md.mark_deleted(2) == MessageInfo(2, "b")
    assert md.mark_deleted(2) is Lookup.DELETED
    assert md.stat() == (1, 1)
    assert md.commit_plan() == (1,)
    md.reset()
    assert md.commit_plan() == ()
    assert md.stat() == (2, 3)


@pytest.mark.parametrize("dots", [0, 1, 63, 64, 65, 500])
def test_dot_stuffing_with_few_and_many_dot_lines(dots: int) -> None:
    lines = [b".dot %d" % i if i < dots else b"line %d" % i for i in range(600)]
    msg = b"Subject: d\r\n\r\n" + b"\r\n".join(lines) + b"\r\n"
    out, _ = encode(msg)
    assert out == msg.replace(b"\r\n.", b"\r\n..") + b".\r\n"
    assert unstuff(out) == msg
