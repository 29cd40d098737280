"""The test suite. Importing it (conftest.py does, before anything else) turns bytecode caching back on.

Container images often set PYTHONDONTWRITEBYTECODE=1. Then each pytest worker compiles gateway/ and tests/
from source again and rewrites every test module's asserts again, and so does each gateway subprocess a test
starts: about 10 s of CPU in the fast loop on two workers. The caches go where Python puts them by default
(`__pycache__/`, ignored by git; `make clean` removes them); where the tree is read-only, nothing is written.
"""

import os
import sys

sys.dont_write_bytecode = False
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)  # for the xdist workers and the subprocesses tests start
