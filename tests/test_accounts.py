"""The users file: scrypt hashes, user names, atomic rewrites, and the demo account."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import stat
from pathlib import Path

import pytest

from gateway import accounts
from gateway.accounts import (
    UserRecord,
    add_user,
    ensure_demo,
    hash_password,
    load_users,
    validate_username,
    verify_password,
)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _scrypt_hash(password: str, *, ln: int, r: int, p: int, salt: bytes, dklen: int = 32) -> str:
    digest = hashlib.scrypt(password.encode(), salt=salt, n=2**ln, r=r, p=p, dklen=dklen)
    return (
        f"$scrypt$ln={ln},r={r},p={p}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"
    )


# --- hashing ------------------------------------------------------------------------------------


@pytest.mark.production_scrypt
def test_hash_then_verify_round_trips() -> None:
    stored = hash_password("correct horse")
    assert verify_password("correct horse", stored)


@pytest.mark.production_scrypt
def test_hash_is_salted_scrypt_in_the_documented_notation() -> None:
    first, second = hash_password("same"), hash_password("same")
    pattern = r"\$scrypt\$ln=14,r=8,p=1\$([A-Za-z0-9+/=]+)\$([A-Za-z0-9+/=]+)"
    m1, m2 = re.fullmatch(pattern, first), re.fullmatch(pattern, second)
    assert m1 and m2
    assert len(base64.b64decode(m1[1])) == 16
    assert m1[1] != m2[1]  # random salt
    assert first != second
    assert "same" not in first


def test_wrong_password_is_rejected() -> None:
    stored = hash_password("right")
    assert not verify_password("wrong", stored)
    assert not verify_password("Right", stored)
    assert not verify_password("", stored)


def test_verify_reads_the_cost_parameters_from_the_stored_hash() -> None:
    stored = _scrypt_hash("pw", ln=4, r=2, p=3, salt=b"0123456789abcdef", dklen=20)
    assert verify_password("pw", stored)
    assert not verify_password("pW", stored)


def test_unicode_password_round_trips() -> None:
    stored = hash_password("pässwörd ☃")
    assert verify_password("pässwörd ☃", stored)
    assert not verify_password("passwörd ☃", stored)


_GOOD = _scrypt_hash("pw", ln=4, r=2, p=1, salt=b"0123456789abcdef")
_SALT = base64.b64encode(b"0123456789abcdef").decode()
_HASH = _GOOD.rsplit("$", 1)[1]
_NOT_UTF8 = base64.b64encode(bytes([0xFF, 0xFE])).decode()


@pytest.mark.parametrize(
    "stored",
    [
        "",
        "pw",
        "$scrypt$",
        "$scrypt$ln=4,r=2,p=1$",
        f"$scrypt$ln=4,r=2,p=1${_SALT}",
        f"$bcrypt$ln=4,r=2,p=1${_SALT}${_HASH}",
        f"scrypt$ln=4,r=2,p=1${_SALT}${_HASH}",
        f"$scrypt$ln=4,r=2,p=1${_SALT}${_HASH}$",
        f"$scrypt$n=16,r=2,p=1${_SALT}${_HASH}",
        f"$scrypt$ln=x,r=2,p=1${_SALT}${_HASH}",
        f"$scrypt$ln=0,r=2,p=1${_SALT}${_HASH}",
        f"$scrypt$ln=4,r=0,p=1${_SALT}${_HASH}",
        f"$scrypt$ln=99,r=8,p=1${_SALT}${_HASH}",  # absurd cost: refused, not computed
        f"$scrypt$ln=22,r=64,p=1${_SALT}${_HASH}",  # 32 GiB
        f"$scrypt$ln=4,r=2,p=1$!!notbase64!!${_HASH}",
        f"$scrypt$ln=4,r=2,p=1${_SALT}$é{_HASH}",
        f"$scrypt$ln=4,r=2,p=1${base64.b64encode(b'short').decode()}${_HASH}",
        f"$scrypt$ln=4,r=2,p=1${_SALT}${base64.b64encode(b'tooshort').decode()}",
        _GOOD[:-1],  # lost its base64 padding
        _GOOD[:-6] + ("A" if _GOOD[-6] != "A" else "B") + _GOOD[-5:],  # one character changed
    ],
)
def test_malformed_stored_hash_is_false_and_never_raises(stored: str) -> None:
    assert verify_password("pw", stored) is False


def test_the_good_hash_of_the_malformed_cases_does_verify() -> None:
    # so the cases above fail for their defect, not for a broken fixture
    assert verify_password("pw", _GOOD)


@pytest.mark.parametrize(("ln", "r", "p"), [(17, 8, 1), (14, 65, 1), (14, 8, 17), (25, 1, 1)])
def test_an_excessive_cost_is_refused_without_computing(
    monkeypatch: pytest.MonkeyPatch, ln: int, r: int, p: int
) -> None:
    def refuse(*args: object, **kwargs: object) -> bytes:
        raise AssertionError("scrypt was run")

    stored = f"$scrypt$ln={ln},r={r},p={p}${_SALT}${_HASH}"
    monkeypatch.setattr(hashlib, "scrypt", refuse)
    assert verify_password("pw", stored) is False


def test_unencodable_password_is_false_not_an_error() -> None:
    assert verify_password("\ud800", _GOOD) is False


@pytest.mark.production_scrypt
def test_dummy_hash_is_well_formed_and_matches_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = hashlib.scrypt

    def counting(*args: object, **kwargs: object) -> bytes:
        calls.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(hashlib, "scrypt", counting)
    assert not verify_password("", accounts.DUMMY_HASH)
    assert not verify_password("demo", accounts.DUMMY_HASH)
    assert len(calls) == 2  # the work is really done


# --- user names ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["alice", "a", "alice.smith", "user@example.com", "a-b_c+d", "jürgen", "x" * 64, "a.b.c"]
)
def test_valid_user_names_pass(name: str) -> None:
    validate_username(name)


@pytest.mark.parametrize(
    "name",
    [
        "",
        "x" * 65,
        "a/b",
        "/abs",
        "a\\b",
        "a:b",
        "..",
        "a..b",
        ".hidden",
        ".",
        "#comment",
        "a b",
        " alice",
        "alice\t",
        "a\nb",
        "a\rb",
        "a\x00b",
        "a\x1bb",
        "a\x7fb",
        "a\u00a0b",  # no-break space
        "a\u200bb",  # zero-width space: not printable
        "a\u2028b",  # line separator
    ],
)
def test_invalid_user_names_raise_value_error(name: str) -> None:
    with pytest.raises(ValueError):
        validate_username(name)


# --- the file -----------------------------------------------------------------------------------


def test_user_record_repr_hides_the_hash_and_apop_secret() -> None:
    record = UserRecord("alice", "$scrypt$SECRET-HASH", "SECRET-APOP")
    assert "alice" in repr(record)
    assert "SECRET" not in repr(record)


def test_add_user_creates_the_file_with_mode_0600(tmp_path: Path) -> None:
    users = tmp_path / "users"
    add_user(users, "alice", "pw-a", apop_secret="apop-a")
    assert _mode(users) == 0o600
    text = users.read_text()
    assert "pw-a" not in text and "apop-a" not in text
    loaded = load_users(users)
    assert list(loaded) == ["alice"]
    assert verify_password("pw-a", loaded["alice"].password_hash)
    assert loaded["alice"].apop_secret == "apop-a"


def test_user_without_apop_secret_loads_none(tmp_path: Path) -> None:
    users = tmp_path / "users"
    add_user(users, "bob", "pw-b")
    assert load_users(users)["bob"].apop_secret is None


def test_replacing_a_user_keeps_the_others_and_comments_byte_for_byte(tmp_path: Path) -> None:
    users = tmp_path / "users"
    add_user(users, "alice", "old")
    add_user(users, "bob", "pw-b", apop_secret="apop-b")
    users.write_text("# managed by hand\n" + users.read_text() + "\n# trailer\n")
    before = users.read_text().split("\n")
    bob_line = next(line for line in before if line.startswith("bob:"))

    add_user(users, "alice", "new", apop_secret="ap")

    after = users.read_text().split("\n")
    assert after[0] == "# managed by hand"
    assert after[1].startswith("alice:")  # replaced in place
    assert bob_line in after
    assert "# trailer" in after
    assert len(after) == len(before)
    loaded = load_users(users)
    assert verify_password("new", loaded["alice"].password_hash)
    assert not verify_password("old", loaded["alice"].password_hash)
    assert loaded["alice"].apop_secret == "ap"
    assert verify_password("pw-b", loaded["bob"].password_hash)
    assert loaded["bob"].apop_secret == "apop-b"
    assert _mode(users) == 0o600


def test_add_user_without_replace_refuses_an_existing_user(tmp_path: Path) -> None:
    users = tmp_path / "users"
    add_user(users, "alice", "pw")
    before = users.read_bytes()
    with pytest.raises(ValueError, match="exists"):
        add_user(users, "alice", "other", replace=False)
    assert users.read_bytes() == before
    add_user(users, "carol", "pw-c", replace=False)
    assert set(load_users(users)) == {"alice", "carol"}


def test_add_user_rejects_an_invalid_name_and_an_empty_apop_secret(tmp_path: Path) -> None:
    users = tmp_path / "users"
    with pytest.raises(ValueError):
        add_user(users, "../evil", "pw")
    with pytest.raises(ValueError):
        add_user(users, "alice", "pw", apop_secret="")
    assert not users.exists()


def test_a_failed_rewrite_leaves_the_old_file_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    users = tmp_path / "users"
    add_user(users, "alice", "pw")
    before = users.read_bytes()

    def boom(src: object, dst: object) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk on fire"):
        add_user(users, "bob", "pw-b")
    assert users.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["users"]


def test_add_user_refuses_to_rewrite_a_malformed_file(tmp_path: Path) -> None:
    users = tmp_path / "users"
    users.write_text("alice\n")
    with pytest.raises(ValueError):
        add_user(users, "bob", "pw")
    assert users.read_text() == "alice\n"


def test_load_users_accepts_two_fields_crlf_comments_and_blank_lines(tmp_path: Path) -> None:
    users = tmp_path / "users"
    secret = base64.b64encode("sécret".encode()).decode()
    users.write_bytes(
        f"# comment\r\n\r\n  \nalice:{_GOOD}\r\nbob:{_GOOD}:\ncarol:{_GOOD}:{secret}\n".encode()
    )
    loaded = load_users(users)
    assert set(loaded) == {"alice", "bob", "carol"}
    assert loaded["alice"].password_hash == _GOOD
    assert loaded["alice"].apop_secret is None
    assert loaded["bob"].apop_secret is None
    assert loaded["carol"].apop_secret == "sécret"


@pytest.mark.parametrize(
    "line",
    [
        "alice",
        "alice:",
        f"alice:{_GOOD}:c2VjcmV0:extra",
        f"../x:{_GOOD}",
        f"alice:{_GOOD}:not base64 SECRETVALUE",
        f"alice:{_GOOD}:{_NOT_UTF8}",
    ],
)
def test_load_users_rejects_a_malformed_line_by_number_without_its_content(tmp_path: Path, line: str) -> None:
    users = tmp_path / "users"
    users.write_text(f"# ok\nbob:{_GOOD}\n{line}\n")
    with pytest.raises(ValueError, match=r":3: ") as info:
        load_users(users)
    assert "SECRETVALUE" not in str(info.value)
    assert _GOOD not in str(info.value)


def test_load_users_rejects_a_user_listed_twice(tmp_path: Path) -> None:
    users = tmp_path / "users"
    users.write_text(f"alice:{_GOOD}\nalice:{_GOOD}\n")
    with pytest.raises(ValueError, match="twice"):
        load_users(users)


# --- the demo account ---------------------------------------------------------------------------


def test_ensure_demo_creates_user_password_file_and_maildir(tmp_path: Path) -> None:
    state = tmp_path / "state"
    user, password = ensure_demo(state)
    assert user == "demo"
    assert len(password) >= 16
    assert (state / "demo-password").read_text().strip() == password
    assert _mode(state / "demo-password") == 0o600
    assert _mode(state / "users") == 0o600
    record = load_users(state / "users")["demo"]
    assert verify_password(password, record.password_hash)
    assert password not in (state / "users").read_text()
    for sub in ("cur", "new", "tmp"):
        assert (state / "mail" / "demo" / sub).is_dir()
    assert [p.name for p in (state / "mail").iterdir()] == ["demo"]  # no staging left over


def test_ensure_demo_is_idempotent_and_keeps_the_password(tmp_path: Path) -> None:
    first = ensure_demo(tmp_path)
    users_before = (tmp_path / "users").read_bytes()
    second = ensure_demo(tmp_path)
    assert first == second
    assert (tmp_path / "users").read_bytes() == users_before  # not rehashed
    assert len(list((tmp_path / "mail" / "demo" / "new").iterdir())) == 3


def test_ensure_demo_keeps_other_users_and_restores_a_lost_demo_record(tmp_path: Path) -> None:
    add_user(tmp_path / "users", "alice", "pw-a")
    _, password = ensure_demo(tmp_path)
    add_user(tmp_path / "users", "demo", "changed-by-someone")
    assert ensure_demo(tmp_path) == ("demo", password)
    loaded = load_users(tmp_path / "users")
    assert verify_password(password, loaded["demo"].password_hash)
    assert verify_password("pw-a", loaded["alice"].password_hash)


def test_ensure_demo_seeds_the_mailbox_only_once(tmp_path: Path) -> None:
    ensure_demo(tmp_path)
    new = tmp_path / "mail" / "demo" / "new"
    for p in new.iterdir():
        p.unlink()
    ensure_demo(tmp_path)
    assert list(new.iterdir()) == []


def test_demo_messages_are_crlf_with_a_dot_line_and_distinct_message_ids(tmp_path: Path) -> None:
    ensure_demo(tmp_path)
    files = sorted((tmp_path / "mail" / "demo" / "new").iterdir())
    assert len(files) == 3
    ids = set()
    dot_lines = 0
    for path in files:
        data = path.read_bytes()
        assert data.endswith(b"\r\n")
        assert data.count(b"\n") == data.count(b"\r\n")  # no bare LF
        assert b"\r\n\r\n" in data
        m = re.search(rb"^Message-ID: (<[^>]+>)\r$", data, re.MULTILINE)
        assert m
        ids.add(m[1])
        dot_lines += sum(1 for line in data.split(b"\r\n") if line.startswith(b"."))
        # the Dovecot size fields tell the truth
        w = re.search(r",W=([0-9]+)", path.name)
        assert w and int(w[1]) == len(data)
    assert len(ids) == 3
    assert dot_lines >= 1
