"""One account, one key: which names are the same account, and the keys built from them.

Locks, per-account limits, LOGIN-DELAY, the auth throttle and the UIDL namespace must all see one key per
upstream account, whatever case or realm the client typed. Two moments, two functions:

- Before the upstream has answered (the throttle, the lock-out), only the typed name is known:
  ``normalize(name, policy)`` applies the configured rule, and ``throttle_key`` turns the result into a
  bounded 16-byte key (a guesser's 100,000 distinct 255-byte names cost 16 bytes each, not 255).
- After a successful open, the maildrop names its account: ``Maildrop.identity``, the upstream's own
  answer where the protocol gives one (JMAP: the mail accountId; Maildir: the users-file record), else
  ``normalize`` of the typed name (IMAP: neither Dovecot nor Cyrus reports the canonical user name in the
  LOGIN reply, ID or NAMESPACE). ``account_key`` builds the one key from it, with the keys older versions
  used for the same login, so that ``durable.attach`` can carry an existing UIDL namespace over.

Rules of ``normalize``:
- ``username_case = "lower"`` (the default) lowercases ASCII A-Z only, as Dovecot's default
  ``auth_username_format = %Lu`` and Cyrus's ``username_tolower`` do. Never Unicode case folding: it would
  join names the upstream keeps apart (``straße``/``strasse``, the Kelvin sign and ``k``), and two accounts
  sharing one UIDL namespace is worse than two keys for one account. ``"exact"`` keeps the name as typed.
- ``default_realm``: a name without ``@`` gets ``@realm`` appended (Dovecot's ``auth_default_realm``), so
  ``alice`` and ``alice@realm`` are one account. Empty: no realm is added.

Compatibility: a name that equals its normalised form keys exactly as before (``alice`` with the defaults),
so existing UIDL stores, whose namespaces were built from the typed name, keep working unchanged.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import TYPE_CHECKING, Final, Literal

if TYPE_CHECKING:
    from gateway.backends.base import Backend, Maildrop
    from gateway.config import ServerConfig

MAX_USERNAME_OCTETS: Final = 256  # what the IMAP and JMAP backends pass through; longer is refused
_THROTTLE_NAME_CHARS: Final = 1024  # hashed at most; a longer name is refused upstream anyway
_ASCII_LOWER: Final = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")

UsernameCase = Literal["lower", "exact"]


@dataclasses.dataclass(frozen=True, slots=True)
class IdentityPolicy:
    username_case: UsernameCase = "lower"
    default_realm: str = ""

    def __post_init__(self) -> None:
        if self.username_case not in ("lower", "exact"):
            raise ValueError(f"username_case must be 'lower' or 'exact', not {self.username_case!r}")
        problem = realm_problem(self.default_realm)
        if problem:
            raise ValueError(f"default_realm {problem}")

    @classmethod
    def from_config(cls, server: ServerConfig) -> IdentityPolicy:
        return cls(username_case=server.username_case, default_realm=server.default_realm)


def realm_problem(realm: str) -> str:
    """Why ``realm`` cannot be a default realm ("" when it can; the empty realm means none)."""
    if len(realm) > 253:
        return "is longer than 253 characters"
    if "@" in realm or not realm.isprintable() or any(c.isspace() for c in realm):
        return "must be a domain: no '@', whitespace or control characters"
    return ""


DEFAULT_POLICY: Final = IdentityPolicy()


def normalize(username: str, policy: IdentityPolicy) -> str:
    """The account name ``username`` stands for under ``policy`` (pure; see the module's rules)."""
    name = username.translate(_ASCII_LOWER) if policy.username_case == "lower" else username
    if policy.default_realm and "@" not in name:
        realm = policy.default_realm
        name += "@" + (realm.translate(_ASCII_LOWER) if policy.username_case == "lower" else realm)
    return name


def throttle_key(username: str, policy: IdentityPolicy) -> bytes:
    """The auth throttle's account key: 16 bytes of BLAKE2b of the normalised (and capped) name."""
    name = normalize(username[:_THROTTLE_NAME_CHARS], policy)
    return hashlib.blake2b(name.encode("utf-8", "surrogatepass"), digest_size=16).digest()


@dataclasses.dataclass(frozen=True, slots=True)
class AccountKey:
    """The keys of one logged-in account."""

    key: str  # the [IN-USE] lock, the per-account limit, LOGIN-DELAY and the UIDL namespace
    identity: str  # the maildrop's canonical account identity
    legacy: tuple[str, ...]  # namespaces older versions used for this login (for ``durable.attach``)


def account_key(backend: Backend, drop: Maildrop, typed: str) -> AccountKey:
    """The keys for a maildrop that ``backend.open_maildrop`` just opened for the name ``typed``."""
    key = backend.lock_key(drop.identity)
    old = backend.lock_key(typed)  # before identities, the namespace was built from the typed name
    return AccountKey(key, drop.identity, () if old == key else (old,))
