"""JMAP credentials never leave the upstream's origin: a hostile or intercepted upstream that redirects
elsewhere or hands out foreign ``apiUrl``/``downloadUrl`` gets the login refused, and the other origin never
sees an Authorization header (neither a user's Basic password nor the shared bearer token)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import poplib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import h11
import httpx
import pytest
import trio

from gateway.accounts import add_user
from gateway.backends import make_backend
from gateway.backends.base import PasswordLogin, PermFailure
from gateway.backends.jmap import JmapBackend, JmapSettings
from gateway.config import Config, ConfigError, ListenConfig, ServerConfig, UpstreamConfig
from gateway.server import Server
from tests.proto.test_jmap import FakeJmap, message

ALICE = PasswordLogin("alice", "pw")
HOME = "example.test"
EVIL = "evil.test"


class Recorder:
    """The fake JMAP server at HOME; every request to any host is recorded, the foreign ones answered
    as a credential thief would (200, a session, anything)."""

    def __init__(self, fake: FakeJmap) -> None:
        self.fake = fake
        self.homes = {HOME}  # the hosts that serve the fake's resources (any path on them)
        self.requests: list[httpx.Request] = []
        self.redirect: str | None = None  # the Location the well-known URL answers

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.url.host not in self.homes:
            return httpx.Response(200, json={"stolen": True})
        if self.redirect is not None and request.url.path == "/.well-known/jmap":
            return httpx.Response(307, headers={"Location": self.redirect})
        return self.fake.handler(request)

    def foreign(self) -> list[httpx.Request]:
        """Requests anywhere but https://HOME (the configured origin)."""
        return [r for r in self.requests if r.url.host != HOME or r.url.scheme != "https" or r.url.port]


@dataclasses.dataclass
class Mode:
    """How the gateway authenticates upstream: the user's password (Basic) or a shared token."""

    name: str
    settings: dict[str, Any]


@pytest.fixture(params=["basic", "token"])
def mode(request: pytest.FixtureRequest, tmp_path: Path) -> Mode:
    if request.param == "basic":
        return Mode("basic", {})
    add_user(tmp_path / "users", "alice", "pw")
    return Mode("token", {"token": "shared-s3cret", "users_file": str(tmp_path / "users")})


@pytest.fixture
def recorder(mode: Mode) -> Recorder:
    fake = FakeJmap()
    if mode.name == "token":
        fake.token = "shared-s3cret"
    fake.add(message(1))
    return Recorder(fake)


@pytest.fixture
async def backend(recorder: Recorder, mode: Mode) -> AsyncIterator[Callable[..., JmapBackend]]:
    made: list[JmapBackend] = []

    def build(**settings: Any) -> JmapBackend:
        b = JmapBackend(
            JmapSettings.from_url(f"jmap+https://{HOME}/", **mode.settings, **settings),
            transport=httpx.MockTransport(recorder.handler),
        )
        made.append(b)
        return b

    yield build
    for b in made:
        await b.aclose()


async def refused_login(backend: JmapBackend, caplog: pytest.LogCaptureFixture, where: str) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.jmap")
    with pytest.raises(PermFailure, match="refusing to send credentials"):
        async with backend.open_maildrop(ALICE):
            pass
    [line] = [r.getMessage() for r in caplog.records if "refusing to send credentials" in r.getMessage()]
    assert where in line
    assert "s3cret" not in caplog.text and "cHc" not in caplog.text  # no token, no base64 of "pw"


async def test_a_redirect_to_another_origin_gets_no_credentials_and_fails_the_login(
    recorder: Recorder, backend: Callable[..., JmapBackend], caplog: pytest.LogCaptureFixture
) -> None:
    recorder.redirect = f"https://{EVIL}/jmap"
    await refused_login(backend(), caplog, EVIL)
    assert recorder.foreign() == []  # refused before the request was made


async def test_a_redirect_to_another_port_of_the_same_host_is_another_origin(
    recorder: Recorder, backend: Callable[..., JmapBackend], caplog: pytest.LogCaptureFixture
) -> None:
    recorder.redirect = f"https://{HOME}:8443/jmap"
    await refused_login(backend(), caplog, f"{HOME}:8443")
    assert [r for r in recorder.requests if r.url.port == 8443] == []


@pytest.mark.parametrize(
    ("session", "where"),
    [
        ({"apiUrl": f"https://{EVIL}/jmap/"}, EVIL),
        ({"apiUrl": f"http://{HOME}/jmap/"}, "cleartext"),
        ({"downloadUrl": f"https://{EVIL}/d/{{accountId}}/{{blobId}}/{{name}}?accept={{type}}"}, EVIL),
        ({"downloadUrl": f"http://{HOME}:443/d/{{accountId}}/{{blobId}}/{{name}}"}, "cleartext"),
        ({"downloadUrl": "https://{accountId}.evil.test/d/{blobId}/{name}"}, "alice.evil.test"),
    ],
)
async def test_foreign_or_cleartext_session_urls_get_no_credentials_and_fail_the_login(
    recorder: Recorder,
    backend: Callable[..., JmapBackend],
    caplog: pytest.LogCaptureFixture,
    session: dict[str, str],
    where: str,
) -> None:
    recorder.fake.session_extra = session
    await refused_login(backend(), caplog, where)
    assert [r for r in recorder.foreign() if "authorization" in r.headers] == []
    assert recorder.foreign() == []


