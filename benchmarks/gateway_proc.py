"""pop3-gateway as a real process (`sys.executable -m gateway serve --config ...`), and /proc readings of it.

The listener binds port 0 and the bound port is read back from the gateway's "listening on" log line, so
there is no race for a free port. The gateway runs in its own session (a terminal Ctrl-C reaches only the
benchmark, which then stops the gateway with SIGTERM and reaps it).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
_LISTENING = re.compile(r"listening on (\S+):(\d+) \(tls=none\)")
_CLK_TCK = os.sysconf("SC_CLK_TCK")
# The admin HTTP endpoint (/healthz, /metrics) listens on a fixed port by default, so a second gateway
# process would fail to start; the benchmark does not use it.
_ADMIN_FIELD = re.compile(r"^\s+admin: ", re.MULTILINE)
_ADMIN_OFF = """
[admin]
address = ""
"""


@dataclass
class GatewayProcess:
    root: Path
    host: str
    port: int
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    @property
    def log_file(self) -> Path:
        return self.root / "gateway.log"

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def status(self) -> dict[str, int]:
        """VmHWM, VmRSS, VmPeak... from /proc/PID/status, in KiB."""
        out: dict[str, int] = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.startswith("Vm") and value.strip().endswith("kB"):
                out[key] = int(value.split()[0])
        return out

    def cpu_seconds(self) -> float:
        """utime + stime of the gateway process (all its threads) so far."""
        stat = Path(f"/proc/{self.pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK

    def stop(self) -> None:
        """SIGTERM (the gateway drains, with no session open it quits at once), then reap. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_TIMEOUT)


def start_gateway(
    root: Path, upstream_url: str, *, log_level: str = "info", source: Path | None = None
) -> GatewayProcess:
    """Start the gateway on `upstream_url` (imap://H:P, jmap+http://H:P/); its config and state live in
    `root`. `source` is a folder holding another `gateway` package."""
    root.mkdir(parents=True, exist_ok=True)
    state = root / "state"
    state.mkdir(exist_ok=True)
    env = dict(os.environ)
    cwd = Path(__file__).resolve().parent.parent
    if source is not None:
        cwd = source.resolve()
        if not (cwd / "gateway" / "__main__.py").exists():
            raise RuntimeError(f"no gateway package in {cwd}")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(cwd), env.get("PYTHONPATH")]))
    config = root / "gateway.toml"
    config.write_text(
        f"""\
[server]
state_dir = "{state}"
shutdown_grace = 2

[[listen]]
address = "127.0.0.1:0"

[upstream]
url = "{upstream_url}"

[log]
level = "{log_level}"
"""
        + (_ADMIN_OFF if _has_admin_section(cwd) else "")
    )
    log_file = root / "gateway.log"
    with log_file.open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            cwd=cwd,
            env=env,
            start_new_session=True,
        )
    gateway = GatewayProcess(root, "127.0.0.1", 0, proc)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            found = _LISTENING.search(log_file.read_text(errors="replace"))
            if found:
                gateway.host, gateway.port = found.group(1), int(found.group(2))
                return gateway
            if proc.poll() is not None:
                raise RuntimeError(f"the gateway exited {proc.returncode}:\n{_tail(log_file)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the gateway did not start in {START_TIMEOUT:.0f} s:\n{_tail(log_file)}")
            time.sleep(0.02)
    except BaseException:
        gateway.stop()
        raise


def _has_admin_section(checkout: Path) -> bool:
    """Whether this gateway build has the `[admin]` config section (older builds reject unknown keys)."""
    try:
        text = (checkout / "gateway" / "config.py").read_text()
    except OSError:
        return False
    return _ADMIN_FIELD.search(text) is not None


def _tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
