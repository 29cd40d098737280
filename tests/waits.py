"""Waiting for a condition in trio tests, with a deadline, instead of sleeping for a guessed time.

Prefer an event the code under test sets (`server.drained`, a `trio.Event`). `until` is for a condition
nothing signals (a session count reaching zero, a line another process logs): it checks the condition,
re-checks it every `poll` seconds, and raises TimeoutError once `timeout` has passed.
"""

from __future__ import annotations

from collections.abc import Callable

import trio


async def until(condition: Callable[[], object], *, timeout: float = 10.0, poll: float = 0.01) -> None:
    with trio.move_on_after(timeout) as scope:
        while not condition():
            await trio.sleep(poll)
    if scope.cancelled_caught:
        raise TimeoutError(f"{getattr(condition, '__name__', condition)!s} still false after {timeout:g} s")
