"""Shared fixtures (one private Dovecot and Cyrus per session, a fresh mail user per test) and the markers.

Every test that starts a real server or program carries the `realserver` marker, so that
`pytest -m "not realserver"` is the fast loop: tests using the `dovecot` or `cyrus` fixture get it here,
tests marked `client` get it too, and the rest say it themselves (`pytestmark`). A test that starts one
without the marker fails (`tests.realservers.fs.require_program` refuses), so a missing marker cannot hide.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio.testing

from gateway import accounts
from tests.realservers import fs
from tests.realservers.cyrus import Cyrus, start_cyrus
from tests.realservers.dovecot import (
    Dovecot,
    MailUser,
    OAuth2Validation,
    start_dovecot,
    start_dovecot_oauth2,
)
from tests.realservers.oidc import OidcProvider, start_oidc

pytest_plugins = ["tests.timeouts"]

_user_numbers = itertools.count(1)
REAL_SERVER_FIXTURES = frozenset({"dovecot", "cyrus", "oidc", "dovecot_oauth2", "dovecot_oauth2_introspect"})
# The test provider's access-token lifetime: short, so that a test (or a polling client) crosses expiries.
OIDC_ACCESS_TOKEN_TTL = int(os.environ.get("POP3GW_OIDC_ACCESS_TOKEN_TTL", "10"))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """`realserver` on every test that uses a real-server fixture (directly or through another fixture)
    or carries `client`."""
    for item in items:
        uses = REAL_SERVER_FIXTURES.intersection(getattr(item, "fixturenames", ()))
        if uses or item.get_closest_marker("client") is not None:
            item.add_marker(pytest.mark.realserver)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    with _real_programs_allowed(item):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    with _real_programs_allowed(item):
        return (yield)


@contextlib.contextmanager
def _real_programs_allowed(item: pytest.Item) -> Iterator[None]:
    """While an unmarked test sets up and runs, `require_program` refuses. Not in teardown: session fixtures
    (a Dovecot started by an earlier, marked test) stop during whichever test happens to be last."""
    fs.unmarked_test = None if item.get_closest_marker("realserver") else item.nodeid
    try:
        yield
    finally:
        fs.unmarked_test = None


# scrypt cost of the users-file hashes that tests make: N = 2**4 instead of the production 2**14. A production
# hash costs ~45 ms of CPU; the fast loop makes and checks ~180 of them (8 s of its ~40 s). Verifying reads
# the cost from the stored hash, so a cheap hash takes the same code path, in-process and in a gateway
# subprocess.
TEST_SCRYPT_LN = 4


@pytest.fixture(autouse=True)
def cheap_scrypt(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """New hashes (and the unknown-user dummy, which must cost what a real one does) at `TEST_SCRYPT_LN`,
    unless the test is about the production cost: `@pytest.mark.production_scrypt`."""
    if request.node.get_closest_marker("production_scrypt") is not None:
        return
    production = f"$scrypt$ln={accounts._LN},"
    assert accounts.DUMMY_HASH.startswith(production)
    monkeypatch.setattr(accounts, "_LN", TEST_SCRYPT_LN)
    monkeypatch.setattr(
        accounts, "DUMMY_HASH", accounts.DUMMY_HASH.replace(production, f"$scrypt$ln={TEST_SCRYPT_LN},", 1)
    )


@pytest.fixture
def socket_clock() -> trio.testing.MockClock:
    """Virtual time for a test on real loopback sockets: the clock jumps to the next deadline once every task
    has waited 5 ms of real time. `autojump_clock` jumps at once, which suits memory streams; on sockets a
    segment the kernel has not yet delivered (softirq deferred on a loaded machine) would see its deadline
    jump past it."""
    return trio.testing.MockClock(autojump_threshold=0.005)


@pytest.fixture(scope="session")
def dovecot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dovecot]:
    """A private Dovecot (IMAP, IMAPS, POP3, POP3S on free loopback ports), started once per session.

    Fails (never skips) when Dovecot is not installed. It lives in /tmp/pop3gw-dovecot-*, not in pytest's
    tmp_path: pytest keeps that 0700 (and resets it whenever another session starts), which locks out
    Dovecot's unprivileged processes. Its log is copied to the session's basetemp (dovecot.log) at the end.
    """
    root = Path(tempfile.mkdtemp(prefix="pop3gw-dovecot-"))
    try:
        server = start_dovecot(root)
        try:
            yield server
        finally:
            server.stop()
            if server.log_file.exists():
                shutil.copyfile(server.log_file, tmp_path_factory.getbasetemp() / "dovecot.log")
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def mail_user(dovecot: Dovecot, request: pytest.FixtureRequest) -> MailUser:
    """A user of the session's Dovecot with an empty INBOX, named after the test (unique per test)."""
    slug = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40]
    user = MailUser(f"u{next(_user_numbers)}-{slug}", secrets.token_hex(8))
    dovecot.add_user(user.name, user.password)
    return user


