"""Mapped accounts (gateway/mapping.py), routes (gateway/routing.py) and their config tables."""

from __future__ import annotations

import datetime
import json
import os
import stat
from pathlib import Path

import pytest

from gateway import mapping
from gateway.backends import make_backend
from gateway.backends.imap import ImapBackend
from gateway.backends.maildir import MaildirBackend
from gateway.backends.mapped import MappedBackend
from gateway.config import ConfigError, DeletePolicy, loads
from gateway.identity import IdentityPolicy
from gateway.mapping import Account, AccountBook, MappingError, Window
from gateway.routing import Route, glob_problem, resolve

# ---------------------------------------------------------------- Window


@pytest.mark.parametrize(
    ("text", "kind", "since", "newest"),
    [
        ("all", "all", None, None),
        ("since:2024-02-29", "since", datetime.date(2024, 2, 29), None),
        ("days:1", "days", datetime.date(2025, 3, 10), None),
        ("days:30", "days", datetime.date(2025, 2, 9), None),
        ("newest:250", "newest", None, 250),
    ],
)
def test_a_window_parses_and_prints_back(
    text: str, kind: str, since: datetime.date | None, newest: int | None
) -> None:
    w = Window.parse(text)
    assert (w.kind, w.since(datetime.date(2025, 3, 10)), w.newest) == (kind, since, newest)
    assert str(w) == text


@pytest.mark.parametrize(
    "text",
    ["", "ALL", "since:2023-02-30", "since:yesterday", "days:0", "days:-1", "newest:0", "newest:x", "days:"],
)
def test_a_bad_window_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match=r"all|N"):
        Window.parse(text)


def test_window_counts_are_capped() -> None:
    with pytest.raises(ValueError, match="100000"):
        Window.parse("days:100001")
    assert Window.parse(f"newest:{mapping.MAX_WINDOW_NEWEST}").newest == mapping.MAX_WINDOW_NEWEST


# ---------------------------------------------------------------- Account


def test_an_oauth2_account_needs_a_provider_and_others_take_none() -> None:
    with pytest.raises(MappingError, match="provider"):
        Account("a", "a@x", credential="oauth2")
    with pytest.raises(MappingError, match="only for credential = oauth2"):
        Account("a", "a@x", credential="stored", provider="m365")
    assert Account("a", "a@x", credential="oauth2", provider="m365").provider == "m365"


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"name": "a:b"}, "name"),
        ({"name": ""}, "name"),
        ({"upstream_user": ""}, "upstream_user"),
        ({"upstream_user": "x" * 300}, "upstream_user"),
        ({"upstream": "no such/profile"}, "upstream"),
        ({"credential": "kerberos"}, "credential"),
        ({"folder": ""}, "folder"),
        ({"uidl_format": "md5"}, "uidl_format"),
    ],
)
def test_a_bad_account_names_its_field(kwargs: dict[str, str], problem: str) -> None:
    fields = {"name": "alice", "upstream_user": "alice", **kwargs}
    with pytest.raises(MappingError, match=problem):
        Account(**fields)  # type: ignore[arg-type]


# ---------------------------------------------------------------- AccountBook


def sample(name: str = "alice") -> Account:
    return Account(
        name,
        "real-alice@example.org",
        upstream="o365",
        credential="stored",
        folder="Scans",
        delete_policy=DeletePolicy.parse("move:Trash"),
        mark_seen=True,
        uidl_format="gmail",
        window=Window.parse("days:7"),
    )


def test_a_saved_book_reads_back_the_same_accounts_and_is_private(tmp_path: Path) -> None:
    book = AccountBook(tmp_path / "accounts.json")
    book.add(sample())
    book.add(Account("bob", "bob"))
    os.umask(0o022)
    book.save()
    assert stat.S_IMODE(os.stat(tmp_path / "accounts.json").st_mode) == 0o600
    again = AccountBook.load(tmp_path / "accounts.json")
    assert list(again) == list(book) == [sample(), Account("bob", "bob")]
    raw = json.loads((tmp_path / "accounts.json").read_text())
    assert raw["version"] == 1
    assert raw["accounts"]["alice"]["window"] == "days:7"
    assert raw["accounts"]["alice"]["delete_policy"] == "move:Trash"
    assert [p.name for p in tmp_path.iterdir()] == ["accounts.json"]  # no temporary file left


