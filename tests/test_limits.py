"""Limits, throttling, trusted networks and the plaintext policy: pure bookkeeping driven by a fake clock."""

from __future__ import annotations

import ipaddress

import pytest

from gateway.identity import IdentityPolicy
from gateway.limits import (
    AuthThrottle,
    Limit,
    Lockout,
    PlaintextAuthPolicy,
    SessionLimits,
    ThrottlePolicy,
    TrustedNetworks,
    client_key,
    is_loopback,
    parse_ip,
)


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# ---------------------------------------------------------------- addresses


def test_client_key_unwraps_ipv4_mapped_and_widens_ipv6() -> None:
    assert client_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert client_key("192.0.2.7", 64) == "192.0.2.7"
    assert client_key("2001:db8::1") == "2001:db8::1"
    assert client_key("2001:db8::1", 64) == client_key("2001:db8::ffff:1", 64) == "2001:db8::/64"
    assert client_key("fe80::1%eth0") == "fe80::1"
    assert client_key("-") == "-"
    assert client_key(ipaddress.ip_address("10.1.2.3")) == "10.1.2.3"
    assert parse_ip(ipaddress.IPv6Address("fe80::1%eth0")) == ipaddress.IPv6Address("fe80::1")


@pytest.mark.parametrize(
    ("ip", "expected"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("10.0.0.1", False),
        ("::2", False),
        ("localhost", False),  # a name is not an address
        ("-", False),
        ("", False),
    ],
)
def test_is_loopback(ip: str, expected: bool) -> None:
    assert is_loopback(ip) is expected


def test_trusted_networks_membership() -> None:
    nets = TrustedNetworks(["10.0.0.0/8", "192.0.2.5", " 2001:db8::/32 "])
    assert nets.contains("10.200.1.1")
    assert nets.contains("::ffff:10.0.0.1")  # a dual-stack socket's view of an IPv4 peer
    assert nets.contains("192.0.2.5")
    assert not nets.contains("192.0.2.6")
    assert nets.contains("2001:db8:1::5")
    assert not nets.contains("2001:db9::5")
    assert not nets.contains("not an ip")
    assert "10.1.1.1" in nets
    assert 42 not in nets
    assert bool(nets) and not TrustedNetworks()
    assert [str(n) for n in nets] == ["10.0.0.0/8", "192.0.2.5/32", "2001:db8::/32"]
    assert "10.0.0.0/8" in repr(nets)
    assert nets.networks == tuple(nets)


@pytest.mark.parametrize("bad", ["10.0.0.1/8", "10.0.0.0/33", "example.org", ""])
def test_trusted_networks_refuse_what_is_no_network(bad: str) -> None:
    with pytest.raises(ValueError, match="not a network"):
        TrustedNetworks([bad])


def test_plaintext_policy_allows_loopback_and_listed_networks_only() -> None:
    default = PlaintextAuthPolicy()
    assert default.allows("127.0.0.1") and default.allows("::1")
    assert not default.allows("192.168.1.20")
    lan = PlaintextAuthPolicy(networks=TrustedNetworks(["192.168.1.0/24"]))
    assert lan.allows("192.168.1.20")
    assert not lan.allows("192.168.2.20")
    assert PlaintextAuthPolicy(everywhere=True).allows("203.0.113.9")


# ---------------------------------------------------------------- session limits


def test_per_ip_limit_refuses_the_extra_connection_and_frees_on_release() -> None:
    limits = SessionLimits(max_per_ip=2)
    assert limits.acquire_connection("192.0.2.1") is None
    assert limits.acquire_connection("::ffff:192.0.2.1") is None  # the same client
    assert limits.acquire_connection("192.0.2.1") is Limit.PER_IP
    assert limits.acquire_connection("192.0.2.2") is None
    assert limits.connections("192.0.2.1") == 2 and limits.total == 3
    limits.release_connection("192.0.2.1")
    assert limits.acquire_connection("192.0.2.1") is None


