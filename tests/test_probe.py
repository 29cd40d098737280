"""Readiness asks the backend (``Backend.probe``), never its private attributes."""

from __future__ import annotations

import dataclasses
import types
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trio.testing

from gateway.admin import NotReady
from gateway.backends.base import NotReachable, TempFailure
from gateway.backends.imap import ImapBackend, ImapSettings
from gateway.backends.jmap import JmapBackend, JmapSettings
from gateway.backends.maildir import MaildirBackend
from gateway.config import Config, ListenConfig, ServerConfig
from gateway.server import Server
from tests.fakes import FakeBackend


def config() -> Config:
    return Config(server=dataclasses.replace(ServerConfig()), listen=(ListenConfig("127.0.0.1:0"),))


@pytest.fixture
async def closed_port() -> AsyncIterator[int]:
    """A loopback port that refuses connections: bound, never listening."""
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@pytest.fixture
async def open_port(nursery: trio.Nursery) -> int:
    [listener] = await trio.open_tcp_listeners(0, host="127.0.0.1")

    async def hang_up(stream: trio.SocketStream) -> None:
        await stream.aclose()

    nursery.start_soon(trio.serve_listeners, hang_up, [listener])
    port: int = listener.socket.getsockname()[1]
    return port


async def ready(server: Server) -> str:
    """'' when ready, else the reason /readyz would show."""
    try:
        assert await server.ready()
    except NotReady as exc:
        return str(exc)
    return ""


async def test_readiness_is_the_backends_probe(nursery: trio.Nursery) -> None:
    backend = FakeBackend({"alice": "pw"}, {"alice": {}})
    server = Server(config(), backend)
    await nursery.start(server.serve)
    assert await ready(server) == ""
    assert backend.probes == 1
    backend.unreachable = "upstream fake:1 unreachable: ConnectionRefusedError"
    server._probe_cache = None  # the answer is cached for 5 s; start afresh
    assert await ready(server) == "upstream fake:1 unreachable: ConnectionRefusedError"
    server.drain()


async def test_readiness_reads_no_private_attributes(nursery: trio.Nursery, closed_port: int) -> None:
    """A backend whose attributes look like an unreachable IMAP host or a missing maildir root, but whose
    probe says it is fine, is ready: only probe() counts."""
    backend = FakeBackend({"alice": "pw"}, {"alice": {}})
    backend.settings = types.SimpleNamespace(host="127.0.0.1", port=closed_port)  # type: ignore[attr-defined]
    backend._root = Path("/nonexistent/maildir/root")  # type: ignore[attr-defined]
    server = Server(config(), backend)
    await nursery.start(server.serve)
    assert await ready(server) == ""
    server.drain()


async def test_a_probe_that_hangs_is_not_ready_after_the_bound(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    class Hanging(FakeBackend):
        async def probe(self) -> None:
            await trio.sleep_forever()

    server = Server(config(), Hanging({"alice": "pw"}, {"alice": {}}))
    await nursery.start(server.serve)
    with trio.fail_after(10):
        assert await ready(server) == "upstream probe took over 3 s"
    server.drain()


async def test_a_probe_failing_otherwise_shows_a_fixed_phrase(nursery: trio.Nursery) -> None:
    class Broken(FakeBackend):
        async def probe(self) -> None:
            raise TempFailure("password=hunter2 in a message that probers must not see")

    server = Server(config(), Broken({"alice": "pw"}, {"alice": {}}))
    await nursery.start(server.serve)
    assert await ready(server) == "upstream not ready"
    server.drain()


async def test_imap_probes_its_host_and_port(open_port: int, closed_port: int) -> None:
    await ImapBackend(ImapSettings.from_url(f"imap://127.0.0.1:{open_port}")).probe()
    with pytest.raises(NotReachable, match=rf"upstream 127\.0\.0\.1:{closed_port} unreachable"):
        await ImapBackend(ImapSettings.from_url(f"imap://127.0.0.1:{closed_port}")).probe()


async def test_jmap_probes_the_session_urls_host_and_port(open_port: int, closed_port: int) -> None:
    backend = JmapBackend(JmapSettings.from_url(f"jmap+http://127.0.0.1:{open_port}/"))
    await backend.probe()
    await backend.aclose()
    backend = JmapBackend(JmapSettings.from_url(f"jmap+http://127.0.0.1:{closed_port}/jmap/session"))
    with pytest.raises(NotReachable, match=rf"upstream 127\.0\.0\.1:{closed_port} unreachable"):
        await backend.probe()
    await backend.aclose()


async def test_maildir_probes_its_root(tmp_path: Path) -> None:
    await MaildirBackend(tmp_path, tmp_path / "users").probe()
    with pytest.raises(NotReachable, match="maildir root not readable"):
        await MaildirBackend(tmp_path / "missing", tmp_path / "users").probe()