def test_a_case_variant_name_is_the_same_account(tmp_path: Path) -> None:
    book = AccountBook(tmp_path / "a.json")
    stored = book.add(Account("Alice", "upstream-alice"))
    assert stored.name == "alice"
    assert book.get("ALICE") == book.get("alice") == stored
    with pytest.raises(MappingError, match="exists already"):
        book.add(Account("ALICE", "other"))
    exact = AccountBook(tmp_path / "b.json", IdentityPolicy(username_case="exact"))
    exact.add(Account("Alice", "x"))
    assert exact.get("alice") is None and exact.get("Alice") is not None


def test_the_default_realm_joins_a_bare_name_to_its_account(tmp_path: Path) -> None:
    book = AccountBook(tmp_path / "a.json", IdentityPolicy(default_realm="example.org"))
    book.add(Account("scanner", "scans@example.org"))
    assert book.get("SCANNER@example.org") is not None and book.get("scanner") is not None


def test_two_names_of_one_account_in_a_file_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    entry = {"upstream_user": "x"}
    path.write_text(json.dumps({"version": 1, "accounts": {"alice": entry, "ALICE": entry}}))
    with pytest.raises(MappingError, match="are one account"):
        AccountBook.load(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "not JSON"),
        (b"\xff\xfe", "not UTF-8"),
        (b"[]", "expected"),
        (b'{"accounts": {}}', "expected"),
        (b'{"version": 2, "accounts": {}}', "format version 2 is not 1"),
        (b'{"version": true, "accounts": {}}', "format version"),
        (b'{"version": 1, "accounts": {}, "extra": 1}', "unknown key 'extra'"),
        (b'{"version": 1, "accounts": []}', "accounts: expected an object"),
        (b'{"version": 1, "accounts": {"a": 1}}', "account 'a': expected an object"),
        (b'{"version": 1, "accounts": {"a": {}}}', "upstream_user is missing"),
        (b'{"version": 1, "accounts": {"a": {"upstream_user": "a", "colour": 1}}}', "unknown field 'colour'"),
        (b'{"version": 1, "accounts": {"a": {"upstream_user": 7}}}', "upstream_user: wrong type int"),
        (b'{"version": 1, "accounts": {"a": {"upstream_user": "a", "window": "days:0"}}}', "days:N"),
        (b'{"version": 1, "accounts": {"a": {"upstream_user": "a", "delete_policy": "burn"}}}', "expunge"),
        (b'{"version": 1, "accounts": {"a": {"upstream_user": "a", "mark_seen": "yes"}}}', "mark_seen"),
    ],
)
def test_a_malformed_file_is_a_clear_error(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "accounts.json"
    path.write_bytes(content)
    with pytest.raises(MappingError, match=message) as info:
        AccountBook.load(path)
    assert str(path) in str(info.value)


def test_a_file_over_the_size_cap_is_refused_unread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mapping, "MAX_FILE_BYTES", 100)
    path = tmp_path / "accounts.json"
    path.write_text(
        json.dumps({"version": 1, "accounts": {f"u{i}": {"upstream_user": "x"} for i in range(9)}})
    )
    with pytest.raises(MappingError, match="larger than 100 bytes"):
        AccountBook.load(path)


def test_a_missing_file_is_an_empty_book_and_refresh_sees_changes(tmp_path: Path) -> None:
    path = tmp_path / "accounts.json"
    book = AccountBook.load(path)
    assert len(book) == 0 and not book.refresh()
    writer = AccountBook(path)
    writer.add(Account("carol", "c"))
    writer.save()
    assert book.refresh() and book.get("carol") is not None
    assert not book.refresh()  # unchanged: not re-read
    path.write_text("{broken")
    with pytest.raises(MappingError):
        book.refresh()
    assert book.get("carol") is not None  # a bad file keeps what was read before
    path.unlink()
    assert book.refresh() and len(book) == 0


def test_remove_takes_any_spelling(tmp_path: Path) -> None:
    book = AccountBook(tmp_path / "a.json")
    book.add(Account("dave", "d"))
    assert book.remove("DAVE").name == "dave"
    with pytest.raises(MappingError, match="no account 'dave'"):
        book.remove("dave")


# ---------------------------------------------------------------- routes


