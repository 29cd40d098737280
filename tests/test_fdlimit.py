"""File descriptors: the soft limit raised at start, an accept loop riding out EMFILE, codecs preloaded."""

from __future__ import annotations

import errno
import logging
import resource
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import trio
import trio.testing

from gateway import fdlimit
from gateway.fdlimit import ResilientListener, raise_nofile_limit

NOFILE = resource.RLIMIT_NOFILE


class FakeLimits:
    def __init__(self, soft: int, hard: int, refuse: bool = False) -> None:
        self.soft, self.hard, self.refuse = soft, hard, refuse
        self.calls: list[tuple[int, int]] = []

    def getrlimit(self, which: int) -> tuple[int, int]:
        assert which == NOFILE
        return self.soft, self.hard

    def setrlimit(self, which: int, limits: tuple[int, int]) -> None:
        assert which == NOFILE
        self.calls.append(limits)
        if self.refuse:
            raise ValueError("not allowed")
        self.soft = limits[0]


def test_the_soft_limit_is_raised_to_the_hard_one() -> None:
    fake = FakeLimits(1024, 65536)
    assert raise_nofile_limit(1000, getrlimit=fake.getrlimit, setrlimit=fake.setrlimit) == []
    assert fake.calls == [(65536, 65536)]


def test_a_limit_that_cannot_carry_max_sessions_is_warned_about() -> None:
    fake = FakeLimits(1024, 1024)
    [warning] = raise_nofile_limit(1000, getrlimit=fake.getrlimit, setrlimit=fake.setrlimit)
    assert fake.calls == []
    assert "open-file limit is 1024" in warning and "server.max_sessions = 1000" in warning
    assert f"may need {fdlimit.needed_fds(1000)}" in warning
    assert "to 320" in warning  # what the limit does carry


def test_a_refused_raise_is_warned_about() -> None:
    fake = FakeLimits(256, 4096, refuse=True)
    warnings = raise_nofile_limit(100, getrlimit=fake.getrlimit, setrlimit=fake.setrlimit)
    assert warnings[0] == "cannot raise the open-file limit from 256 to 4096: not allowed"
    assert "open-file limit is 256" in warnings[1]


def test_an_unlimited_hard_limit_gets_a_large_finite_soft_one() -> None:
    fake = FakeLimits(256, resource.RLIM_INFINITY)
    assert raise_nofile_limit(1000, getrlimit=fake.getrlimit, setrlimit=fake.setrlimit) == []
    assert fake.calls == [(1 << 20, resource.RLIM_INFINITY)]


def run_python(code: str, soft: int | None = None) -> subprocess.CompletedProcess[str]:
    def lower() -> None:
        if soft is not None:
            resource.setrlimit(NOFILE, (soft, resource.getrlimit(NOFILE)[1]))

    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        preexec_fn=lower,
    )


