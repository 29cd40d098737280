"""`python -m benchmarks` (or `make bench`): pop3-gateway against Dovecot POP3, direct and over imapc.

See benchmarks/README.md. Run from the repository root (the tests' Dovecot helpers are imported from there).
"""

from __future__ import annotations

import sys

from benchmarks.run import main

if __name__ == "__main__":
    sys.exit(main())
