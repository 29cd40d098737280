"""Test messages as bytes, and what a POP3 client should see of them.

Every message has a unique Message-ID (Cyrus JMAP merges byte-identical messages into one Email, and
tests match deliveries by Message-ID). Line ends are CRLF unless a message exists to break that rule.
"""

from __future__ import annotations

import re
import uuid

CRLF = b"\r\n"
_MESSAGE_ID = re.compile(rb"^Message-ID:[ \t]*(<[^>\r\n]*>)", re.IGNORECASE | re.MULTILINE)


def new_message_id(tag: str = "t") -> bytes:
    return b"<%s.%s@pop3-gateway.test>" % (tag.encode(), uuid.uuid4().hex.encode())


def message(
    subject: str | bytes, body_lines: list[bytes], *, final_crlf: bool = True, tag: str = "t"
) -> bytes:
    """A plain text/plain message with CRLF line ends and a fresh Message-ID."""
    head = [
        b"From: Sender <sender@pop3-gateway.test>",
        b"To: Receiver <receiver@pop3-gateway.test>",
        b"Subject: " + (subject.encode() if isinstance(subject, str) else subject),
        b"Date: Mon, 01 Jan 2024 00:00:00 +0000",
        b"Message-ID: " + new_message_id(tag),
        b"MIME-Version: 1.0",
        b"Content-Type: text/plain; charset=utf-8",
        b"Content-Transfer-Encoding: 8bit",
    ]
    text = CRLF.join([*head, b"", *body_lines])
    return text + CRLF if final_crlf else text


def tricky_messages() -> list[bytes]:
    """The edge cases every POP3 path must carry byte for byte (a fresh set of Message-IDs per call)."""
    return [
        message("plain", [b"Hello, world."], tag="plain"),
        message(
            "dot-stuffing",
            [b"Lines that start with a dot:", b".", b"..", b"...", b".x", b"..x", b" .", b"end"],
            tag="dots",
        ),
        message("8-bit utf-8 ✓ Grüße", ["Grüße, naïve café — ✓".encode()], tag="utf8"),
        message(
            b"invalid utf-8 \xe9t\xe9 \xff",
            [
                b"latin-1 \xe9t\xe9, lone continuation \x80, overlong \xc0\xaf, truncated \xe2\x82",
                b"\xff\xfe",
            ],
            tag="badutf8",
        ),
        message(
            "no final CRLF", [b"first line", b"last line has no line end"], final_crlf=False, tag="nocrlf"
        ),
        message("no final CRLF, last line a dot", [b"body", b"."], final_crlf=False, tag="nocrlfdot"),
        message("empty body", [], tag="empty"),
        message("long line", [b"x" * 998, b"y" * 1500], tag="long"),
        message("ends with a blank line", [b"text", b""], tag="blank"),
    ]


def sized_message(index: int, size: int, *, tag: str = "sized") -> bytes:
    """A message of exactly `size` bytes (at least its ~330-byte header), numbered in its Subject."""
    head = message(f"message {index}", [], tag=tag)
    room = size - len(head)
    if room <= 0:
        return head
    line = b"%06d " % index + b"abcdefghijklmnopqrstuvwxyz0123456789-" * 2 + CRLF  # 82 bytes
    body = (line * (room // len(line) + 1))[:room]
    if room >= 2:
        body = body[:-2] + CRLF
    return head + body


def sized_messages(count: int, size: int, *, tag: str = "sized") -> list[bytes]:
    """`count` messages of `size` bytes each, with unique Message-IDs."""
    return [sized_message(i, size, tag=tag) for i in range(1, count + 1)]


def big_message(size: int = 10 * 1024 * 1024) -> bytes:
    """A message of `size` bytes (10 MiB by default) with a dot-stuffing line every ~100 lines."""
    block = b"".join(
        (b"." if n % 100 == 0 else b"") + b"%05d big message line %s" % (n, b"z" * 50) + CRLF
        for n in range(1000)
    )
    head = message("big message", [], tag="big")
    room = max(size - len(head), 2)
    body = (block * (room // len(block) + 1))[: room - 2] + CRLF
    return head + body


def message_id(raw: bytes) -> bytes:
    """The Message-ID (with angle brackets) of a raw message."""
    match = _MESSAGE_ID.search(raw)
    if match is None:
        raise ValueError("message has no Message-ID")
    return match.group(1)


def normalize_crlf(raw: bytes) -> bytes:
    """Every line end as CRLF (Maildir deliveries and fetchmail's MDA write LF)."""
    return re.sub(rb"\r?\n", CRLF, raw)


def pop3_view(raw: bytes) -> bytes:
    """What a POP3 client reassembles from RETR of `raw`: CRLF line ends, ending in CRLF.

    RFC 1939 multi-line replies are lines, so a message without a final CRLF comes back with one.
    """
    text = normalize_crlf(raw)
    return text if text.endswith(CRLF) else text + CRLF


def pop3_size(raw: bytes) -> int:
    """The size LIST should report for `raw`, as Dovecot counts it (CRLF line ends, no dot-stuffing)."""
    return len(normalize_crlf(raw))