def test_total_limit_is_checked_before_the_per_ip_one() -> None:
    limits = SessionLimits(max_total=2, max_per_ip=1)
    assert limits.acquire_connection("192.0.2.1") is None
    assert limits.acquire_connection("192.0.2.2") is None
    assert limits.acquire_connection("192.0.2.1") is Limit.TOTAL
    assert limits.acquire_connection("192.0.2.3") is Limit.TOTAL
    assert limits.total == 2  # a refusal takes nothing


def test_ipv6_clients_of_one_prefix_share_a_per_ip_limit() -> None:
    limits = SessionLimits(max_per_ip=1, ipv6_prefix=64)
    assert limits.acquire_connection("2001:db8::1") is None
    assert limits.acquire_connection("2001:db8::2") is Limit.PER_IP
    assert limits.acquire_connection("2001:db8:0:1::1") is None


def test_per_account_limit() -> None:
    limits = SessionLimits(max_per_account=1)
    assert limits.acquire_account("alice") is None
    assert limits.acquire_account("alice") is Limit.PER_ACCOUNT
    assert limits.acquire_account("bob") is None
    assert limits.sessions("alice") == 1
    limits.release_account("alice")
    assert limits.sessions("alice") == 0
    assert limits.acquire_account("alice") is None


def test_zero_means_unlimited() -> None:
    limits = SessionLimits()
    for _ in range(500):
        assert limits.acquire_connection("192.0.2.1") is None
        assert limits.acquire_account("alice") is None
    assert limits.total == 500


def test_release_without_acquire_is_a_bug() -> None:
    limits = SessionLimits(max_per_ip=1)
    with pytest.raises(ValueError):
        limits.release_connection("192.0.2.1")
    with pytest.raises(ValueError):
        limits.release_account("alice")
    assert limits.acquire_account("alice") is None
    limits.release_account("alice")
    with pytest.raises(ValueError):
        limits.release_account("alice")


