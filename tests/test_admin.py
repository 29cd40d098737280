"""The admin endpoint over real HTTP on port 0: httpx as the client, raw sockets for what httpx won't send."""

from __future__ import annotations

import functools
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import httpx
import pytest
import trio

from gateway.admin import AdminSettings, NotReady, serve_admin
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


async def test_a_slow_readiness_check_is_not_ready() -> None:
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


async def test_an_idle_connection_is_closed_after_the_read_timeout_silently() -> None:
    async with admin() as base:
        with trio.fail_after(3):
            assert await raw(base, b"") == b""


async def test_a_request_begun_and_not_finished_in_time_gets_408() -> None:
    async with admin() as base:
        with trio.fail_after(3):
            out = await raw(base, b"GET /healthz HTTP/1.1\r\nHost: a\r\n")
    assert out.startswith(b"HTTP/1.1 408 ")


async def test_a_client_that_half_closes_mid_request_gets_400() -> None:
    async with admin() as base:
        out = await raw(base, b"GET /healthz HTTP/1.1\r\nHost: a\r\n", half_close=True)
    assert out.startswith(b"HTTP/1.1 400 ")


async def test_connections_beyond_the_cap_wait_for_a_free_slot() -> None:
    async with admin(settings=AdminSettings(read_timeout=5, max_connections=1)) as base:
        host, port = base.removeprefix("http://").rsplit(":", 1)
        first = await trio.open_tcp_stream(host, int(port))
        try:
            await first.send_all(b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
            assert (await first.receive_some(65536)).startswith(b"HTTP/1.1 200 ")
            async with trio.open_nursery() as nursery:
                answer: list[bytes] = []

                async def second() -> None:
                    answer.append(
                        await raw(base, b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
                    )

                nursery.start_soon(second)
                await trio.sleep(0.3)
                assert answer == []  # the only slot is held by the idle keep-alive connection
                await first.aclose()
        finally:
            await first.aclose()
        assert answer[0].startswith(b"HTTP/1.1 200 ")


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
