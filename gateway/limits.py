"""Session limits, auth-failure throttling, trusted networks and the plaintext-auth policy.

Pure bookkeeping: no I/O, no sleeping and no clock of its own. The caller injects the clock (float seconds;
``trio.current_time`` in the shell, a fake in tests) and does the waiting itself.

Rules:

- Client addresses are keyed by ``client_key``: an IPv4-mapped IPv6 address counts as its IPv4 address,
  and an IPv6 address may be widened to its prefix (``ipv6_prefix``, e.g. 64: one subscriber's network),
  so that one client cannot dodge a per-IP limit by walking its own /64. A peer that is no IP address
  (a Unix socket, a test's memory stream) is keyed by its text as given.
- ``SessionLimits``: a limit of 0 means unlimited. ``acquire_*`` either takes a slot and returns None, or
  takes nothing and returns the ``Limit`` that refused. Every successful acquire needs exactly one release;
  a release without an acquire is a bug (``ValueError``).
- ``AuthThrottle``: failures are counted per client key and per account within a sliding ``window``. The
  delay before the next attempt is ``base_delay * 2**(n-1)`` for n counted failures, capped at
  ``max_delay``, the larger of the client's and the account's. With ``lockout_after`` > 0, that many
  failures within the window lock the key out for ``lockout_duration`` and start its count afresh. A
  success forgets the account's failures, never the client's (a valid login must not launder an address
  that guesses other accounts' passwords). Memory is bounded: expired records are swept as it goes, and
  at most ``max_keys`` keys are kept (the least recently failed go first). Accounts are keyed by
  ``identity.throttle_key``: the typed name normalised by the ``identity`` policy (``ALICE`` and ``alice``
  share one count and one lock-out), capped and hashed to 16 bytes, whatever its length.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Final, Literal

from gateway.identity import DEFAULT_POLICY, IdentityPolicy, throttle_key

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_KEYS: Final = 100_000
_SWEEP_EVERY: Final = 1024  # record_failure calls between two sweeps of expired records
_MAX_REMEMBERED: Final = (
    64  # failures remembered per key beyond lockout_after: the delay is capped long before
)


class Limit(enum.Enum):
    TOTAL = "total"
    PER_IP = "per-ip"
    PER_ACCOUNT = "per-account"
    UNAUTHENTICATED = "unauthenticated"  # too many sessions that have not logged in yet


def parse_ip(ip: str | IPAddress) -> IPAddress | None:
    """The address, IPv4-mapped IPv6 unwrapped and any zone dropped; None when ``ip`` is no IP address."""
    if isinstance(ip, str):
        try:
            ip = ipaddress.ip_address(ip.partition("%")[0])
        except ValueError:
            return None
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip.scope_id is not None:
            return ipaddress.IPv6Address(int(ip))
    return ip


def client_key(ip: str | IPAddress, ipv6_prefix: int = 128) -> str:
    address = parse_ip(ip)
    if address is None:
        return str(ip)
    if address.version == 6 and ipv6_prefix < 128:
        return str(ipaddress.IPv6Network((int(address), ipv6_prefix), strict=False))
    return str(address)


def is_loopback(ip: str | IPAddress) -> bool:
    address = parse_ip(ip)
    return address is not None and address.is_loopback


# ---------------------------------------------------------------- trusted networks and plaintext policy


class TrustedNetworks:
    """A list of networks (``10.0.0.0/8``, ``2001:db8::/32``, or single addresses) and a membership test."""

    def __init__(self, networks: Iterable[str | IPNetwork] = ()) -> None:
        parsed: list[IPNetwork] = []
        for net in networks:
            if isinstance(net, str):
                try:
                    net = ipaddress.ip_network(net.strip(), strict=True)
                except ValueError as exc:
                    raise ValueError(f"not a network: {net!r} ({exc})") from None
            parsed.append(net)
        self._networks = tuple(parsed)

    @property
    def networks(self) -> tuple[IPNetwork, ...]:
        return self._networks

    def contains(self, ip: str | IPAddress) -> bool:
        address = parse_ip(ip)
        if address is None:
            return False
        return any(address.version == net.version and address in net for net in self._networks)

    def __contains__(self, ip: object) -> bool:
        return isinstance(ip, str | ipaddress.IPv4Address | ipaddress.IPv6Address) and self.contains(ip)

    def __bool__(self) -> bool:
        return bool(self._networks)

    def __iter__(self) -> Iterator[IPNetwork]:
        return iter(self._networks)

    def __repr__(self) -> str:
        return f"TrustedNetworks({[str(n) for n in self._networks]!r})"


@dataclasses.dataclass(frozen=True, slots=True)
class PlaintextAuthPolicy:
    """Who may send a password before TLS: loopback always; ``networks``; everyone if ``everywhere``.

    The shell computes ``allows(peer.ip, proxied=peer.proxied)`` once per connection (the real client
    when a PROXY header came, see ``gateway.proxied``) and hands it to the POP3 core as
    ``Settings.allow_plaintext_auth``; on TLS the core allows it anyway.

    Loopback's implicit permission is for the socket's own peer only. An address that a PROXY header
    claims (``proxied``) never gets it, not even 127.0.0.1 or ``::ffff:127.0.0.1``: the balancer's host
    is not ours. It may still match ``networks``, which the operator listed on purpose (a LAN behind the
    balancer). An unknown address (``None``: a PROXY LOCAL or UNKNOWN header, a failed ``getpeername``)
    matches nothing but ``everywhere``.
    """

    everywhere: bool = False
    networks: TrustedNetworks = dataclasses.field(default_factory=TrustedNetworks)

    def allows(self, ip: str | IPAddress | None, *, proxied: bool = False) -> bool:
        if self.everywhere:
            return True
        if ip is None:
            return False
        return (not proxied and is_loopback(ip)) or self.networks.contains(ip)


# ---------------------------------------------------------------- session limits


class SessionLimits:
    def __init__(
        self, *, max_total: int = 0, max_per_ip: int = 0, max_per_account: int = 0, ipv6_prefix: int = 128
    ) -> None:
        for name, value in (
            ("max_total", max_total),
            ("max_per_ip", max_per_ip),
            ("max_per_account", max_per_account),
        ):
            if value < 0:
                raise ValueError(f"{name} must be >= 0")
        if not 0 <= ipv6_prefix <= 128:
            raise ValueError("ipv6_prefix must be within 0..128")
        self.max_total = max_total
        self.max_per_ip = max_per_ip
        self.max_per_account = max_per_account
        self.ipv6_prefix = ipv6_prefix
        self._total = 0
        self._by_ip: dict[str, int] = {}
        self._by_account: dict[str, int] = {}

    @property
    def total(self) -> int:
        return self._total

    def connections(self, ip: str) -> int:
        return self._by_ip.get(client_key(ip, self.ipv6_prefix), 0)

    def sessions(self, account: str) -> int:
        return self._by_account.get(account, 0)

    def acquire_connection(self, ip: str) -> Limit | None:
        """At accept: one slot of the total and one of this client's, or the limit that refused."""
        if self.max_total and self._total >= self.max_total:
            return Limit.TOTAL
        key = client_key(ip, self.ipv6_prefix)
        if self.max_per_ip and self._by_ip.get(key, 0) >= self.max_per_ip:
            return Limit.PER_IP
        self._total += 1
        self._by_ip[key] = self._by_ip.get(key, 0) + 1
        return None

    def release_connection(self, ip: str) -> None:
        key = client_key(ip, self.ipv6_prefix)
        _decrement(self._by_ip, key, "connection")
        self._total -= 1

    def acquire_account(self, account: str) -> Limit | None:
        """At login: one of the account's slots (pass a normalised key, e.g. the backend's lock key)."""
        if self.max_per_account and self._by_account.get(account, 0) >= self.max_per_account:
            return Limit.PER_ACCOUNT
        self._by_account[account] = self._by_account.get(account, 0) + 1
        return None

    def release_account(self, account: str) -> None:
        _decrement(self._by_account, account, "account")