@pytest.mark.parametrize(
    "kwargs", [{"max_total": -1}, {"max_per_ip": -1}, {"max_per_account": -1}, {"ipv6_prefix": 129}]
)
def test_session_limits_refuse_bad_settings(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        SessionLimits(**kwargs)


# ---------------------------------------------------------------- throttling


def throttle(clock: FakeClock, **policy: float) -> AuthThrottle:
    return AuthThrottle(ThrottlePolicy(**policy), clock)  # type: ignore[arg-type]


def test_delay_doubles_from_base_to_cap() -> None:
    clock = FakeClock()
    t = throttle(clock, base_delay=1, max_delay=10)
    assert t.delay_for("192.0.2.1", "alice") == 0
    delays = []
    for _ in range(6):
        t.record_failure("192.0.2.1", "alice")
        delays.append(t.delay_for("192.0.2.1", "alice"))
    assert delays == [1, 2, 4, 8, 10, 10]


def test_delay_is_the_larger_of_client_and_account() -> None:
    clock = FakeClock()
    t = throttle(clock, base_delay=1, max_delay=60)
    for ip in ("192.0.2.1", "192.0.2.2", "192.0.2.3"):  # one account guessed from three addresses
        t.record_failure(ip, "alice")
    assert t.delay_for("198.51.100.9", "alice") == 4  # a fresh address still waits for the account
    assert t.delay_for("192.0.2.1", "bob") == 1  # that address is suspect for any account
    assert t.delay_for("198.51.100.9", "bob") == 0
    assert t.delay_for("192.0.2.1") == 1
    assert t.failures("198.51.100.9", "alice") == 3


def test_failures_expire_after_the_window() -> None:
    clock = FakeClock()
    t = throttle(clock, base_delay=1, window=60)
    t.record_failure("192.0.2.1", "alice")
    clock.advance(30)
    t.record_failure("192.0.2.1", "alice")
    assert t.delay_for("192.0.2.1", "alice") == 2
    clock.advance(30)  # the first failure is now exactly window old: forgotten
    assert t.delay_for("192.0.2.1", "alice") == 1
    clock.advance(30)
    assert t.delay_for("192.0.2.1", "alice") == 0


def test_success_forgets_the_account_but_not_the_client() -> None:
    clock = FakeClock()
    t = throttle(clock, base_delay=1)
    t.record_failure("192.0.2.1", "alice")
    t.record_failure("192.0.2.1", "alice")
    t.record_success("192.0.2.1", "alice")
    assert t.delay_for("198.51.100.9", "alice") == 0
    assert t.delay_for("192.0.2.1", "alice") == 2


def test_zero_base_delay_never_delays() -> None:
    clock = FakeClock()
    t = throttle(clock, base_delay=0, max_delay=0)
    t.record_failure("192.0.2.1", "alice")
    assert t.delay_for("192.0.2.1", "alice") == 0
    assert t.failures("192.0.2.1", "alice") == 1


def test_lockout_after_n_failures_within_the_window_then_a_fresh_count() -> None:
    clock = FakeClock()
    t = throttle(clock, base_delay=1, lockout_after=3, lockout_duration=600, window=300)
    t.record_failure("192.0.2.1", "alice")
    t.record_failure("192.0.2.2", "alice")
    assert t.locked_out("192.0.2.3", "alice") is None
    t.record_failure("192.0.2.3", "alice")
    assert t.locked_out("198.51.100.9", "alice") == Lockout("account", clock.now + 600)
    assert t.locked_out("192.0.2.1", "bob") is None  # each address failed only once
    clock.advance(599)
    assert t.locked_out("198.51.100.9", "alice") is not None
    clock.advance(1)
    assert t.locked_out("198.51.100.9", "alice") is None
    assert t.delay_for("198.51.100.9", "alice") == 0  # counting starts afresh
    t.record_failure("198.51.100.9", "alice")
    assert t.locked_out("198.51.100.9", "alice") is None


def test_lockout_reports_the_longer_of_client_and_account() -> None:
    clock = FakeClock()
    t = throttle(clock, lockout_after=2, lockout_duration=100)
    t.record_failure("192.0.2.1", "alice")
    t.record_failure("192.0.2.1", "bob")  # the address reaches 2 now
    assert t.locked_out("192.0.2.1", "carol") == Lockout("ip", clock.now + 100)
    clock.advance(10)
    t.record_failure("198.51.100.1", "alice")  # alice reaches 2 ten seconds later
    assert t.locked_out("192.0.2.1", "alice") == Lockout("account", clock.now + 100)


def test_failures_spread_beyond_the_window_never_lock_out() -> None:
    clock = FakeClock()
    t = throttle(clock, lockout_after=3, window=60)
    for _ in range(10):
        t.record_failure("192.0.2.1", "alice")
        clock.advance(31)
    assert t.locked_out("192.0.2.1", "alice") is None


def test_memory_is_bounded_by_max_keys_least_recently_failed_first() -> None:
    clock = FakeClock()
    t = AuthThrottle(ThrottlePolicy(base_delay=1), clock, max_keys=4)
    t.record_failure("192.0.2.1", "alice")
    t.record_failure("192.0.2.2", "bob")
    t.record_failure("192.0.2.1", "alice")  # refreshes both keys
    t.record_failure("192.0.2.3", "carol")  # 6 keys -> the two oldest (192.0.2.2 and bob) go
    assert len(t) == 4
    assert t.delay_for("192.0.2.2", "bob") == 0
    assert t.delay_for("192.0.2.1", "alice") == 2


def test_expired_records_are_swept() -> None:
    clock = FakeClock()
    t = throttle(clock, window=60, lockout_after=1, lockout_duration=120)
    for i in range(100):
        t.record_failure(f"10.0.{i // 256}.{i % 256}", None)
    assert len(t) == 100
    clock.advance(61)
    t.sweep()
    assert len(t) == 100  # locked out still: kept
    clock.advance(60)
    t.sweep()
    assert len(t) == 0


def test_sweeping_happens_by_itself() -> None:
    clock = FakeClock()
    t = throttle(clock, window=1)
    for i in range(3000):
        t.record_failure(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", None)
        clock.advance(1)
    assert len(t) < 1100


@pytest.mark.parametrize(
    "policy",
    [
        {"base_delay": -1},
        {"base_delay": 5, "max_delay": 1},
        {"window": 0},
        {"lockout_after": -1},
        {"lockout_duration": -1},
    ],
)
def test_throttle_policy_refuses_bad_settings(policy: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        ThrottlePolicy(**policy)  # type: ignore[arg-type]


def test_throttle_refuses_zero_keys() -> None:
    with pytest.raises(ValueError):
        AuthThrottle(ThrottlePolicy(), FakeClock(), max_keys=0)


def test_ipv6_clients_of_one_prefix_share_a_throttle() -> None:
    clock = FakeClock()
    t = AuthThrottle(ThrottlePolicy(base_delay=1), clock, ipv6_prefix=64)
    t.record_failure("2001:db8::1", "alice")
    assert t.delay_for("2001:db8::99", "bob") == 1
    assert t.delay_for("2001:db8:0:1::1", "bob") == 0


# ---------------------------------------------------------------- throttle keys: one per account, bounded


def test_case_variants_of_a_name_share_one_lockout() -> None:
    clock = FakeClock()
    t = throttle(clock, base_delay=1, lockout_after=3)
    for ip, name in (("192.0.2.1", "ALICE"), ("192.0.2.2", "Alice"), ("192.0.2.3", "aLiCe")):
        t.record_failure(ip, name)
    assert t.locked_out("198.51.100.9", "alice") == Lockout("account", clock.now + 900)
    assert t.locked_out("198.51.100.9", "bob") is None


def test_case_variants_of_a_name_share_one_delay_and_one_success() -> None:
    clock = FakeClock()
    t = throttle(clock, base_delay=1, max_delay=60)
    t.record_failure("192.0.2.1", "ALICE")
    t.record_failure("192.0.2.2", "alice")
    assert t.delay_for("198.51.100.9", "Alice") == 2
    t.record_success("198.51.100.9", "alice")
    assert t.delay_for("198.51.100.9", "ALICE") == 0


def test_the_default_realm_joins_a_name_and_its_qualified_form() -> None:
    clock = FakeClock()
    policy = IdentityPolicy(default_realm="example.com")
    t = AuthThrottle(ThrottlePolicy(base_delay=1, lockout_after=2), clock, identity=policy)  # type: ignore[arg-type]
    t.record_failure("192.0.2.1", "alice")
    t.record_failure("192.0.2.2", "Alice@Example.COM")
    assert t.locked_out("198.51.100.9", "alice") is not None
    exact = AuthThrottle(ThrottlePolicy(base_delay=1), clock, identity=IdentityPolicy("exact"))  # type: ignore[arg-type]
    exact.record_failure("192.0.2.1", "ALICE")
    assert exact.delay_for("198.51.100.9", "alice") == 0  # a case-sensitive upstream: other accounts


def test_long_guessed_names_cost_no_more_memory_than_short_ones() -> None:
    """A guesser's 100,000 distinct 255-byte names must not fill MAX_KEYS * 255 bytes: keys are hashed.

    Checked on what the throttle keeps (the allocator's totals vary with what else ran in the process)."""
    t = throttle(FakeClock(), base_delay=1)
    for i in range(2000):
        t.record_failure("192.0.2.1", f"{i:0255d}")
    account_keys = [key for scope, key in t._records if scope == "account"]
    assert len(account_keys) == 2000
    assert {type(k) for k in account_keys} == {bytes}
    assert {len(k) for k in account_keys} == {16}  # not the 255-character names
