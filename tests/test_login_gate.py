"""The login gate on its own: throttle, lock-out, reservations, LOGIN-DELAY memory, with virtual time."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing

from gateway import login as gate_module
from gateway.backends.base import ApopUnavailable, Login, PasswordLogin
from gateway.limits import AuthThrottle, SessionLimits, ThrottlePolicy
from gateway.login import Admitted, GateSettings, LoginGate, Refused
from gateway.metrics import Metrics
from gateway.proto.logins import ApopLogin
from gateway.proto.pop3 import Refusal
from tests.fakes import FakeBackend


class CountingBackend(FakeBackend):
    def __init__(self) -> None:
        super().__init__({"alice": "pw", "bob": "pw"}, {"alice": {}, "bob": {}})
        self.asked = 0

    @contextlib.asynccontextmanager
    async def open_maildrop(self, login: Login) -> AsyncIterator[object]:  # type: ignore[override]
        self.asked += 1
        if isinstance(login, ApopLogin):
            raise ApopUnavailable("no APOP secret")
        async with super().open_maildrop(login) as drop:
            yield drop


def gate(
    backend: FakeBackend | None = None, *, login_delay: int = 0, **policy: float
) -> tuple[LoginGate, CountingBackend]:
    be = backend or CountingBackend()
    assert isinstance(be, CountingBackend)
    throttle = AuthThrottle(ThrottlePolicy(**policy), trio.current_time)  # type: ignore[arg-type]
    g = LoginGate(
        be,
        limits=SessionLimits(),
        throttle=throttle,
        metrics=Metrics(process=False),
        settings=GateSettings(login_delay=login_delay),
    )
    return g, be


async def attempt(g: LoginGate, user: str, password: str, ip: str) -> tuple[Admitted | Refused, float]:
    start = trio.current_time()
    async with contextlib.AsyncExitStack() as stack:
        result = await g.login(PasswordLogin(user, password), ip=ip, peer=ip, stack=stack)
    return result, trio.current_time() - start


async def test_parallel_guesses_from_one_address_wait_longer_and_longer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    g, be = gate(base_delay=1, max_delay=30)
    await attempt(g, "alice", "wrong", "192.0.2.7")  # one failure on record: every guess now waits
    waits: list[float] = []

    async def guess() -> None:
        result, waited = await attempt(g, "alice", "wrong", "192.0.2.7")
        assert isinstance(result, Refused) and result.outcome.refusal is Refusal.AUTH
        waits.append(round(waited))

    async with trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(guess)
    # reserved before the wait: each guess waits as if those in flight ahead of it had failed
    assert sorted(waits) == [1, 2, 4, 8, 16] + [30] * 15
    assert be.asked == 21


async def test_parallel_guesses_cannot_overshoot_the_lockout(autojump_clock: trio.testing.MockClock) -> None:
    g, be = gate(base_delay=0, lockout_after=5, lockout_duration=600)
    results: list[Admitted | Refused] = []

    async def guess() -> None:
        results.append((await attempt(g, "alice", "wrong", "192.0.2.7"))[0])

    async with trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(guess)
    assert be.asked == 5  # exactly lockout_after guesses reached the upstream, not 20
    labels = sorted(r.outcome.result for r in results if isinstance(r, Refused))
    assert labels == ["auth"] * 5 + ["locked-out"] * 15


async def test_a_clean_address_is_not_punished_for_guesses_elsewhere(
    autojump_clock: trio.testing.MockClock,
) -> None:
    g, _ = gate(base_delay=1, max_delay=30, lockout_after=5, lockout_duration=600)
    for _ in range(10):  # a guesser hammers alice from its own address until it is locked out
        await attempt(g, "alice", "wrong", "198.51.100.66")
    result, waited = await attempt(g, "alice", "pw", "192.0.2.10")  # the owner, from a clean address
    assert isinstance(result, Admitted)
    assert waited == 0
    # the guesser is still locked out, and its address is refused without the upstream
    result, _ = await attempt(g, "alice", "pw", "198.51.100.66")
    assert isinstance(result, Refused) and result.outcome.result == "locked-out"


async def test_an_address_that_failed_feels_the_accounts_delay(
    autojump_clock: trio.testing.MockClock,
) -> None:
    g, _ = gate(base_delay=1, max_delay=30)
    for _ in range(4):
        await attempt(g, "alice", "wrong", "198.51.100.66")
    await attempt(g, "bob", "wrong", "192.0.2.10")  # this address failed once, on another account
    _, waited = await attempt(g, "alice", "wrong", "192.0.2.10")
    assert waited == 8  # alice's four failures count for an address with failures of its own


async def test_a_lockout_answers_after_the_same_delay_as_a_failure(
    autojump_clock: trio.testing.MockClock,
) -> None:
    g, be = gate(base_delay=2, max_delay=30, lockout_after=3, lockout_duration=600)
    waits = [(await attempt(g, "alice", "wrong", "192.0.2.7"))[1] for _ in range(3)]
    assert waits == [0, 2, 4]
    result, waited = await attempt(g, "alice", "pw", "192.0.2.7")
    assert isinstance(result, Refused) and result.outcome.refusal is Refusal.AUTH
    assert result.outcome.result == "locked-out"
    assert waited == 4  # not instant: the guesser cannot tell a lock-out from a failure
    assert be.asked == 3


async def test_an_apop_that_can_never_succeed_is_no_guess(autojump_clock: trio.testing.MockClock) -> None:
    g, _ = gate(base_delay=1, lockout_after=2)
    for _ in range(5):
        async with contextlib.AsyncExitStack() as stack:
            result = await g.login(
                ApopLogin("alice", "<x@y>", "0" * 32), ip="192.0.2.7", peer="-", stack=stack
            )
        assert isinstance(result, Refused) and result.outcome.refusal is Refusal.AUTH
    assert g.throttle.failures("192.0.2.7", "alice") == 0
    result, waited = await attempt(g, "alice", "pw", "192.0.2.7")
    assert isinstance(result, Admitted) and waited == 0


async def test_refusals_after_the_password_was_right_are_no_failures(
    autojump_clock: trio.testing.MockClock,
) -> None:
    g, _ = gate(base_delay=1, lockout_after=2)
    async with contextlib.AsyncExitStack() as first:
        assert isinstance(
            await g.login(PasswordLogin("alice", "pw"), ip="192.0.2.7", peer="-", stack=first), Admitted
        )
        for _ in range(3):  # [IN-USE] while the first session holds the maildrop
            result, _ = await attempt(g, "alice", "pw", "192.0.2.7")
            assert isinstance(result, Refused) and result.outcome.refusal is Refusal.IN_USE
    assert g.throttle.failures("192.0.2.7", "alice") == 0


async def test_last_logins_are_bounded(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gate_module, "MAX_REMEMBERED_LOGINS", 50)
    be = CountingBackend()
    be.users.update({f"user{i}": "pw" for i in range(200)})
    be.boxes.update({f"user{i}": {} for i in range(200)})
    g, _ = gate(be, login_delay=300)
    for i in range(200):
        result, _ = await attempt(g, f"user{i}", "pw", "192.0.2.7")
        assert isinstance(result, Admitted)
    assert len(g._last_login) == 50
    await trio.sleep(301)
    await attempt(g, "alice", "pw", "192.0.2.7")
    assert len(g._last_login) == 1  # entries older than login_delay no longer matter and are gone
