"""The admin endpoint over real HTTP on port 0: httpx as the client, raw sockets for what httpx won't send."""

from __future__ import annotations

import contextlib
import functools
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import trio
import trio.testing

from gateway import config as cfg
from gateway.admin import AdminSettings, AdminToken, NotReady, load_token, serve_admin
from gateway.metrics import Metrics

FAST = AdminSettings(read_timeout=0.5, ready_timeout=0.3)


async def always_ready() -> bool:
    return True


@asynccontextmanager
async def admin(
    check: Callable[[], Awaitable[bool]] = always_ready,
    *,
    metrics: Metrics | None = None,
    settings: AdminSettings = FAST,
) -> AsyncIterator[str]:
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(
            functools.partial(serve_admin, "127.0.0.1:0", metrics or Metrics(), check, settings=settings)
        )
        host, port = bound[0]
        yield f"http://{host}:{port}"
        nursery.cancel_scope.cancel()


async def raw(base: str, data: bytes, *, half_close: bool = False) -> bytes:
    """Send ``data`` on a fresh connection and read until the server closes it."""
    host, port = base.removeprefix("http://").rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    try:
        with trio.fail_after(5):
            await stream.send_all(data)
            if half_close:
                await stream.send_eof()
            out = b""
            while chunk := await stream.receive_some(65536):
                out += chunk
            return out
    finally:
        await stream.aclose()


async def test_healthz_says_ok() -> None:
    async with admin() as base, httpx.AsyncClient(base_url=base) as client:
        r = await client.get("/healthz")
        assert (r.status_code, r.text) == (200, "ok\n")
        assert r.headers["content-type"] == "text/plain; charset=utf-8"
        assert r.headers["cache-control"] == "no-store"
        head = await client.head("/healthz")
        assert (head.status_code, head.content, head.headers["content-length"]) == (200, b"", "3")


async def test_readyz_follows_the_check() -> None:
    ready = False

    async def check() -> bool:
        return ready

    async with admin(check) as base, httpx.AsyncClient(base_url=base) as client:
        r = await client.get("/readyz")
        assert (r.status_code, r.text) == (503, "not ready: not ready\n")
        ready = True
        r = await client.get("/readyz")
        assert (r.status_code, r.text) == (200, "ready\n")


async def test_readyz_shows_a_not_ready_reason_but_never_other_exception_text() -> None:
    async def upstream_down() -> bool:
        raise NotReady("upstream imap://mail:143 unreachable")

    async def broken() -> bool:
        raise RuntimeError("password=hunter2")

    async with admin(upstream_down) as base, httpx.AsyncClient(base_url=base) as client:
        r = await client.get("/readyz")
        assert (r.status_code, r.text) == (503, "not ready: upstream imap://mail:143 unreachable\n")
    async with admin(broken) as base, httpx.AsyncClient(base_url=base) as client:
        r = await client.get("/readyz")
        assert (r.status_code, r.text) == (503, "not ready: readiness check failed\n")
        assert "hunter2" not in r.text


async def test_a_slow_readiness_check_is_not_ready(socket_clock: trio.testing.MockClock) -> None:
    async def slow() -> bool:
        await trio.sleep(30)
        return True

    async with admin(slow) as base, httpx.AsyncClient(base_url=base) as client:
        r = await client.get("/readyz")
        assert (r.status_code, r.text) == (503, "not ready: readiness check timed out\n")


async def test_metrics_change_between_scrapes_on_one_keep_alive_connection() -> None:
    metrics = Metrics()
    async with admin(metrics=metrics) as base, httpx.AsyncClient(base_url=base) as client:
        r = await client.get("/metrics")
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/plain")
        assert "pop3_gateway_sessions_active 0.0" in r.text
        metrics.session_started()
        metrics.login("ok")
        r = await client.get("/metrics?name[]=ignored")
        assert "pop3_gateway_sessions_active 1.0" in r.text
        assert 'pop3_gateway_logins_total{result="ok"} 1.0' in r.text
        om = await client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
        assert om.headers["content-type"].startswith("application/openmetrics-text")
        assert om.text.endswith("# EOF\n")


