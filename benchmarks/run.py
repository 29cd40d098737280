"""The benchmark run: start the servers, fill the mailboxes, time the sessions, print and save the results.

Workloads (`--only`, default all):

- ``small`` / ``large``: LIST + UIDL + RETR of 1000 x 10 KiB; RETR of 5 x 10 MiB, through the gateway on
  IMAP, against Dovecot POP3 direct and Dovecot POP3 over imapc (the peers).
- ``jmap-small`` / ``jmap-large``: the same two sessions through a second gateway process on a private Cyrus
  over JMAP (`gateway-jmap`), holding the very same message bytes. It joins the small/large rows as one more
  target, so its ratios to the peers (and to the gateway on IMAP) come from the same interleaved run.
- ``uidl100k``: login + UIDL of 100,000 small messages + QUIT, in its own gateway process (so its peak RSS
  belongs to this workload). The first login, in which the gateway assigns and stores every UIDL, is timed
  and printed apart from the steady-state logins after it.
- ``store``: the UIDL store alone, no servers (``benchmarks/store.py``): a login to 10 live messages after
  10^4, 10^5 and 10^6 deleted ones, main's code against this checkout. Only when asked for by name.
"""

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
from benchmarks.client import (
    Client,
    Command,
    Pop3Error,
    SessionResult,
    list_uidl_retr,
    retr_all,
    uidl_only,
)
from benchmarks.fill import FillError, multiappend_parallel
from benchmarks.gateway_proc import GatewayProcess, start_gateway
from benchmarks.imapc_peer import IMAPC_FEATURES, start_imapc_peer
from benchmarks.jmap_upstream import CYRUS_DEFAULT_MAX_OBJECTS_IN_GET, start_jmap_upstream
from benchmarks.report import format_table
from tests.realservers.corpus import big_message, sized_message, sized_messages
from tests.realservers.cyrus import Cyrus
from tests.realservers.dovecot import Dovecot, start_dovecot

PASSWORD = "bench-secret"
PR_SET_CHILD_SUBREAPER = 36
PEERS = ("dovecot-direct", "imapc-peer")
JMAP = "gateway-jmap"  # the target: the gateway process on the Cyrus JMAP upstream
UIDL = "uidl100k"
WORKLOADS = ("small", "large", "jmap-small", "jmap-large", UIDL)
STORE = "store"  # benchmarks/store.py: only by name (--only store), never in the default run
# Issue 4: login to the complete UIDL listing of 100k messages, steady state.
UIDL_GOAL_RATIO = 1.0  # at most the imapc peer's time
UIDL_GOAL_SECONDS = 2.0  # on this kind of machine
JMAP_NOTE = (
    "JMAP has no C peer (Dovecot cannot read a JMAP upstream; nothing else serves POP3 from JMAP), so "
    f"{JMAP} is compared with the IMAP-side peers and with the gateway on IMAP; its upstream is a "
    "private Cyrus 3.6 holding the same message bytes, not the Dovecot the others read"
)
KIB = 1024
MIB = 1024 * 1024


class BenchmarkError(RuntimeError):
    pass


@dataclass
class Workload:
    name: str  # the table row: small, large or uidl100k
    user: str
    count: int
    size: int
    commands: list[Command]
    description: str
    targets: list[str]
    retr_count: int  # RETRs per session
    listing_lines: dict[bytes, int]  # lines each LIST / UIDL listing must have
    fill_seconds: float = 0.0


@dataclass
class Series:
    seconds: list[float] = field(default_factory=list)
    client_cpu: list[float] = field(default_factory=list)
    gateway_cpu: list[float] = field(default_factory=list)
    wire_bytes: list[int] = field(default_factory=list)


