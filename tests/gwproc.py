"""Running the gateway as a real process in tests: `serve` on port 0, and the port it bound read back.

`spawn_gateway` starts `python -m gateway serve --listen 127.0.0.1:0` and reads its stderr line by line
until the `listening on HOST:PORT (tls=...)` log line (logged at info once the listener is bound, so a
connection made after it is accepted). No port is picked in advance, so two tests (or two engineers'
runs) can never race for one. A thread keeps draining stderr afterwards, so the pipe never fills and
blocks the gateway; the last lines are kept for error messages.
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO, NamedTuple

START_TIMEOUT = 20.0
STOP_TIMEOUT = 20.0
LISTENING = re.compile(rb"listening on (\S+):(\d+) \(tls=\w+\)")
_TAIL_LINES = 50


class GatewayStartError(RuntimeError):
    """The gateway exited, or did not report its port in time; the message has its last stderr lines."""


class SpawnedGateway(NamedTuple):
    proc: subprocess.Popen[bytes]
    port: int
    host: str = "127.0.0.1"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM (the gateway drains), then reap; SIGKILL if it does not end in time. Idempotent."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait(timeout)


def spawn_gateway(state: Path, upstream: str, *extra: str) -> SpawnedGateway:
    """`python -m gateway serve` on 127.0.0.1:0 (admin on 127.0.0.1:0 too), returned once it listens.

    `extra` arguments come last, so they may override the defaults here, except that the log level must
    stay at info or below (the port is read from an info line)."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gateway",
            "serve",
            "--admin-listen",
            "127.0.0.1:0",
            "--listen",
            "127.0.0.1:0",
            "--log-level",
            "info",
            "--log-format",
            "text",
            "--state-dir",
            str(state),
            "--upstream",
            upstream,
            *extra,
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stderr is not None
    reader = _StderrReader(proc.stderr)
    try:
        port = reader.wait_for_port(START_TIMEOUT)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return SpawnedGateway(proc, port)


class _StderrReader:
    """Reads a process's stderr to its end in a daemon thread; reports the first `listening on` port."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream
        self._tail: collections.deque[bytes] = collections.deque(maxlen=_TAIL_LINES)
        self._done = threading.Event()  # the port is known, or stderr ended
        self._port: int | None = None
        threading.Thread(target=self._run, name="gateway-stderr", daemon=True).start()

    def _run(self) -> None:
        with self._stream:  # closed here, at the end of the output, and never left to the GC
            for line in self._stream:
                self._tail.append(line)
                if self._port is None and (found := LISTENING.search(line)):
                    self._port = int(found.group(2))
                    self._done.set()
        self._done.set()

    def wait_for_port(self, timeout: float) -> int:
        if not self._done.wait(timeout):
            raise GatewayStartError(f"the gateway did not report its port in {timeout:g} s:\n{self.tail()}")
        if self._port is None:
            raise GatewayStartError(f"the gateway exited before it listened:\n{self.tail()}")
        return self._port

    def tail(self) -> str:
        return b"".join(self._tail).decode(errors="replace")
