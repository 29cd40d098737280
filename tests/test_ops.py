"""Operating the gateway: limits, throttling, the plaintext policy, PROXY headers, metrics over the admin
endpoint, SIGHUP reload, structured session lines and log redaction."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import poplib
import re
import signal
import ssl
from ipaddress import ip_address
from pathlib import Path

import httpx
import pytest
import trio
import trio.testing
import trustme

from gateway.admin import serve_admin
from gateway.backends.imap import ImapBackend, ImapSettings
from gateway.config import Config, LimitsConfig, ListenConfig, ServerConfig, UpstreamConfig
from gateway.logsetup import JsonFormatter
from gateway.proto.proxy import Address, format_v1, format_v2
from gateway.server import Bound, Server
from tests.fakes import FakeBackend
from tests.gwproc import spawn_serve
from tests.realservers import corpus
from tests.realservers.dovecot import Dovecot, MailUser
from tests.test_server import MSG1, MSG2, MSG3, Client
from tests.waits import until

SECRET = "S3cr3t-Hunter2-\u00e9"


def backend() -> FakeBackend:
    return FakeBackend(
        {"alice": "pw", "bob": "pw2"}, {"alice": {"m1": MSG1, "m2": MSG2, "m3": MSG3}, "bob": {}}
    )


def config(
    *,
    listen: tuple[ListenConfig, ...] = (ListenConfig("127.0.0.1:0"),),
    limits: LimitsConfig | None = None,
    **server: object,
) -> Config:
    return Config(
        server=dataclasses.replace(ServerConfig(), **server),  # type: ignore[arg-type]
        listen=listen,
        limits=limits or LimitsConfig(),
    )


class CountingBackend(FakeBackend):
    def __init__(self) -> None:
        b = backend()
        super().__init__(b.users, b.boxes)
        self.calls = 0

    def open_maildrop(self, login):  # type: ignore[no-untyped-def,override]
        self.calls += 1
        return super().open_maildrop(login)


# ---------------------------------------------------------------- limits


async def test_sessions_per_ip_are_limited(nursery: trio.Nursery) -> None:
    server = Server(config(limits=LimitsConfig(max_sessions_per_ip=1)), backend())
    [bound] = await nursery.start(server.serve)
    first = await Client.connect(bound)
    assert (await first.readline()).startswith(b"+OK")
    second = await Client.connect(bound)
    assert await second.readline() == b"-ERR [SYS/TEMP] Too many sessions from your address, try again later"
    assert await second.read_all() == b""
    assert server.metrics.sample("pop3_gateway_sessions_refused_total", limit="per-ip") == 1
    await first.cmd(b"QUIT")
    await first.read_all()
    third = await Client.connect(bound)
    assert (await third.readline()).startswith(b"+OK")
    server.drain()


async def test_sessions_per_account_are_limited(nursery: trio.Nursery) -> None:
    server = Server(config(in_use_lock=False, limits=LimitsConfig(max_sessions_per_account=1)), backend())
    [bound] = await nursery.start(server.serve)
    first = await Client.connect(bound)
    assert (await first.login()).startswith(b"+OK")
    second = await Client.connect(bound)
    assert await second.login() == b"-ERR [IN-USE] Too many sessions for this account"
    server.drain()


async def session(server: Server, nursery: trio.Nursery) -> Client:
    client_side, server_side = trio.testing.memory_stream_pair()
    nursery.start_soon(server.serve_stream, server_side)
    return Client(client_side)


async def test_failed_logins_slow_down_more_and_more(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    limits = LimitsConfig(auth_delay_base=2, auth_delay_max=7)
    server = Server(config(limits=limits, max_auth_failures=10), backend())
    c = await session(server, nursery)
    await c.readline()
    waits = []
    for _ in range(5):
        await c.cmd(b"USER alice")
        start = trio.current_time()
        assert await c.cmd(b"PASS wrong") == b"-ERR [AUTH] Authentication failed"
        waits.append(round(trio.current_time() - start, 1))
    assert waits == [0, 2, 4, 7, 7]
    caps = (await c.cmd(b"CAPA")) + await c.read_multiline()
    assert b"LOGIN-DELAY 7" in caps.split(b"\r\n")  # the throttle is advertised
    await c.cmd(b"USER alice")
    start = trio.current_time()
    assert (await c.cmd(b"PASS pw")).startswith(b"+OK")
    assert trio.current_time() - start >= 7  # the right password waits too: the delay reveals nothing


async def test_lockout_refuses_without_asking_the_upstream(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    be = CountingBackend()
    limits = LimitsConfig(auth_delay_base=0, lockout_after=2, lockout_duration=600)
    server = Server(config(limits=limits, max_auth_failures=10), be)
    c = await session(server, nursery)
    await c.readline()
    for _ in range(2):
        await c.cmd(b"USER alice")
        await c.cmd(b"PASS wrong")
    assert be.calls == 2
    await c.cmd(b"USER alice")
    assert await c.cmd(b"PASS pw") == b"-ERR [AUTH] Authentication failed"
    assert be.calls == 2  # locked out: the upstream was not asked
    assert server.metrics.sample("pop3_gateway_logins_total", result="locked-out") == 1
    await trio.sleep(601)  # past the lock-out (and past this session's login timeout)
    c2 = await session(server, nursery)
    await c2.readline()
    await c2.cmd(b"USER alice")
    assert (await c2.cmd(b"PASS pw")).startswith(b"+OK")


# ---------------------------------------------------------------- PROXY protocol and the plaintext policy


async def proxied_client(bound: Bound, header: bytes) -> Client:
    c = await Client.connect(bound)
    await c.stream.send_all(header)
    return c


V1 = format_v1(Address(ip_address("192.0.2.7"), 5555), Address(ip_address("192.0.2.1"), 110))


async def test_proxy_v1_gives_the_real_address_and_plaintext_is_refused_off_loopback(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    cfg = config(listen=(ListenConfig("127.0.0.1:0", proxy_protocol=True),), trusted_proxies=("127.0.0.0/8",))
    server = Server(cfg, backend())
    [bound] = await nursery.start(server.serve)
    c = await proxied_client(bound, V1)
    assert (await c.readline()).startswith(b"+OK")
    caps = (await c.cmd(b"CAPA")) + await c.read_multiline()
    assert b"USER" not in caps.split(b"\r\n") and b"SASL PLAIN LOGIN" not in caps
    assert (await c.cmd(b"USER alice")).startswith(b"-ERR [AUTH] Plaintext authentication disallowed")
    await c.cmd(b"QUIT")
    await c.read_all()
    await until(lambda: server.active_sessions == 0)
    assert "peer=192.0.2.7:5555" in caplog.text
    server.drain()


async def test_plaintext_networks_let_legacy_lan_devices_in(nursery: trio.Nursery) -> None:
    cfg = config(
        listen=(ListenConfig("127.0.0.1:0", proxy_protocol=True),),
        trusted_proxies=("127.0.0.1/32",),
        plaintext_auth_networks=("192.0.2.0/24",),
    )
    server = Server(cfg, backend())
    [bound] = await nursery.start(server.serve)
    header = format_v2(Address(ip_address("192.0.2.9"), 4000), Address(ip_address("192.0.2.1"), 110))
    c = await proxied_client(bound, header)
    assert (await c.login()).startswith(b"+OK Logged in")
    other = await proxied_client(
        bound, format_v1(Address(ip_address("198.51.100.1"), 1), Address(ip_address("192.0.2.1"), 110))
    )
    await other.readline()
    assert (await other.cmd(b"USER alice")).startswith(b"-ERR [AUTH]")  # not in the allowed network
    server.drain()


@pytest.mark.parametrize(
    ("trusted", "header"),
    [
        (("10.0.0.0/8",), V1),  # the peer is not a trusted proxy
        (("127.0.0.0/8",), b"PROXY TCP4 not-an-ip 1.2.3.4 1 2\r\n"),
        (("127.0.0.0/8",), b"USER alice\r\n"),  # no header at all
    ],
)
async def test_bad_or_untrusted_proxy_headers_are_closed_without_a_greeting(
    nursery: trio.Nursery, trusted: tuple[str, ...], header: bytes
) -> None:
    cfg = config(listen=(ListenConfig("127.0.0.1:0", proxy_protocol=True),), trusted_proxies=trusted)
    server = Server(cfg, backend())
    [bound] = await nursery.start(server.serve)
    c = await Client.connect(bound)
    with trio.move_on_after(5):
        with contextlib.suppress(trio.BrokenResourceError):
            await c.stream.send_all(header)
    assert await c.read_all() == b""
    assert server.metrics.sample("pop3_gateway_errors_total", kind="proxy-header") == 1
    server.drain()


async def test_proxy_header_before_implicit_tls(nursery: trio.Nursery, tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "c.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "k.pem"))
    lc = ListenConfig(
        "127.0.0.1:0", "implicit", str(tmp_path / "c.pem"), str(tmp_path / "k.pem"), proxy_protocol=True
    )
    server = Server(config(listen=(lc,), trusted_proxies=("127.0.0.0/8",)), backend())
    [bound] = await nursery.start(server.serve)
    raw = await trio.open_tcp_stream(bound.host, bound.port)
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    await raw.send_all(V1)
    tls = trio.SSLStream(raw, ctx, server_hostname="localhost")
    c = Client(tls)
    assert (await c.readline()).startswith(b"+OK")
    assert (await c.cmd(b"USER alice")).startswith(b"+OK")  # TLS: passwords allowed from anywhere
    assert (await c.cmd(b"PASS pw")).startswith(b"+OK")
    server.drain()


# ---------------------------------------------------------------- metrics and the admin endpoint


async def test_metrics_change_as_sessions_run_and_admin_answers(nursery: trio.Nursery) -> None:
    server = Server(config(), backend())
    [bound] = await nursery.start(server.serve)
    [(host, port)] = await nursery.start(
        functools.partial(serve_admin, "127.0.0.1:0", server.metrics, server.ready)
    )
    base = f"http://{host}:{port}"
    async with httpx.AsyncClient() as http:
        assert (await http.get(base + "/healthz")).status_code == 200
        ready = await http.get(base + "/readyz")
        assert ready.status_code == 200, ready.text
        before = (await http.get(base + "/metrics")).text
        assert "pop3_gateway_sessions_total 0.0" in before

        def run() -> None:
            p = poplib.POP3(bound.host, bound.port, timeout=10)
            p.user("alice")
            p.pass_("pw")
            p.retr(1)
            p.quit()
            q = poplib.POP3(bound.host, bound.port, timeout=10)
            q.user("alice")
            with contextlib.suppress(poplib.error_proto):
                q.pass_("bad")
            q.quit()

        await trio.to_thread.run_sync(run)
        await until(lambda: server.active_sessions == 0)
        after = (await http.get(base + "/metrics")).text
        assert "pop3_gateway_sessions_total 2.0" in after
        assert 'pop3_gateway_logins_total{result="ok"} 1.0' in after
        assert 'pop3_gateway_logins_total{result="auth"} 1.0' in after
        assert 'pop3_gateway_commands_total{verb="RETR"} 1.0' in after
        assert (server.metrics.sample("pop3_gateway_sent_bytes_total") or 0) > len(MSG1)
        server.drain()  # readiness fails at once: draining is set by drain() itself
        not_ready = await http.get(base + "/readyz")
        assert not_ready.status_code == 503
        assert "draining" in not_ready.text


# ---------------------------------------------------------------- structured session lines and redaction


async def test_session_end_is_one_structured_line(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    server = Server(config(), backend())
    [bound] = await nursery.start(server.serve)
    c = await Client.connect(bound)
    await c.login()
    await c.cmd(b"RETR 1")
    await c.read_multiline()
    await c.cmd(b"TOP 2 0")
    await c.read_multiline()
    await c.cmd(b"DELE 3")
    await c.cmd(b"QUIT")
    await c.read_all()
    await until(lambda: any(getattr(r, "fields", None) for r in caplog.records))
    [record] = [r for r in caplog.records if getattr(r, "fields", None)]
    fields = record.fields  # type: ignore[attr-defined]
    assert fields["user"] == "alice" and fields["result"] == "quit"
    assert (fields["retr"], fields["retr_octets"], fields["top"], fields["dele"]) == (1, len(MSG1), 1, 1)
    assert fields["dele_octets"] == len(MSG3) + 4
    line = json.loads(JsonFormatter().format(record))
    assert line["event"] == "session_end" and line["retr_octets"] == len(MSG1) and "duration" in line
    server.drain()


def _secret_forms(secret: str, user: str) -> list[str]:
    raw = secret.encode()
    forms = [
        secret,
        base64.b64encode(raw).decode(),
        base64.b64encode(b"\0" + user.encode() + b"\0" + raw).decode(),
    ]
    forms.append(repr(secret)[1:-1])
    return forms


async def test_passwords_tokens_and_auth_payloads_never_reach_logs_or_reprs(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture, dovecot: Dovecot, mail_user: MailUser
) -> None:
    caplog.set_level(logging.DEBUG)
    user = MailUser(mail_user.name + "r", SECRET)
    dovecot.add_user(user.name, user.password)
    dovecot.append(user.name, user.password, corpus.sized_messages(2, 500))
    cfg = config()
    server = Server(cfg, ImapBackend(ImapSettings(dovecot.host, dovecot.imap_port, "none")))
    [bound] = await nursery.start(server.serve)

    def sessions() -> None:
        for how in ("user", "plain", "login", "bad"):
            p = poplib.POP3(bound.host, bound.port, timeout=30)
            try:
                if how == "user":
                    p.user(user.name)
                    p.pass_(user.password)
                elif how == "plain":
                    payload = base64.b64encode(b"\0" + user.name.encode() + b"\0" + SECRET.encode()).decode()
                    p._shortcmd("AUTH PLAIN " + payload)  # type: ignore[attr-defined]
                elif how == "login":
                    p._putcmd("AUTH LOGIN")  # type: ignore[attr-defined]
                    p._getline()  # type: ignore[attr-defined]
                    p._putcmd(base64.b64encode(user.name.encode()).decode())  # type: ignore[attr-defined]
                    p._getline()  # type: ignore[attr-defined]
                    p._shortcmd(base64.b64encode(SECRET.encode()).decode())  # type: ignore[attr-defined]
                else:
                    p.user(user.name)
                    with contextlib.suppress(poplib.error_proto):
                        p.pass_(SECRET + "x")
                    p._shortcmd("APOP " + user.name + " " + hashlib.md5(SECRET.encode()).hexdigest())  # type: ignore[attr-defined]
            except poplib.error_proto:
                pass
            p.quit()

    await trio.to_thread.run_sync(sessions)
    await until(lambda: server.active_sessions == 0)
    token_cfg = dataclasses.replace(cfg, upstream=UpstreamConfig(url="jmap+https://x/", token=SECRET))
    text = caplog.text + repr(token_cfg) + repr(server.config)
    assert "login peer=" in caplog.text  # the sessions really logged
    for form in _secret_forms(SECRET, user.name):
        assert form not in text
    server.drain()


# ---------------------------------------------------------------- SIGHUP


def _write_cert(ca: trustme.CA, d: Path) -> None:
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(d / "cert.pem"))
    cert.private_key_pem.write_to_path(str(d / "key.pem"))


def test_sighup_reloads_certificates_without_dropping_sessions(tmp_path: Path) -> None:
    ca1, ca2 = trustme.CA(), trustme.CA()
    _write_cert(ca1, tmp_path)
    conf = tmp_path / "gw.toml"
    conf.write_text(
        f'[server]\nstate_dir = "{tmp_path / "state"}"\n\n[admin]\naddress = "127.0.0.1:0"\n\n'
        f'[[listen]]\naddress = "127.0.0.1:0"\ntls = "implicit"\n'
        f'cert_file = "{tmp_path / "cert.pem"}"\nkey_file = "{tmp_path / "key.pem"}"\n'
    )
    gw = spawn_serve("--config", str(conf))
    port, admin = gw.port, gw.admin_port()

    def ctx(ca: trustme.CA) -> ssl.SSLContext:
        c = ssl.create_default_context()
        ca.configure_trust(c)
        return c

    try:
        old = poplib.POP3_SSL("127.0.0.1", port, context=ctx(ca1), timeout=10)
        password = (tmp_path / "state" / "demo-password").read_text().strip()
        old.user("demo")
        old.pass_(password)
        _write_cert(ca2, tmp_path)
        mark = gw.lines_so_far()
        gw.proc.send_signal(signal.SIGHUP)
        gw.wait_for_line(re.compile(rb"SIGHUP: configuration and TLS certificates reloaded"), after=mark)
        assert gw.proc.poll() is None
        new = poplib.POP3_SSL("127.0.0.1", port, context=ctx(ca2), timeout=10)  # the new certificate
        new.quit()
        with pytest.raises(ssl.SSLError):
            poplib.POP3_SSL("127.0.0.1", port, context=ctx(ca1), timeout=10)
        assert old.stat()[0] == 3  # the session from before the reload is still there
        old.quit()
        conf.write_text("[server]\nnot_a_key = 1\n")  # a broken file: logged, the old settings stay
        mark = gw.lines_so_far()
        gw.proc.send_signal(signal.SIGHUP)
        gw.wait_for_line(re.compile(rb"SIGHUP: reload failed, keeping the running configuration"), after=mark)
        assert gw.proc.poll() is None
        health = httpx.get(f"http://127.0.0.1:{admin}/healthz", timeout=5)
        assert health.status_code == 200
        assert gw.stop(timeout=30) == 0
    finally:
        gw.stop()
    err = gw.stderr_text()
    assert "SIGHUP: configuration and TLS certificates reloaded" in err
    assert "SIGHUP: reload failed, keeping the running configuration" in err
