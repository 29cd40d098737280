"""Running the gateway as a real process in tests: `serve` on port 0, and the port it bound read back.

`spawn_serve(*args)` starts `python -m gateway serve --log-level info --log-format text *args` and reads
its stderr line by line until the `listening on HOST:PORT (tls=...)` log line (logged at info once the
listener is bound, so a connection made after it is accepted). No port is picked in advance, so two tests
(or two engineers' runs) can never race for one. A thread keeps draining stderr afterwards, so the pipe
never fills and blocks the gateway; it keeps the last lines, which `wait_for_line` searches (for a SIGHUP's
"reloaded" line, say) and error messages quote. `spawn_gateway` is the common case: a state directory and
an upstream, the POP3 and admin listeners on 127.0.0.1:0.

Both need the gateway to log that line at info on stderr (gateway/cli.py `_serve_signals`); if it changes,
these fail at once with the gateway's last stderr lines, not with a hang.
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

START_TIMEOUT = 20.0
STOP_TIMEOUT = 20.0
LISTENING = re.compile(rb"listening on (\S+):(\d+) \(tls=(\w+)\)")
ADMIN = re.compile(rb"admin endpoint on http://(\S+):(\d+)/")
_KEPT_LINES = 500


class GatewayStartError(RuntimeError):
    """The gateway exited, or did not log what was awaited in time; the message has its last stderr lines."""


@dataclass(frozen=True)
class SpawnedGateway:
    proc: subprocess.Popen[bytes]
    port: int  # of the first listener
    host: str
    _stderr: _StderrReader = field(repr=False)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def admin_port(self, timeout: float = START_TIMEOUT) -> int:
        """The port of the admin endpoint (logged just after the POP3 listeners)."""
        return int(self.wait_for_line(ADMIN, timeout).group(2))

    def wait_for_line(
        self, pattern: re.Pattern[bytes], timeout: float = START_TIMEOUT, *, after: int = 0
    ) -> re.Match[bytes]:
        """The first stderr line numbered `after` or later (from 0) that matches; waits up to `timeout`."""
        return self._stderr.wait_for(pattern, timeout, after)

    def lines_so_far(self) -> int:
        """How many stderr lines have been read: pass it as `after` to wait only for lines still to come."""
        return self._stderr.count

    def stderr_text(self) -> str:
        """The last stderr lines kept (all of them for a short run)."""
        return self._stderr.tail()

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM (the gateway drains), then reap; SIGKILL if it does not end in time. Idempotent."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait(timeout)


def spawn_serve(*args: str, env: dict[str, str] | None = None) -> SpawnedGateway:
    """`python -m gateway serve *args`, returned once its first listener is bound. `args` come after
    `--log-level info --log-format text` and may override them, but not above info."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--log-level", "info", "--log-format", "text", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )
    assert proc.stderr is not None
    reader = _StderrReader(proc.stderr)
    try:
        found = reader.wait_for(LISTENING, START_TIMEOUT, 0)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return SpawnedGateway(proc, int(found.group(2)), found.group(1).decode(), reader)


def spawn_gateway(state: Path, upstream: str, *extra: str) -> SpawnedGateway:
    """`serve` on 127.0.0.1:0 (admin on 127.0.0.1:0 too) with this state directory and upstream."""
    return spawn_serve(
        "--admin-listen",
        "127.0.0.1:0",
        "--listen",
        "127.0.0.1:0",
        "--state-dir",
        str(state),
        "--upstream",
        upstream,
        *extra,
    )


class _StderrReader:
    """Reads a process's stderr to its end in a daemon thread, keeping the last lines to search."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream
        self._lines: collections.deque[tuple[int, bytes]] = collections.deque(maxlen=_KEPT_LINES)
        self.count = 0
        self._ended = False
        self._changed = threading.Condition()
        threading.Thread(target=self._run, name="gateway-stderr", daemon=True).start()

    def _run(self) -> None:
        with self._stream:  # closed here, at the end of the output, and never left to the GC
            for line in self._stream:
                with self._changed:
                    self._lines.append((self.count, line))
                    self.count += 1
                    self._changed.notify_all()
        with self._changed:
            self._ended = True
            self._changed.notify_all()

    def wait_for(self, pattern: re.Pattern[bytes], timeout: float, after: int) -> re.Match[bytes]:
        found: list[re.Match[bytes]] = []

        def seen() -> bool:
            found[:] = [m for n, line in self._lines if n >= after and (m := pattern.search(line))]
            return bool(found) or self._ended

        with self._changed:
            if not self._changed.wait_for(seen, timeout):
                raise GatewayStartError(
                    f"the gateway logged no {pattern.pattern!r} in {timeout:g} s:\n{self._text()}"
                )
            if not found:
                raise GatewayStartError(
                    f"the gateway's stderr ended before {pattern.pattern!r}:\n{self._text()}"
                )
            return found[0]

    def tail(self) -> str:
        with self._changed:
            return self._text()

    def _text(self) -> str:
        return b"".join(line for _, line in self._lines).decode(errors="replace")
