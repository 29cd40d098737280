"""`[oauth2]` configuration and `pop3-gateway oauth` against a scripted provider (httpx.MockTransport)."""

from __future__ import annotations

import io
import re
import time
import urllib.parse
from pathlib import Path

import httpx
import pytest

from gateway import cli, cli_oauth
from gateway import config as cfg
from gateway.oauth2 import flows, tokens, vault

# ---------------------------------------------------------------- config


def test_provider_tables_parse_into_named_configs() -> None:
    config = cfg.loads(
        """
        [oauth2]
        refresh_margin = 300
        [oauth2.providers.m365]
        kind = "microsoft"
        tenant = "contoso.onmicrosoft.com"
        client_id = "11111111-2222-3333-4444-555555555555"
        client_secret_file = "/etc/pop3-gateway/m365.secret"
        flow = "client-credentials"
        [oauth2.providers.gmail]
        kind = "google"
        client_id = "x.apps.googleusercontent.com"
        flow = "code"
        """
    )
    assert config.oauth2.refresh_margin == 300.0 and config.oauth2.token_timeout == 10.0
    assert set(config.oauth2.providers) == {"m365", "gmail"}
    assert config.oauth2.providers["m365"].tenant == "contoso.onmicrosoft.com"
    assert config.oauth2.providers["gmail"].redirect_uri == "http://localhost"


@pytest.mark.parametrize(
    ("table", "key", "says"),
    [
        ('kind = "oidc"\nissuer = "https://id.example"', "oauth2.providers.p.client_id", "is required"),
        ('kind = "oidc"\nclient_id = "c"', "oauth2.providers.p.issuer", "is required"),
        (
            'kind = "oidc"\nclient_id = "c"\nissuer = "http://id.example"',
            "oauth2.providers.p.issuer",
            "https",
        ),
        ('kind = "google"\nclient_id = "c"', "oauth2.providers.p.flow", 'flow = "code"'),
        ('kind = "google"\nclient_id = "c"\ntenant = "t"', "oauth2.providers.p.tenant", "microsoft"),
        (
            'kind = "microsoft"\nclient_id = "c"\nflow = "client-credentials"\nclient_secret_file = "/s"',
            "oauth2.providers.p.tenant",
            "tenant's id or domain",
        ),
        ('kind = "microsoft"\nclient_id = "c"\nflow = "client-credentials"', "client_secret_file", "secret"),
        ('kind = "microsoft"\nclient_id = "c"\nsecret = "x"', "oauth2.providers.p.secret", "unknown key"),
        ('kind = "okta"\nclient_id = "c"', "oauth2.providers.p.kind", "one of"),
        ('kind = "microsoft"\nclient_id = "c"\nredirect_uri = "urn:x"', "redirect_uri", "http(s) URL"),
    ],
)
def test_provider_mistakes_are_config_errors_naming_the_key(table: str, key: str, says: str) -> None:
    with pytest.raises(cfg.ConfigError) as failure:
        cfg.loads(f"[oauth2.providers.p]\n{table}\n")
    assert key in str(failure.value) and says in str(failure.value)


def test_oauth2_section_bounds_and_names() -> None:
    with pytest.raises(cfg.ConfigError, match=r"oauth2\.token_timeout: must be > 0"):
        cfg.loads("[oauth2]\ntoken_timeout = 0\n")
    with pytest.raises(cfg.ConfigError, match=r"oauth2\.refresh_margin: must be >= 0"):
        cfg.loads("[oauth2]\nrefresh_margin = -1\n")
    with pytest.raises(cfg.ConfigError, match="a name is"):
        cfg.loads('[oauth2.providers."bad name"]\nclient_id = "c"\n')


def test_the_key_comes_from_the_file_the_variable_or_the_state_dir(tmp_path: Path) -> None:
    base = cfg.Config(server=cfg.ServerConfig(state_dir=str(tmp_path)))
    assert tokens.key_file_path(base, environ={}) == tmp_path / "token.key"
    assert tokens.key_file_path(base, environ={vault.ENV_VAR: "k1:x"}) is None
    named = cfg.loads(f'[oauth2]\nkey_file = "{tmp_path}/k"\n')
    assert tokens.key_file_path(named, environ={vault.ENV_VAR: "k1:x"}) == tmp_path / "k"
    entry = vault.new_key_entry("env")
    assert tokens.load_keyring(base, environ={vault.ENV_VAR: entry}).current == "env"


