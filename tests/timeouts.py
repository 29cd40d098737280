"""A per-test timeout that also ends a hung trio test cleanly and says where its tasks were waiting.

pytest-timeout gives the settings (the `timeout` ini value, `--timeout`, `@pytest.mark.timeout(n)`); this
plugin replaces how its "signal" method fires, because neither built-in method suits trio:

- "signal" raises from the SIGALRM handler wherever the main thread is. A hung trio test is nearly always
  parked in trio's scheduler (`epoll.poll`), so the exception tears through trio's run loop: the report
  points at `epoll.poll`, trio's global state is left half torn down (the next trio test fails with
  "Attempted to call run() from inside a run()") and `filterwarnings = error` turns the leftovers into
  more errors.
- "thread" dumps the threads' stacks and `os._exit`s the whole run; the stacks again show only
  `epoll.poll`, not the `await` the test was stuck on.

Here, when the alarm fires:

1. outside `trio.run` (a sync test or fixture), or in a trio task's own code that does not yield (a
   blocking call), it raises `pytest.fail(...)` right there, as trio itself delivers KeyboardInterrupt to
   unprotected code;
2. inside trio's machinery, it asks trio (`TrioToken.run_sync_soon`, which is signal-safe) to record every
   task's await stack and cancel the test's nurseries; when `trio.run` returns, the test fails with
   "Timeout (>N s)" and those stacks;
3. if the test still runs `GRACE` seconds later (it swallowed the cancellation or is shielded), it writes
   every thread's stack and the recorded task stacks to stderr and ends the run with `os._exit(1)`: a
   hung run must not hold CI for its whole time limit.

`faulthandler_timeout` (set above the timeout plus the grace in pyproject.toml) is the last resort, for a
hang that holds the GIL so that no Python signal handler can run.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
import threading
import traceback
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio

GRACE = 10.0  # seconds a cancelled trio test gets to unwind before the run is ended


@dataclass
class _Alarm:
    item: pytest.Item
    timeout: float
    stage: str = "armed"  # armed -> cancelled -> (exit)
    task_stacks: str = field(default="", repr=False)

    def message(self) -> str:
        return f"Timeout (>{self.timeout:g}s) from pytest-timeout"

    def fire(self, signum: int, frame: Any) -> None:
        __tracebackhide__ = True
        try:
            token = trio.lowlevel.current_trio_token()
        except RuntimeError:
            token = None
        if token is None or not trio.lowlevel.currently_ki_protected():
            self.stage = "raised"
            pytest.fail(self.message(), pytrace=True)
        if self.stage == "armed":
            self.stage = "cancelling"
            token.run_sync_soon(self._cancel_test)
            signal.setitimer(signal.ITIMER_REAL, GRACE)
            return
        self._give_up()

    def _cancel_test(self) -> None:
        """Runs in the trio thread, between tasks: record where every task waits, then cancel them."""
        root = trio.lowlevel.current_root_task()
        self.task_stacks = "".join(_format_task_tree(root)) if root is not None else ""
        for task in _all_tasks(root):
            for nursery in task.child_nurseries:
                if task is not root:
                    nursery.cancel_scope.cancel()
        self.stage = "cancelled"

    def _give_up(self) -> None:
        capman = self.item.config.pluginmanager.getplugin("capturemanager")
        if capman is not None:
            capman.suspend_global_capture(in_=True)  # so this reaches the terminal, not a capture buffer
        err = sys.stderr
        err.write(f"\n{'+' * 30} {self.message()}: {self.item.nodeid} {'+' * 30}\n")
        err.write(f"it did not end within {GRACE:g}s of being cancelled; ending the test run\n")
        if self.task_stacks:
            err.write(f"trio tasks when it was cancelled:\n{self.task_stacks}\n")
        err.flush()
        faulthandler.dump_traceback(file=err, all_threads=True)
        err.flush()
        os._exit(1)

    def cancel(self) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)


def _all_tasks(root: trio.lowlevel.Task | None) -> Iterator[trio.lowlevel.Task]:
    if root is None:
        return
    yield root
    for nursery in root.child_nurseries:
        for child in sorted(nursery.child_tasks, key=lambda t: t.name):
            yield from _all_tasks(child)


def _format_task_tree(task: trio.lowlevel.Task, depth: int = 0) -> Iterator[str]:
    if task.name == "<TrioToken.run_sync_soon task>":
        return  # the one recording this
    pad = "  " * depth
    yield f"{pad}task {task.name!r}:\n"
    frames = [(f, n) for f, n in task.iter_await_frames() if not _is_machinery(f.f_code.co_filename)]
    for line in traceback.StackSummary.extract(frames).format():
        yield "".join(f"{pad}  {part}\n" for part in line.rstrip("\n").split("\n"))
    for nursery in task.child_nurseries:
        for child in sorted(nursery.child_tasks, key=lambda t: t.name):
            yield from _format_task_tree(child, depth + 1)


def _is_machinery(filename: str) -> bool:
    parts = filename.replace("\\", "/").split("/")
    return "pytest_trio" in parts or ("trio" in parts and "_core" in parts)


@pytest.hookimpl(tryfirst=True)
def pytest_timeout_set_timer(item: pytest.Item, settings: Any) -> bool | None:
    if settings.method != "signal" or threading.current_thread() is not threading.main_thread():
        return None  # pytest-timeout's own "thread" method
    import pytest_timeout

    if not settings.disable_debugger_detection and pytest_timeout.is_debugging():
        return None
    alarm = _Alarm(item, float(settings.timeout))
    item.stash[_ALARM] = alarm
    signal.signal(signal.SIGALRM, alarm.fire)
    signal.setitimer(signal.ITIMER_REAL, alarm.timeout)
    return True


@pytest.hookimpl(tryfirst=True)
def pytest_timeout_cancel_timer(item: pytest.Item) -> bool | None:
    alarm = item.stash.get(_ALARM, None)
    if alarm is None:
        return None
    alarm.cancel()
    del item.stash[_ALARM]
    return True


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
    """Turn a trio run that ended because the timeout cancelled it into the timeout's failure."""
    try:
        result = yield
    except BaseException:
        alarm = item.stash.get(_ALARM, None)
        if alarm is not None and alarm.stage in ("cancelling", "cancelled"):
            raise pytest.fail.Exception(_cancelled_message(alarm), pytrace=False) from None
        raise
    alarm = item.stash.get(_ALARM, None)
    if alarm is not None and alarm.stage in ("cancelling", "cancelled"):
        raise pytest.fail.Exception(_cancelled_message(alarm), pytrace=False)
    return result


def _cancelled_message(alarm: _Alarm) -> str:
    return f"{alarm.message()}: the test was cancelled; its trio tasks were waiting at:\n{alarm.task_stacks}"


_ALARM = pytest.StashKey[_Alarm]()