@pytest.fixture(scope="session")
def cyrus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cyrus]:
    """A private Cyrus 3.6 (JMAP over HTTP, IMAP for filling mailboxes) on free loopback ports, started once
    per session. Fails (never skips) when Cyrus or its privately unpacked imapd is missing (`make deps`).
    It lives in /tmp/pop3gw-cyrus-* (its processes run as `cyrus`); what it sent to syslog is copied to the
    session's basetemp (cyrus-syslog.log) at the end."""
    root = Path(tempfile.mkdtemp(prefix="pop3gw-cyrus-"))
    try:
        server = start_cyrus(root)
        try:
            yield server
        finally:
            server.stop()
            (tmp_path_factory.getbasetemp() / "cyrus-syslog.log").write_text(server.log_text())
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def oidc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OidcProvider]:
    """A private oidc-provider (panva's, under node) on a free loopback port, started once per session.

    Device flow, client credentials, rotating refresh tokens, introspection, revocation; JWT access tokens
    living `OIDC_ACCESS_TOKEN_TTL` s ($POP3GW_OIDC_ACCESS_TOKEN_TTL, default 10). Accounts `alice` and
    `bob` (passwords in `.accounts`); `.device_login("alice")` runs the whole device flow through the
    provider's pages. Fails (never skips) without node or oidc-provider (`make deps`). Its log is copied
    to the session's basetemp (oidc.log) at the end.
    """
    root = Path(tempfile.mkdtemp(prefix="pop3gw-oidc-"))
    try:
        server = start_oidc(root, access_token_ttl=OIDC_ACCESS_TOKEN_TTL)
        try:
            yield server
        finally:
            server.stop()
            if server.log_file.exists():
                shutil.copyfile(server.log_file, tmp_path_factory.getbasetemp() / "oidc.log")
    finally:
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def _oauth2_dovecot(
    oidc: OidcProvider, validation: OAuth2Validation, tmp_path_factory: pytest.TempPathFactory, name: str
) -> Iterator[Dovecot]:
    root = Path(tempfile.mkdtemp(prefix="pop3gw-dvo-"))
    try:
        server = start_dovecot_oauth2(root, validation)
        try:
            for account, password in oidc.accounts.items():
                server.add_user(account, password)
            yield server
        finally:
            server.stop()
            if server.log_file.exists():
                shutil.copyfile(server.log_file, tmp_path_factory.getbasetemp() / f"{name}.log")
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def dovecot_oauth2(oidc: OidcProvider, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dovecot]:
    """A second private Dovecot whose XOAUTH2/OAUTHBEARER logins take the `oidc` provider's JWT access
    tokens, checked locally with its signing key: user tokens (`sub` = the user) and app-only tokens
    (scope `imap.app`, any user named in `user=`). Each provider account is a mail user whose IMAP
    password (for PLAIN, `append`) is its provider password."""
    validation = OAuth2Validation(
        "local", issuer=oidc.issuer, key_pem=oidc.signing_key_pem, alg=oidc.alg, kid=oidc.kid
    )
    with _oauth2_dovecot(oidc, validation, tmp_path_factory, "dovecot-oauth2") as server:
        yield server


@pytest.fixture(scope="session")
def dovecot_oauth2_introspect(
    oidc: OidcProvider, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Dovecot]:
    """Like `dovecot_oauth2`, but every token is checked online at the provider's introspection endpoint
    (RFC 7662, as the `dovecot` client): opaque tokens (`resource=OPAQUE_RESOURCE`) work here."""
    client = oidc.introspector
    url = oidc.introspection_endpoint.replace(
        "http://", f"http://{client.client_id}:{client.client_secret}@", 1
    )
    validation = OAuth2Validation("post", introspection_url=url)
    with _oauth2_dovecot(oidc, validation, tmp_path_factory, "dovecot-oauth2-introspect") as server:
        yield server
