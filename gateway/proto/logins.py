"""The credentials a POP3 client offers, as the protocol core hands them to the shell.

Secrets are kept out of ``repr`` so that a log line or a traceback never shows them.
"""

from __future__ import annotations

import dataclasses
from typing import Literal


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


TokenMechanism = Literal["auto", "xoauth2", "oauthbearer"]


@dataclasses.dataclass(frozen=True, slots=True)
class TokenLogin:
    """What a mapped account sends upstream with an OAuth2 access token or a JMAP API token (never
    produced by the POP3 core: the gateway builds it after checking the local password).

    ``username`` is the UPSTREAM identity, which may differ from the token's subject (a shared mailbox).
    ``mechanism`` matters to IMAP only: ``auto`` is OAUTHBEARER when the server advertises it, else
    XOAUTH2."""

    username: str
    token: str = dataclasses.field(repr=False)
    mechanism: TokenMechanism = "auto"


Login = PasswordLogin | ApopLogin | TokenLogin
