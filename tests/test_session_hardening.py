"""The session and login path under attack: slowloris, parallel guesses, refusals, greetings, logs.

Memory streams and virtual time (autojump_clock); the fake backend. Each test here failed against the code
before the login path was rebuilt (issue 9).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing

from gateway.backends.base import Login
from gateway.config import Config, LimitsConfig, ListenConfig, ServerConfig
from gateway.logsetup import TextFormatter
from gateway.server import Server
from tests.fakes import FakeBackend
from tests.test_server import MSG1, MSG2, MSG3, Client, open_session


class CountingBackend(FakeBackend):
    def __init__(self, supports_apop: bool = True) -> None:
        super().__init__(
            {"alice": "pw", "bob": "pw2"}, {"alice": {"m1": MSG1, "m2": MSG2, "m3": MSG3}, "bob": {}}
        )
        self.asked = 0
        self.supports_apop = supports_apop

    @contextlib.asynccontextmanager
    async def open_maildrop(self, login: Login) -> AsyncIterator[object]:  # type: ignore[override]
        self.asked += 1
        async with super().open_maildrop(login) as drop:
            yield drop


def config(limits: LimitsConfig | None = None, **server: object) -> Config:
    return Config(
        server=dataclasses.replace(ServerConfig(), **server),  # type: ignore[arg-type]
        listen=(ListenConfig("127.0.0.1:0"),),
        limits=limits or LimitsConfig(),
    )


# ---------------------------------------------------------------- 1. slowloris before login


async def test_login_timeout_is_one_deadline_from_accept_not_reset_by_each_byte(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server = Server(config(login_timeout=60), CountingBackend())
    c, finished = open_session(server, nursery)
    await c.readline()
    start = trio.current_time()

    async def trickle() -> None:
        for byte in b"USER alice\r\nPASS pw":  # one byte every 20 s, never a whole login
            await c.stream.send_all(bytes([byte]))
            await trio.sleep(20)

    async with trio.open_nursery() as inner:
        inner.start_soon(trickle)
        await finished.wait()
        ended = trio.current_time() - start
        inner.cancel_scope.cancel()
    assert ended <= 61
    assert await c.read_all() == b"-ERR Autologout; idle for too long\r\n"


async def test_bad_commands_before_login_are_capped(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server = Server(config(max_bad_commands=5), CountingBackend())
    c, finished = open_session(server, nursery)
    await c.readline()
    for _ in range(4):
        assert (await c.cmd(b"HELO")).startswith(b"-ERR")
    assert await c.cmd(b"HELO") == b"-ERR Unknown command"
    assert await c.readline() == b"-ERR Too many bad commands; closing"
    assert await c.read_all() == b""
    await finished.wait()


async def test_sessions_waiting_to_log_in_are_capped_below_max_sessions(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server = Server(config(max_sessions=10, max_unauthenticated=3), CountingBackend())
    logged = open_session(server, nursery)[0]
    assert (await logged.login()).startswith(b"+OK")  # logged in: no longer counts toward the cap
    idle = [open_session(server, nursery)[0] for _ in range(3)]
    for c in idle:
        assert (await c.readline()).startswith(b"+OK")
    late, finished = open_session(server, nursery)
    assert await late.readline() == b"-ERR [SYS/TEMP] Too many sessions waiting to log in, try again later"
    await finished.wait()
    assert server.metrics.sample("pop3_gateway_sessions_refused_total", limit="unauthenticated") == 1
    await idle[0].stream.aclose()
    await trio.sleep(1)
    again = open_session(server, nursery)[0]
    assert (await again.readline()).startswith(b"+OK")


# ---------------------------------------------------------------- 2. parallel guesses


async def test_parallel_wrong_passwords_do_not_all_wait_the_same_delay(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    limits = LimitsConfig(auth_delay_base=1, auth_delay_max=30, max_sessions_per_ip=0)
    server = Server(config(limits=limits, max_auth_failures=10), CountingBackend())
    first = open_session(server, nursery)[0]
    assert await first.login(password=b"wrong") == b"-ERR [AUTH] Authentication failed"
    clients = [open_session(server, nursery)[0] for _ in range(20)]
    for c in clients:
        await c.readline()
        await c.cmd(b"USER alice")
    answered: list[float] = []
    start = trio.current_time()

    async def guess(c: Client) -> None:
        assert await c.cmd(b"PASS wrong") == b"-ERR [AUTH] Authentication failed"
        answered.append(round(trio.current_time() - start))

    async with trio.open_nursery() as guesses:
        for c in clients:
            guesses.start_soon(guess, c)
    assert sorted(answered) == [1, 2, 4, 8, 16] + [30] * 15


async def test_parallel_guesses_cannot_overshoot_the_lockout(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    be = CountingBackend()
    be.login_delay = 0.5  # an upstream takes time to say no: that is when parallel guesses overtake
    limits = LimitsConfig(auth_delay_base=0, lockout_after=3, lockout_duration=600, max_sessions_per_ip=0)
    server = Server(config(limits=limits), be)
    clients = [open_session(server, nursery)[0] for _ in range(20)]
    for c in clients:
        await c.readline()
        await c.cmd(b"USER alice")

    async def guess(c: Client) -> None:
        assert await c.cmd(b"PASS wrong") == b"-ERR [AUTH] Authentication failed"

    async with trio.open_nursery() as guesses:
        for c in clients:
            guesses.start_soon(guess, c)
    assert be.asked == 3


# ---------------------------------------------------------------- refusals that are not guesses


async def test_in_use_refusals_do_not_end_the_session_as_failed_logins(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server = Server(config(max_auth_failures=2), CountingBackend())
    holder = open_session(server, nursery)[0]
    assert (await holder.login()).startswith(b"+OK")
    c = open_session(server, nursery)[0]
    await c.readline()
    for _ in range(3):
        await c.cmd(b"USER alice")
        assert (await c.cmd(b"PASS pw")).startswith(b"-ERR [IN-USE]")
    assert await c.cmd(b"NOOP") == b"-ERR Command not valid in AUTHORIZATION state"  # still open


async def test_refused_sessions_are_not_counted_as_sessions(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server = Server(config(limits=LimitsConfig(max_sessions_per_ip=1)), CountingBackend())
    first = open_session(server, nursery)[0]
    assert (await first.readline()).startswith(b"+OK")
    second, finished = open_session(server, nursery)
    assert (await second.readline()).startswith(b"-ERR [SYS/TEMP]")
    await finished.wait()
    assert server.metrics.sample("pop3_gateway_sessions_total") == 1
    assert server.metrics.sample("pop3_gateway_sessions_active") == 1


# ---------------------------------------------------------------- 11. the greeting


async def test_the_greeting_tells_nothing_and_offers_apop_only_where_it_can_succeed(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    import os
    import socket

    greetings = []
    for _ in range(2):
        c = open_session(Server(config(), CountingBackend(supports_apop=True)), nursery)[0]
        greetings.append(await c.readline())
    for g in greetings:
        assert g.startswith(b"+OK POP3 gateway ready <") and g.endswith(b">")
        assert str(os.getpid()).encode() not in g
        assert socket.gethostname().encode() not in g
    assert greetings[0] != greetings[1]
    pass_through = open_session(Server(config(), CountingBackend(supports_apop=False)), nursery)[0]
    assert await pass_through.readline() == b"+OK POP3 gateway ready"
    assert await pass_through.cmd(b"APOP alice " + b"0" * 32) == b"-ERR APOP not available"
    off = open_session(Server(config(apop=False), CountingBackend(supports_apop=True)), nursery)[0]
    assert await off.readline() == b"+OK POP3 gateway ready"


# ---------------------------------------------------------------- 12. lock-outs and SASL lines


async def test_an_over_long_sasl_line_cancels_the_exchange(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server = Server(config(), CountingBackend())
    c = open_session(server, nursery)[0]
    await c.readline()
    assert await c.cmd(b"AUTH PLAIN") == b"+ "
    await c.send(b"A" * 9000)
    assert await c.readline() == b"-ERR Line too long; authentication cancelled"
    assert (await c.cmd(b"CAPA")).startswith(b"+OK")  # a command again, not base64


# ---------------------------------------------------------------- 8. big listings do not stall others


async def test_pipelined_commands_are_answered_in_turns(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server = Server(config(), CountingBackend())
    client_side, server_side = trio.testing.memory_stream_pair()
    writes: list[int] = []
    real_send = server_side.send_stream.send_all

    async def counting_send(data: bytes | bytearray | memoryview) -> None:
        writes.append(len(data))
        await real_send(data)

    server_side.send_stream.send_all = counting_send  # type: ignore[method-assign]
    nursery.start_soon(server.serve_stream, server_side)
    c = Client(client_side)
    assert (await c.login()).startswith(b"+OK")
    before = len(writes)
    await c.stream.send_all(b"NOOP\r\n" * 1000)
    for _ in range(1000):
        assert await c.readline() == b"+OK"
    assert len(writes) - before >= 1000 // 64  # written in turns, not after all 1000 were handled


# ---------------------------------------------------------------- 13. escaped log lines


async def test_user_names_are_escaped_in_text_logs(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    be = CountingBackend()
    be.users["evil\x1b[31m\x08FAKE"] = "pw"
    be.boxes["evil\x1b[31m\x08FAKE"] = {}
    server = Server(config(), be)
    c = open_session(server, nursery)[0]
    assert (await c.login(b"evil\x1b[31m\x08FAKE")).startswith(b"+OK")  # logged in: login and session lines
    await c.cmd(b"QUIT")
    await trio.sleep(1)
    text = "\n".join(TextFormatter().format(r) for r in caplog.records)
    assert "\x1b" not in text and "\x08" not in text
    assert "user=evil\\x1b[31m\\x08FAKE messages=0" in text
    assert "user=evil\\x1b[31m\\x08FAKE result=quit" in text


def test_exceptions_are_logged_as_one_line_without_a_traceback() -> None:
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        import sys

        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    line = TextFormatter().format(record)
    assert "\n" not in line and "Traceback" not in line
    assert "exc=ValueError: boom\\x0asecond line (at test_session_hardening.py:" in line


# ---------------------------------------------------------------- 3. reload never takes the server down


async def test_a_reload_changing_ipv6_prefix_under_open_sessions_is_refused_and_nothing_crashes(
    nursery: trio.Nursery,
) -> None:
    from gateway.reload import ReloadRefused

    running = Config(listen=(ListenConfig("[::1]:0"),), limits=LimitsConfig(ipv6_prefix=64))
    server = Server(running, CountingBackend())
    [bound] = await nursery.start(server.serve)
    c = Client(await trio.open_tcp_stream("::1", bound.port))
    assert (await c.login()).startswith(b"+OK")
    with pytest.raises(ReloadRefused):
        server.reload(dataclasses.replace(running, limits=LimitsConfig(ipv6_prefix=128)))
    assert await c.cmd(b"QUIT") == b"+OK Logging out"
    assert await c.read_all() == b""
    with trio.fail_after(5):
        while server.active_sessions:
            await trio.sleep(0.01)
    again = Client(await trio.open_tcp_stream("::1", bound.port))  # still serving
    assert (await again.login()).startswith(b"+OK")
    server.drain()


async def test_a_reload_changing_a_listeners_tls_mode_is_refused_and_stls_keeps_working(
    nursery: trio.Nursery, tmp_path: object
) -> None:
    import ssl

    import trustme

    from gateway.reload import ReloadRefused

    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    from pathlib import Path

    base = Path(str(tmp_path))
    cert.private_key_pem.write_to_path(base / "key.pem")
    cert.cert_chain_pems[0].write_to_path(base / "cert.pem")
    plain = ListenConfig("127.0.0.1:0")
    stls = ListenConfig(
        "127.0.0.1:0", tls="starttls", cert_file=str(base / "cert.pem"), key_file=str(base / "key.pem")
    )
    running = Config(listen=(plain, stls))
    server = Server(running, CountingBackend())
    bounds = await nursery.start(server.serve)
    with pytest.raises(ReloadRefused):
        server.reload(dataclasses.replace(running, listen=(stls, plain)))  # order swapped
    with pytest.raises(ReloadRefused):
        server.reload(dataclasses.replace(running, listen=(plain, dataclasses.replace(stls, tls="implicit"))))
    c = Client(await trio.open_tcp_stream("127.0.0.1", bounds[1].port))
    await c.readline()
    assert await c.cmd(b"STLS") == b"+OK Begin TLS negotiation"
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    tls_stream = trio.SSLStream(c.stream, ctx, server_hostname="localhost")
    await tls_stream.do_handshake()
    secure = Client(tls_stream)
    assert (await secure.cmd(b"CAPA")).startswith(b"+OK")
    server.drain()


# ---------------------------------------------------------------- 6. PROXY headers grant no privilege


V2_SIG = b"\r\n\r\n\x00\r\nQUIT\n"
MAPPED_LOOPBACK = bytes(10) + b"\xff\xff" + bytes([127, 0, 0, 1])


@pytest.mark.parametrize(
    "header",
    [
        b"PROXY TCP4 127.0.0.1 127.0.0.1 5555 110\r\n",
        b"PROXY UNKNOWN\r\n",
        V2_SIG + b"\x21\x21\x00\x24" + MAPPED_LOOPBACK + MAPPED_LOOPBACK + b"\x15\xb3\x00\x6e",
        V2_SIG + b"\x20\x00\x00\x00",  # v2 LOCAL
    ],
    ids=["v1-loopback", "v1-unknown", "v2-mapped-loopback", "v2-local"],
)
async def test_a_proxied_client_never_gets_loopbacks_plaintext_permission(
    nursery: trio.Nursery, header: bytes
) -> None:
    proxied_listener = ListenConfig("127.0.0.1:0", proxy_protocol=True)
    server = Server(
        Config(
            server=dataclasses.replace(ServerConfig(), trusted_proxies=("127.0.0.1/32",)),
            listen=(proxied_listener,),
        ),
        CountingBackend(),
    )
    [bound] = await nursery.start(server.serve)
    c = Client(await trio.open_tcp_stream(bound.host, bound.port))
    await c.stream.send_all(header)
    assert (await c.readline()).startswith(b"+OK")
    assert (await c.cmd(b"USER alice")).startswith(b"-ERR [AUTH] Plaintext authentication disallowed")
    server.drain()


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_no_log_level_or_format_prints_a_traceback(fmt: str) -> None:
    import sys

    from gateway.logsetup import setup

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        setup("debug", fmt)
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
        line = root.handlers[0].format(record)
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
    assert "Traceback" not in line and "\n" not in line
    assert "RuntimeError: boom" in line
