"""The benchmark run: start the servers, fill the mailboxes, time the sessions, print and save the results."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import pyspy
from benchmarks.client import Client, Command, Pop3Error, SessionResult, list_uidl_retr, retr_all
from benchmarks.gateway_proc import GatewayProcess, start_gateway
from benchmarks.imapc_peer import IMAPC_FEATURES, start_imapc_peer
from tests.realservers.corpus import big_message, sized_messages
from tests.realservers.dovecot import start_dovecot

PASSWORD = "bench-secret"
PR_SET_CHILD_SUBREAPER = 36
PEERS = ("dovecot-direct", "imapc-peer")
KIB = 1024
MIB = 1024 * 1024


class BenchmarkError(RuntimeError):
    pass


@dataclass
class Workload:
    name: str
    user: str
    count: int
    size: int
    commands: list[Command]
    description: str


@dataclass
class Series:
    seconds: list[float] = field(default_factory=list)
    client_cpu: list[float] = field(default_factory=list)
    gateway_cpu: list[float] = field(default_factory=list)
    wire_bytes: list[int] = field(default_factory=list)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Time POP3 sessions against Dovecot POP3 (Maildir), Dovecot POP3 over imapc, and "
        "pop3-gateway, all on the same private Dovecot IMAP upstream.",
    )
    p.add_argument("--repeat", type=int, default=None, help="measured sessions per target and workload (11)")
    p.add_argument("--quick", action="store_true", help="smoke run: 3 repetitions instead of 11 (same data)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    p.add_argument(
        "--client",
        choices=("pipelined", "lockstep"),
        default="pipelined",
        help="pipelined: all commands in one write (default); lockstep: one command per round trip",
    )
    p.add_argument("--workloads", default="small,large", help="comma-separated subset of: small,large")
    p.add_argument("--small-count", type=int, default=None, help="messages in the small workload (1000)")
    p.add_argument("--small-size", type=int, default=10 * KIB, help="bytes per small message (10 KiB)")
    p.add_argument("--large-count", type=int, default=None, help="messages in the large workload (5)")
    p.add_argument("--large-size", type=int, default=10 * MIB, help="bytes per large message (10 MiB)")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured sessions per target first (1)")
    p.add_argument(
        "--profile",
        metavar="DIR",
        help="after the timed runs, profile the gateway with py-spy during extra sessions of each workload "
        "and write flame graphs + collapsed stacks to DIR (needs py-spy in the venv)",
    )
    p.add_argument(
        "--profile-sessions", type=int, default=None, help="sessions per profile (small 5, large 3)"
    )
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, configs, mail)")
    p.add_argument(
        "--gateway-src",
        metavar="DIR",
        help="run the gateway package found in DIR (another checkout, for before/after comparisons) "
        "instead of this one",
    )
    p.add_argument(
        "--also",
        metavar="NAME=DIR",
        action="append",
        default=[],
        type=_named_dir,
        help="benchmark another gateway build too, as one more target NAME (repeatable)",
    )
    p.add_argument("--gateway-log-level", default="info", choices=("debug", "info", "warning", "error"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    repeat = args.repeat if args.repeat is not None else (3 if args.quick else 11)
    small_count = args.small_count if args.small_count is not None else 1000
    large_count = args.large_count if args.large_count is not None else 5
    wanted = [w.strip() for w in args.workloads.split(",") if w.strip()]
    if repeat < 1 or not wanted or set(wanted) - {"small", "large"}:
        print("python -m benchmarks: bad --repeat or --workloads", file=sys.stderr)
        return 2
    py_spy = None
    if args.profile:
        py_spy = pyspy.find_py_spy()
        if py_spy is None:
            print("--profile needs py-spy: .venv/bin/pip install py-spy", file=sys.stderr)
            return 2
    workloads = []
    if "small" in wanted:
        workloads.append(
            Workload(
                "small",
                "small",
                small_count,
                args.small_size,
                list_uidl_retr(small_count),
                f"LIST + UIDL + RETR of {small_count} x {_size(args.small_size)}",
            )
        )
    if "large" in wanted:
        workloads.append(
            Workload(
                "large",
                "large",
                large_count,
                args.large_size,
                retr_all(large_count),
                f"RETR of {large_count} x {_size(args.large_size)}",
            )
        )

    # SIGTERM (and SIGHUP) unwind like Ctrl-C, so every server below is stopped and reaped.
    def _terminate(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored (`&`)
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)

    _become_subreaper()
    root = Path(tempfile.mkdtemp(prefix="pop3gw-bench-"))
    root.chmod(0o755)  # Dovecot's unprivileged processes must reach the folders below
    try:
        with contextlib.ExitStack() as stack:
            stack.callback(signal.signal, signal.SIGINT, signal.default_int_handler)  # runs last
            stack.callback(_reap_orphans)
            try:
                results = _run(args, stack, root, workloads, repeat, py_spy)
            finally:
                # A second Ctrl-C must not cut the shutdown short and leave a server behind.
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
    except KeyboardInterrupt:
        print("\ninterrupted; servers stopped", file=sys.stderr)
        return 130
    except (BenchmarkError, Pop3Error, RuntimeError, OSError) as exc:
        print(f"\nBENCHMARK FAILED: {exc}", file=sys.stderr)
        print(f"(logs kept in {root})", file=sys.stderr)
        args.keep = True
        return 1
    finally:
        if args.keep:
            print(f"temporary folder kept: {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    print(_format_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nresults written to {args.json}")
    return 0


def _run(
    args: argparse.Namespace,
    stack: contextlib.ExitStack,
    root: Path,
    workloads: list[Workload],
    repeat: int,
    py_spy: str | None,
) -> dict[str, Any]:
    t_setup = time.perf_counter()
    _say("starting Dovecot (IMAP + POP3 on Maildir)")
    upstream = start_dovecot(root / "up")
    stack.callback(upstream.stop)
    _say("starting Dovecot POP3 over imapc (the peer)")
    peer = start_imapc_peer(root / "imapc", upstream)
    stack.callback(peer.stop)
    sources: dict[str, Path | None] = {"gateway": Path(args.gateway_src) if args.gateway_src else None}
    for name, src in args.also:
        sources[name] = src
    gateways: dict[str, GatewayProcess] = {}
    for name, src in sources.items():
        _say(f"starting pop3-gateway as {name!r}" + (f" from {src}" if src else ""))
        gw = start_gateway(
            root / name, upstream.host, upstream.imap_port, log_level=args.gateway_log_level, source=src
        )
        stack.callback(gw.stop)
        gateways[name] = gw
    gateway = gateways["gateway"]
    targets = [*PEERS, *gateways]

    for w in workloads:
        _say(f"filling {w.user!r}: {w.count} x {_size(w.size)}")
        upstream.add_user(w.user, PASSWORD)
        if w.name == "small":
            upstream.append(w.user, PASSWORD, sized_messages(w.count, w.size))
        else:
            for _ in range(w.count):  # one at a time: a 10 MiB message is a lot of memory
                upstream.append(w.user, PASSWORD, [big_message(w.size)])
    setup_seconds = time.perf_counter() - t_setup

    endpoints = {
        "dovecot-direct": (upstream.host, upstream.pop3_port),
        "imapc-peer": (peer.host, peer.pop3_port),
        **{name: (gw.host, gw.port) for name, gw in gateways.items()},
    }
    client = Client()

    def session(target: str, w: Workload) -> SessionResult:
        host, port = endpoints[target]
        try:
            return client.session(host, port, w.user, PASSWORD, w.commands, mode=args.client)
        except (Pop3Error, OSError) as exc:
            raise BenchmarkError(f"{target}, workload {w.name}: {exc!r}") from exc

    # Warm-up (caches, Dovecot indexes, the peer's imapc index) and the reference bytes of each workload.
    references: dict[str, tuple[str, SessionResult]] = {}
    for w in workloads:
        for target in targets:
            for _ in range(max(args.warmup, 1)):
                result = session(target, w)
                _check_same(w, references, target, result)
        ref = references[w.name][1]
        _say(
            f"warm-up {w.name}: identical bytes from all targets ({ref.retr_count} messages, "
            f"{ref.retr_octets} RETR octets, digest {ref.retr_digest[:12]})"
        )

    series: dict[str, dict[str, Series]] = {w.name: {t: Series() for t in targets} for w in workloads}
    t_runs = time.perf_counter()
    for rep in range(repeat):
        # Each repetition starts with the next target, so no target always runs first (or after another).
        order = targets[rep % len(targets) :] + targets[: rep % len(targets)]
        for w in workloads:
            for target in order:
                gw = gateways.get(target)
                cpu0 = gw.cpu_seconds() if gw else 0.0
                result = session(target, w)
                cpu1 = gw.cpu_seconds() if gw else 0.0
                _check_same(w, references, target, result)
                s = series[w.name][target]
                s.seconds.append(result.seconds)
                s.client_cpu.append(result.client_cpu)
                s.wire_bytes.append(result.wire_bytes)
                if gw:
                    s.gateway_cpu.append(cpu1 - cpu0)
        _say(
            f"repetition {rep + 1}/{repeat}: "
            + "  ".join(
                f"{w.name} " + " ".join(f"{series[w.name][t].seconds[-1]:.3f}" for t in targets)
                for w in workloads
            )
        )
    runs_seconds = time.perf_counter() - t_runs
    for name, gw in gateways.items():
        if not gw.alive():
            raise BenchmarkError(f"the gateway process {name!r} died during the runs")
    memory = {name: gw.status() for name, gw in gateways.items()}
    cpu_total = {name: gw.cpu_seconds() for name, gw in gateways.items()}

    profiles: dict[str, dict[str, Any]] = {}
    if py_spy is not None:
        out = Path(args.profile)
        out.mkdir(parents=True, exist_ok=True)
        for w in workloads:
            n = args.profile_sessions or (5 if w.name == "small" else 3)

            def work(w: Workload = w, n: int = n) -> None:
                for _ in range(n):
                    _check_same(w, references, "gateway", session("gateway", w))

            _say(f"profiling the gateway with py-spy: {n} x {w.name}")
            prof = pyspy.record(py_spy, gateway.pid, out / f"gateway-{w.name}", work)
            print(pyspy.format_profile(w.name, prof), flush=True)
            profiles[w.name] = {
                "sessions": n,
                "samples": prof.samples,
                "seconds": prof.seconds,
                "busy": prof.busy,
                "self_top": prof.self_top,
                "total_top": prof.total_top,
                "flamegraph": str(out / f"gateway-{w.name}.svg"),
                "collapsed": str(out / f"gateway-{w.name}.txt"),
            }

    _say("stopping the servers")
    return _results(
        args,
        workloads,
        repeat,
        targets,
        series,
        references,
        {name: (memory[name], cpu_total[name], gw.pid, sources[name]) for name, gw in gateways.items()},
        setup_seconds,
        runs_seconds,
        profiles,
    )


def _check_same(
    w: Workload, references: dict[str, tuple[str, SessionResult]], target: str, result: SessionResult
) -> None:
    """The first session of a workload is the reference; every other must carry exactly the same bytes."""
    if w.name not in references:
        if result.retr_count != w.count:
            raise BenchmarkError(f"{target}: {result.retr_count} messages retrieved, expected {w.count}")
        references[w.name] = (target, result)
        return
    ref_target, ref = references[w.name]
    if (result.retr_count, result.retr_octets, result.retr_digest) != (
        ref.retr_count,
        ref.retr_octets,
        ref.retr_digest,
    ):
        first = next(
            (
                i + 1
                for i, (a, b) in enumerate(zip(ref.retr_sizes, result.retr_sizes, strict=False))
                if a != b
            ),
            None,
        )
        raise BenchmarkError(
            f"workload {w.name}: {target} sent different message bytes than {ref_target}: "
            f"{result.retr_count} messages / {result.retr_octets} octets vs {ref.retr_count} / "
            f"{ref.retr_octets}" + (f"; first size difference at message {first}" if first else "")
        )
    if result.listing_digest != ref.listing_digest:
        raise BenchmarkError(f"workload {w.name}: {target} sent a different LIST/UIDL than {ref_target}")


def _results(
    args: argparse.Namespace,
    workloads: list[Workload],
    repeat: int,
    targets: list[str],
    series: dict[str, dict[str, Series]],
    references: dict[str, tuple[str, SessionResult]],
    gateways: dict[str, tuple[dict[str, int], float, int, Path | None]],
    setup_seconds: float,
    runs_seconds: float,
    profiles: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "node": platform.node()},
        "client": args.client,
        "repeat": repeat,
        "targets": targets,
        "git": _git_state(),
        "imapc_features": IMAPC_FEATURES,
        "setup_seconds": round(setup_seconds, 3),
        "runs_seconds": round(runs_seconds, 3),
        "workloads": {},
        "gateways": {
            name: {
                "source": str(src) if src else "(this checkout)",
                "pid": pid,
                "peak_rss_kib": memory.get("VmHWM"),
                "rss_kib": memory.get("VmRSS"),
                "cpu_seconds_total": round(cpu, 3),
            }
            for name, (memory, cpu, pid, src) in gateways.items()
        },
        "profiles": profiles,
    }
    for w in workloads:
        ref = references[w.name][1]
        per_target: dict[str, Any] = {}
        for t in targets:
            s = series[w.name][t]
            per_target[t] = {
                "median_s": statistics.median(s.seconds),
                "min_s": min(s.seconds),
                "max_s": max(s.seconds),
                "stdev_s": statistics.stdev(s.seconds) if len(s.seconds) > 1 else 0.0,
                "seconds": s.seconds,
                "client_cpu_median_s": statistics.median(s.client_cpu),
                "wire_bytes": s.wire_bytes[0],
            }
            if s.gateway_cpu:
                per_target[t]["gateway_cpu_median_s"] = statistics.median(s.gateway_cpu)
        med = {t: per_target[t]["median_s"] for t in targets}
        out["workloads"][w.name] = {
            "description": w.description,
            "messages": w.count,
            "message_size": w.size,
            "retr_octets": ref.retr_octets,
            "retr_digest": ref.retr_digest,
            "targets": per_target,
            "ratios": {
                t: {
                    "to_imapc_peer": med[t] / med["imapc-peer"],
                    "to_dovecot_direct": med[t] / med["dovecot-direct"],
                }
                for t in targets
                if t not in PEERS
            },
            "ratio_imapc_peer_to_dovecot_direct": med["imapc-peer"] / med["dovecot-direct"],
        }
    return out


def _format_table(results: dict[str, Any]) -> str:
    targets = results["targets"]
    width = max(16, *(len(t) + 2 for t in targets))
    lines = [
        "",
        f"pop3-gateway benchmark: {results['repeat']} repetitions per target, {results['client']} client, "
        f"targets interleaved, {results['machine']['cpus']} CPUs; gateway at {results['git']}",
        "",
        f"{'workload':<10}{'target':<{width}}{'median s':>10}{'min s':>9}{'max s':>9}{'client CPU':>12}"
        f"{'gateway CPU':>13}",
    ]
    for name, w in results["workloads"].items():
        lines.append(
            f"{name:<10}{w['description']}  (identical bytes from all targets: {w['retr_octets']} octets)"
        )
        for t in targets:
            r = w["targets"][t]
            gw = f"{r['gateway_cpu_median_s']:.3f}" if "gateway_cpu_median_s" in r else ""
            lines.append(
                f"{'':<10}{t:<{width}}{r['median_s']:>10.3f}{r['min_s']:>9.3f}{r['max_s']:>9.3f}"
                f"{r['client_cpu_median_s']:>12.3f}{gw:>13}"
            )
        for t, ratio in w["ratios"].items():
            lines.append(
                f"{'':<10}{t}/imapc-peer {ratio['to_imapc_peer']:.2f}x   "
                f"{t}/dovecot-direct {ratio['to_dovecot_direct']:.2f}x"
            )
        lines.append(f"{'':<10}(imapc-peer/dovecot-direct {w['ratio_imapc_peer_to_dovecot_direct']:.2f}x)")
        lines.append("")
    for name, g in results["gateways"].items():
        lines.append(
            f"{name} peak RSS (VmHWM): {g['peak_rss_kib'] / 1024:.1f} MiB   "
            f"(VmRSS at the end {g['rss_kib'] / 1024:.1f} MiB, CPU {g['cpu_seconds_total']:.1f} s in all)"
        )
    lines.append(
        "client CPU = the benchmark client's own CPU per session; gateway CPU = the gateway process's CPU "
        "per session (medians)"
    )
    return "\n".join(lines)


def _become_subreaper() -> None:
    """Orphans of our descendants become our children, not PID 1's (which reaps them only now and then).

    Dovecot's `log` process outlives its master by a moment at shutdown; without this it would linger as
    a zombie under PID 1 after the run.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _reap_orphans(timeout: float = 10.0) -> None:
    """After every server was stopped: wait for (and reap) whatever descendants were left to us."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return  # no children left
        if pid == 0:
            if time.monotonic() > deadline:
                print("warning: child processes still running after the shutdown", file=sys.stderr)
                return
            time.sleep(0.02)


def _git_state() -> str:
    """The commit of this checkout, and whether gateway/ has uncommitted changes."""
    here = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "gateway"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if not head:
        return "unknown"
    return head + (" + uncommitted changes under gateway/" if dirty else "")


def _named_dir(text: str) -> tuple[str, Path]:
    name, sep, folder = text.partition("=")
    if not sep or not name or not folder or name in (*PEERS, "gateway"):
        raise argparse.ArgumentTypeError(f"expected NAME=DIR with a new NAME, got {text!r}")
    return name, Path(folder)


def _size(n: int) -> str:
    if n % MIB == 0:
        return f"{n // MIB} MiB"
    if n % KIB == 0:
        return f"{n // KIB} KiB"
    return f"{n} B"


_T0 = time.perf_counter()


def _say(text: str) -> None:
    """Progress on stderr, with the seconds since the start."""
    print(f"[{time.perf_counter() - _T0:6.1f} s] {text}", file=sys.stderr, flush=True)


__all__ = ["main"]