@dataclass
class FirstLogin:
    result: SessionResult
    gateway_cpu: float | None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Time POP3 sessions against Dovecot POP3 (Maildir), Dovecot POP3 over imapc, and "
        "pop3-gateway on the same private Dovecot IMAP upstream, and pop3-gateway on a private Cyrus "
        "JMAP upstream.",
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
    p.add_argument(
        "--only",
        "--workloads",
        dest="only",
        default=",".join(WORKLOADS),
        metavar="LIST",
        help=f"comma-separated subset of: {','.join(WORKLOADS)} (default: all), or {STORE} (the UIDL store "
        "alone, against main or the first --also build)",
    )
    p.add_argument("--small-count", type=int, default=None, help="messages in the small workload (1000)")
    p.add_argument("--small-size", type=int, default=10 * KIB, help="bytes per small message (10 KiB)")
    p.add_argument("--large-count", type=int, default=None, help="messages in the large workload (5)")
    p.add_argument("--large-size", type=int, default=10 * MIB, help="bytes per large message (10 MiB)")
    p.add_argument(
        "--uidl-count", type=int, default=100_000, help=f"messages in the {UIDL} workload (100000)"
    )
    p.add_argument(
        "--uidl-size",
        type=int,
        default=300,
        help=f"bytes per {UIDL} message (300; a message is never shorter than its ~306-byte header)",
    )
    p.add_argument("--warmup", type=int, default=1, help="unmeasured sessions per target first (1)")
    p.add_argument(
        "--profile",
        metavar="DIR",
        help="after the timed runs, profile the gateway with py-spy during extra sessions of each workload "
        "and write flame graphs + collapsed stacks to DIR (needs py-spy in the venv)",
    )
    p.add_argument(
        "--profile-sessions",
        type=int,
        default=None,
        help=f"sessions per profile (small 5, large 3, {UIDL} 3; a {UIDL} first login is always one)",
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
        help="benchmark another gateway build too, as one more target NAME (repeatable; IMAP workloads)",
    )
    p.add_argument("--gateway-log-level", default="info", choices=("debug", "info", "warning", "error"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    repeat = args.repeat if args.repeat is not None else (3 if args.quick else 11)
    wanted = [w.strip() for w in args.only.split(",") if w.strip()]
    if STORE in wanted:  # no servers: its own runner
        from benchmarks import store

        wanted.remove(STORE)
        store_args = ["--repeat", str(args.repeat or 3)] + (
            ["--json", args.json] if args.json and not wanted else []
        )
        if args.also:  # --also before=DIR: the build to compare with (default: a worktree of main)
            store_args = [*store_args, "--old", str(args.also[0][1])]
        rc = store.main(store_args)
        if rc or not wanted:
            return rc
    if repeat < 1 or not wanted or set(wanted) - set(WORKLOADS) or args.uidl_count < 1:
        choices = ",".join(WORKLOADS)
        print(f"python -m benchmarks: bad --repeat, --uidl-count or --only (of: {choices})", file=sys.stderr)
        return 2
    py_spy = None
    if args.profile:
        py_spy = pyspy.find_py_spy()
        if py_spy is None:
            print("--profile needs py-spy: .venv/bin/pip install py-spy", file=sys.stderr)
            return 2
    gateway_names = ["gateway", *(name for name, _ in args.also)]
    workloads = _plan(args, set(wanted), gateway_names)

    # SIGTERM (and SIGHUP) unwind like Ctrl-C, so every server below is stopped and reaped.
    def _terminate(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored (`&`)
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)

    _become_subreaper()
    root = Path(tempfile.mkdtemp(prefix="pop3gw-bench-"))
    root.chmod(0o755)  # Dovecot's and Cyrus's unprivileged processes must reach the folders below
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
    except (BenchmarkError, FillError, Pop3Error, RuntimeError, OSError) as exc:
        print(f"\nBENCHMARK FAILED: {exc}", file=sys.stderr)
        print(f"(logs kept in {root})", file=sys.stderr)
        args.keep = True
        return 1
    finally:
        if args.keep:
            print(f"temporary folder kept: {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    print(format_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nresults written to {args.json}")
    return 0


def _plan(args: argparse.Namespace, wanted: set[str], gateway_names: list[str]) -> list[Workload]:
    """One table row per session kind; `jmap-small` adds the JMAP gateway to the small row, and so on.

    The peers are in every row: every ratio is taken against them, measured in the same run."""
    small_count = args.small_count if args.small_count is not None else 1000
    large_count = args.large_count if args.large_count is not None else 5
    rows = []
    for kind in ("small", "large"):
        if kind not in wanted and f"jmap-{kind}" not in wanted:
            continue
        targets = [*PEERS]
        if kind in wanted:
            targets += gateway_names
        if f"jmap-{kind}" in wanted:
            targets.append(JMAP)
        if kind == "small":
            rows.append(
                Workload(
                    "small",
                    "small",
                    small_count,
                    args.small_size,
                    list_uidl_retr(small_count),
                    f"LIST + UIDL + RETR of {small_count} x {_size(args.small_size)}",
                    targets,
                    small_count,
                    {b"LIST": small_count, b"UIDL": small_count},
                )
            )
        else:
            rows.append(
                Workload(
                    "large",
                    "large",
                    large_count,
                    args.large_size,
                    retr_all(large_count),
                    f"RETR of {large_count} x {_size(args.large_size)}",
                    targets,
                    large_count,
                    {},
                )
            )
    if UIDL in wanted:
        n = args.uidl_count
        octets = len(sized_message(1, args.uidl_size, tag="uidl"))
        rows.append(
            Workload(
                UIDL,
                "uidl",
                n,
                octets,
                uidl_only(),
                f"login + UIDL of {n} messages (~{octets} B each) + QUIT",
                [*PEERS, *gateway_names],
                0,
                {b"UIDL": n},
            )
        )
    return rows


def _process_label(target: str, w: Workload) -> str:
    """The gateway process serving `target` in row `w`: the uidl100k row has processes of its own."""
    return f"{target}@{UIDL}" if w.name == UIDL else target


def _run(
    args: argparse.Namespace,
    stack: contextlib.ExitStack,
    root: Path,
    workloads: list[Workload],
    repeat: int,
    py_spy: str | None,
) -> dict[str, Any]:
    t_setup = time.perf_counter()
    git = _git_state()  # now, as the gateway processes start (others may edit gateway/ during a long run)
    _say("starting Dovecot (IMAP + POP3 on Maildir)")
    upstream = start_dovecot(root / "up")
    stack.callback(upstream.stop)
    _say("starting Dovecot POP3 over imapc (the peer)")
    peer = start_imapc_peer(root / "imapc", upstream)
    stack.callback(peer.stop)
    imap_url = f"imap://{upstream.host}:{upstream.imap_port}"

    cyrus: Cyrus | None = None
    if any(JMAP in w.targets for w in workloads):
        _say("starting Cyrus (JMAP), the JMAP upstream")
        cyrus = start_jmap_upstream(root / "cyrus")
        stack.callback(cyrus.stop)

    sources: dict[str, Path | None] = {"gateway": Path(args.gateway_src) if args.gateway_src else None}
    for name, src in args.also:
        sources[name] = src
    # Gateway processes, by label: `gateway` (small/large on IMAP), `gateway-jmap`, `gateway@uidl100k`...
    processes: dict[str, GatewayProcess] = {}
    process_info: dict[str, dict[str, Any]] = {}
    procs: dict[tuple[str, str], GatewayProcess] = {}  # (workload, target) -> its gateway process
    for w in workloads:
        for target in w.targets:
            if target in PEERS:
                continue
            label = _process_label(target, w)
            if label not in processes:
                if target == JMAP:
                    assert cyrus is not None
                    url, src = cyrus.jmap_url, sources["gateway"]
                else:
                    url, src = imap_url, sources[target]
                _say(f"starting pop3-gateway as {label!r} on {url}" + (f" from {src}" if src else ""))
                gw = start_gateway(root / label, url, log_level=args.gateway_log_level, source=src)
                stack.callback(gw.stop)
                processes[label] = gw
                process_info[label] = {
                    "source": str(src) if src else "(this checkout)",
                    "upstream": url,
                    "workloads": [],
                }
            procs[(w.name, target)] = processes[label]
            process_info[label]["workloads"].append(w.name)

    for w in workloads:
        t_fill = time.perf_counter()
        _fill(w, upstream, cyrus)
        w.fill_seconds = time.perf_counter() - t_fill
    # The fills leave up to 100k new files in the page cache; their writeback would otherwise run during
    # the first timed sessions (it made the imapc peer's first 100k login 3x slower in one run).
    t_sync = time.perf_counter()
    os.sync()
    _say(f"sync: the filled mailboxes are on disk ({time.perf_counter() - t_sync:.1f} s)")
    setup_seconds = time.perf_counter() - t_setup

    def endpoint(target: str, w: Workload) -> tuple[str, int]:
        if target == "dovecot-direct":
            return upstream.host, upstream.pop3_port
        if target == "imapc-peer":
            return peer.host, peer.pop3_port
        gw = procs[(w.name, target)]
        return gw.host, gw.port

    client = Client()
    checker = Checker()

    def session(target: str, w: Workload) -> SessionResult:
        host, port = endpoint(target, w)
        try:
            return client.session(host, port, w.user, PASSWORD, w.commands, mode=args.client)
        except (Pop3Error, OSError) as exc:
            raise BenchmarkError(f"{target}, workload {w.name}: {exc!r}") from exc

    # Warm-up (caches, Dovecot indexes, the peer's imapc index) and the reference bytes of each workload.
    for w in workloads:
        if w.name == UIDL:
            continue
        for target in w.targets:
            for _ in range(max(args.warmup, 1)):
                checker.check(w, target, session(target, w))
        ref = checker.reference(w)
        _say(
            f"warm-up {w.name}: identical bytes from all targets ({ref.retr_count} messages, "
            f"{ref.retr_octets} RETR octets, digest {ref.retr_digest[:12]})"
        )

    # uidl100k: the first login of every target, timed on its own. The peers go first: Dovecot direct's
    # first POP3 login warms the upstream's size cache, so the imapc peer and the gateway (both reading the
    # upstream over IMAP) start from the same warm upstream.
    first: dict[str, FirstLogin] = {}
    memory_after_first: dict[str, dict[str, int]] = {}
    for w in workloads:
        if w.name != UIDL:
            continue
        for target in w.targets:
            proc = procs.get((w.name, target))
            cpu0 = proc.cpu_seconds() if proc else 0.0
            result = session(target, w)
            cpu1 = proc.cpu_seconds() if proc else 0.0
            checker.check(w, target, result)
            first[target] = FirstLogin(result, cpu1 - cpu0 if proc else None)
            if proc:
                memory_after_first[_process_label(target, w)] = proc.status()
            _say(f"{UIDL} first login through {target}: {result.seconds:.3f} s")
        _say(f"{UIDL}: identical UIDL listings of {w.count} messages from all targets")

    series: dict[str, dict[str, Series]] = {w.name: {t: Series() for t in w.targets} for w in workloads}
    t_runs = time.perf_counter()
    for rep in range(repeat):
        for w in workloads:
            # Each repetition starts with the next target, so no target always runs first (or after another).
            k = rep % len(w.targets)
            for target in w.targets[k:] + w.targets[:k]:
                proc = procs.get((w.name, target))
                cpu0 = proc.cpu_seconds() if proc else 0.0
                result = session(target, w)
                cpu1 = proc.cpu_seconds() if proc else 0.0
                checker.check(w, target, result)
                s = series[w.name][target]
                s.seconds.append(result.seconds)
                s.client_cpu.append(result.client_cpu)
                s.wire_bytes.append(result.wire_bytes)
                if proc:
                    s.gateway_cpu.append(cpu1 - cpu0)
        _say(
            f"repetition {rep + 1}/{repeat}: "
            + "  ".join(
                f"{w.name} " + " ".join(f"{series[w.name][t].seconds[-1]:.3f}" for t in w.targets)
                for w in workloads
            )
        )
    runs_seconds = time.perf_counter() - t_runs
    for label, gw in processes.items():
        if not gw.alive():
            raise BenchmarkError(f"the gateway process {label!r} died during the runs")
    for label, gw in processes.items():
        process_info[label].update(
            pid=gw.pid,
            memory=gw.status(),
            memory_after_first_login=memory_after_first.get(label),
            cpu_seconds_total=gw.cpu_seconds(),
        )

    profiles: dict[str, dict[str, Any]] = {}
    if py_spy is not None:
        profiles = _profile(args, stack, root, py_spy, workloads, procs, session, checker, imap_url)

    _say("stopping the servers")
    return _results(
        args,
        git,
        workloads,
        repeat,
        series,
        checker,
        first,
        process_info,
        setup_seconds,
        runs_seconds,
        profiles,
    )


def _fill(w: Workload, upstream: Dovecot, cyrus: Cyrus | None) -> None:
    """Fill the row's account on Dovecot, and on Cyrus with the very same bytes when gateway-jmap is in it."""
    on_cyrus = cyrus is not None and JMAP in w.targets
    where = "Dovecot" + (" and Cyrus" if on_cyrus else "")
    _say(f"filling {w.user!r} on {where}: {w.count} x {_size(w.size)}")
    upstream.add_user(w.user, PASSWORD)
    if on_cyrus:
        assert cyrus is not None
        cyrus.add_user(w.user, PASSWORD)
    if w.name == "small":
        messages = sized_messages(w.count, w.size)  # unique Message-IDs (Cyrus merges identical messages)
        upstream.append(w.user, PASSWORD, messages)
        if on_cyrus:
            assert cyrus is not None
            cyrus.append(w.user, PASSWORD, messages)
    elif w.name == "large":
        for _ in range(w.count):  # one at a time: a 10 MiB message is a lot of memory
            message = big_message(w.size)
            upstream.append(w.user, PASSWORD, [message])
            if on_cyrus:
                assert cyrus is not None
                cyrus.append(w.user, PASSWORD, [message])
    else:
        t0 = time.perf_counter()
        step = max(w.count // 10, 1)
        last = [0]

        def progress(done: int) -> None:
            if done // step > last[0] // step or done == w.count:
                rate = done / (time.perf_counter() - t0)
                _say(f"  {w.user!r}: {done}/{w.count} appended ({rate:.0f} messages/s)")
            last[0] = done

        def make(i: int) -> bytes:
            return sized_message(i, w.size, tag="uidl")  # unique Message-IDs

        # One APPEND per 1000 messages (MULTIAPPEND), on parallel connections: the tests' one-APPEND-per-
        # message helper slows down as a Maildir grows, to ~5 ms a message at 20k (see benchmarks/fill.py).
        multiappend_parallel(
            upstream.host, upstream.imap_port, w.user, PASSWORD, w.count, make, progress=progress
        )


def _profile(
    args: argparse.Namespace,
    stack: contextlib.ExitStack,
    root: Path,
    py_spy: str,
    workloads: list[Workload],
    procs: dict[tuple[str, str], GatewayProcess],
    session: Any,
    checker: Checker,
    imap_url: str,
) -> dict[str, dict[str, Any]]:
    """py-spy on the main gateway (and gateway-jmap) during extra sessions of every workload.

    For uidl100k also a first login: each of the two recordings gets a fresh gateway process with an empty
    state directory, so both see the one-time assignment of every UIDL."""
    out = Path(args.profile)
    out.mkdir(parents=True, exist_ok=True)
    profiles: dict[str, dict[str, Any]] = {}
    for w in workloads:
        n = args.profile_sessions or (5 if w.name == "small" else 3)
        for target in ("gateway", JMAP):
            gw = procs.get((w.name, target))
            if gw is None:
                continue

            def work(w: Workload = w, n: int = n, target: str = target) -> None:
                for _ in range(n):
                    checker.check(w, target, session(target, w))

            label = f"{target}-{w.name}"
            _say(f"profiling {target} with py-spy: {n} x {w.name}")
            prof = pyspy.record(py_spy, gw.pid, out / label, work)
            print(pyspy.format_profile(f"{target} (workload {w.name})", prof), flush=True)
            profiles[label] = _profile_json(prof, n, out / label)
        if w.name == UIDL and (w.name, "gateway") in procs:
            profiles.update(_profile_first_login(args, stack, root, py_spy, w, checker, imap_url))
    return profiles


def _profile_first_login(
    args: argparse.Namespace,
    stack: contextlib.ExitStack,
    root: Path,
    py_spy: str,
    w: Workload,
    checker: Checker,
    imap_url: str,
) -> dict[str, dict[str, Any]]:
    """py-spy on a first uidl100k login: each recording gets a fresh gateway with an empty state dir."""
    out = Path(args.profile)
    client = Client()
    src = Path(args.gateway_src) if args.gateway_src else None
    fresh: list[GatewayProcess] = []

    def start_fresh() -> int:
        label = f"gateway@{UIDL}-profile-{len(fresh) + 1}"
        gw = start_gateway(root / label, imap_url, log_level=args.gateway_log_level, source=src)
        stack.callback(gw.stop)
        fresh.append(gw)
        return gw.pid

    def first_login() -> None:
        gw = fresh[-1]
        try:
            result = client.session(gw.host, gw.port, w.user, PASSWORD, w.commands, mode=args.client)
        except (Pop3Error, OSError) as exc:
            raise BenchmarkError(f"profiled first login, workload {w.name}: {exc!r}") from exc
        checker.check(w, "gateway", result)
        _say(f"profiled first login: {result.seconds:.3f} s")

    label = f"gateway-{UIDL}-first-login"
    _say(f"profiling the gateway with py-spy: a first {UIDL} login, in fresh processes")
    try:
        prof = pyspy.record(py_spy, start_fresh, out / label, first_login)
    finally:
        for gw in fresh:
            gw.stop()
    print(pyspy.format_profile(f"gateway (workload {UIDL}, a first login)", prof), flush=True)
    return {label: _profile_json(prof, 1, out / label)}


def _profile_json(prof: pyspy.Profile, sessions: int, stem: Path) -> dict[str, Any]:
    return {
        "sessions": sessions,
        "samples": prof.samples,
        "seconds": prof.seconds,
        "busy": prof.busy,
        "self_top": prof.self_top,
        "total_top": prof.total_top,
        "flamegraph": str(stem.with_suffix(".svg")),
        "collapsed": str(stem.with_suffix(".txt")),
    }


class Checker:
    """The first session of a workload is its reference; every other must carry the same bytes.

    RETR bodies and LIST listings must be identical from every target of a row. UIDL listings must be
    identical among the targets reading the same upstream: gateway-jmap's UIDLs come from Cyrus (JMAP
    Email ids), the others' from Dovecot's UIDs."""

    def __init__(self) -> None:
        self._refs: dict[tuple[str, str], tuple[str, SessionResult]] = {}

    def reference(self, w: Workload) -> SessionResult:
        return self._refs[(w.name, "")][1]

    def check(self, w: Workload, target: str, result: SessionResult) -> None:
        if result.retr_count != w.retr_count:
            raise BenchmarkError(
                f"workload {w.name}: {target} retrieved {result.retr_count} messages, expected {w.retr_count}"
            )
        for command, lines in w.listing_lines.items():
            got = result.listing_lines.get(command)
            if got != lines:
                raise BenchmarkError(
                    f"workload {w.name}: {target} listed {got} lines for {command.decode()}, expected {lines}"
                )
        ref_target, ref = self._refs.setdefault((w.name, ""), (target, result))
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
        for command in w.listing_lines:
            if command == b"UIDL":
                upstream = "jmap" if target == JMAP else "imap"
                ref_target, ref = self._refs.setdefault((w.name, "UIDL@" + upstream), (target, result))
            else:
                ref_target, ref = self._refs[(w.name, "")]
            if result.listing_digests.get(command) != ref.listing_digests.get(command):
                raise BenchmarkError(
                    f"workload {w.name}: {target} sent a different {command.decode()} than {ref_target}"
                )


def _summary(values: Series) -> dict[str, Any]:
    s = values
    out: dict[str, Any] = {
        "median_s": statistics.median(s.seconds),
        "min_s": min(s.seconds),
        "max_s": max(s.seconds),
        "stdev_s": statistics.stdev(s.seconds) if len(s.seconds) > 1 else 0.0,
        "seconds": s.seconds,
        "client_cpu_median_s": statistics.median(s.client_cpu),
        "wire_bytes": s.wire_bytes[0],
    }
    if s.gateway_cpu:
        out["gateway_cpu_median_s"] = statistics.median(s.gateway_cpu)
        out["gateway_cpu_s"] = s.gateway_cpu
    return out


def _ratios(seconds: dict[str, float], targets: list[str]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for t in targets:
        if t in PEERS:
            continue
        out[t] = {
            "to_imapc_peer": seconds[t] / seconds["imapc-peer"],
            "to_dovecot_direct": seconds[t] / seconds["dovecot-direct"],
        }
        if t == JMAP and "gateway" in seconds:
            out[t]["to_gateway"] = seconds[t] / seconds["gateway"]
    return out


def _results(
    args: argparse.Namespace,
    git: str,
    workloads: list[Workload],
    repeat: int,
    series: dict[str, dict[str, Series]],
    checker: Checker,
    first: dict[str, FirstLogin],
    processes: dict[str, dict[str, Any]],
    setup_seconds: float,
    runs_seconds: float,
    profiles: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    all_targets: list[str] = []
    for w in workloads:
        all_targets += [t for t in w.targets if t not in all_targets]
    out: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "node": platform.node()},
        "client": args.client,
        "repeat": repeat,
        "targets": all_targets,
        "git": git,
        "imapc_features": IMAPC_FEATURES,
        "setup_seconds": round(setup_seconds, 3),
        "runs_seconds": round(runs_seconds, 3),
        "workloads": {},
        "gateways": {},
        "profiles": profiles,
    }
    if JMAP in all_targets:
        out["jmap_upstream"] = {
            "server": "Cyrus 3.6 (tests/realservers/cyrus.py)",
            "jmap_max_objects_in_get": CYRUS_DEFAULT_MAX_OBJECTS_IN_GET,
        }
    for label, info in processes.items():
        memory = info["memory"]
        after_first = info.get("memory_after_first_login")
        entry = {
            "source": info["source"],
            "upstream": info["upstream"],
            "workloads": info["workloads"],
            "pid": info["pid"],
            "peak_rss_kib": memory.get("VmHWM"),
            "rss_kib": memory.get("VmRSS"),
            "cpu_seconds_total": round(info["cpu_seconds_total"], 3),
        }
        if after_first is not None:
            entry["peak_rss_kib_after_first_login"] = after_first.get("VmHWM")
        out["gateways"][label] = entry
    for w in workloads:
        ref = checker.reference(w)
        per_target = {t: _summary(series[w.name][t]) for t in w.targets}
        med = {t: per_target[t]["median_s"] for t in w.targets}
        row: dict[str, Any] = {
            "description": w.description,
            "messages": w.count,
            "message_size": w.size,
            "fill_seconds": round(w.fill_seconds, 3),
            "retr_octets": ref.retr_octets,
            "retr_digest": ref.retr_digest,
            "targets": per_target,
            "ratios": _ratios(med, w.targets),
            "ratio_imapc_peer_to_dovecot_direct": med["imapc-peer"] / med["dovecot-direct"],
            "notes": [JMAP_NOTE] if JMAP in w.targets else [],
        }
        if w.name == UIDL:
            row["listing_lines"] = w.count
            row["steady_state"] = f"median of the {repeat} logins after the first"
            row["first_login"] = {
                t: {
                    "seconds": first[t].result.seconds,
                    "client_cpu_s": first[t].result.client_cpu,
                    **({"gateway_cpu_s": first[t].gateway_cpu} if first[t].gateway_cpu is not None else {}),
                }
                for t in w.targets
            }
            row["first_login_ratios"] = _ratios({t: first[t].result.seconds for t in w.targets}, w.targets)
            row["goals"] = {
                t: {
                    "ratio_to_imapc_peer": row["ratios"][t]["to_imapc_peer"],
                    "max_ratio_to_imapc_peer": UIDL_GOAL_RATIO,
                    "median_s": med[t],
                    "max_seconds": UIDL_GOAL_SECONDS,
                    "met": row["ratios"][t]["to_imapc_peer"] <= UIDL_GOAL_RATIO
                    and med[t] < UIDL_GOAL_SECONDS,
                }
                for t in w.targets
                if t not in PEERS
            }
        out["workloads"][w.name] = row
    return out


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
    if not sep or not name or not folder or "@" in name or name in (*PEERS, "gateway", JMAP):
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
