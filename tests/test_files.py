"""Files the gateway creates are private (0700 directories, 0600 files) under a umask of 022, and the
users file or state directory that others can read is warned about."""

from __future__ import annotations

import io
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway import accounts, cli, files, reload
from gateway import config as cfg
from gateway.store import Item, UidlStore


@pytest.fixture(autouse=True)
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_store_creates_a_private_state_directory_and_database(tmp_path: Path) -> None:
    state = tmp_path / "new" / "state"
    store = UidlStore(state / "uidl.sqlite3")
    try:
        store.assign("mb", "alice", [Item("k", 10, native="n")], "native")
        assert mode(tmp_path / "new") == 0o700
        assert mode(state) == 0o700
        assert mode(state / "uidl.sqlite3") == 0o600
        for side in ("uidl.sqlite3-wal", "uidl.sqlite3-shm"):
            assert (state / side).exists()
            assert mode(state / side) == 0o600
    finally:
        store.close()


def test_an_existing_state_directory_keeps_its_mode(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o750)
    UidlStore(state / "uidl.sqlite3").close()
    assert mode(state) == 0o750
    assert mode(state / "uidl.sqlite3") == 0o600


def test_the_demo_is_private(tmp_path: Path) -> None:
    state = tmp_path / "deep" / "state"
    accounts.ensure_demo(state)
    assert mode(tmp_path / "deep") == 0o700
    assert mode(state) == 0o700
    assert mode(state / "users") == 0o600
    assert mode(state / "demo-password") == 0o600
    assert mode(state / "mail") == 0o700


def test_user_add_creates_a_private_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    users = tmp_path / "etc" / "gw" / "users"
    monkeypatch.setattr("sys.stdin", io.StringIO("a-password\n"))
    assert cli.main(["user", "add", "alice", "--users-file", str(users), "--password-stdin"]) == 0
    assert mode(users.parent) == 0o700
    assert mode(tmp_path / "etc") == 0o700
    assert mode(users) == 0o600


def test_a_readable_users_file_is_warned_about(tmp_path: Path) -> None:
    users = tmp_path / "users"
    accounts.add_user(users, "alice", "pw")
    assert files.exposure_warning(users, "the users file") is None
    users.chmod(0o644)
    warning = files.exposure_warning(users, "the users file")
    assert warning == (
        f"the users file {users} is readable by its group and others (mode 0644); "
        "chmod 600 it unless that is meant"
    )
    users.chmod(0o640)
    assert "readable by its group (mode 0640)" in (files.exposure_warning(users, "the users file") or "")


def test_a_readable_state_directory_is_warned_about(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()  # 0755 under umask 022, as made by hand
    config = cfg.Config(server=cfg.ServerConfig(state_dir=str(state)))
    [warning] = reload.build(config).warnings
    assert warning.startswith(f"the state directory {state} is readable by its group and others (mode 0755)")
    assert "chmod 700" in warning
    state.chmod(0o700)
    assert reload.build(config).warnings == ()


def test_a_configured_users_file_is_checked(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    users = tmp_path / "users"
    users.write_text("")
    users.chmod(0o604)
    config = cfg.Config(
        server=cfg.ServerConfig(state_dir=str(state)), upstream=cfg.UpstreamConfig(users_file=str(users))
    )
    [warning] = files.config_warnings(config)
    assert "readable by others (mode 0604)" in warning


def test_serve_logs_the_warnings_at_start(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    (state / "users").write_text("")
    (state / "users").chmod(0o644)
    caplog.set_level(logging.WARNING)
    cli._start_checks(cfg.Config(server=cfg.ServerConfig(state_dir=str(state))))
    lines = [r.getMessage() for r in caplog.records if r.name == "gateway"]
    assert any(line.startswith("the state directory") for line in lines)
    assert any(line.startswith("the users file") for line in lines)


def test_missing_paths_are_no_warning(tmp_path: Path) -> None:
    assert files.exposure_warning(tmp_path / "nope", "the users file") is None
