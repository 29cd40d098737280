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


@dataclasses.dataclass(frozen=True, slots=True)
class TokenLogin:
    """What a mapped account sends upstream with an OAuth2 / bearer credential (never typed by a client)."""

    username: str  # the UPSTREAM identity (may differ from the token's subject: a shared mailbox)
    token: str = dataclasses.field(repr=False)  # access token / JMAP API token
    mechanism: Literal["auto", "xoauth2", "oauthbearer"] = (
        "auto"  # IMAP only; auto = OAUTHBEARER if advertised
    )


# The contract (docs: issue 11) is ``PasswordLogin | ApopLogin | TokenLogin``; the IMAP and JMAP backends
# learn TokenLogin in another branch, so here it stays out of the union until they do.
Login = PasswordLogin | ApopLogin