async def test_unknown_paths_are_404_and_other_methods_405() -> None:
    async with admin() as base, httpx.AsyncClient(base_url=base) as client:
        assert (await client.get("/")).status_code == 404
        assert (await client.get("/healthz/")).status_code == 404
        assert (await client.post("/nope")).status_code == 404
        r = await client.post("/metrics", content=b"x")
        assert (r.status_code, r.headers["allow"]) == (405, "GET, HEAD")
        assert (await client.delete("/healthz")).status_code == 405
        assert (await client.get("/healthz")).status_code == 200  # the connection goes on


async def test_pipelined_requests_on_one_connection_are_answered_in_order() -> None:
    async with admin() as base:
        out = await raw(
            base,
            b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n"
            b"GET /nope HTTP/1.1\r\nHost: a\r\n\r\n"
            b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        )
    assert re.findall(rb"HTTP/1\.1 (\d{3}) ", out) == [b"200", b"404", b"200"]


async def test_http_1_0_gets_its_answer_and_a_close() -> None:
    async with admin() as base:
        out = await raw(base, b"GET /healthz HTTP/1.0\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200 OK\r\n") and out.endswith(b"\r\n\r\nok\n")


@pytest.mark.parametrize(
    "garbage",
    [
        b"GARBAGE\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost a\r\n\r\n",  # a header without a colon
        b"GET /healthz HTTP/1.1\r\n\r\n",  # HTTP/1.1 without Host
        b"GET /healthz HTTP/1.1\r\nHost: a\r\nContent-Length: x\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(256)) + b"\r\n\r\n",  # TLS
        b"GET /he\x00lthz HTTP/1.1\r\nHost: a\r\n\r\n",
    ],
)
async def test_malformed_http_gets_400_and_a_close_and_the_server_lives_on(garbage: bytes) -> None:
    async with admin() as base:
        out = await raw(base, garbage)
        assert out.startswith(b"HTTP/1.1 400 "), out
        assert b"connection: close" in out.lower()
        assert out.endswith(b"bad request\n")
        async with httpx.AsyncClient(base_url=base) as client:
            assert (await client.get("/healthz")).status_code == 200


