"""Tokens at rest: encrypted per account, replaced atomically, and failing closed."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from gateway.oauth2 import vault
from gateway.oauth2.flows import TokenSet
from gateway.oauth2.vault import KeyFileError, Keyring, RecordError, TokenVault, needs_refresh

ACCESS, REFRESH, NEW_REFRESH = "at-secret-1111", "rt-secret-2222", "rt-secret-3333"
TOKEN = TokenSet(ACCESS, "Bearer", 1_700_003_600.0, REFRESH, "mail")
ROTATED = TokenSet("at-secret-4444", "Bearer", 1_700_007_200.0, NEW_REFRESH, "mail")


def keyring(*kids: str) -> Keyring:
    return Keyring.parse([vault.new_key_entry(k) for k in kids or ("k1",)], "test")


def make(tmp_path: Path, keys: Keyring | None = None) -> TokenVault:
    return TokenVault(tmp_path / "oauth2", keys or keyring(), clock=lambda: 1_700_000_000.0)


def test_round_trip_and_file_modes(tmp_path: Path) -> None:
    v = make(tmp_path)
    assert v.load_sync("alice@example.org") is None
    v.store_sync("alice@example.org", TOKEN, "microsoft")
    stored = v.load_sync("alice@example.org")
    assert stored is not None
    assert (stored.token, stored.provider, stored.stored_at, stored.kid) == (
        TOKEN,
        "microsoft",
        1_700_000_000.0,
        "k1",
    )
    assert stat.S_IMODE(os.stat(v.path("alice@example.org")).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(v.directory).st_mode) == 0o700
    raw = v.path("alice@example.org").read_bytes()
    assert raw.startswith(b"p3gt1.k1.")
    for secret in (ACCESS, REFRESH, "alice"):
        assert secret.encode() not in raw
    assert "alice" not in v.path("alice@example.org").name


def test_a_wrong_key_fails_closed(tmp_path: Path) -> None:
    make(tmp_path).store_sync("alice", TOKEN)
    with pytest.raises(RecordError):
        make(tmp_path, keyring("k1")).load_sync("alice")  # same id, another key
    with pytest.raises(RecordError, match="not loaded"):
        make(tmp_path, keyring("k9")).load_sync("alice")


@pytest.mark.parametrize("where", [-5, -30, 20])
def test_tampering_is_detected(tmp_path: Path, where: int) -> None:
    v = make(tmp_path)
    v.store_sync("alice", TOKEN)
    path = v.path("alice")
    data = bytearray(path.read_bytes())
    data[where] = ord("A") if data[where] != ord("A") else ord("B")
    path.write_bytes(bytes(data))
    with pytest.raises(RecordError):
        v.load_sync("alice")


def test_an_edited_key_id_is_detected(tmp_path: Path) -> None:
    keys = Keyring.parse(["k1:" + vault.new_key_entry().split(":")[1]], "t")
    entry = vault.new_key_entry("k1").split(":")[1]
    both = Keyring.parse([f"k1:{entry}", f"k2:{entry}"], "t")  # one key under two ids
    v = make(tmp_path, both)
    v.store_sync("alice", TOKEN)
    path = v.path("alice")
    path.write_bytes(path.read_bytes().replace(b"p3gt1.k1.", b"p3gt1.k2.", 1))
    with pytest.raises(RecordError):
        v.load_sync("alice")
    assert keys.current == "k1"


def test_a_record_of_another_account_is_refused(tmp_path: Path) -> None:
    v = make(tmp_path)
    v.store_sync("alice", TOKEN)
    v.store_sync("mallory", ROTATED)
    v.path("mallory").write_bytes(v.path("alice").read_bytes())
    with pytest.raises(RecordError):
        v.load_sync("mallory")
    assert v.load_sync("alice") is not None


@pytest.mark.parametrize(
    "content", [b"", b"garbage", b"p3gt9.k1.AAAA.AAAA\n", b"p3gt1.k1.AA.AAAA\n", b"\xff" * 10]
)
def test_a_record_that_is_not_one_is_refused(tmp_path: Path, content: bytes) -> None:
    v = make(tmp_path)
    v.store_sync("alice", TOKEN)
    v.path("alice").write_bytes(content)
    with pytest.raises(RecordError):
        v.load_sync("alice")


def test_a_crash_between_write_and_rename_leaves_the_old_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    v = make(tmp_path)
    v.store_sync("alice", TOKEN)

    def crash(src: object, dst: object) -> None:
        raise OSError("power cut")

    monkeypatch.setattr(vault, "_replace", crash)
    with pytest.raises(OSError, match="power cut"):
        v.store_sync("alice", ROTATED)
    stored = v.load_sync("alice")
    assert stored is not None and stored.token == TOKEN
    assert [p.name for p in v.directory.iterdir() if p.name.endswith(".tmp")] == []


def test_a_failed_fsync_leaves_the_old_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    v = make(tmp_path)
    v.store_sync("alice", TOKEN)

    def fail(fd: int) -> None:
        raise OSError("EIO")

    monkeypatch.setattr(vault, "_fsync", fail)
    with pytest.raises(OSError):
        v.store_sync("alice", ROTATED)
    monkeypatch.undo()
    stored = v.load_sync("alice")
    assert stored is not None and stored.token == TOKEN


def test_a_temporary_file_left_by_a_killed_process_is_never_read(tmp_path: Path) -> None:
    v = make(tmp_path)
    v.store_sync("alice", TOKEN)
    base = v.path("alice").stem
    leftover = v.directory / f".{base}.dead.tmp"
    leftover.write_bytes(b"p3gt1.k1.half")  # a write cut short
    stored = v.load_sync("alice")
    assert stored is not None and stored.token == TOKEN
    v.store_sync("alice", ROTATED)  # the next write clears it
    assert not leftover.exists()
    stored = v.load_sync("alice")
    assert stored is not None and stored.token.refresh_token == NEW_REFRESH


def test_a_record_that_is_a_directory_or_a_symlink_is_refused(tmp_path: Path) -> None:
    v = make(tmp_path)
    v.store_sync("alice", TOKEN)
    v.path("bob").mkdir()
    with pytest.raises(RecordError, match="regular"):
        v.load_sync("bob")
    v.path("carol").symlink_to(v.path("alice"))
    with pytest.raises(RecordError, match="cannot be opened"):
        v.load_sync("carol")


def test_a_fifo_key_file_is_refused_without_hanging(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo", 0o600)
    with pytest.raises(KeyFileError, match="regular"):
        Keyring.from_file(tmp_path / "fifo")


def test_delete(tmp_path: Path) -> None:
    v = make(tmp_path)
    v.store_sync("alice", TOKEN)
    assert v.delete_sync("alice") is True
    assert v.load_sync("alice") is None
    assert v.delete_sync("alice") is False


def test_key_rotation_rewraps_with_the_new_key(tmp_path: Path) -> None:
    old = vault.new_key_entry("k1")
    make(tmp_path, Keyring.parse([old], "t")).store_sync("alice", TOKEN)
    new = vault.new_key_entry("k2")
    rotated = make(tmp_path, Keyring.parse([new, old], "t"))
    stored = rotated.load_sync("alice")
    assert stored is not None and stored.kid == "k1"
    assert rotated.rewrap_sync("alice") is True
    assert rotated.rewrap_sync("alice") is False
    after = make(tmp_path, Keyring.parse([new], "t")).load_sync("alice")  # the old key can go
    assert after is not None and after.token == TOKEN and after.kid == "k2"


# ---------------------------------------------------------------- keys


def test_key_file_mode_0600_or_stricter(tmp_path: Path) -> None:
    path = tmp_path / "token.key"
    vault.create_key_file(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert Keyring.from_file(path).current == "k1"
    os.chmod(path, 0o400)
    assert Keyring.from_file(path).ids == ["k1"]
    for mode in (0o640, 0o604, 0o644, 0o660):
        os.chmod(path, mode)
        with pytest.raises(KeyFileError, match="chmod 600"):
            Keyring.from_file(path)
    with pytest.raises(FileExistsError):
        vault.create_key_file(path)


def test_key_file_errors_name_the_file_and_never_the_key(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="cannot open"):
        Keyring.from_file(tmp_path / "missing")
    path = tmp_path / "k"
    entry = vault.new_key_entry("k1")
    for text in ("", "# only a comment\n", "k1\n", "k1:short\n", "bad id:AAAA\n", f"{entry}\n{entry}\n"):
        path.write_text(text)
        os.chmod(path, 0o600)
        with pytest.raises(KeyFileError) as info:
            Keyring.from_file(path)
        assert str(path) in str(info.value)
        assert entry.split(":")[1] not in str(info.value)
    with pytest.raises(KeyFileError, match="regular"):
        os.chmod(tmp_path, 0o700)
        Keyring.from_file(tmp_path)


def test_keys_from_the_environment() -> None:
    a, b = vault.new_key_entry("new"), vault.new_key_entry("old")
    keys = Keyring.from_env({vault.ENV_VAR: f"{a} {b}"})
    assert (keys.current, keys.ids) == ("new", ["new", "old"])
    with pytest.raises(KeyFileError, match=vault.ENV_VAR):
        Keyring.from_env({})
    assert Keyring.load(None, {vault.ENV_VAR: a}).current == "new"


def test_no_secret_in_reprs_or_logs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    entry = vault.new_key_entry("k1")
    keys = Keyring.parse([entry], "t")
    v = make(tmp_path, keys)
    v.store_sync("alice", TOKEN)
    stored = v.load_sync("alice")
    texts = [repr(keys), repr(v), repr(stored), caplog.text]
    for bad in (make(tmp_path, keyring("k1")), make(tmp_path, keyring("zz"))):
        with pytest.raises(RecordError) as info:
            bad.load_sync("alice")
        texts.append(str(info.value))
    for secret in (entry.split(":")[1], ACCESS, REFRESH):
        assert not [t for t in texts if secret in t]


# ---------------------------------------------------------------- refresh timing and locks


def test_needs_refresh_ten_minutes_before_expiry() -> None:
    t = TokenSet("a", "Bearer", 10_000.0)
    assert not needs_refresh(t, 10_000.0 - 601)
    assert needs_refresh(t, 10_000.0 - 600)
    assert needs_refresh(t, 20_000.0)
    assert not needs_refresh(TokenSet("a", "Bearer", None), 1e12)
    assert needs_refresh(t, 9_000.0, margin=1_000)


@given(expires=st.floats(0, 1e10), now=st.floats(0, 1e10), margin=st.floats(0, 1e5))
def test_needs_refresh_is_the_margin_rule(expires: float, now: float, margin: float) -> None:
    assert needs_refresh(TokenSet("a", "Bearer", expires), now, margin) == (now >= expires - margin)


async def test_async_api_round_trip(tmp_path: Path) -> None:
    v = make(tmp_path)
    await v.store("alice", TOKEN, "google")
    stored = await v.load("alice")
    assert stored is not None and stored.provider == "google"
    assert await v.rewrap("alice") is False
    assert await v.delete("alice") is True


async def test_one_refresher_per_account_in_a_process(tmp_path: Path) -> None:
    v = make(tmp_path)
    inside: list[str] = []
    overlaps: list[int] = []

    async def refresher(account: str) -> None:
        async with v.refreshing(account):
            inside.append(account)
            overlaps.append(inside.count(account))
            await trio.sleep(0.01)
            inside.remove(account)

    async with trio.open_nursery() as nursery:
        for account in ("alice", "alice", "alice", "bob", "bob"):
            nursery.start_soon(refresher, account)
    assert overlaps == [1] * 5
    assert len(v._locks) == 0  # bounded: no lock outlives its users


async def test_one_refresher_per_account_across_processes(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # two vaults on one directory stand for two processes: flock conflicts between open files
    a, b = make(tmp_path), make(tmp_path)
    order: list[str] = []
    a_inside = trio.Event()

    async def first() -> None:
        async with a.refreshing("alice"):
            a_inside.set()
            order.append("a in")
            await trio.sleep(0.3)
            order.append("a out")

    async def second() -> None:
        await a_inside.wait()
        async with b.refreshing("alice"):
            order.append("b in")
        async with b.refreshing("bob"):  # another account is not held up
            pass

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(first)
            nursery.start_soon(second)
    assert order == ["a in", "a out", "b in"]


async def test_waiting_for_the_lock_can_be_cancelled(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    a, b = make(tmp_path), make(tmp_path)
    async with a.refreshing("alice"):
        with trio.move_on_after(0.2) as scope:
            async with b.refreshing("alice"):
                pytest.fail("entered a held lock")
        assert scope.cancelled_caught
    async with b.refreshing("alice"):  # and it is free afterwards
        pass
