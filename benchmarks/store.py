"""The UIDL store benchmark: a login to 10 live messages after 10^4, 10^5 and 10^6 deleted ones.

The case of a poller that deletes at QUIT (the main use case): every message it ever fetched was seen,
fingerprinted and deleted. For each size:

1. A store file as the schema-1 code (main before issue 10) leaves it is written directly with SQL:
   N rows in state ``deleted``, with UIDLs and fingerprints, in one mailbox.
2. ``before``: the old code (another checkout: ``--old DIR``, by default a scratch ``git worktree`` of
   ``main``) opens it in a fresh process and logs in: ``assign_or_plan`` of 10 new messages, which are then
   marked deleted (the poller's QUIT, not timed). Repeated ``--repeat`` times, each in a fresh process (no
   cache: the first login after a restart, or any login after another process wrote).
3. ``after``: a copy of the same file is opened once by this checkout (the forward migration, timed apart),
   then logged into the same way.

Each login reports its wall time and the process's peak RSS (``ru_maxrss``; the JSON also has its growth
during the login: the peak after it minus the RSS before it). Run: ``python -m benchmarks --only store`` or
``python -m benchmarks.store [--sizes 10000,100000,1000000] [--old DIR] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAILBOX = "imap:127.0.0.1:143:poller:INBOX"
LIVE = 10
GOAL_SECONDS = 0.050  # issue 10: a login to 10 live messages after 10^6 deleted ones
SIZES = (10_000, 100_000, 1_000_000)

# The schema-1 tables, as main's gateway/store.py creates them.
V1_SCHEMA = """
CREATE TABLE mailbox (
    id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, account TEXT NOT NULL,
    last_list_hash TEXT, last_count INTEGER, sessions INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE message (
    mailbox_id INTEGER NOT NULL REFERENCES mailbox(id), key TEXT NOT NULL, uidl TEXT NOT NULL,
    size INTEGER NOT NULL, header_sha1 TEXT, body_sha1 TEXT, state TEXT NOT NULL DEFAULT 'present',
    order_pos INTEGER, first_seen REAL NOT NULL,
    PRIMARY KEY (mailbox_id, key), UNIQUE (mailbox_id, uidl)
) WITHOUT ROWID;
PRAGMA user_version = 1;
"""

# One login, in a fresh process of either checkout (PYTHONPATH decides which).
LOGIN = r"""
import json, resource, sys, time
from pathlib import Path
from gateway.store import Item, UidlStore

path, mailbox, live, rep = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
t0 = time.perf_counter()
store = UidlStore(Path(path))
opened = time.perf_counter() - t0

def rss_kib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * (resource.getpagesize() // 1024)

items = [Item(f"live:{rep}:{i}", 2000 + i, native=f"{rep:08x}{i:08x}", uid=i + 1, uidvalidity=7)
         for i in range(live)]
before = rss_kib()
t0 = time.perf_counter()
result = store.assign_or_plan(mailbox, "poller", items, "native")
login = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
assert len(result.uidls) == live, result
store.mark_deleted(mailbox, [i.key for i in items])  # the poller's QUIT
store.close()
print(json.dumps({"login": login, "open": opened, "rss_growth_kib": max(peak - before, 0), "peak_kib": peak}))
"""


def fill_v1(path: Path, deleted: int) -> None:
    """A schema-1 store with ``deleted`` rows in state deleted (fingerprinted: the poller RETRed them)."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(V1_SCHEMA)
    db.execute("BEGIN")
    db.execute(
        "INSERT INTO mailbox (id, name, account, sessions) VALUES (1, ?, 'poller', ?)", (MAILBOX, deleted)
    )

    def rows() -> Iterator[tuple[object, ...]]:
        now = time.time()
        for i in range(1, deleted + 1):
            h = hashlib.sha1(str(i).encode(), usedforsecurity=False).hexdigest()
            yield (1, f"u:1:{i}", f"{i:08x}00000001", 1000 + i % 5000, h, h[::-1], "deleted", now)

    db.executemany(
        "INSERT INTO message (mailbox_id, key, uidl, size, header_sha1, body_sha1, state, first_seen) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        rows(),
    )
    db.execute("COMMIT")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()


def login(src: Path, path: Path, rep: int) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(src)}
    out = subprocess.run(
        [sys.executable, "-c", LOGIN, str(path), MAILBOX, str(LIVE), str(rep)],
        env=env,
        cwd=src,
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    if out.returncode != 0:
        raise RuntimeError(f"login with {src} failed: {out.stderr.strip()[-2000:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def migrate(path: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    script = "import sys,time;from pathlib import Path;from gateway.store import UidlStore\n"
    script += "t=time.perf_counter();UidlStore(Path(sys.argv[1])).close();print(time.perf_counter()-t)"
    out = subprocess.run(
        [sys.executable, "-c", script, str(path)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=1800,
    )
    return float(out.stdout.strip())


@contextlib.contextmanager
def old_checkout(given: str | None, ref: str) -> Iterator[Path]:
    if given:
        yield Path(given)
        return
    where = Path(tempfile.mkdtemp(prefix="store-old-")) / "tree"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(where), ref], check=True)
    try:
        yield where
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(where)], check=False)
        shutil.rmtree(where.parent, ignore_errors=True)


