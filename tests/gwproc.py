"""Running the gateway as a real process in tests: a free port, and `serve` started and waited for."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn_gateway(state: Path, port: int, upstream: str, *extra: str) -> subprocess.Popen[bytes]:
    """`python -m gateway serve` on 127.0.0.1:port (admin on a free port), once it accepts connections."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gateway",
            "serve",
            "--admin-listen",
            "127.0.0.1:0",
            "--listen",
            f"127.0.0.1:{port}",
            "--state-dir",
            str(state),
            "--upstream",
            upstream,
            *extra,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise RuntimeError("the gateway did not start") from None
            time.sleep(0.05)