def test_the_real_soft_limit_is_raised() -> None:
    out = run_python(
        """
        import resource
        from gateway.fdlimit import raise_nofile_limit
        print(raise_nofile_limit(10))
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        print(soft == hard, soft)
        """,
        soft=200,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == "[]"
    assert out.stdout.splitlines()[1].startswith("True")


def test_serve_raises_the_soft_limit_at_start(tmp_path: Path) -> None:
    """The CLI calls it: a gateway started under a soft limit of 200 runs with the hard limit."""
    out = run_python(
        f"""
        import resource, sys
        from gateway import cli
        cli._start_checks(cli.cfg.Config(server=cli.cfg.ServerConfig(state_dir={str(tmp_path)!r})))
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        print(soft == hard)
        """,
        soft=200,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"


# ---------------------------------------------------------------- codecs


_UNDER_EMFILE = """
    import os, resource, sys
    from gateway import fdlimit
    if sys.argv[1] == "preload":
        fdlimit.preload_codecs()
    # no descriptor left: the next open() fails with EMFILE
    used = len(os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (used - 1, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    try:
        open("/dev/null")
    except OSError as exc:
        assert exc.errno == 24, exc
    else:
        raise SystemExit("the limit did not bite")
    "bücher.example".encode("idna")
    "caf\\xe9".encode("unicode_escape").decode("ascii")
    b"\\xe9".decode("latin-1"), "é".encode("utf-8"), b"x".decode("ascii")
    import codecs; codecs.encode(b"x", "base64")
    print("ok")
"""


def test_preloaded_codecs_need_no_descriptor_later() -> None:
    code = "import sys\nsys.argv = ['-', 'preload']\n" + textwrap.dedent(_UNDER_EMFILE)
    out = run_python(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_without_preload_a_codec_lookup_fails_under_emfile() -> None:
    """The control: this is the failure preload_codecs() prevents."""
    code = "import sys\nsys.argv = ['-', 'none']\n" + textwrap.dedent(_UNDER_EMFILE)
    out = run_python(code)
    assert out.returncode != 0
    assert "Too many open files" in out.stderr


# ---------------------------------------------------------------- the accept loop


class FlakyListener(trio.abc.Listener[trio.SocketStream]):
    """Fails ``failures`` times with ``errno_`` and then hands out streams."""

    def __init__(self, failures: int, errno_: int = errno.EMFILE) -> None:
        self.failures = failures
        self.errno = errno_
        self.calls: list[float] = []
        self.closed = False

    async def accept(self) -> trio.SocketStream:
        await trio.lowlevel.checkpoint()
        self.calls.append(trio.current_time())
        if self.failures > 0:
            self.failures -= 1
            raise OSError(self.errno, "Too many open files")
        a, b = trio.socket.socketpair()
        b.close()
        return trio.SocketStream(a)

    async def aclose(self) -> None:
        self.closed = True


def accept_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "gateway.fdlimit"]


async def test_emfile_backs_off_logs_rarely_and_recovers(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    inner = FlakyListener(100)
    errors: list[int] = []
    listener = ResilientListener(inner, name="test", on_failure=lambda exc: errors.append(exc.errno or 0))
    start = trio.current_time()
    stream = await listener.accept()
    await stream.aclose()
    assert len(errors) == 100 and listener.total_failures == 100
    # back-off grows 0.1, 0.2, 0.4, 0.8, then stays at 1 s
    gaps = [round(b - a, 3) for a, b in zip(inner.calls, inner.calls[1:], strict=False)]
    assert gaps[:6] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    assert max(gaps) == 1.0
    elapsed = trio.current_time() - start
    assert elapsed == pytest.approx(0.1 + 0.2 + 0.4 + 0.8 + 96 * 1.0)
    lines = accept_lines(caplog)
    # at most one line per 10 s, plus the recovery
    assert len(lines) <= elapsed / fdlimit.LOG_EVERY + 2
    assert lines[0].startswith("accept on test failing: EMFILE; 1 failure(s) since the last report")
    assert lines[-1].startswith("accept on test recovered")
    counted = [int(line.split("; ")[1].split()[0]) for line in lines[:-1]]
    recovered = int(lines[-1].split("(")[1].split()[0])
    assert sum(counted) + recovered == 100  # every failure counted once


async def test_failures_alternating_with_successes_are_logged_at_a_bounded_rate(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    inner = FlakyListener(0)
    listener = ResilientListener(inner, name="test")
    start = trio.current_time()
    for _ in range(300):
        inner.failures = 1
        await (await listener.accept()).aclose()
    elapsed = trio.current_time() - start
    assert elapsed == pytest.approx(30.0)  # 300 x 0.1 s
    lines = accept_lines(caplog)
    assert 2 <= len(lines) <= 2 * (elapsed / fdlimit.LOG_EVERY + 1)
    assert listener.total_failures == 300


async def test_after_recovery_the_backoff_starts_small_again(autojump_clock: trio.testing.MockClock) -> None:
    inner = FlakyListener(5, errno.ENFILE)
    listener = ResilientListener(inner)
    await (await listener.accept()).aclose()
    inner.failures = 1
    inner.calls.clear()
    await (await listener.accept()).aclose()
    assert round(inner.calls[1] - inner.calls[0], 3) == 0.1


@pytest.mark.parametrize("code", [errno.ENOBUFS, errno.ENOMEM])
async def test_other_capacity_errors_are_ridden_out(
    code: int, autojump_clock: trio.testing.MockClock
) -> None:
    listener = ResilientListener(FlakyListener(3, code))
    await (await listener.accept()).aclose()
    assert listener.total_failures == 3


async def test_other_errors_propagate() -> None:
    listener = ResilientListener(FlakyListener(1, errno.EBADF))
    with pytest.raises(OSError, match="Too many") as info:
        await listener.accept()
    assert info.value.errno == errno.EBADF


async def test_trio_serve_listeners_never_sees_emfile(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """trio's own loop logs every EMFILE, ten lines a second; behind the wrapper it logs none."""
    caplog.set_level(logging.DEBUG)
    inner = FlakyListener(50)
    served = trio.Event()

    async def handler(stream: trio.SocketStream) -> None:
        served.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, handler, [ResilientListener(inner)])
        await served.wait()
        nursery.cancel_scope.cancel()
    assert not [r for r in caplog.records if r.name.startswith("trio")]
    assert len(accept_lines(caplog)) <= 6 + 2


async def test_without_the_wrapper_trio_logs_every_emfile(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """The control: the log flood that the wrapper prevents."""
    caplog.set_level(logging.DEBUG)
    served = trio.Event()

    async def handler(stream: trio.SocketStream) -> None:
        served.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, handler, [FlakyListener(50)])
        await served.wait()
        nursery.cancel_scope.cancel()
    assert len([r for r in caplog.records if r.name.startswith("trio")]) == 50


async def test_aclose_and_socket_reach_the_inner_listener() -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    wrapped = ResilientListener(listeners[0])
    assert wrapped.socket.getsockname()[0] == "127.0.0.1"
    assert wrapped.name.startswith("127.0.0.1:")
    await wrapped.aclose()
    inner = FlakyListener(0)
    await ResilientListener(inner).aclose()
    assert inner.closed
    with pytest.raises(AttributeError):
        ResilientListener(inner).socket  # noqa: B018


def test_bad_backoff_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="backoff"):
        ResilientListener(FlakyListener(0), backoff_min=0)
