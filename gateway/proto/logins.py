"""The credentials a POP3 client offers, as the protocol core hands them to the shell.

Secrets are kept out of ``repr`` so that a log line or a traceback never shows them.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True, slots=True)
class PasswordLogin:
    """USER/PASS, AUTH PLAIN or AUTH LOGIN."""

    username: str
    password: str = dataclasses.field(repr=False)


@dataclasses.dataclass(frozen=True, slots=True)
class ApopLogin:
    """APOP (RFC 1939 section 7): an MD5 digest of the greeting's timestamp and a shared secret."""

    username: str
    timestamp: str  # the greeting's <...@...> banner, brackets included
    digest: str = dataclasses.field(repr=False)  # lowercase hex, 32 characters


Login = PasswordLogin | ApopLogin
