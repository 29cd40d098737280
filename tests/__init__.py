"""The test suite. Importing it (conftest.py does, before anything else) sets up two things for the run.

Bytecode caching goes back on. Container images often set PYTHONDONTWRITEBYTECODE=1; then each pytest worker
compiles gateway/ and tests/ from source again and rewrites every test module's asserts again, and so does
each gateway subprocess a test starts: about 10 s of CPU in the fast loop on two workers. The caches go where
Python puts them by default (`__pycache__/`, ignored by git; `make clean` removes them).

`tmp_path` lives in RAM (/dev/shm) unless TMPDIR or PYTEST_DEBUG_TEMPROOT says where: the UIDL store commits
with `synchronous=FULL`, and on a disk its fsyncs cost the fast loop several seconds of waiting. Nothing in
the suite depends on the disk itself: a test cannot pull the power cord.
"""

import os
import sys

sys.dont_write_bytecode = False
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)  # for the xdist workers and the subprocesses tests start

if (
    "TMPDIR" not in os.environ
    and "PYTEST_DEBUG_TEMPROOT" not in os.environ
    and os.path.isdir("/dev/shm")
    and os.access("/dev/shm", os.W_OK | os.X_OK)
):
    os.environ["PYTEST_DEBUG_TEMPROOT"] = "/dev/shm"  # pytest's documented root for tmp_path
