"""Real POP3 clients (fetchmail, mpop, getmail6, curl, poplib) against the gateway, on the embedded Maildir
backend and on a real Dovecot IMAP upstream (plain, STARTTLS and implicit TLS)."""

from __future__ import annotations

import dataclasses
import poplib
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme

from gateway.accounts import add_user
from gateway.backends.base import Backend
from gateway.backends.imap import ImapBackend, ImapSettings
from gateway.backends.maildir import MaildirBackend
from gateway.config import Config, ListenConfig, ServerConfig
from gateway.server import Bound, Server
from gateway.store import AsyncUidlStore
from tests.realservers import corpus
from tests.realservers.clients import (
    ClientError,
    curl_pop3,
    delivered_messages,
    pop3_url,
    run_fdm,
    run_fetchmail,
    run_getmail,
    run_mpop,
)
from tests.realservers.dovecot import Dovecot, MailUser

pytestmark = pytest.mark.client

CLIENTS: dict[str, Callable[..., int]] = {
    "fetchmail": run_fetchmail,
    "mpop": run_mpop,
    "getmail": run_getmail,
}
BACKENDS = ["maildir", "imap", "imap+starttls", "imaps"]


@dataclasses.dataclass
class Target:
    bound: Bound  # plain listener
    stls: Bound
    pop3s: Bound
    user: str
    password: str
    ca_file: Path
    add: Callable[[list[bytes]], None]


@pytest.fixture(scope="module")
def gateway_ca(tmp_path_factory: pytest.TempPathFactory) -> tuple[trustme.CA, Path, Path, Path]:
    ca = trustme.CA()
    d = tmp_path_factory.mktemp("gwtls")
    cert = ca.issue_cert("localhost", "127.0.0.1", common_name="localhost")  # fetchmail checks the CN
    cert.private_key_and_cert_chain_pem.write_to_path(str(d / "cert.pem"))
    cert.private_key_pem.write_to_path(str(d / "key.pem"))
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    return ca, d / "cert.pem", d / "key.pem", d / "ca.pem"


