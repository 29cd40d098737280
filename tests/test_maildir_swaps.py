"""Maildir RETR reads only the snapshot's own regular files: a message file swapped after the login for a
symlink (to the users file, say), a hard link to another file, a FIFO or a directory is refused with
[SYS/TEMP]-style TempFailure and a warning, and none of its bytes are sent."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from contextlib import aclosing
from pathlib import Path

import pytest
import trio

from gateway import accounts
from gateway.backends.base import PasswordLogin, TempFailure
from gateway.backends.maildir import MaildirBackend

ALICE = PasswordLogin("alice", "alice-pw")
SECRET = b"-----BEGIN PRIVATE KEY-----\nnot for pop3 clients\n"
MESSAGE = b"Subject: hi\n\nhello\n"


@pytest.fixture
def users_file(tmp_path: Path) -> Path:
    path = tmp_path / "users"
    path.write_text(f"alice:{accounts.hash_password('alice-pw')}:\n")
    return path


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    path = tmp_path / "tls.key"
    path.write_bytes(SECRET)
    return path


@pytest.fixture
def message(tmp_path: Path) -> Path:
    for sub in ("cur", "new", "tmp"):
        (tmp_path / "mail" / "alice" / sub).mkdir(parents=True)
    path = tmp_path / "mail" / "alice" / "cur" / "1700000000.M1P1.host:2,S"
    path.write_bytes(MESSAGE)
    return path


async def read(backend: MaildirBackend, swap: Callable[[], None]) -> bytes:
    """Log in, swap the message file, RETR it."""
    out = b""
    async with backend.open_maildrop(ALICE) as drop:
        assert len(drop.entries) == 1
        swap()
        async with aclosing(drop.stream(0)) as chunks:
            async for chunk in chunks:
                out += chunk
    return out


def symlink_to(target: Path, path: Path) -> Callable[[], None]:
    def swap() -> None:
        path.unlink()
        path.symlink_to(target)

    return swap


def hard_link_to(target: Path, path: Path) -> Callable[[], None]:
    def swap() -> None:
        path.unlink()
        os.link(target, path)

    return swap


def fifo(path: Path) -> Callable[[], None]:
    def swap() -> None:
        path.unlink()
        os.mkfifo(path)

    return swap


@pytest.mark.parametrize(
    ("make_swap", "reason"),
    [
        (lambda message, secret, users: symlink_to(secret, message), "symlink"),
        (lambda message, secret, users: symlink_to(users, message), "symlink"),
        (lambda message, secret, users: hard_link_to(secret, message), "another inode"),
        (lambda message, secret, users: fifo(message), "no regular file"),
    ],
    ids=["symlink-to-tls-key", "symlink-to-users-file", "hard-link", "fifo"],
)
async def test_a_swapped_message_file_is_refused_and_nothing_of_it_is_read(
    tmp_path: Path,
    message: Path,
    secret: Path,
    users_file: Path,
    caplog: pytest.LogCaptureFixture,
    make_swap: Callable[[Path, Path, Path], Callable[[], None]],
    reason: str,
) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.maildir")
    backend = MaildirBackend(tmp_path / "mail", users_file)

    async def unblock_a_fifo_reader() -> None:
        # A FIFO opened for reading without O_NONBLOCK waits for a writer forever, in a worker thread that
        # no cancel scope reaches: after a while, be that writer, so such a regression fails, not hangs.
        await trio.sleep(3)
        with contextlib.suppress(OSError):
            os.close(os.open(message, os.O_WRONLY | os.O_NONBLOCK))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(unblock_a_fifo_reader)
        with pytest.raises(TempFailure, match="was replaced"):
            await read(backend, make_swap(message, secret, users_file))
        nursery.cancel_scope.cancel()
    [line] = [r.getMessage() for r in caplog.records if "refusing to read" in r.getMessage()]
    assert "not the file of the snapshot" in line and reason in line


async def test_a_symlinked_subfolder_is_refused(
    tmp_path: Path, message: Path, secret: Path, users_file: Path
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.symlink(secret, elsewhere / message.name)

    def swap() -> None:
        cur = message.parent
        cur.rename(tmp_path / "old-cur")
        cur.symlink_to(elsewhere)

    backend = MaildirBackend(tmp_path / "mail", users_file)
    with pytest.raises(TempFailure, match="no longer a directory"):
        await read(backend, swap)


async def test_a_renamed_message_is_still_the_same_inode_and_streams(
    tmp_path: Path, message: Path, users_file: Path
) -> None:
    """Another client changing flags renames the file: same inode, still served."""
    backend = MaildirBackend(tmp_path / "mail", users_file)
    assert await read(backend, lambda: message.rename(message.with_name(message.name + "R"))) == MESSAGE


async def test_a_symlink_swapped_in_before_sizing_is_left_out_of_the_snapshot(
    tmp_path: Path, message: Path, secret: Path, users_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway.backends import maildir as maildir_mod

    real = maildir_mod._list_maildir

    def list_then_swap(maildir: Path) -> list[maildir_mod._File]:
        files = real(maildir)
        symlink_to(secret, message)()  # between the listing and the size scan
        return files

    monkeypatch.setattr(maildir_mod, "_list_maildir", list_then_swap)
    backend = MaildirBackend(tmp_path / "mail", users_file)
    async with backend.open_maildrop(ALICE) as drop:
        assert drop.entries == ()