# ---------------------------------------------------------------- CLI


def write_config(tmp_path: Path, *, kind: str = "google", flow: str = "code") -> Path:
    secret = tmp_path / "secret"
    secret.write_text("client-secret-value\n")
    secret.chmod(0o600)
    path = tmp_path / "gw.toml"
    path.write_text(
        f'[server]\nstate_dir = "{tmp_path / "state"}"\n'
        f'[oauth2]\nkey_file = "{tmp_path / "token.key"}"\n'
        f'[oauth2.providers.g]\nkind = "{kind}"\nclient_id = "cid"\n'
        f'client_secret_file = "{secret}"\nflow = "{flow}"\n'
        + ('tenant = "contoso.example"\n' if kind == "microsoft" else "")
    )
    return path


class Provider:
    """Google's endpoints answered by a script; records what was posted."""

    def __init__(self) -> None:
        self.posts: list[tuple[str, dict[str, str]]] = []
        self.answers: list[httpx.Response] = []

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.posts.append((request.url.path, dict(urllib.parse.parse_qsl(request.content.decode()))))
        if self.answers:
            return self.answers.pop(0)
        return httpx.Response(
            200,
            json={
                "access_token": "at-1",
                "token_type": "Bearer",
                "expires_in": 3600,
                "refresh_token": "rt-1",
            },
        )


@pytest.fixture
def provider(monkeypatch: pytest.MonkeyPatch) -> Provider:
    fake = Provider()
    monkeypatch.setattr(
        flows, "open_http", lambda: httpx.AsyncClient(transport=httpx.MockTransport(fake.handler))
    )
    return fake


class PastesRedirect(io.StringIO):
    """stdin of an admin who opens the printed URL and pastes where the browser was sent."""

    def __init__(self, out: io.StringIO, mangle: str = "") -> None:
        super().__init__()
        self.out, self.mangle = out, mangle

    def readline(self, *_args: object) -> str:  # type: ignore[override]
        url = re.search(r"https://accounts\.google\.com/\S+", self.out.getvalue())
        assert url is not None
        query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url.group(0)).query))
        state = query["state"] + self.mangle
        return f"{query['redirect_uri']}/?state={state}&code=the-code&scope=x\n"


def test_keygen_creates_a_private_key_file_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path)
    assert cli.main(["oauth", "keygen", "--config", str(path)]) == 0
    key = tmp_path / "token.key"
    assert key.stat().st_mode & 0o777 == 0o600
    first = key.read_bytes()
    assert cli.main(["oauth", "keygen", "--config", str(path)]) == 0
    assert key.read_bytes() == first
    assert "left as it is" in capsys.readouterr().out


def test_code_flow_login_reads_the_pasted_redirect_and_stores_the_tokens(
    tmp_path: Path, provider: Provider
) -> None:
    config = cfg.load(write_config(tmp_path))
    vault.create_key_file(tmp_path / "token.key")
    out = io.StringIO()
    assert cli_oauth.login(config, "Bob@Example.ORG", None, None, stdin=PastesRedirect(out), stdout=out) == 0
    printed = out.getvalue()
    assert "access_type=offline" in printed and "code_challenge_method=S256" in printed
    path, form = provider.posts[-1]
    assert path == "/token" and form["code"] == "the-code" and form["code_verifier"]
    assert form["redirect_uri"] == "http://localhost"
    keys = tokens.load_keyring(config, environ={})
    stored = tokens.token_vault(config, keys).load_sync("bob@example.org")
    assert stored is not None and stored.token.refresh_token == "rt-1" and stored.flow == "code"
    assert "at-1" not in printed and "rt-1" not in printed


def test_a_pasted_redirect_of_another_attempt_stores_nothing(
    tmp_path: Path, provider: Provider, capsys: pytest.CaptureFixture[str]
) -> None:
    config = cfg.load(write_config(tmp_path))
    vault.create_key_file(tmp_path / "token.key")
    out = io.StringIO()
    assert cli_oauth.login(config, "bob", None, None, stdin=PastesRedirect(out, mangle="x"), stdout=out) == 1
    assert "state" in capsys.readouterr().err
    assert provider.posts == []
    keys = tokens.load_keyring(config, environ={})
    assert tokens.token_vault(config, keys).load_sync("bob") is None