async def test_oversized_headers_get_431() -> None:
    async with admin(settings=AdminSettings(read_timeout=2, max_request_bytes=1024)) as base:
        out = await raw(base, b"GET /healthz HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 5000 + b"\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 431 ")


async def test_a_body_over_the_cap_gets_413() -> None:
    async with admin(settings=AdminSettings(read_timeout=2, max_body_bytes=10)) as base:
        out = await raw(base, b"GET /healthz HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\n\r\n" + b"x" * 11)
        assert out.startswith(b"HTTP/1.1 413 ")
        out = await raw(
            base,
            b"GET /healthz HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\nConnection: close\r\n\r\n"
            + b"x" * 10,
        )
        assert out.startswith(b"HTTP/1.1 200 ")


async def test_expect_100_continue_is_honoured() -> None:
    async with admin() as base:
        out = await raw(
            base,
            b"GET /healthz HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nExpect: 100-continue\r\n"
            b"Connection: close\r\n\r\nhi",
        )
    assert out.startswith(b"HTTP/1.1 100 ")
    assert b"HTTP/1.1 200 " in out


async def test_an_idle_connection_is_closed_after_the_read_timeout_silently(
    socket_clock: trio.testing.MockClock,
) -> None:
    async with admin() as base:
        with trio.fail_after(3):
            assert await raw(base, b"") == b""


async def test_a_request_begun_and_not_finished_in_time_gets_408(
    socket_clock: trio.testing.MockClock,
) -> None:
    async with admin() as base:
        with trio.fail_after(3):
            out = await raw(base, b"GET /healthz HTTP/1.1\r\nHost: a\r\n")
    assert out.startswith(b"HTTP/1.1 408 ")


async def test_a_client_that_half_closes_mid_request_gets_400() -> None:
    async with admin() as base:
        out = await raw(base, b"GET /healthz HTTP/1.1\r\nHost: a\r\n", half_close=True)
    assert out.startswith(b"HTTP/1.1 400 ")


async def connect_from(base: str, source: str) -> trio.SocketStream:
    host, port = base.removeprefix("http://").rsplit(":", 1)
    return await trio.open_tcp_stream(host, int(port), local_address=source)


async def keep_alive_request(stream: trio.SocketStream) -> bytes:
    """GET /healthz on ``stream``, kept open: the whole answer (it comes in more than one segment)."""
    await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
    out = b""
    with trio.fail_after(2):
        while not out.endswith(b"\r\n\r\nok\n") and (chunk := await stream.receive_some(65536)):
            out += chunk
    return out


async def test_connections_beyond_the_cap_wait_while_every_slot_is_busy() -> None:
    release = trio.Event()

    async def held() -> bool:
        await release.wait()
        return True

    settings = AdminSettings(read_timeout=5, max_connections=1)
    async with admin(held, settings=settings) as base, trio.open_nursery() as nursery:
        answers: dict[str, bytes] = {}

        async def get(path: str) -> None:
            answers[path] = await raw(
                base, f"GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".encode()
            )

        nursery.start_soon(get, "/readyz")
        await trio.testing.wait_all_tasks_blocked(0.05)
        nursery.start_soon(get, "/healthz")
        await trio.testing.wait_all_tasks_blocked(0.05)
        assert answers == {}  # the only slot is busy answering /readyz: the probe waits, it is not dropped
        release.set()
    assert answers["/readyz"].startswith(b"HTTP/1.1 200 ")
    assert answers["/healthz"].startswith(b"HTTP/1.1 200 ")


async def test_a_new_connection_at_the_cap_closes_the_oldest_idle_one() -> None:
    async with admin(settings=AdminSettings(read_timeout=5, max_connections=1)) as base:
        host, port = base.removeprefix("http://").rsplit(":", 1)
        first = await trio.open_tcp_stream(host, int(port))
        try:
            assert (await keep_alive_request(first)).startswith(b"HTTP/1.1 200 ")
            with trio.fail_after(2):  # the idle keep-alive connection makes room at once
                out = await raw(base, b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
                assert out.startswith(b"HTTP/1.1 200 ")
                assert await first.receive_some(65536) == b""  # closed for the newcomer
        finally:
            await first.aclose()


async def test_idle_and_keep_alive_sockets_cannot_starve_healthz() -> None:
    # The default settings: 32 connections, a 10 s read timeout. Before, 32 idle sockets made the probe
    # wait for a free slot; here 80 of them (40 from one address, over its cap; 40 from 40 others, over
    # the total cap; half of them kept alive after a request) and the probe still answers at once.
    async with admin(settings=AdminSettings()) as base, contextlib.AsyncExitStack() as held:
        for i in range(80):
            source = "127.0.0.1" if i < 40 else f"127.0.0.{i - 30}"
            stream = await connect_from(base, source)
            held.push_async_callback(stream.aclose)
            if i % 2:
                assert (await keep_alive_request(stream)).startswith(b"HTTP/1.1 200 ")
        with trio.fail_after(2):
            out = await raw(base, b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 200 ")


async def test_a_flood_from_one_address_closes_only_its_own_oldest_connections() -> None:
    settings = AdminSettings(read_timeout=5, max_connections_per_ip=4)
    async with admin(settings=settings) as base, contextlib.AsyncExitStack() as held:
        scraper = await connect_from(base, "127.0.0.3")  # a Prometheus keep-alive connection
        held.push_async_callback(scraper.aclose)
        assert (await keep_alive_request(scraper)).startswith(b"HTTP/1.1 200 ")
        flood = []
        for _ in range(10):
            stream = await connect_from(base, "127.0.0.2")
            held.push_async_callback(stream.aclose)
            flood.append(stream)
        # The probe from the flooding address itself gets through too (it is the newest).
        probe = await connect_from(base, "127.0.0.2")
        held.push_async_callback(probe.aclose)
        assert (await keep_alive_request(probe)).startswith(b"HTTP/1.1 200 ")
        with trio.fail_after(2):
            for stream in flood[:7]:  # 10 + the probe, 4 allowed: the 7 oldest were closed
                assert await stream.receive_some(65536) == b""
        for stream in flood[7:]:
            assert (await keep_alive_request(stream)).startswith(b"HTTP/1.1 200 ")
        assert (await keep_alive_request(scraper)).startswith(b"HTTP/1.1 200 ")  # untouched


async def test_a_silent_connection_is_closed_after_the_idle_timeout(autojump_clock: trio.abc.Clock) -> None:
    async with admin(settings=AdminSettings(read_timeout=10, idle_timeout=3)) as base:
        started = trio.current_time()
        assert await raw(base, b"") == b""
        assert 3 <= trio.current_time() - started < 10
        started = trio.current_time()
        stream = await connect_from(base, "127.0.0.1")
        try:
            assert (await keep_alive_request(stream)).startswith(b"HTTP/1.1 200 ")
            assert await stream.receive_some(65536) == b""  # kept alive, then idle too long: closed
        finally:
            await stream.aclose()
        assert 3 <= trio.current_time() - started < 10


async def test_a_busy_port_raises_from_start() -> None:
    async with admin() as base:
        address = base.removeprefix("http://")
        async with trio.open_nursery() as nursery:
            with pytest.raises(OSError):
                await nursery.start(serve_admin, address, Metrics(), always_ready)


async def test_cancelling_closes_the_listener() -> None:
    async with admin() as base:
        host, port = base.removeprefix("http://").rsplit(":", 1)
    with pytest.raises(OSError):
        await trio.open_tcp_stream(host, int(port))


class BrokenMetrics(Metrics):
    def render(self, accept: str = "") -> tuple[bytes, str]:
        raise RuntimeError("exposition failed")


async def test_an_internal_error_closes_that_connection_only(caplog: pytest.LogCaptureFixture) -> None:
    async with admin(metrics=BrokenMetrics(process=False)) as base:
        assert await raw(base, b"GET /metrics HTTP/1.1\r\nHost: a\r\n\r\n") == b""
        async with httpx.AsyncClient(base_url=base) as client:
            assert (await client.get("/healthz")).status_code == 200
    assert "admin connection failed" in caplog.text


# ---------------------------------------------------------------- the bearer token

TOKEN = "s3cr3t-admin-token-0123456789"


async def test_metrics_want_the_bearer_token_and_probes_do_not() -> None:
    async def down() -> bool:
        raise NotReady("upstream imap://mail.internal:143 unreachable")

    settings = AdminSettings(read_timeout=2, token=AdminToken(TOKEN))
    good = {"Authorization": f"Bearer {TOKEN}"}
    async with admin(down, settings=settings) as base, httpx.AsyncClient(base_url=base) as client:
        assert (await client.get("/healthz")).status_code == 200  # liveness probes carry no token
        r = await client.get("/readyz")
        assert (r.status_code, r.text) == (503, "not ready\n")  # the status, never the reason
        r = await client.get("/readyz", headers=good)
        assert r.text == "not ready: upstream imap://mail.internal:143 unreachable\n"
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
            r = await client.get("/metrics", headers=headers)
            assert (r.status_code, r.text) == (401, "unauthorized\n")
            assert r.headers["www-authenticate"] == 'Bearer realm="pop3-gateway"'
            assert TOKEN not in r.text
        r = await client.get("/metrics", headers={"Authorization": f"bearer  {TOKEN}"})
        assert r.status_code == 200
        assert "pop3_gateway_sessions_active" in r.text
        doubled = await raw(
            base,
            f"GET /metrics HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Authorization: Bearer x\r\nConnection: close\r\n\r\n".encode(),
        )
        assert doubled.startswith(b"HTTP/1.1 401 ")


async def test_the_token_never_shows_in_reprs_or_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    token = AdminToken(TOKEN)
    settings = AdminSettings(token=token)
    assert TOKEN not in repr(token) and TOKEN not in repr(settings) and TOKEN not in str(token)
    async with admin(settings=settings) as base, httpx.AsyncClient(base_url=base) as client:
        await client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
        await client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}x"})
    assert "/metrics -> 200" in caplog.text and "/metrics -> 401" in caplog.text
    assert TOKEN not in caplog.text


def test_the_token_file_must_be_private(tmp_path: Path) -> None:
    f = tmp_path / "token"
    f.write_text(TOKEN + "\n")
    f.chmod(0o640)
    config = cfg.AdminConfig(token_file=str(f))
    with pytest.raises(cfg.ConfigError, match=r"^admin\.token_file: .* \(mode 0640\): chmod 600 it$"):
        load_token(config, {})
    f.chmod(0o600)
    token = load_token(config, {"POP3_GATEWAY_ADMIN_TOKEN": "another-token-from-env"})  # the file wins
    assert (
        token is not None and token.matches(TOKEN.encode()) and not token.matches(b"another-token-from-env")
    )
    f.chmod(0o400)
    assert load_token(config, {}) is not None


def test_a_bad_token_is_a_config_error_that_does_not_show_it(tmp_path: Path) -> None:
    missing = cfg.AdminConfig(token_file=str(tmp_path / "nope"))
    with pytest.raises(cfg.ConfigError, match=r"^admin\.token_file: cannot read .*nope"):
        load_token(missing, {})
    short = tmp_path / "short"
    short.write_text("hunter2\n")
    short.chmod(0o600)
    with pytest.raises(cfg.ConfigError, match="16 to 4096 characters") as info:
        load_token(cfg.AdminConfig(token_file=str(short)), {})
    assert "hunter2" not in str(info.value)
    with pytest.raises(cfg.ConfigError, match=r"^POP3_GATEWAY_ADMIN_TOKEN: .*visible ASCII"):
        load_token(cfg.AdminConfig(), {"POP3_GATEWAY_ADMIN_TOKEN": "with a space in the middle"})


def test_the_token_comes_from_the_environment_or_nowhere() -> None:
    assert load_token(cfg.AdminConfig(), {}) is None
    token = load_token(cfg.AdminConfig(), {"POP3_GATEWAY_ADMIN_TOKEN": f" {TOKEN}\n"})
    assert token is not None and token.matches(TOKEN.encode())


def test_an_admin_address_beyond_loopback_wants_a_token_or_an_explicit_opt_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("POP3_GATEWAY_ADMIN_TOKEN", raising=False)
    for address in ("0.0.0.0:9110", "[::]:9110", "10.1.2.3:9110", "admin.example:9110"):
        with pytest.raises(cfg.ConfigError) as info:
            cfg.loads(f'[admin]\naddress = "{address}"\n')
        message = str(info.value)
        assert message.startswith("line 2: admin.address: ")
        assert "admin.token_file" in message and "admin.allow_unauthenticated" in message
    for address in ("127.0.0.1:9110", "127.0.0.5:0", "[::1]:9110", "localhost:9110", "[::ffff:127.0.0.1]:1"):
        cfg.loads(f'[admin]\naddress = "{address}"\n')
    cfg.loads('[admin]\naddress = "0.0.0.0:9110"\nallow_unauthenticated = true\n')
    cfg.loads('[admin]\naddress = "0.0.0.0:9110"\ntoken_file = "/run/secrets/admin-token"\n')
    with pytest.raises(cfg.ConfigError, match=r"admin\.address"):
        cfg.with_overrides(cfg.Config(), admin="0.0.0.0:9110")  # --admin-listen is checked the same way
    monkeypatch.setenv("POP3_GATEWAY_ADMIN_TOKEN", TOKEN)
    cfg.loads('[admin]\naddress = "0.0.0.0:9110"\n')


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("idle_timeout", "0"),
        ("read_timeout", "-1"),
        ("max_connections", "0"),
        ("max_connections_per_ip", "0"),
    ],
)
def test_admin_bounds_must_be_positive(key: str, value: str) -> None:
    with pytest.raises(cfg.ConfigError, match=rf"^line 2: admin\.{key}: must be"):
        cfg.loads(f"[admin]\n{key} = {value}\n")
