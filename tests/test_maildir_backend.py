"""The embedded Maildir backend against real directories in tmp_path."""

from __future__ import annotations

import base64
import hashlib
import os
import random
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from pathlib import Path
from typing import cast

import pytest

from gateway import accounts
from gateway.backends import maildir as maildir_mod
from gateway.backends.base import (
    ApopLogin,
    AuthFailed,
    Backend,
    Entry,
    Maildrop,
    MessageGone,
    PasswordLogin,
    TempFailure,
    TokenLogin,
    TokenRejected,
)
from gateway.backends.maildir import CHUNK_SIZE, MaildirBackend

TS = "<1896.697170952@dbc.mtview.ca.us>"

_users_text: str | None = None


def _users_file_text() -> str:
    """alice (password + APOP secret) and bob (password only), hashed once per test run."""
    global _users_text
    if _users_text is None:
        apop = base64.b64encode(b"tanstaaf").decode()
        _users_text = (
            f"alice:{accounts.hash_password('alice-pw')}:{apop}\nbob:{accounts.hash_password('bob-pw')}:\n"
        )
    return _users_text


@pytest.fixture
def users_file(tmp_path: Path) -> Path:
    path = tmp_path / "users"
    path.write_text(_users_file_text())
    return path


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "mail"
    path.mkdir()
    return path


@pytest.fixture
def backend(root: Path, users_file: Path) -> MaildirBackend:
    return MaildirBackend(root, users_file)


ALICE = PasswordLogin("alice", "alice-pw")


def deliver(root: Path, name: str, content: bytes, *, user: str = "alice", sub: str = "new") -> Path:
    for d in ("cur", "new", "tmp"):
        (root / user / d).mkdir(parents=True, exist_ok=True)
    path = root / user / sub / name
    path.write_bytes(content)
    return path


async def read_all(drop: Maildrop, index: int, *, top_lines: int | None = None) -> list[bytes]:
    chunks = []
    # base.py types stream() as an AsyncIterator; it is an async generator, closed here on early exit
    stream = cast("AsyncGenerator[bytes, None]", drop.stream(index, top_lines=top_lines))
    async with aclosing(stream) as it:
        async for chunk in it:
            chunks.append(chunk)
    return chunks


def apop(secret: str, timestamp: str = TS) -> str:
    return hashlib.md5((timestamp + secret).encode()).hexdigest()


# --- identity -----------------------------------------------------------------------------------


def test_name_and_lock_key(backend: MaildirBackend, root: Path) -> None:
    typed: Backend = backend
    assert typed.name == "maildir"
    assert backend.lock_key("alice") == f"maildir:{root}:alice"
    assert backend.lock_key("alice") != backend.lock_key("bob")


async def test_aclose_is_harmless(backend: MaildirBackend) -> None:
    await backend.aclose()
    async with backend.open_maildrop(ALICE) as drop:
        assert drop.entries == ()


# --- authentication -----------------------------------------------------------------------------


async def test_password_login_creates_an_empty_maildir_on_first_login(
    backend: MaildirBackend, root: Path
) -> None:
    assert not (root / "alice").exists()
    async with backend.open_maildrop(ALICE) as drop:
        assert drop.entries == ()
    for sub in ("cur", "new", "tmp"):
        assert (root / "alice" / sub).is_dir()


async def test_wrong_password_is_auth_failed(backend: MaildirBackend, root: Path) -> None:
    with pytest.raises(AuthFailed):
        async with backend.open_maildrop(PasswordLogin("alice", "bob-pw")):
            pytest.fail("entered with a wrong password")
    assert not (root / "alice").exists()


