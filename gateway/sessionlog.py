"""What one POP3 session did, and the one log line that says so when it ends.

Text lines are ``session end key=value ...``; every value that came from a client or an upstream is escaped
(``escape``) so that a user name with a CR, LF or terminal escape cannot forge or corrupt log lines. JSON
lines carry the same fields (JSON escapes them itself).
"""

from __future__ import annotations

import logging
import re
from typing import Final

log = logging.getLogger("gateway.session")

MAX_FIELD: Final = 200  # characters of one client-supplied value kept in a log line
_UNSAFE: Final = re.compile(r"[\x00-\x20\x7f-\x9f\\\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def escape(text: str, limit: int = MAX_FIELD) -> str:
    """``text`` with control, space, bidi and backslash characters as escapes, cut to ``limit``."""
    if len(text) > limit:
        text = text[:limit] + "..."
    return _UNSAFE.sub(_escape_one, text)


def _escape_one(match: re.Match[str]) -> str:
    ch = match.group()
    if ch == "\\":
        return "\\\\"
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


class SessionStats:
    __slots__ = ("dele", "dele_octets", "drift", "result", "retr", "retr_octets", "top", "top_octets", "user")

    def __init__(self) -> None:
        self.retr = self.top = self.dele = 0
        self.retr_octets = self.top_octets = self.dele_octets = 0
        self.result = "closed"
        self.user: str | None = None  # the account, once logged in
        self.drift: dict[str, object] = {}

    def ended(self, result: str) -> None:
        """Record how the session ended, unless a more precise result was recorded already."""
        if self.result == "closed":
            self.result = result


def log_session_end(peer: str, stats: SessionStats, duration: float) -> None:
    fields: dict[str, object] = {
        "event": "session_end",
        "peer": peer,
        "user": stats.user if stats.user else "-",
        "result": stats.result,
        "retr": stats.retr,
        "retr_octets": stats.retr_octets,
        "top": stats.top,
        "top_octets": stats.top_octets,
        "dele": stats.dele,
        "dele_octets": stats.dele_octets,
        **stats.drift,
        "duration": round(duration, 3),
    }
    log.info("session end %s", kv(fields), extra={"fields": fields})


def kv(fields: dict[str, object]) -> str:
    return " ".join(f"{k}={escape(str(v))}" for k, v in fields.items() if k != "event")
