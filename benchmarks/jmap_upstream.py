"""The JMAP upstream of the benchmark: the tests' private Cyrus 3.6 (`tests/realservers/cyrus.py`), with one
setting put back to Cyrus's default.

The test helper sets `jmap_max_objects_in_get: 100` so that a small test mailbox already needs several
`Email/get` batches. A benchmark should see the server as deployed, so that line is dropped (Cyrus's default
is 4096, `man 5 imapd.conf`) and the master restarted on the same ports before any mail is added.
"""

from __future__ import annotations

import re
from pathlib import Path

from tests.realservers.cyrus import Cyrus, start_cyrus

_TEST_ONLY = re.compile(r"^(# small on purpose:.*\n)?jmap_max_objects_in_get:.*\n", re.MULTILINE)
CYRUS_DEFAULT_MAX_OBJECTS_IN_GET = 4096


def start_jmap_upstream(root: Path) -> Cyrus:
    root.mkdir(parents=True, exist_ok=True)
    server = start_cyrus(root)
    try:
        text = server.conf.read_text()
        cleaned = _TEST_ONLY.sub("", text)
        if cleaned != text:
            server.conf.write_text(cleaned)
            server.stop()
            server.restart()
    except BaseException:
        server.stop()
        raise
    return server


__all__ = ["CYRUS_DEFAULT_MAX_OBJECTS_IN_GET", "Cyrus", "start_jmap_upstream"]
