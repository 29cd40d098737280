"""The token layer and `pop3-gateway oauth` against a real authorization server (panva's oidc-provider).

The `oidc` fixture rotates refresh tokens on every use and revokes the whole grant when a rotated-out
refresh token is replayed, as Microsoft's and most providers' reuse detection does: a gateway that loses
a rotated token, or two processes that refresh with the same one, fail here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from gateway import config as cfg
from gateway.backends.base import TempFailure
from gateway.metrics import Metrics
from gateway.oauth2 import flows, providers, tokens, vault
from tests.realservers.oidc import APP_SCOPE, USER_SCOPE, OAuthError, OidcProvider
from tests.tcpproxy import RecordingProxy

pytestmark = [pytest.mark.realserver, pytest.mark.timeout(90)]

ROOT = Path(__file__).resolve().parent.parent
PROVIDER = "test"


def write_config(tmp_path: Path, oidc: OidcProvider) -> Path:
    secret = tmp_path / "client-secret"
    secret.write_text(oidc.client.client_secret + "\n")
    secret.chmod(0o600)
    path = tmp_path / "gateway.toml"
    path.write_text(
        textwrap.dedent(f"""
        [server]
        state_dir = "{tmp_path / "state"}"

        [oauth2]
        key_file = "{tmp_path / "token.key"}"

        [oauth2.providers.{PROVIDER}]
        kind = "oidc"
        issuer = "{oidc.issuer}"
        client_id = "{oidc.client.client_id}"
        client_secret_file = "{secret}"
        scope = "{USER_SCOPE}"
        app_scope = "{APP_SCOPE}"
        flow = "device"
        """)
    )
    return path


def gateway(*args: str, **kw: object) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop(vault.ENV_VAR, None)
    return subprocess.Popen(
        [sys.executable, "-m", "gateway", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=env,
        **kw,  # type: ignore[call-overload]
    )


def run_gateway(*args: str) -> subprocess.CompletedProcess[str]:
    process = gateway(*args)
    out, err = process.communicate(timeout=60)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


@pytest.fixture
def setup(tmp_path: Path, oidc: OidcProvider) -> Iterator[tuple[Path, cfg.Config, vault.Keyring]]:
    path = write_config(tmp_path, oidc)
    done = run_gateway("oauth", "keygen", "--config", str(path))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "token.key").stat().st_mode & 0o777 == 0o600
    config = cfg.load(path)
    yield path, config, tokens.load_keyring(config, environ={})


def store_expired(
    config: cfg.Config, keys: vault.Keyring, oidc: OidcProvider, account: str
) -> flows.TokenSet:
    """A device-flow grant for `account` from the provider, stored as if its access token had expired."""
    got = oidc.device_login("alice")
    token = flows.TokenSet(got.access_token, "Bearer", time.time() - 1, got.refresh_token, got.scope)
    tokens.token_vault(config, keys).store_sync(account, token, PROVIDER, "device")
    return token


def is_jwt(token: str) -> bool:
    """The provider's access tokens are JWTs (three base64url parts); a wrong string is not."""
    return token.count(".") == 2 and all(part for part in token.split("."))