async def test_unknown_user_is_auth_failed_after_the_same_scrypt_work(
    backend: MaildirBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    verified: list[str] = []
    real = accounts.verify_password

    def spy(password: str, stored: str) -> bool:
        verified.append(stored)
        return real(password, stored)

    monkeypatch.setattr(accounts, "verify_password", spy)
    with pytest.raises(AuthFailed):
        async with backend.open_maildrop(PasswordLogin("mallory", "alice-pw")):
            pytest.fail("entered as an unknown user")
    assert verified == [accounts.DUMMY_HASH]


@pytest.mark.parametrize("name", ["../alice", "alice/../bob", ".alice", "", "al ice", "a:b", "x" * 65])
async def test_invalid_user_name_is_auth_failed_and_touches_nothing(
    backend: MaildirBackend, root: Path, tmp_path: Path, name: str
) -> None:
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(AuthFailed):
        async with backend.open_maildrop(PasswordLogin(name, "alice-pw")):
            pytest.fail("entered with an invalid user name")
    assert sorted(tmp_path.rglob("*")) == before


async def test_apop_with_the_shared_secret_logs_in(backend: MaildirBackend, root: Path) -> None:
    deliver(root, "1.a", b"x\r\n")
    async with backend.open_maildrop(ApopLogin("alice", TS, apop("tanstaaf"))) as drop:
        assert len(drop.entries) == 1


async def test_a_token_login_is_refused_as_bad_credentials(backend: MaildirBackend, root: Path) -> None:
    deliver(root, "1.a", b"x\r\n")
    with pytest.raises(AuthFailed, match="token") as refused:
        async with backend.open_maildrop(TokenLogin("alice", "tok")):
            pass
    assert not isinstance(refused.value, TokenRejected)  # nothing to refresh: the maildir has no tokens


async def test_apop_accepts_an_uppercase_digest(backend: MaildirBackend) -> None:
    async with backend.open_maildrop(ApopLogin("alice", TS, apop("tanstaaf").upper())) as drop:
        assert drop.entries == ()


@pytest.mark.parametrize(
    "login",
    [
        ApopLogin("alice", TS, apop("wrong")),
        ApopLogin("alice", "<other@host>", apop("tanstaaf")),  # replayed from another greeting
        ApopLogin("alice", TS, apop("alice-pw")),  # the password is not the APOP secret
        ApopLogin("alice", TS, "not hex ☃"),
        ApopLogin("bob", TS, apop("")),  # bob has no APOP secret
        ApopLogin("bob", TS, apop("bob-pw")),
        ApopLogin("mallory", TS, apop("")),
        ApopLogin("../alice", TS, apop("tanstaaf")),
    ],
)
async def test_apop_failures_are_auth_failed(backend: MaildirBackend, login: ApopLogin) -> None:
    with pytest.raises(AuthFailed):
        async with backend.open_maildrop(login):
            pytest.fail("APOP should have failed")


async def test_a_changed_users_file_is_seen_without_a_restart(
    backend: MaildirBackend, users_file: Path
) -> None:
    async with backend.open_maildrop(ALICE):
        pass
    accounts.add_user(users_file, "alice", "rotated")
    with pytest.raises(AuthFailed):
        async with backend.open_maildrop(ALICE):
            pass
    async with backend.open_maildrop(PasswordLogin("alice", "rotated")) as drop:
        assert drop.entries == ()
    accounts.add_user(users_file, "carol", "carol-pw")
    async with backend.open_maildrop(PasswordLogin("carol", "carol-pw")):
        pass


async def test_missing_users_file_is_temp_failure(root: Path, tmp_path: Path) -> None:
    backend = MaildirBackend(root, tmp_path / "nope")
    with pytest.raises(TempFailure):
        async with backend.open_maildrop(ALICE):
            pass


async def test_malformed_users_file_is_temp_failure(backend: MaildirBackend, users_file: Path) -> None:
    users_file.write_text("garbage\n")
    with pytest.raises(TempFailure):
        async with backend.open_maildrop(ALICE):
            pass


async def test_unreadable_maildir_is_temp_failure(backend: MaildirBackend, root: Path) -> None:
    (root / "alice").write_text("a file where the maildir should be")
    with pytest.raises(TempFailure):
        async with backend.open_maildrop(ALICE):
            pass


# --- the snapshot -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "size"),
    [
        (b"Subject: x\r\n\r\nbody\r\n", 20),  # CRLF: unchanged
        (b"Subject: x\n\nbody\n", 20),  # LF: each LF counts as CRLF
        (b"Subject: x\n\nbody", 18),  # unterminated last line: no CRLF added
        (b"Subject: x\r\n\nbo\rdy\n", 21),  # mixed, a bare CR stays one octet
        (b"", 0),
        (b"\n", 2),
        (b"\r\n", 2),
    ],
)
async def test_snapshot_size_counts_bare_lf_as_crlf(
    backend: MaildirBackend, root: Path, content: bytes, size: int
) -> None:
    deliver(root, "1000.M1P1.host", content)
    async with backend.open_maildrop(ALICE) as drop:
        assert [e.size for e in drop.entries] == [size]


