"""TokenSource and SecretVault against a scripted token endpoint (httpx.MockTransport) and real files.

What they promise: a fresh token costs no request; a due one is refreshed once however many logins ask at
once; the rotated refresh token is on disk before the new access token is handed out; invalid_grant is
`ReauthorizationNeeded` with a metric and a log line naming the repair command; an endpoint that is down
or slow is `TempFailure` and the record stays as it was. No token ever reaches a log line.
"""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from gateway.backends.base import AuthFailed, PermFailure, TempFailure
from gateway.metrics import Metrics
from gateway.oauth2 import flows, providers, tokens, vault

NOW = 1_700_000_000.0
ACCESS, REFRESH = "at-old-0123456789", "rt-old-abcdef"
NEW_ACCESS, NEW_REFRESH = "at-new-9876543210", "rt-new-fedcba"
SECRET = "client-secret-value"
ENDPOINTS = flows.Endpoints(token="https://as.example/token", revocation="https://as.example/revoke")
PROFILE = providers.Provider("p", ENDPOINTS, "mail offline_access", "mail.app")


class FakeAS:
    def __init__(self) -> None:
        self.script: list[httpx.Response | Exception | Callable[[], Any]] = []
        self.forms: list[dict[str, str]] = []

    async def handler(self, request: httpx.Request) -> httpx.Response:
        self.forms.append(dict(urllib.parse.parse_qsl(request.content.decode())))
        answer = self.script.pop(0) if self.script else granted()
        if isinstance(answer, Exception):
            raise answer
        if callable(answer):
            result = answer()
            return await result if hasattr(result, "__await__") else result  # type: ignore[no-any-return]
        return answer


def granted(
    access: str = NEW_ACCESS, refresh: str | None = NEW_REFRESH, expires_in: int = 3600
) -> httpx.Response:
    doc: dict[str, Any] = {"access_token": access, "token_type": "Bearer", "expires_in": expires_in}
    if refresh:
        doc["refresh_token"] = refresh
    return httpx.Response(200, json=doc)


class Static:
    def __init__(self, handle: tokens.ProviderHandle) -> None:
        self.handle = handle

    async def get(self, name: str) -> tokens.ProviderHandle:
        if name != self.handle.name:
            raise tokens.UnknownProvider(name)
        return self.handle


class World:
    def __init__(self, tmp_path: Path, clock: list[float]) -> None:
        self.fake = FakeAS()
        self.clock = clock
        self.keys = vault.Keyring.parse([vault.new_key_entry()], "test")
        self.vault = vault.TokenVault(tmp_path / "oauth2", self.keys, clock=lambda: self.clock[0])
        self.metrics = Metrics(process=False)
        http = httpx.AsyncClient(transport=httpx.MockTransport(self.fake.handler))
        client = flows.OAuth2Client(ENDPOINTS, "gw", SECRET, http=http, clock=lambda: self.clock[0])
        handle = tokens.ProviderHandle("p", PROFILE, client, PROFILE.user_scope, "mail.app", "device", "")
        self.source = tokens.TokenSource(
            self.vault, Static(handle), self.metrics, clock=lambda: self.clock[0], margin=600, timeout=0.5
        )

    def store(self, expires_in: float, refresh: str | None = REFRESH, flow: str = "device") -> None:
        token = flows.TokenSet(ACCESS, "Bearer", self.clock[0] + expires_in, refresh)
        self.vault.store_sync("alice", token, "p", flow)

    def stored(self) -> vault.StoredToken:
        got = self.vault.load_sync("alice")
        assert got is not None
        return got

    def count(self, outcome: str) -> float | None:
        return self.metrics.sample("pop3_gateway_oauth2_refresh_total", outcome=outcome)


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path, [NOW])


async def test_a_fresh_token_is_returned_without_asking_the_provider(world: World) -> None:
    world.store(expires_in=3600)
    assert await world.source.access_token("alice", "p") == ACCESS
    assert world.fake.forms == []