def run(sizes: tuple[int, ...], repeat: int, old: Path, work: Path) -> list[dict[str, object]]:
    results: list[dict[str, object]] = []
    for n in sizes:
        print(f"store: {n:,} deleted rows: filling...", file=sys.stderr, flush=True)
        before_path = work / f"before-{n}.sqlite3"
        fill_v1(before_path, n)
        after_path = work / f"after-{n}.sqlite3"
        shutil.copy(before_path, after_path)
        migrated = migrate(after_path)
        row: dict[str, object] = {"deleted": n, "migrate_s": migrated}
        for label, src, path in (("before", old, before_path), ("after", ROOT, after_path)):
            runs = [login(src, path, rep) for rep in range(repeat)]
            row[f"{label}_login_s"] = statistics.median(r["login"] for r in runs)
            row[f"{label}_rss_growth_mib"] = max(r["rss_growth_kib"] for r in runs) / 1024
            row[f"{label}_peak_rss_mib"] = max(r["peak_kib"] for r in runs) / 1024
            row[f"{label}_open_s"] = statistics.median(r["open"] for r in runs)
            print(f"store: {n:,} {label}: {row[f'{label}_login_s']:.4f} s", file=sys.stderr, flush=True)
        row["file_mib_after"] = after_path.stat().st_size / 2**20
        results.append(row)
        for p in work.glob(f"*-{n}.sqlite3*"):
            p.unlink()
    return results


def format_results(results: list[dict[str, object]]) -> str:
    head = (
        f"{'deleted rows':>13} | {'before login':>12} | {'before peak RSS':>15} | {'after login':>11} | "
        f"{'after peak RSS':>14} | {'speed-up':>8} | {'migration':>9}"
    )
    lines = [f"UIDL store: a login to {LIVE} live messages (fresh process, median)", head, "-" * len(head)]
    for r in results:
        b, a = float(r["before_login_s"]), float(r["after_login_s"])  # type: ignore[arg-type]
        lines.append(
            f"{r['deleted']:>13,} | {b * 1000:>9.1f} ms | {r['before_peak_rss_mib']:>11.1f} MiB | "
            f"{a * 1000:>8.1f} ms | {r['after_peak_rss_mib']:>10.1f} MiB | {b / a:>7.0f}x | "
            f"{float(r['migrate_s']):>7.2f} s"  # type: ignore[arg-type]
        )
    last = results[-1]
    if last["deleted"] == SIZES[-1]:
        ok = float(last["after_login_s"]) < GOAL_SECONDS  # type: ignore[arg-type]
        verdict = "met" if ok else "MISSED"
        lines.append(f"goal: under {GOAL_SECONDS * 1000:.0f} ms after {SIZES[-1]:,} deleted: {verdict}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.store", description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default=",".join(map(str, SIZES)), help="deleted rows, comma-separated")
    p.add_argument(
        "--repeat", type=int, default=3, help="logins per size and build, each a fresh process (3)"
    )
    p.add_argument(
        "--old", metavar="DIR", help="the checkout to compare with (default: a worktree of --old-ref)"
    )
    p.add_argument("--old-ref", default="main", help="the git ref of the old code (main)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    args = p.parse_args(argv)
    try:
        sizes = tuple(int(s) for s in args.sizes.split(",") if s.strip())
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 0 or args.repeat < 1:
        print("python -m benchmarks.store: bad --sizes or --repeat", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="pop3gw-store-bench-"))
    try:
        with old_checkout(args.old, args.old_ref) as old:
            results = run(sizes, args.repeat, old, work)
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        print(f"STORE BENCHMARK FAILED: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(format_results(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