def test_login_without_a_key_or_with_an_unknown_provider_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = cfg.load(write_config(tmp_path))
    assert cli_oauth.login(config, "bob", None, None) == 2
    assert "oauth keygen" in capsys.readouterr().err
    assert cli_oauth.login(config, "bob", "nope", None) == 2
    assert "no provider 'nope'" in capsys.readouterr().err


def test_status_shows_states_and_expiry_but_no_token(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = cfg.load(write_config(tmp_path))
    vault.create_key_file(tmp_path / "token.key")
    store = tokens.token_vault(config, tokens.load_keyring(config, environ={}))
    now = time.time()
    store.store_sync("fresh", flows.TokenSet("at-a", "Bearer", now + 3600, "rt-a"), "g", "code")
    earlier = vault.TokenVault(store.directory, store.keys, clock=lambda: now - 3540)  # an hour's token
    earlier.store_sync("soon", flows.TokenSet("at-b", "Bearer", now + 60, "rt-b"), "g", "code")
    store.store_sync("dead", flows.TokenSet("at-c", "Bearer", now - 60, "rt-c"), "g", "code")
    store.store_sync("norefresh", flows.TokenSet("at-d", "Bearer", now + 3600, None), "g", "device")
    store.store_sync("app", flows.TokenSet("at-e", "Bearer", now + 3600, None), "g", "client-credentials")
    store.store_sync("unlisted", flows.TokenSet("at-f", "Bearer", now + 3600, "rt-f"), "g", "code")
    names = ["fresh", "soon", "dead", "norefresh", "app", "none"]
    assert cli_oauth.status(config, names) == 0
    out = capsys.readouterr().out
    states = {line.split()[0]: line.split()[3] for line in out.splitlines()[1:7]}
    assert states == {
        "fresh": "ok",
        "soon": "expiring",
        "dead": "expired",
        "norefresh": "no-refresh-token",
        "app": "ok",
        "none": "no-token",
    }
    assert "1 other token record(s)" in out
    assert re.search(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", out)
    assert not re.search(r"at-[a-f]|rt-[a-f]", out)


def test_logout_revokes_then_deletes(
    tmp_path: Path, provider: Provider, capsys: pytest.CaptureFixture[str]
) -> None:
    config = cfg.load(write_config(tmp_path))
    vault.create_key_file(tmp_path / "token.key")
    store = tokens.token_vault(config, tokens.load_keyring(config, environ={}))
    store.store_sync("bob", flows.TokenSet("at-1", "Bearer", time.time() + 60, "rt-1"), "g", "code")
    assert cli_oauth.logout(config, "BOB", None) == 0
    [(path, form)] = provider.posts
    assert path == "/revoke" and form["token"] == "rt-1" and form["token_type_hint"] == "refresh_token"
    assert store.load_sync("bob") is None
    assert "grant revoked" in capsys.readouterr().out
    assert cli_oauth.logout(config, "bob", None) == 1


def test_logout_deletes_even_when_revocation_fails(
    tmp_path: Path, provider: Provider, capsys: pytest.CaptureFixture[str]
) -> None:
    config = cfg.load(write_config(tmp_path))
    vault.create_key_file(tmp_path / "token.key")
    store = tokens.token_vault(config, tokens.load_keyring(config, environ={}))
    store.store_sync("bob", flows.TokenSet("at-1", "Bearer", time.time() + 60, "rt-1"), "g", "code")
    provider.answers.append(httpx.Response(503))
    assert cli_oauth.logout(config, "bob", None) == 0
    assert store.load_sync("bob") is None
    assert "revocation failed" in capsys.readouterr().err


def test_client_credentials_login_fetches_at_once(tmp_path: Path, provider: Provider) -> None:
    config = cfg.load(write_config(tmp_path, kind="microsoft", flow="client-credentials"))
    vault.create_key_file(tmp_path / "token.key")
    out = io.StringIO()
    assert cli_oauth.login(config, "scanner", None, None, stdout=out) == 0
    path, form = provider.posts[-1]
    assert path == "/contoso.example/oauth2/v2.0/token"
    assert form == {
        "grant_type": "client_credentials",
        "scope": "https://outlook.office365.com/.default",
        "client_id": "cid",
        "client_secret": "client-secret-value",
    }
    assert "client-secret-value" not in out.getvalue()
