"""Shared fixtures: one private Dovecot per session, and a fresh mail user per test."""

from __future__ import annotations

import itertools
import re
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.realservers.cyrus import Cyrus, start_cyrus
from tests.realservers.dovecot import Dovecot, MailUser, start_dovecot

_user_numbers = itertools.count(1)


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