def _write_maildir(root: Path, messages: list[bytes]) -> None:
    new = root / "new"
    for sub in ("cur", "new", "tmp"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    start = len(list(new.iterdir())) + len(list((root / "cur").iterdir()))
    for i, raw in enumerate(messages, start=start):
        (new / f"{1700000000 + i}.M{i}P1.test").write_bytes(raw)


@pytest.fixture(params=BACKENDS)
async def target(
    request: pytest.FixtureRequest,
    nursery: trio.Nursery,
    tmp_path: Path,
    gateway_ca: tuple[trustme.CA, Path, Path, Path],
) -> AsyncIterator[Target]:
    _, cert, key, ca_file = gateway_ca
    kind: str = request.param
    backend: Backend
    if kind == "maildir":
        user, password = "carol", "maildir pass \u00e9"
        add_user(tmp_path / "users", user, password)
        _write_maildir(tmp_path / "mail" / user, [])
        backend = MaildirBackend(tmp_path / "mail", tmp_path / "users")

        def add(messages: list[bytes]) -> None:
            _write_maildir(tmp_path / "mail" / user, messages)

    else:
        dovecot: Dovecot = request.getfixturevalue("dovecot")
        mail_user: MailUser = request.getfixturevalue("mail_user")
        user, password = mail_user.name, mail_user.password
        tls = {"imap": "none", "imap+starttls": "starttls", "imaps": "implicit"}[kind]
        port = dovecot.imaps_port if tls == "implicit" else dovecot.imap_port
        backend = ImapBackend(ImapSettings(dovecot.host, port, tls, ca_file=str(dovecot.ca_file)))

        def add(messages: list[bytes]) -> None:
            dovecot.append(user, password, messages)

    cfg = Config(
        server=dataclasses.replace(ServerConfig(), upstream_timeout=15.0),
        listen=(
            ListenConfig("127.0.0.1:0"),
            ListenConfig("127.0.0.1:0", "starttls", str(cert), str(key)),
            ListenConfig("127.0.0.1:0", "implicit", str(cert), str(key)),
        ),
    )
    server = Server(cfg, backend, store=AsyncUidlStore(tmp_path / "uidl.sqlite3"))  # as `serve` runs
    plain, stls, pop3s = await nursery.start(server.serve)
    yield Target(plain, stls, pop3s, user, password, ca_file, add)
    server.drain()


def by_message_id(messages: list[bytes]) -> dict[bytes, bytes]:
    return {corpus.message_id(m): m for m in messages}


def undo_client_changes(client: str, raw: bytes) -> bytes:
    text = corpus.normalize_crlf(raw)
    if client == "getmail":
        first, rest = text.split(b"\r\n", 1)
        assert first.startswith(b"Return-Path: ")
        text = rest
    return text


@pytest.mark.parametrize("client", list(CLIENTS))
async def test_keep_mode_client_fetches_once_then_only_new_mail(
    target: Target, client: str, tmp_path: Path
) -> None:
    messages = corpus.tricky_messages()
    target.add(messages)
    run = CLIENTS[client]
    work = tmp_path / f"work-{client}"

    def fetch() -> int:
        return run(target.bound.host, target.bound.port, target.user, target.password, work)

    assert await trio.to_thread.run_sync(fetch) == len(messages)
    assert await trio.to_thread.run_sync(fetch) == 0
    late = corpus.sized_message(1, 3000, tag="late")
    target.add([late])
    assert await trio.to_thread.run_sync(fetch) == 1
    delivered = by_message_id([undo_client_changes(client, m) for m in delivered_messages(work)])
    assert delivered == by_message_id([corpus.pop3_view(m) for m in [*messages, late]])


async def test_fdm_fetches_through_the_gateway_without_being_lured_into_apop(target: Target) -> None:
    """fdm switches to APOP whenever the greeting carries a timestamp and gives up when APOP fails: the
    gateway offers APOP only where it can succeed (none of these accounts has an APOP secret)."""
    import tempfile

    messages = corpus.sized_messages(3, 800)
    target.add(messages)
    work = Path(tempfile.mkdtemp(prefix="pop3gw-fdm-"))  # fdm runs as debianfdm: not under pytest's 0700 tmp

    def fetch() -> int:
        return run_fdm(target.bound.host, target.bound.port, target.user, target.password, work)

    try:
        assert await trio.to_thread.run_sync(fetch) == 3
        assert await trio.to_thread.run_sync(fetch) == 0  # keep + new-only: nothing twice
    finally:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


@pytest.mark.parametrize(
    ("client", "tls"),
    [
        ("fetchmail", "starttls"),
        ("fetchmail", "implicit"),
        ("mpop", "starttls"),
        ("mpop", "implicit"),
        ("getmail", "implicit"),
    ],
)
async def test_clients_over_gateway_tls(target: Target, client: str, tls: str, tmp_path: Path) -> None:
    messages = corpus.tricky_messages()[:3]
    target.add(messages)
    bound = target.pop3s if tls == "implicit" else target.stls

    def fetch() -> int:
        return CLIENTS[client](
            bound.host,
            bound.port,
            target.user,
            target.password,
            tmp_path / "w",
            tls=tls,
            ca_file=target.ca_file,
        )

    assert await trio.to_thread.run_sync(fetch) == 3
    assert await trio.to_thread.run_sync(fetch) == 0


async def test_curl_list_retr_uidl_top_stls_and_pop3s(target: Target) -> None:
    messages = corpus.tricky_messages()
    target.add(messages)
    b, u, pw = target.bound, target.user, target.password

    def run() -> dict[str, Any]:
        out: dict[str, Any] = {}
        out["list"] = curl_pop3(pop3_url(b.host, b.port), user=u, password=pw)
        out["retr"] = [
            curl_pop3(pop3_url(b.host, b.port, str(n)), user=u, password=pw)
            for n in range(1, len(messages) + 1)
        ]
        out["uidl"] = curl_pop3(pop3_url(b.host, b.port), "-X", "UIDL", user=u, password=pw)
        out["top"] = curl_pop3(pop3_url(b.host, b.port), "-X", "TOP 2 0", user=u, password=pw)
        out["stls"] = curl_pop3(
            pop3_url(target.stls.host, target.stls.port, "1"),
            "--ssl-reqd",
            user=u,
            password=pw,
            ca_file=target.ca_file,
        )
        out["pop3s"] = curl_pop3(
            pop3_url(target.pop3s.host, target.pop3s.port, "1", implicit_tls=True),
            user=u,
            password=pw,
            ca_file=target.ca_file,
        )
        return out

    out = await trio.to_thread.run_sync(run)
    listing = out["list"].decode().split("\r\n")[:-1]
    assert [int(line.split()[1]) for line in listing] == [corpus.pop3_size(m) for m in messages]
    for got, raw in zip(out["retr"], messages, strict=True):
        assert got == corpus.pop3_view(raw)
    assert len(out["uidl"].decode().split("\r\n")[:-1]) == len(messages)
    header_end = messages[1].index(b"\r\n\r\n") + 4
    assert out["top"] == messages[1][:header_end]
    assert out["stls"] == out["pop3s"] == corpus.pop3_view(messages[0])


async def test_curl_refuses_the_gateway_certificate_without_the_ca(target: Target) -> None:
    def run() -> bytes:
        return curl_pop3(
            pop3_url(target.pop3s.host, target.pop3s.port, implicit_tls=True),
            user=target.user,
            password=target.password,
        )

    with pytest.raises(ClientError):
        await trio.to_thread.run_sync(run)


async def test_poplib_stls_and_bad_password(target: Target) -> None:
    target.add(corpus.tricky_messages()[:2])
    ctx = ssl.create_default_context(cafile=str(target.ca_file))

    def run() -> tuple[int, str]:
        p = poplib.POP3(target.stls.host, target.stls.port, timeout=30)
        p.stls(context=ctx)
        p.user(target.user)
        p.pass_(target.password)
        count = p.stat()[0]
        p.quit()
        q = poplib.POP3(target.bound.host, target.bound.port, timeout=30)
        q.user(target.user)
        try:
            q.pass_("wrong")
            reply = "accepted"
        except poplib.error_proto as exc:
            reply = str(exc)
        q.quit()
        return count, reply

    count, reply = await trio.to_thread.run_sync(run)
    assert count == 2
    assert "-ERR [AUTH]" in reply


async def test_apop_with_poplib_on_the_embedded_maildir(nursery: trio.Nursery, tmp_path: Path) -> None:
    add_user(tmp_path / "users", "dora", "login-pw", apop_secret="apop-secret")
    add_user(tmp_path / "users", "eve", "login-pw2")  # no APOP secret: APOP is refused cleanly
    _write_maildir(tmp_path / "mail" / "dora", corpus.tricky_messages()[:2])
    backend = MaildirBackend(tmp_path / "mail", tmp_path / "users")
    server = Server(Config(listen=(ListenConfig("127.0.0.1:0"),)), backend)
    [bound] = await nursery.start(server.serve)

    def run() -> tuple[int, str, str]:
        p = poplib.POP3(bound.host, bound.port, timeout=30)
        p.apop("dora", "apop-secret")  # poplib takes the timestamp from the greeting
        count = p.stat()[0]
        p.quit()
        replies = []
        for user, secret in (("dora", "wrong"), ("eve", "login-pw2")):
            q = poplib.POP3(bound.host, bound.port, timeout=30)
            try:
                q.apop(user, secret)
                replies.append("accepted")
            except poplib.error_proto as exc:
                replies.append(str(exc))
            q.quit()
        return count, replies[0], replies[1]

    count, wrong, no_secret = await trio.to_thread.run_sync(run)
    assert count == 2
    assert "-ERR [AUTH]" in wrong and "-ERR [AUTH]" in no_secret
    server.drain()