def _decrement(counts: dict[str, int], key: str, what: str) -> None:
    n = counts.get(key, 0)
    if n <= 0:
        raise ValueError(f"release of a {what} slot that was never acquired")
    if n == 1:
        del counts[key]
    else:
        counts[key] = n - 1


# ---------------------------------------------------------------- auth-failure throttling


@dataclasses.dataclass(frozen=True, slots=True)
class ThrottlePolicy:
    base_delay: float = 1.0  # seconds before the attempt after the first failure; 0 disables delays
    max_delay: float = 30.0
    window: float = 900.0  # failures older than this are forgotten
    lockout_after: int = 0  # failures within the window that lock the key out; 0 never locks out
    lockout_duration: float = 900.0

    def __post_init__(self) -> None:
        if self.base_delay < 0 or self.max_delay < self.base_delay:
            raise ValueError("need 0 <= base_delay <= max_delay")
        if self.window <= 0:
            raise ValueError("window must be > 0")
        if self.lockout_after < 0 or self.lockout_duration < 0:
            raise ValueError("lockout_after and lockout_duration must be >= 0")


Scope = Literal["ip", "account"]


@dataclasses.dataclass(frozen=True, slots=True)
class Lockout:
    scope: Scope
    until: float  # clock time when the lock-out ends