async def test_size_is_right_when_a_crlf_straddles_scan_reads(backend: MaildirBackend, root: Path) -> None:
    n = maildir_mod._SCAN_SIZE
    content = b"x" * (n - 1) + b"\r\n" + b"y" * (n - 1) + b"\n" + b"z\n"
    deliver(root, "1000.M1P1.host", content)
    async with backend.open_maildrop(ALICE) as drop:
        assert drop.entries[0].size == len(content) + 2


async def test_dovecot_w_field_is_used_instead_of_scanning(
    backend: MaildirBackend, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_scan(path: Path) -> int:
        raise AssertionError(f"scanned {path}")

    monkeypatch.setattr(maildir_mod, "_crlf_size", no_scan)
    deliver(root, "1000.M1P1.host,S=5,W=999:2,S", b"hello", sub="cur")
    deliver(root, "1001.M1P1.host,W=7", b"a\nb\nc")
    async with backend.open_maildrop(ALICE) as drop:
        assert [e.size for e in drop.entries] == [999, 7]
        assert drop.entries[0].upstream_id == "1000.M1P1.host,S=5,W=999"


async def test_sizes_are_cached_across_logins_and_flag_changes(
    backend: MaildirBackend, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scanned: list[str] = []
    real = maildir_mod._crlf_size

    def counting(path: Path, inode: tuple[int, int]) -> int:
        scanned.append(path.name)
        return real(path, inode)

    monkeypatch.setattr(maildir_mod, "_crlf_size", counting)
    path = deliver(root, "1000.M1P1.host", b"a\nb\n")
    deliver(root, "1001.M1P1.host", b"c\n")
    async with backend.open_maildrop(ALICE):
        pass
    assert sorted(scanned) == ["1000.M1P1.host", "1001.M1P1.host"]

    scanned.clear()
    path.rename(root / "alice" / "cur" / "1000.M1P1.host:2,S")  # rename keeps the mtime
    async with backend.open_maildrop(ALICE) as drop:
        assert [e.size for e in drop.entries] == [6, 3]
    assert scanned == []

    (root / "alice" / "new" / "1001.M1P1.host").write_bytes(b"changed\n")
    async with backend.open_maildrop(ALICE) as drop:
        assert [e.size for e in drop.entries] == [6, 9]
    assert scanned == ["1001.M1P1.host"]


async def test_order_is_leading_timestamp_then_name_across_new_and_cur(
    backend: MaildirBackend, root: Path
) -> None:
    deliver(root, "100.b", b"1\n")
    deliver(root, "20.z:2,S", b"2\n", sub="cur")
    deliver(root, "100.a:2,", b"3\n", sub="cur")
    deliver(root, "abc", b"4\n")
    deliver(root, "3.x", b"5\n")
    deliver(root, "1000.a", b"6\n")
    async with backend.open_maildrop(ALICE) as drop:
        assert [e.upstream_id for e in drop.entries] == ["3.x", "20.z", "100.a", "100.b", "1000.a", "abc"]
    # and again, the same
    async with backend.open_maildrop(ALICE) as drop:
        assert [e.upstream_id for e in drop.entries] == ["3.x", "20.z", "100.a", "100.b", "1000.a", "abc"]


async def test_dotfiles_tmp_subdirectories_and_symlinks_are_not_messages(
    backend: MaildirBackend, root: Path
) -> None:
    deliver(root, "1.real", b"x\n")
    deliver(root, ".hidden", b"x\n")
    deliver(root, "2.in-tmp", b"x\n", sub="tmp")
    (root / "alice" / "cur" / "3.subdir").mkdir()
    (root / "alice" / "new" / "4.link").symlink_to(root / "alice" / "new" / "1.real")
    (root / "alice" / "dovecot-uidlist").write_text("3 V1 N2\n")
    async with backend.open_maildrop(ALICE) as drop:
        assert [e.upstream_id for e in drop.entries] == ["1.real"]


async def test_a_message_in_both_new_and_cur_is_listed_once(backend: MaildirBackend, root: Path) -> None:
    deliver(root, "1.dup", b"x\n")
    deliver(root, "1.dup:2,S", b"x\n", sub="cur")
    async with backend.open_maildrop(ALICE) as drop:
        assert [e.upstream_id for e in drop.entries] == ["1.dup"]


async def test_uidl_is_the_base_name_or_its_sha1(backend: MaildirBackend, root: Path) -> None:
    b70 = "1." + "a" * 68
    b71 = "2." + "b" * 69
    odd = "3.caf\u00e9"
    deliver(root, b70 + ":2,S", b"x\n", sub="cur")
    deliver(root, b71, b"x\n")
    deliver(root, odd, b"x\n")
    async with backend.open_maildrop(ALICE) as drop:
        assert [e.upstream_id for e in drop.entries] == [b70, b71, odd]
        uidls = [e.uidl for e in drop.entries]
    assert uidls[0] == b70
    assert uidls[1] == hashlib.sha1(b71.encode()).hexdigest()
    assert uidls[2] == hashlib.sha1(odd.encode()).hexdigest()
    for uidl in uidls:
        assert 1 <= len(uidl) <= 70
        assert all(0x21 <= ord(c) <= 0x7E for c in uidl)
    assert len(set(uidls)) == 3


async def test_snapshot_is_fixed_for_the_session(backend: MaildirBackend, root: Path) -> None:
    deliver(root, "1.a", b"x\n")
    async with backend.open_maildrop(ALICE) as drop:
        deliver(root, "2.b", b"y\n")
        assert [e.upstream_id for e in drop.entries] == ["1.a"]
        assert isinstance(drop.entries[0], Entry)


# --- streaming ----------------------------------------------------------------------------------


async def test_a_5_mb_message_streams_in_bounded_chunks(backend: MaildirBackend, root: Path) -> None:
    # random bytes from "abcdefgh \r", with a line end about every 100 (made with translate: a byte-by-byte
    # generator took seconds)
    alphabet = b"abcdefgh \r"
    table = bytes(b"\n"[0] if i < 3 else alphabet[i % len(alphabet)] for i in range(256))
    content = random.Random(5).randbytes(5 * 1024 * 1024).translate(table)
    deliver(root, "1.big", content)
    async with backend.open_maildrop(ALICE) as drop:
        chunks = await read_all(drop, 0)
    assert len(chunks) >= 5 * 1024 * 1024 // CHUNK_SIZE
    assert max(len(c) for c in chunks) <= 64 * 1024
    assert b"".join(chunks) == content


async def test_stream_yields_the_raw_bytes_of_the_right_message(backend: MaildirBackend, root: Path) -> None:
    deliver(root, "2.second", b"two\n.dot\n")
    deliver(root, "1.first", b"one\r\n")
    async with backend.open_maildrop(ALICE) as drop:
        assert b"".join(await read_all(drop, 0)) == b"one\r\n"
        assert b"".join(await read_all(drop, 1)) == b"two\n.dot\n"
        assert b"".join(await read_all(drop, 1)) == b"two\n.dot\n"  # again


async def test_stream_after_an_external_delete_is_message_gone(backend: MaildirBackend, root: Path) -> None:
    path = deliver(root, "1.a", b"x\n")
    async with backend.open_maildrop(ALICE) as drop:
        path.unlink()
        with pytest.raises(MessageGone):
            await read_all(drop, 0)


async def test_stream_when_the_whole_maildir_went_away_is_message_gone(
    backend: MaildirBackend, root: Path
) -> None:
    deliver(root, "1.a", b"x\n")
    async with backend.open_maildrop(ALICE) as drop:
        os.rename(root / "alice", root / "elsewhere")
        with pytest.raises(MessageGone):
            await read_all(drop, 0)


async def test_a_message_moved_to_cur_with_flags_still_streams(backend: MaildirBackend, root: Path) -> None:
    path = deliver(root, "1.a,S=3", b"abc")
    async with backend.open_maildrop(ALICE) as drop:
        path.rename(root / "alice" / "cur" / "1.a,S=3:2,S")
        assert b"".join(await read_all(drop, 0)) == b"abc"
        (root / "alice" / "cur" / "1.a,S=3:2,S").rename(root / "alice" / "cur" / "1.a,S=3:2,RS")
        assert b"".join(await read_all(drop, 0)) == b"abc"


async def test_an_unopenable_message_is_temp_failure(backend: MaildirBackend, root: Path) -> None:
    path = deliver(root, "1.a", b"x\n")
    async with backend.open_maildrop(ALICE) as drop:
        path.unlink()
        path.mkdir()  # opening a directory fails with something other than "not found"
        with pytest.raises(TempFailure):
            await read_all(drop, 0)


async def test_stream_index_out_of_range_is_an_index_error(backend: MaildirBackend, root: Path) -> None:
    deliver(root, "1.a", b"x\n")
    async with backend.open_maildrop(ALICE) as drop:
        with pytest.raises(IndexError):
            await read_all(drop, 1)
        with pytest.raises(IndexError):
            await read_all(drop, -1)


async def test_top_stops_reading_after_the_header_and_the_lines_asked(
    backend: MaildirBackend, root: Path
) -> None:
    header = b"Subject: big\n" + b"X-Filler: " + b"f" * 100_000 + b"\n\n"
    body = b"".join(b"line %d\n" % i for i in range(200_000))
    deliver(root, "1.a", header + body)
    async with backend.open_maildrop(ALICE) as drop:
        top = b"".join(await read_all(drop, 0, top_lines=3))
        top0 = b"".join(await read_all(drop, 0, top_lines=0))
        whole = b"".join(await read_all(drop, 0))
    assert whole == header + body
    for got, lines in ((top, 3), (top0, 0)):
        assert (header + body).startswith(got)
        assert got.startswith(header + b"".join(b"line %d\n" % i for i in range(lines)))
        assert len(got) < len(header) + 2 * CHUNK_SIZE


def _top_end(message: bytes, n: int) -> int | None:
    """Reference: the offset just after the LF that completes the header and n body lines."""
    lines = message.split(b"\n")[:-1]  # only LF-terminated lines
    offset = 0
    in_header = True
    for line in lines:
        offset += len(line) + 1
        if in_header:
            if line in (b"", b"\r"):
                in_header = False
                if n == 0:
                    return offset
        else:
            n -= 1
            if n == 0:
                return offset
    return None


@pytest.mark.parametrize("top_lines", [0, 1, 2, 5])
@pytest.mark.parametrize(
    "message",
    [
        b"A: 1\r\nB: 2\r\n\r\nl1\r\nl2\r\n\r\nl4\r\nl5\r\nl6\r\n",
        b"A: 1\nB: 2\n\nl1\nl2\n\nl4\nl5\nl6\n",
        b"A: 1\r\n\nl1\r\r\nl2\n",
        b"A: 1\nB\n\nl1\nx\n\nl3\n",  # one-character lines are not empty
        b"A: 1\r\n\r\r\n\rx\nl3\n",
        b"\r\nbody only\r\n",
        b"A: \r\r\nB:\n\r\n\r\n\r\n",
        b"no header end\nat all\n",
        b"A: 1\n\nunterminated",
    ],
)
@pytest.mark.parametrize("split", [1, 2, 3, 1000])
def test_top_cutter_ends_exactly_where_top_is_complete(message: bytes, top_lines: int, split: int) -> None:
    cutter = maildir_mod._TopCutter(top_lines)
    done_at = None
    for start in range(0, len(message), split):
        if cutter.feed(message[start : start + split]):
            done_at = min(start + split, len(message))
            break
    expected = _top_end(message, top_lines)
    if expected is None:
        assert done_at is None
    else:
        assert done_at is not None
        assert expected <= done_at < expected + split


# --- deletions ----------------------------------------------------------------------------------


def _names(root: Path, user: str = "alice") -> list[str]:
    return sorted(p.name for sub in ("new", "cur") for p in (root / user / sub).iterdir())


async def test_nothing_is_deleted_before_apply_deletions(backend: MaildirBackend, root: Path) -> None:
    for i in range(3):
        deliver(root, f"{i}.m", b"x\n")
    async with backend.open_maildrop(ALICE) as drop:
        assert _names(root) == ["0.m", "1.m", "2.m"]
        await drop.apply_deletions([0, 2])
        assert _names(root) == ["1.m"]
    assert _names(root) == ["1.m"]


async def test_leaving_without_apply_deletes_nothing(backend: MaildirBackend, root: Path) -> None:
    for i in range(3):
        deliver(root, f"{i}.m", b"x\n")
    async with backend.open_maildrop(ALICE) as drop:
        await read_all(drop, 1)
    with pytest.raises(RuntimeError, match="session dropped"):
        async with backend.open_maildrop(ALICE):
            raise RuntimeError("session dropped")
    assert _names(root) == ["0.m", "1.m", "2.m"]


async def test_deleting_already_gone_and_moved_files_succeeds(backend: MaildirBackend, root: Path) -> None:
    gone = deliver(root, "1.gone", b"x\n")
    moved = deliver(root, "2.moved", b"x\n")
    deliver(root, "3.kept", b"x\n")
    async with backend.open_maildrop(ALICE) as drop:
        gone.unlink()
        moved.rename(root / "alice" / "cur" / "2.moved:2,S")
        await drop.apply_deletions([0, 1, 1])
    assert _names(root) == ["3.kept"]


async def test_apply_deletions_of_nothing_is_fine(backend: MaildirBackend, root: Path) -> None:
    deliver(root, "1.a", b"x\n")
    async with backend.open_maildrop(ALICE) as drop:
        await drop.apply_deletions([])
    assert _names(root) == ["1.a"]


async def test_an_out_of_range_index_deletes_nothing(backend: MaildirBackend, root: Path) -> None:
    deliver(root, "1.a", b"x\n")
    async with backend.open_maildrop(ALICE) as drop:
        with pytest.raises(IndexError):
            await drop.apply_deletions([0, 5])
    assert _names(root) == ["1.a"]


async def test_a_partial_failure_deletes_the_rest_then_raises_temp_failure(
    backend: MaildirBackend, root: Path
) -> None:
    for i in range(3):
        deliver(root, f"{i}.m", b"x\n")
    async with backend.open_maildrop(ALICE) as drop:
        stuck = root / "alice" / "new" / "1.m"
        stuck.unlink()
        stuck.mkdir()  # unlink() of a non-empty directory fails (as root too)
        (stuck / "keep").write_text("x")
        with pytest.raises(TempFailure, match="1 of 3"):
            await drop.apply_deletions([0, 1, 2])
    assert _names(root) == ["1.m"]
    assert (stuck / "keep").exists()


def _indexes(entries: Sequence[Entry], *ids: str) -> list[int]:
    return [i for i, e in enumerate(entries) if e.upstream_id in ids]


async def test_deletion_targets_the_entries_by_snapshot_index(backend: MaildirBackend, root: Path) -> None:
    deliver(root, "30.c", b"x\n")
    deliver(root, "10.a", b"x\n", sub="cur")
    deliver(root, "20.b", b"x\n")
    async with backend.open_maildrop(ALICE) as drop:
        await drop.apply_deletions(_indexes(drop.entries, "20.b"))
    assert _names(root) == ["10.a", "30.c"]