def fingerprint(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()[:16]


def test_device_login_through_the_cli_approved_at_the_provider_then_status(
    setup: tuple[Path, cfg.Config, vault.Keyring], oidc: OidcProvider
) -> None:
    path, config, keys = setup
    process = gateway("oauth", "login", "--account", "Alice", "--config", str(path))
    assert process.stdout is not None
    lines: list[str] = []
    code = None
    while code is None:
        line = process.stdout.readline()
        assert line, f"no user code printed: {lines} {process.stderr.read() if process.stderr else ''}"
        lines.append(line)
        if "enter the code:" in line:
            code = line.rsplit(":", 1)[1].strip()
    assert any(oidc.issuer + "/device" in line for line in lines)
    oidc.approve_device(code, "alice")
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert "account alice: authorised with provider test (device)" in out
    stored = tokens.token_vault(config, keys).load_sync("alice")  # the name normalised as logins are
    assert stored is not None and stored.token.refresh_token and stored.flow == "device"
    record = tokens.token_vault(config, keys).path("alice")
    assert record.stat().st_mode & 0o777 == 0o600
    assert stored.token.access_token.encode() not in record.read_bytes()

    status = run_gateway("oauth", "status", "--account", "alice", "--config", str(path))
    assert status.returncode == 0, status.stderr
    row = status.stdout.splitlines()[1].split()
    assert row[:3] == ["alice", "test", "device"]
    assert row[3] in ("ok", "expiring")  # the test provider's tokens live 10 s: refreshed at half-life
    for secret in (stored.token.access_token, stored.token.refresh_token, oidc.client.client_secret):
        assert secret not in status.stdout + status.stderr + out + err


async def test_a_refresh_against_the_provider_stores_the_rotated_token_and_the_old_one_is_dead(
    setup: tuple[Path, cfg.Config, vault.Keyring], oidc: OidcProvider, caplog: pytest.LogCaptureFixture
) -> None:
    _, config, keys = setup
    old = store_expired(config, keys, oidc, "alice")
    metrics = Metrics(process=False)
    async with tokens.open_token_source(config, keys=keys, metrics=metrics) as source:
        access = await source.access_token("alice", PROVIDER)
        again = await source.access_token("alice", PROVIDER)  # fresh now: no second refresh
    assert access == again != old.access_token
    assert is_jwt(access)
    stored = tokens.token_vault(config, keys).load_sync("alice")
    assert stored is not None and stored.token.access_token == access
    assert stored.token.refresh_token and stored.token.refresh_token != old.refresh_token
    assert metrics.sample("pop3_gateway_oauth2_refresh_total", outcome="ok") == 1
    assert old.refresh_token is not None
    with pytest.raises(OAuthError) as replay:
        oidc.refresh(old.refresh_token)
    assert replay.value.error == "invalid_grant"
    for secret in (access, stored.token.refresh_token, old.refresh_token):
        assert secret not in caplog.text


async def test_a_revoked_grant_is_reauthorisation_with_the_log_line_and_the_record_kept(
    setup: tuple[Path, cfg.Config, vault.Keyring], oidc: OidcProvider, caplog: pytest.LogCaptureFixture
) -> None:
    _, config, keys = setup
    old = store_expired(config, keys, oidc, "alice")
    assert old.refresh_token is not None
    oidc.revoke(old.refresh_token)
    metrics = Metrics(process=False)
    async with tokens.open_token_source(config, keys=keys, metrics=metrics) as source:
        with pytest.raises(tokens.ReauthorizationNeeded):
            await source.access_token("alice", PROVIDER)
    assert metrics.sample("pop3_gateway_oauth2_refresh_total", outcome="invalid_grant") == 1
    assert (
        "oauth2: account alice needs re-authorisation (invalid_grant); "
        "run: pop3-gateway oauth login --account alice"
    ) in caplog.text
    assert tokens.token_vault(config, keys).load_sync("alice") is not None


RACER = """
import hashlib, pathlib, sys, time, trio
from gateway import config as cfg
from gateway.oauth2 import tokens
go = pathlib.Path(sys.argv[2])
while not go.exists():
    time.sleep(0.01)
async def main():
    config = cfg.load(sys.argv[1])
    async with tokens.open_token_source(config) as source:
        token = await source.access_token("alice", "test")
    print(hashlib.sha256(token.encode()).hexdigest()[:16])
trio.run(main)
"""


def test_two_processes_refreshing_one_account_at_once_leave_one_valid_token(
    setup: tuple[Path, cfg.Config, vault.Keyring], oidc: OidcProvider, tmp_path: Path
) -> None:
    path, config, keys = setup
    store_expired(config, keys, oidc, "alice")
    go = tmp_path / "go"
    racers = [gateway_script(RACER, str(path), str(go)) for _ in range(2)]
    time.sleep(1.0)  # both interpreters up and waiting
    go.touch()
    results = [r.communicate(timeout=60) for r in racers]
    assert [r.returncode for r in racers] == [0, 0], [err for _, err in results]
    printed = {out.strip() for out, _ in results}
    stored = tokens.token_vault(config, keys).load_sync("alice")
    assert stored is not None and printed == {fingerprint(stored.token.access_token)}
    # One refresh happened: a second one with the same refresh token would have been a replay, and the
    # provider would have revoked the grant. The stored refresh token still works.
    assert stored.token.refresh_token is not None
    assert oidc.refresh(stored.token.refresh_token).access_token


def gateway_script(script: str, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop(vault.ENV_VAR, None)
    return subprocess.Popen(
        [sys.executable, "-c", script, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


async def test_client_credentials_login_through_the_cli_then_renewed_when_expired(
    setup: tuple[Path, cfg.Config, vault.Keyring], oidc: OidcProvider
) -> None:
    path, config, keys = setup
    done = await trio.to_thread.run_sync(
        run_gateway,
        "oauth",
        "login",
        "--account",
        "scanner",
        "--flow",
        "client-credentials",
        "--config",
        str(path),
    )
    assert done.returncode == 0, done.stderr
    stored = tokens.token_vault(config, keys).load_sync("scanner")
    assert stored is not None and stored.flow == "client-credentials" and stored.token.refresh_token is None
    assert is_jwt(stored.token.access_token)
    status = await trio.to_thread.run_sync(
        run_gateway, "oauth", "status", "--account", "scanner", "--config", str(path)
    )
    assert status.stdout.splitlines()[1].split()[:3] == ["scanner", "test", "client-credentials"]
    later = time.time() + 3600  # past the app token's expiry
    metrics = Metrics(process=False)
    async with flows.open_http() as http:
        registry = tokens.ProviderRegistry.from_config(config.oauth2, http, clock=lambda: later)
        source = tokens.TokenSource(
            tokens.token_vault(config, keys), registry, metrics, clock=lambda: later, margin=600
        )
        renewed = await source.access_token("scanner", PROVIDER)
    assert renewed != stored.token.access_token
    assert is_jwt(renewed)
    assert metrics.sample("pop3_gateway_oauth2_refresh_total", outcome="ok") == 1


async def test_a_stopped_token_endpoint_is_temp_failure_keeps_the_token_and_works_when_back(
    setup: tuple[Path, cfg.Config, vault.Keyring], oidc: OidcProvider, caplog: pytest.LogCaptureFixture
) -> None:
    _, config, keys = setup
    old = store_expired(config, keys, oidc, "alice")
    record = tokens.token_vault(config, keys).path("alice")
    before = record.read_bytes()
    proxy = RecordingProxy(oidc.host, oidc.port)
    metrics = Metrics(process=False)
    async with trio.open_nursery() as nursery, flows.open_http() as http:
        port = await nursery.start(proxy.serve)
        real = await providers.discover(http, oidc.issuer, scope=USER_SCOPE)
        token_url = oidc.token_endpoint.replace(f":{oidc.port}/", f":{port}/")
        profile = dataclasses.replace(real, endpoints=dataclasses.replace(real.endpoints, token=token_url))
        client = flows.OAuth2Client(
            profile.endpoints,
            oidc.client.client_id,
            oidc.client.client_secret,
            http=http,
            auth_method=profile.auth_method,
        )
        handle = tokens.ProviderHandle(PROVIDER, profile, client, USER_SCOPE, APP_SCOPE, "device", "")
        source = tokens.TokenSource(tokens.token_vault(config, keys), Static(handle), metrics)

        proxy.target = (oidc.host, closed_port())  # the token endpoint is down
        with pytest.raises(TempFailure):
            await source.access_token("alice", PROVIDER)
        assert record.read_bytes() == before  # nothing wiped, nothing rewritten
        assert metrics.sample("pop3_gateway_oauth2_refresh_total", outcome="temporary") == 1

        proxy.target = (oidc.host, oidc.port)  # back
        access = await source.access_token("alice", PROVIDER)
        assert access != old.access_token and is_jwt(access)
        assert metrics.sample("pop3_gateway_oauth2_refresh_total", outcome="ok") == 1
        nursery.cancel_scope.cancel()
    assert "refresh failed for now" in caplog.text


class Static:
    def __init__(self, handle: tokens.ProviderHandle) -> None:
        self.handle = handle

    async def get(self, name: str) -> tokens.ProviderHandle:
        assert name == self.handle.name
        return self.handle


def closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed once the with ends: nothing listens there


def test_logout_revokes_the_grant_at_the_provider_and_deletes_the_token(
    setup: tuple[Path, cfg.Config, vault.Keyring], oidc: OidcProvider
) -> None:
    path, config, keys = setup
    token = store_expired(config, keys, oidc, "alice")
    done = run_gateway("oauth", "logout", "--account", "alice", "--config", str(path))
    assert done.returncode == 0, done.stderr
    assert "grant revoked at provider test" in done.stdout
    assert tokens.token_vault(config, keys).load_sync("alice") is None
    assert token.refresh_token is not None
    with pytest.raises(OAuthError) as revoked:
        oidc.refresh(token.refresh_token)
    assert revoked.value.error == "invalid_grant"
