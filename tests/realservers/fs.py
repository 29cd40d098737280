"""Small process and filesystem helpers shared by the real-server and real-client modules."""

from __future__ import annotations

import os
import pwd
import shutil
import stat
from pathlib import Path

VMAIL_USER = "vmail"


class MissingProgram(RuntimeError):
    """A program (or system user) the real-server tests need is not installed: run `make deps`."""


class UnmarkedRealServerTest(AssertionError):
    """A test without the `realserver` marker started a real program: it would hide in the fast loop."""


# The node id of the test now running when it lacks the `realserver` marker (set by tests/conftest.py);
# None outside pytest (benchmarks) and for marked tests.
unmarked_test: str | None = None


def require_program(name: str) -> str:
    """The absolute path of `name`, looked up on PATH and then in the sbin folders (not on every PATH).

    Every real server and client is started through here, so here a test without the `realserver` marker
    is refused."""
    if unmarked_test is not None:
        raise UnmarkedRealServerTest(
            f"{unmarked_test} runs {name} but has no `realserver` marker; add `pytestmark = "
            "pytest.mark.realserver` (or `@pytest.mark.realserver`) so `-m 'not realserver'` leaves it out"
        )
    path = shutil.which(name) or shutil.which(name, path="/usr/local/sbin:/usr/sbin:/sbin")
    if path is None:
        raise MissingProgram(f"{name!r} is not installed; run `make deps` (scripts/setup-deps.sh) as root")
    return path


def vmail_ids() -> tuple[int, int]:
    """uid and gid of the unprivileged `vmail` user that owns test mailboxes."""
    try:
        entry = pwd.getpwnam(VMAIL_USER)
    except KeyError:
        raise MissingProgram(
            f"system user {VMAIL_USER!r} is missing; run `make deps` (scripts/setup-deps.sh) as root"
        ) from None
    return entry.pw_uid, entry.pw_gid


def check_searchable(path: Path) -> None:
    """Raise unless unprivileged users (dovecot, vmail) can walk down to `path`.

    pytest's temporary folders do not qualify: they are 0700, and every pytest start resets
    /tmp/pytest-of-USER to 0700, which would cut a running Dovecot off from its own files when another
    session starts. Use a `tempfile.mkdtemp()` folder instead.
    """
    for directory in [path, *path.parents]:
        if not directory.stat().st_mode & stat.S_IXOTH:
            raise PermissionError(
                f"{directory} is not searchable by other users, so Dovecot's processes cannot reach {path}; "
                "use a folder outside pytest's tmp_path (e.g. tempfile.mkdtemp())"
            )


def chown_tree(path: Path, uid: int, gid: int) -> None:
    os.chown(path, uid, gid)
    for dirpath, dirnames, filenames in os.walk(path):
        for name in [*dirnames, *filenames]:
            os.chown(os.path.join(dirpath, name), uid, gid, follow_symlinks=False)


def tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"({path} does not exist)"
    return "\n".join(text.splitlines()[-lines:])
