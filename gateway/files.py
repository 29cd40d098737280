"""Files and directories the gateway creates are private to its user, whatever the umask.

- ``make_private_dir(path)``: creates ``path`` and every missing parent with mode 0700 (``Path.mkdir``
  gives the parents the umask's default, 0755 under umask 022). An existing directory is left as it is.
- ``create_private_file(path)``: creates an empty ``path`` with mode 0600 if it is missing. sqlite gives
  its ``-wal`` and ``-shm`` files the mode of the database file, so creating the database this way first
  makes those private too.
- ``exposure_warning(path, what)``: one sentence when ``path`` is readable by its group or by others
  (the users file holds password hashes and APOP secrets; the state directory holds the UIDL store and the
  demo password), else None. The gateway warns and goes on: the operator may mean it (a group for backups).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from gateway.config import Config

DIR_MODE = 0o700
FILE_MODE = 0o600


def make_private_dir(path: Path) -> None:
    missing: list[Path] = []
    p = Path(path)
    while not p.exists():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=DIR_MODE)
        except FileExistsError:
            continue  # made meanwhile by someone else: theirs to decide
        os.chmod(d, DIR_MODE)  # mkdir's mode is filtered by the umask; 0700 survives any sane one


def create_private_file(path: Path) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except FileExistsError:
        return
    os.close(fd)


def exposure_warning(path: Path, what: str) -> str | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    readers = [
        who for who, bit in (("its group", stat.S_IRGRP), ("others", stat.S_IROTH)) if st.st_mode & bit
    ]
    if not readers:
        return None
    fix = "chmod 700" if stat.S_ISDIR(st.st_mode) else "chmod 600"
    return (
        f"{what} {path} is readable by {' and '.join(readers)} "
        f"(mode {stat.S_IMODE(st.st_mode):04o}); {fix} it unless that is meant"
    )


def users_file_path(config: Config) -> Path:
    """The users file the maildir backends and a JMAP token setup read."""
    up = config.upstream
    return Path(up.users_file) if up.users_file else config.state_path / "users"


def config_warnings(config: Config) -> list[str]:
    """The exposure warnings for the files a config names (only those that exist)."""
    out = [
        exposure_warning(config.state_path, "the state directory"),
        exposure_warning(users_file_path(config), "the users file"),
    ]
    return [w for w in out if w is not None]


__all__ = [
    "DIR_MODE",
    "FILE_MODE",
    "config_warnings",
    "create_private_file",
    "exposure_warning",
    "make_private_dir",
    "users_file_path",
]