async def test_an_allowed_origin_gets_the_credentials(
    recorder: Recorder, backend: Callable[..., JmapBackend]
) -> None:
    recorder.homes.add("dl.example.test")  # the operator's download host
    recorder.fake.session_extra = {
        "downloadUrl": "https://dl.example.test/jmap/download/{accountId}/{blobId}/{name}"
    }
    b = backend(allowed_origins=("https://dl.example.test",))
    async with b.open_maildrop(ALICE) as drop, contextlib.aclosing(drop.stream(0)) as chunks:
        body = b"".join([chunk async for chunk in chunks])
    assert body == message(1)
    [download] = [r for r in recorder.requests if r.url.host == "dl.example.test"]
    assert "authorization" in download.headers


def test_allowed_origins_are_bare_origins_and_never_cleartext_under_tls() -> None:
    with pytest.raises(ValueError, match="credentials never go over http"):
        JmapSettings.from_url("jmap+https://h/", allowed_origins=("http://other",))
    with pytest.raises(ValueError, match="not an origin"):
        JmapSettings.from_url("jmap+https://h/", allowed_origins=("https://other/path",))
    JmapSettings.from_url("jmap+http://h/", allowed_origins=("http://other:8080", "https://other"))
    with pytest.raises(ConfigError, match=r"upstream\.allowed_origins"):
        make_backend(Config(upstream=UpstreamConfig(url="jmap+https://h/", allowed_origins=("http://x",))))
    with pytest.raises(ConfigError, match=r"upstream\.allowed_origins"):
        make_backend(Config(upstream=UpstreamConfig(url="imaps://h/", allowed_origins=("https://x",))))


async def test_the_pop3_client_sees_sys_perm(recorder: Recorder, mode: Mode) -> None:
    recorder.fake.session_extra = {"apiUrl": f"https://{EVIL}/jmap/"}
    backend = JmapBackend(
        JmapSettings.from_url(f"jmap+https://{HOME}/", **mode.settings),
        transport=httpx.MockTransport(recorder.handler),
    )
    cfg = Config(server=dataclasses.replace(ServerConfig()), listen=(ListenConfig("127.0.0.1:0"),))
    server = Server(cfg, backend)
    async with trio.open_nursery() as nursery:
        [bound] = await nursery.start(server.serve)

        def login() -> str:
            p = poplib.POP3(bound.host, bound.port, timeout=10)
            try:
                p.user("alice")
                with pytest.raises(poplib.error_proto) as err:
                    p.pass_("pw")
                return err.value.args[0].decode()
            finally:
                p.close()

        reply = await trio.to_thread.run_sync(login)
        server.drain()
    await backend.aclose()
    assert reply.startswith("-ERR [SYS/PERM]")
    assert recorder.foreign() == []


# ------------------------------------------------------------------ real sockets: two origins on loopback


async def serve_http(
    listener: trio.SocketListener, respond: Callable[[h11.Request], h11.Response], seen: list[h11.Request]
) -> None:
    async def one(stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        async with stream:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(65536))
                    continue
                if isinstance(event, h11.Request):
                    seen.append(event)
                    response = respond(event)
                    await stream.send_all(conn.send(response))
                    await stream.send_all(conn.send(h11.EndOfMessage()))
                    return
                return

    await trio.serve_listeners(one, [listener])


async def test_a_real_cross_origin_redirect_keeps_the_password_at_home(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    """Two HTTP servers on loopback (two ports: two origins). The configured one redirects session
    discovery to the other, which would accept anything; it must never be asked."""
    [home] = await trio.open_tcp_listeners(0, host="127.0.0.1")
    [other] = await trio.open_tcp_listeners(0, host="127.0.0.1")
    other_port = other.socket.getsockname()[1]
    home_seen: list[h11.Request] = []
    other_seen: list[h11.Request] = []

    def redirect(request: h11.Request) -> h11.Response:
        location = f"http://127.0.0.1:{other_port}/jmap".encode()
        return h11.Response(status_code=307, headers=[("Location", location), ("Content-Length", "0")])

    def thief(request: h11.Request) -> h11.Response:
        return h11.Response(status_code=500, headers=[("Content-Length", "0")])

    nursery.start_soon(serve_http, home, redirect, home_seen)
    nursery.start_soon(serve_http, other, thief, other_seen)
    port = home.socket.getsockname()[1]
    backend = JmapBackend(JmapSettings.from_url(f"jmap+http://127.0.0.1:{port}/", timeout=5))
    caplog.set_level(logging.WARNING, logger="gateway.jmap")
    try:
        with pytest.raises(PermFailure, match="refusing to send credentials"):
            async with backend.open_maildrop(ALICE):
                pass
    finally:
        await backend.aclose()
    assert [r.target for r in home_seen] == [b"/.well-known/jmap"]
    assert other_seen == []
    assert f"127.0.0.1:{other_port}" in caplog.text
