"""Optional profiling of the gateway process with py-spy (`--profile DIR`), summarised as top functions.

py-spy samples the running gateway from outside (`py-spy record --pid`), so the gateway needs no change.
It writes a flame graph (SVG) and the collapsed stacks (`--format raw`), from which this module prints the
functions with the most samples on top of the stack (self) and anywhere on it (total).
"""

from __future__ import annotations

import collections
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

RATE = 250  # samples a second
# Leaves py-spy counts as active although the thread only waits: trio's idle worker threads sit in
# `self._worker_lock.acquire(timeout=...)` inside `_work` (the durable UIDL store runs SQLite in them).
IDLE_LEAVES = frozenset({"WorkerThread._work (trio/_core/_thread_cache.py)"})
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def find_py_spy() -> str | None:
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


@dataclass
class Profile:
    samples: int
    seconds: float
    self_top: list[tuple[str, int]]
    total_top: list[tuple[str, int]]

    @property
    def busy(self) -> float:
        """Share of the wall time the gateway spent on a CPU (py-spy skips idle samples by default)."""
        return self.samples / (RATE * self.seconds) if self.seconds else 0.0


def record(py_spy: str, pid: int | Callable[[], int], out_stem: Path, work: Callable[[], None]) -> Profile:
    """Run `work()` twice, once under a flame-graph recording and once under a raw one; summarise the raw.

    `pid` may be a function that starts a fresh process and returns its pid: it is called before each
    recording, so both see the same one-time work (a first login that assigns every UIDL, say)."""
    svg = out_stem.with_suffix(".svg")
    raw = out_stem.with_suffix(".txt")
    _run_recording(py_spy, pid if isinstance(pid, int) else pid(), svg, "flamegraph", work)
    seconds = _run_recording(py_spy, pid if isinstance(pid, int) else pid(), raw, "raw", work)
    return summarise(raw, seconds)


def _run_recording(py_spy: str, pid: int, out: Path, fmt: str, work: Callable[[], None]) -> float:
    log = out.with_suffix(out.suffix + ".log")
    with log.open("wb") as stdio:
        proc = subprocess.Popen(
            [py_spy, "record", "--pid", str(pid), "--rate", str(RATE), "--format", fmt, "-o", str(out)],
            stdin=subprocess.DEVNULL,
            stdout=stdio,
            stderr=stdio,
            start_new_session=True,
        )
    try:
        time.sleep(1.0)  # py-spy attaches
        if proc.poll() is not None:
            raise RuntimeError(f"py-spy exited {proc.returncode}: {log.read_text(errors='replace')[-2000:]}")
        t0 = time.perf_counter()
        work()
        seconds = time.perf_counter() - t0
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    if not out.exists():
        raise RuntimeError(f"py-spy wrote no {out}: {log.read_text(errors='replace')[-2000:]}")
    return seconds


def summarise(raw: Path, seconds: float, top: int = 25) -> Profile:
    self_counts: collections.Counter[str] = collections.Counter()
    total_counts: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        frames = [_short(f) for f in stack.split(";")]
        frames = [f for f in frames if f]
        if not frames or frames[-1] in IDLE_LEAVES:
            continue
        samples += count
        self_counts[frames[-1]] += count
        for name in set(frames):
            total_counts[name] += count
    return Profile(samples, seconds, self_counts.most_common(top), total_counts.most_common(top))


def _short(frame: str) -> str:
    """'receive_data (gateway/proto/imap.py:123)' -> 'receive_data (gateway/proto/imap.py)'."""
    match = _FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    path = match.group("file")
    for marker in ("/site-packages/", "/lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    if "/gateway/" in path:
        path = "gateway/" + path.split("/gateway/", 1)[1]
    return f"{match.group('func')} ({path})"


def format_profile(name: str, prof: Profile) -> str:
    lines = [
        f"py-spy profile of {name}: {prof.samples} samples in {prof.seconds:.2f} s "
        f"(gateway on CPU ~{prof.busy:.0%} of the wall time)",
        "  self (top of stack):",
    ]
    lines += [f"    {c / prof.samples:6.1%}  {f}" for f, c in prof.self_top[:15]] if prof.samples else []
    lines.append("  total (anywhere on the stack):")
    lines += [f"    {c / prof.samples:6.1%}  {f}" for f, c in prof.total_top[:25]] if prof.samples else []
    return "\n".join(lines)