async def test_a_token_within_the_margin_is_refreshed_and_the_rotated_one_stored(world: World) -> None:
    world.store(expires_in=3600)
    world.clock[0] += 3600 - 599  # inside the 600 s margin
    assert await world.source.access_token("alice", "p") == NEW_ACCESS
    assert world.fake.forms == [{"grant_type": "refresh_token", "refresh_token": REFRESH}]
    stored = world.stored()
    assert (stored.token.access_token, stored.token.refresh_token) == (NEW_ACCESS, NEW_REFRESH)
    assert stored.flow == "device" and stored.provider == "p"
    assert world.count("ok") == 1


async def test_a_short_lived_token_is_refreshed_at_half_life_not_at_every_login(world: World) -> None:
    world.store(expires_in=300)  # shorter than the margin
    world.clock[0] += 100
    assert await world.source.access_token("alice", "p") == ACCESS
    world.clock[0] += 51
    assert await world.source.access_token("alice", "p") == NEW_ACCESS


async def test_the_rotated_token_is_stored_before_the_access_token_is_handed_out(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    world.store(expires_in=-1)

    def full_disk(*_args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(world.vault, "store_sync", full_disk)
    with pytest.raises(TempFailure):
        await world.source.access_token("alice", "p")  # never NEW_ACCESS without NEW_REFRESH on disk
    monkeypatch.undo()

    seen: list[str | None] = []
    original = world.vault.store

    async def watching(account: str, token: flows.TokenSet, provider: str = "", flow: str = "") -> None:
        await original(account, token, provider, flow)
        seen.append(world.stored().token.refresh_token)

    monkeypatch.setattr(world.vault, "store", watching)
    world.fake.script.append(granted(refresh="rt-newer"))
    assert await world.source.access_token("alice", "p") == NEW_ACCESS
    assert seen == ["rt-newer"]


async def test_many_logins_at_once_refresh_once(world: World) -> None:
    world.store(expires_in=-1)

    async def slow() -> httpx.Response:
        await trio.sleep(0.05)
        return granted()

    world.fake.script.append(slow)
    got: list[str] = []
    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(lambda: _append(got, world.source.access_token("alice", "p")))
    assert got == [NEW_ACCESS] * 5
    assert len(world.fake.forms) == 1
    assert world.count("ok") == 1


async def _append(out: list[str], call: Any) -> None:
    out.append(await call)


async def test_invalid_grant_is_reauthorisation_with_metric_and_the_log_line(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    world.store(expires_in=-1)
    before = world.vault.path("alice").read_bytes()
    world.fake.script.append(httpx.Response(400, json={"error": "invalid_grant"}))
    with pytest.raises(tokens.ReauthorizationNeeded) as failure:
        await world.source.access_token("alice", "p")
    assert isinstance(failure.value, AuthFailed)
    assert world.count("invalid_grant") == 1
    assert (
        "oauth2: account alice needs re-authorisation (invalid_grant); "
        "run: pop3-gateway oauth login --account alice"
    ) in caplog.text
    assert world.vault.path("alice").read_bytes() == before  # kept for `oauth status`
    assert REFRESH not in caplog.text and REFRESH not in str(failure.value)


@pytest.mark.parametrize(
    "answer",
    [httpx.Response(503), httpx.ConnectError("refused"), httpx.Response(200, text="<html>proxy</html>")],
    ids=["503", "connect", "html"],
)
async def test_an_endpoint_that_is_down_is_temp_failure_and_the_record_is_untouched(
    world: World, answer: Any, caplog: pytest.LogCaptureFixture
) -> None:
    world.store(expires_in=-1)
    before = world.vault.path("alice").read_bytes()
    world.fake.script.append(answer)
    with pytest.raises(TempFailure):
        await world.source.access_token("alice", "p")
    assert world.vault.path("alice").read_bytes() == before
    assert world.count("temporary") == 1
    assert "the stored token is kept" in caplog.text


async def test_a_slow_endpoint_is_cut_at_token_timeout(world: World) -> None:
    world.store(expires_in=-1)

    async def hang() -> httpx.Response:
        await trio.sleep(30)
        return granted()

    world.fake.script.append(hang)
    with trio.fail_after(5):
        with pytest.raises(TempFailure):
            await world.source.access_token("alice", "p")
    assert world.stored().token.refresh_token == REFRESH


async def test_a_failing_refresh_still_serves_a_token_that_has_not_expired(world: World) -> None:
    world.store(expires_in=300)
    world.clock[0] += 200  # due (half-life), not expired
    world.fake.script.append(httpx.Response(503))
    assert await world.source.access_token("alice", "p") == ACCESS
    world.fake.script.append(httpx.Response(503))
    with pytest.raises(TempFailure):  # the upstream refused it: no use handing it out again
        await world.source.access_token("alice", "p", force=True)


async def test_force_refreshes_a_fresh_token_once_for_logins_refused_together(world: World) -> None:
    world.store(expires_in=3600)
    assert await world.source.access_token("alice", "p", force=True) == NEW_ACCESS
    assert len(world.fake.forms) == 1

    async def slow() -> httpx.Response:
        await trio.sleep(0.05)
        return granted(access="at-forced", refresh="rt-forced")

    world.fake.script.append(slow)
    got: list[str] = []
    async with trio.open_nursery() as nursery:
        for _ in range(3):  # all saw NEW_ACCESS refused; the first refresher replaces it for all
            nursery.start_soon(lambda: _append(got, world.source.access_token("alice", "p", force=True)))
    assert got == ["at-forced"] * 3
    assert len(world.fake.forms) == 2


async def test_an_app_only_account_gets_a_new_client_credentials_grant(world: World) -> None:
    world.store(expires_in=-1, refresh=None, flow="client-credentials")
    world.fake.script.append(granted(refresh=None))
    assert await world.source.access_token("alice", "p") == NEW_ACCESS
    assert world.fake.forms == [{"grant_type": "client_credentials", "scope": "mail.app"}]
    assert world.stored().flow == "client-credentials"


async def test_a_user_token_without_refresh_token_needs_reauthorisation_not_app_access(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    world.store(expires_in=-1, refresh=None, flow="device")
    with pytest.raises(tokens.ReauthorizationNeeded):
        await world.source.access_token("alice", "p")
    assert world.fake.forms == []
    assert "run: pop3-gateway oauth login --account alice" in caplog.text


async def test_no_record_or_another_providers_record_needs_reauthorisation(world: World) -> None:
    with pytest.raises(tokens.ReauthorizationNeeded):
        await world.source.access_token("alice", "p")
    world.store(expires_in=3600)
    with pytest.raises(tokens.ReauthorizationNeeded):
        await world.source.access_token("alice", "other")


async def test_an_invalid_client_is_perm_failure_counted_refused(world: World) -> None:
    world.store(expires_in=-1)
    world.fake.script.append(httpx.Response(401, json={"error": "invalid_client"}))
    with pytest.raises(PermFailure):
        await world.source.access_token("alice", "p")
    assert world.count("refused") == 1
    assert world.stored().token.refresh_token == REFRESH


async def test_a_record_under_an_unknown_key_is_perm_failure(world: World, tmp_path: Path) -> None:
    world.store(expires_in=3600)
    other = vault.Keyring.parse([vault.new_key_entry("k2")], "test")
    world.source.vault = vault.TokenVault(tmp_path / "oauth2", other)
    with pytest.raises(PermFailure):
        await world.source.access_token("alice", "p")


async def test_no_token_or_secret_in_any_log_line_or_repr(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    world.store(expires_in=-1)
    await world.source.access_token("alice", "p")
    world.fake.script.append(httpx.Response(400, json={"error": "invalid_grant"}))
    with pytest.raises(tokens.ReauthorizationNeeded):
        await world.source.access_token("alice", "p", force=True)
    shown = caplog.text + repr(world.source) + repr(world.stored()) + repr(world.source.providers)
    for secret in (ACCESS, REFRESH, NEW_ACCESS, NEW_REFRESH, SECRET):
        assert secret not in shown


# ---------------------------------------------------------------- SecretVault


@pytest.fixture
def secrets_vault(tmp_path: Path) -> tokens.SecretVault:
    return tokens.SecretVault(tmp_path / "secrets", vault.Keyring.parse([vault.new_key_entry()], "t"))


async def test_secrets_round_trip_sealed_in_private_files(secrets_vault: tokens.SecretVault) -> None:
    await secrets_vault.put("alice", "password", "upstream-pw-1")
    await secrets_vault.put("alice", "bearer", "jmap-token-2")
    assert await secrets_vault.get_password("alice") == "upstream-pw-1"
    assert await secrets_vault.get_bearer("alice") == "jmap-token-2"
    assert await secrets_vault.get("bob", "password") is None
    path = secrets_vault.path("alice", "password")
    assert path.stat().st_mode & 0o777 == 0o600
    assert secrets_vault.directory.stat().st_mode & 0o777 == 0o700
    assert b"upstream-pw-1" not in path.read_bytes()
    assert "upstream-pw-1" not in repr(secrets_vault) + repr(secrets_vault.load_sync("alice", "password"))
    await secrets_vault.put("alice", "password", "upstream-pw-3")  # replaced
    assert await secrets_vault.get("alice", "password") == "upstream-pw-3"
    assert [p.name for p in secrets_vault.directory.iterdir() if p.name.endswith(".tmp")] == []
    assert await secrets_vault.delete("alice", "password") is True
    assert await secrets_vault.delete("alice", "password") is False
    assert await secrets_vault.get("alice", "password") is None


def test_a_secret_moved_to_another_account_or_kind_does_not_decrypt(
    secrets_vault: tokens.SecretVault,
) -> None:
    secrets_vault.put_sync("alice", "password", "pw")
    record = secrets_vault.path("alice", "password").read_bytes()
    for account, kind in (("bob", "password"), ("alice", "bearer")):
        target = secrets_vault.path(account, kind)
        target.write_bytes(record)
        with pytest.raises(vault.RecordError):
            secrets_vault.get_sync(account, kind)
    flipped = bytearray(record)
    flipped[-5] ^= 1
    secrets_vault.path("alice", "password").write_bytes(bytes(flipped))
    with pytest.raises(vault.RecordError) as failure:
        secrets_vault.get_sync("alice", "password")
    assert "pw" not in str(failure.value).replace("password", "")


def test_secrets_are_rewrapped_to_the_current_key(secrets_vault: tokens.SecretVault, tmp_path: Path) -> None:
    secrets_vault.put_sync("alice", "bearer", "tok")
    old_entry = f"k1:{vault._b64e(secrets_vault.keys.key('k1') or b'')}"
    rotated = vault.Keyring.parse([vault.new_key_entry("k2"), old_entry], "t")
    newer = tokens.SecretVault(secrets_vault.directory, rotated)
    assert newer.rewrap_sync("alice", "bearer") is True
    assert newer.rewrap_sync("alice", "bearer") is False
    k2 = rotated.key("k2")
    assert k2 is not None
    only_new = vault.Keyring({"k2": k2}, "k2")
    assert tokens.SecretVault(secrets_vault.directory, only_new).get_sync("alice", "bearer") == "tok"


def test_a_secret_kind_outside_the_set_is_refused(secrets_vault: tokens.SecretVault) -> None:
    with pytest.raises(ValueError):
        secrets_vault.put_sync("alice", "cookie", "x")
    with pytest.raises(ValueError):
        secrets_vault.put_sync("alice", "password", "")


# ---------------------------------------------------------------- client secret files


def test_a_client_secret_file_must_be_private(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text("s3cret-value\n")
    path.chmod(0o644)
    with pytest.raises(tokens.ConfigError) as failure:
        tokens.read_client_secret(path, "oauth2.providers.m.client_secret_file")
    assert "chmod 600" in str(failure.value) and "s3cret" not in str(failure.value)
    assert "oauth2.providers.m.client_secret_file" in str(failure.value)
    path.chmod(0o600)
    assert tokens.read_client_secret(path, "k") == "s3cret-value"
    with pytest.raises(tokens.ConfigError):
        tokens.read_client_secret(tmp_path / "missing", "k")
    os.mkfifo(tmp_path / "fifo", 0o600)
    with pytest.raises(tokens.ConfigError):
        tokens.read_client_secret(tmp_path / "fifo", "k")