def test_routes_match_the_account_key_case_insensitively_and_the_first_wins() -> None:
    routes = [Route("*@Partner.example", "partner"), Route("scan?@*", "scanners"), Route("*@*", "catchall")]
    assert resolve(routes, "bob@partner.EXAMPLE", "default") == "partner"
    assert resolve(routes, "scan1@partner.example", "default") == "partner"
    assert resolve(routes, "scan1@other", "default") == "scanners"
    assert resolve(routes, "scan12@other", "default") == "catchall"
    assert resolve(routes, "bare-name", "default") == "default"
    assert resolve(routes, "bare-name", "") is None
    assert not Route("a.b", "x").matches("aXb")  # "." is itself, not any character


@pytest.mark.parametrize("pattern", ["", "a b", "[ab]*", "x\x00", "*" * 256])
def test_a_bad_glob_is_refused(pattern: str) -> None:
    assert glob_problem(pattern)
    with pytest.raises(ValueError, match="route match"):
        Route(pattern, "default")


# ---------------------------------------------------------------- config


CONFIG = """\
[upstream]
url = "imap://127.0.0.1:1143"

[upstreams.o365]
url = "imaps://outlook.example"
folder = "Scans"

[[routes]]
match = "*@partner.example"
upstream = "o365"

[accounts]
default_upstream = ""
"""


def test_named_upstreams_routes_and_accounts_load() -> None:
    config = loads(CONFIG)
    assert set(config.profiles()) == {"default", "o365"}
    assert config.upstreams["o365"].folder == "Scans"
    assert config.routes[0].match == "*@partner.example"
    assert config.accounts.default_upstream == ""


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        (CONFIG.replace('upstream = "o365"', 'upstream = "nowhere"'), 10, "no upstream profile 'nowhere'"),
        (CONFIG.replace('"*@partner.example"', '"[ab]"'), 9, "character classes"),
        (CONFIG + '\n[[routes]]\nmatch = "*@PARTNER.example"\n', 16, r"already routes\[0\]'s match"),
        (CONFIG.replace('url = "imaps://outlook.example"', 'url = "pop3://x"'), 5, "unknown upstream scheme"),
        (CONFIG.replace('url = "imaps://outlook.example"', 'url = ""'), 5, "needs a url"),
        (CONFIG.replace('folder = "Scans"', "colour = 1"), 6, "unknown key"),
        (CONFIG.replace("[upstreams.o365]", "[upstreams.default]"), 4, '"default" is'),
        (CONFIG.replace("[upstreams.o365]", '[upstreams."a b"]'), 4, "a name is 1 to 64"),
        (CONFIG.replace('default_upstream = ""', 'default_upstream = "x"'), 13, "no upstream profile 'x'"),
    ],
)
def test_bad_mapping_config_names_key_and_line(text: str, line: int, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        loads(text)
    assert info.value.line == line, str(info.value)


def test_without_mapping_settings_make_backend_builds_what_it_always_did(tmp_path: Path) -> None:
    plain = loads(f'[server]\nstate_dir = "{tmp_path}"\n[upstream]\nurl = "imap://127.0.0.1:1"\n')
    assert isinstance(make_backend(plain), ImapBackend)
    demo = loads(f'[server]\nstate_dir = "{tmp_path}"\n')
    assert isinstance(make_backend(demo), MaildirBackend)
    AccountBook(tmp_path / "accounts.json").save()  # an empty book changes nothing either
    assert isinstance(make_backend(plain), ImapBackend)


def test_routes_or_accounts_make_a_mapped_backend(tmp_path: Path) -> None:
    base = f'[server]\nstate_dir = "{tmp_path}"\n[upstream]\nurl = "imap://127.0.0.1:1"\n'
    routed = loads(base + '[[routes]]\nmatch = "*@x"\n')
    assert isinstance(make_backend(routed), MappedBackend)
    book = AccountBook(tmp_path / "accounts.json")
    book.add(Account("alice", "real-alice"))
    book.save()
    backend = make_backend(loads(base))
    assert isinstance(backend, MappedBackend)
    assert backend.name == "imap"  # metrics: the kind of the default upstream


def test_an_account_naming_a_missing_profile_fails_the_config(tmp_path: Path) -> None:
    book = AccountBook(tmp_path / "accounts.json")
    book.add(Account("alice", "a", upstream="o365"))
    book.save()
    config = loads(f'[server]\nstate_dir = "{tmp_path}"\n[upstream]\nurl = "imap://127.0.0.1:1"\n')
    with pytest.raises(ConfigError, match=r"accounts\.file: account 'alice': no upstream profile 'o365'"):
        make_backend(config)
    (tmp_path / "accounts.json").write_text('{"version": 9}')
    with pytest.raises(ConfigError, match="format version 9"):
        make_backend(config)