class _Record:
    __slots__ = ("failures", "locked_until")

    def __init__(self, maxlen: int) -> None:
        self.failures: deque[float] = deque(maxlen=maxlen)
        self.locked_until = float("-inf")


class AuthThrottle:
    def __init__(
        self,
        policy: ThrottlePolicy,
        clock: Callable[[], float],
        *,
        ipv6_prefix: int = 128,
        max_keys: int = MAX_KEYS,
        identity: IdentityPolicy = DEFAULT_POLICY,
    ) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be >= 1")
        self.policy = policy
        self._clock = clock
        self.ipv6_prefix = ipv6_prefix
        self.identity = identity
        self._max_keys = max_keys
        self._records: dict[tuple[Scope, str | bytes], _Record] = {}
        self._until_sweep = _SWEEP_EVERY

    def __len__(self) -> int:
        """Keys remembered now (for tests and a gauge)."""
        return len(self._records)

    def _keys(self, ip: str, account: str | None) -> list[tuple[Scope, str | bytes]]:
        keys: list[tuple[Scope, str | bytes]] = [("ip", client_key(ip, self.ipv6_prefix))]
        if account is not None:
            keys.append(("account", throttle_key(account, self.identity)))
        return keys

    def _live(self, key: tuple[Scope, str | bytes], now: float) -> _Record | None:
        record = self._records.get(key)
        if record is not None:
            horizon = now - self.policy.window
            while record.failures and record.failures[0] <= horizon:
                record.failures.popleft()
        return record

    def failures(self, ip: str, account: str | None = None) -> int:
        """The larger count of recent failures of the client and of the account."""
        now = self._clock()
        return max((len(r.failures) for k in self._keys(ip, account) if (r := self._live(k, now))), default=0)

    def delay_for(self, ip: str, account: str | None = None) -> float:
        """Seconds to wait before checking the next credentials from ``ip`` for ``account``."""
        n = self.failures(ip, account)
        if n == 0 or self.policy.base_delay == 0:
            return 0.0
        return float(min(self.policy.base_delay * 2.0 ** min(n - 1, 64), self.policy.max_delay))

    def locked_out(self, ip: str, account: str | None = None) -> Lockout | None:
        """The lock-out in force for the client or the account (the one lasting longer), or None."""
        now = self._clock()
        found: Lockout | None = None
        for scope, key in self._keys(ip, account):
            record = self._records.get((scope, key))
            if (
                record is not None
                and record.locked_until > now
                and (found is None or record.locked_until > found.until)
            ):
                found = Lockout(scope, record.locked_until)
        return found

    def record_failure(self, ip: str, account: str | None = None) -> None:
        now = self._clock()
        policy = self.policy
        for key in self._keys(ip, account):
            record = self._live(key, now)
            if record is None:
                record = _Record(max(policy.lockout_after, _MAX_REMEMBERED))
            else:
                del self._records[key]  # re-inserted below: the dict's order is least recently failed first
            self._records[key] = record
            record.failures.append(now)
            if policy.lockout_after and len(record.failures) >= policy.lockout_after:
                record.locked_until = now + policy.lockout_duration
                record.failures.clear()
        while len(self._records) > self._max_keys:
            del self._records[next(iter(self._records))]
        self._until_sweep -= 1
        if self._until_sweep <= 0:
            self.sweep()

    def record_success(self, ip: str, account: str) -> None:
        """Forget the account's failures (the client's stay until they expire)."""
        self._records.pop(("account", throttle_key(account, self.identity)), None)

    def sweep(self) -> None:
        """Drop every record with no failure in the window and no lock-out in force."""
        self._until_sweep = _SWEEP_EVERY
        now = self._clock()
        for key in list(self._records):
            record = self._live(key, now)
            assert record is not None
            if not record.failures and record.locked_until <= now:
                del self._records[key]
