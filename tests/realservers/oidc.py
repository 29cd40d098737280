"""A private OAuth2 authorization server for tests: panva's `oidc-provider` (npm) on a free loopback port.

`start_oidc(root)` writes a config and runs tests/realservers/oidc_server.mjs under node. The provider has:

- the device flow (RFC 8628), client credentials, refresh tokens rotated on every use, introspection
  (RFC 7662) and revocation (RFC 7009);
- two resource servers: `RESOURCE` (scopes `imap imap.app`, RS256 JWT access tokens, the default) and
  `OPAQUE_RESOURCE` (scope `imap`, opaque tokens, for introspection);
- a confidential client `pop3gw` (device_code, refresh_token, client_credentials) and a client `dovecot`
  that only introspects;
- accounts with passwords, checked by the login page behind `interactions.url`.

A device code is approved as a browser would (`approve_device`): the provider's /device page, its
confirmation form, the login and consent pages, each form parsed from the HTML and posted with httpx.

Everything lives under one folder:

    ROOT/config.json   ROOT/state/jwks.json (private key), signing-key.pem (public)   ROOT/log/oidc.log

A missing node or oidc-provider raises `MissingProgram` (never a skip). oidc-provider is installed by
scripts/setup-deps.sh into /opt/pop3-gateway/oidc-provider ($POP3GW_OIDC_PROVIDER_DIR overrides).
"""

from __future__ import annotations

import html.parser
import json
import os
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.realservers.fs import MissingProgram, require_program, tail
from tests.realservers.rawimap import free_ports

HOST = "127.0.0.1"
MODULE_DIR = Path(os.environ.get("POP3GW_OIDC_PROVIDER_DIR", "/opt/pop3-gateway/oidc-provider"))
SERVER_SCRIPT = Path(__file__).with_name("oidc_server.mjs")
START_TIMEOUT = 20.0
STOP_TIMEOUT = 5.0
EXIT_ADDRESS_IN_USE = 98

RESOURCE = "urn:pop3gw:imap"
OPAQUE_RESOURCE = "urn:pop3gw:imap-opaque"
USER_SCOPE = "imap"
APP_SCOPE = "imap.app"
DEVICE_CODE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
DEFAULT_ACCOUNTS = {"alice": "alice-secret", "bob": "bob-secret"}


class OAuthError(Exception):
    """An OAuth2 error response (`error`, `error_description`, the HTTP status); never carries a token."""

    def __init__(self, status: int, error: str, description: str = "") -> None:
        super().__init__(f"{status} {error}: {description}")
        self.status = status
        self.error = error
        self.description = description


@dataclass(frozen=True)
class OidcClient:
    client_id: str
    client_secret: str = field(repr=False)

    @property
    def auth(self) -> tuple[str, str]:
        return (self.client_id, self.client_secret)


@dataclass(frozen=True)
class TokenSet:
    """A token response. The tokens stay out of the repr."""

    access_token: str = field(repr=False)
    expires_in: int
    token_type: str
    scope: str
    refresh_token: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class DeviceAuthorization:
    device_code: str = field(repr=False)
    user_code: str
    verification_uri: str
    verification_uri_complete: str
    expires_in: int
    interval: int


@dataclass
class OidcProvider:
    root: Path
    host: str
    port: int
    access_token_ttl: int
    client: OidcClient
    introspector: OidcClient
    accounts: Mapping[str, str] = field(repr=False)
    kid: str = ""
    alg: str = "RS256"
    _process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _metadata: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def issuer(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def log_file(self) -> Path:
        return self.root / "log" / "oidc.log"

    @property
    def signing_key_pem(self) -> str:
        """The PEM public key that signs JWT access tokens (for Dovecot's local validation)."""
        return (self.root / "state" / "signing-key.pem").read_text()

    def endpoint(self, name: str) -> str:
        """An endpoint URL from the provider's discovery document, e.g. `token_endpoint`."""
        return str(self._metadata[name])

    @property
    def token_endpoint(self) -> str:
        return self.endpoint("token_endpoint")

    @property
    def introspection_endpoint(self) -> str:
        return self.endpoint("introspection_endpoint")

    def log_text(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    # --- grants ------------------------------------------------------------------------------------------

    def device_authorize(self, scope: str = USER_SCOPE, resource: str | None = None) -> DeviceAuthorization:
        """Start the device flow (RFC 8628) as the `pop3gw` client."""
        data = {"scope": scope, **({"resource": resource} if resource else {})}
        body = self._post(self.endpoint("device_authorization_endpoint"), data)
        return DeviceAuthorization(
            device_code=body["device_code"],
            user_code=body["user_code"],
            verification_uri=body["verification_uri"],
            verification_uri_complete=body["verification_uri_complete"],
            expires_in=int(body["expires_in"]),
            interval=int(body.get("interval", 5)),
        )

    def approve_device(self, user_code: str, account: str, password: str | None = None) -> None:
        """Approve a user code as a browser would, through the provider's own pages: /device, its
        confirmation form, then the login and consent pages. Raises AssertionError with the last page when
        the provider does not end on its success page (a wrong password ends on the login form)."""
        password = self.accounts[account] if password is None else password
        with httpx.Client(timeout=10, follow_redirects=True) as browser:
            page = browser.get(self.endpoint("issuer") + "/device", params={"user_code": user_code})
            signed_in = False
            for _step in range(10):
                if "<title>Sign-in Success</title>" in page.text:
                    return
                form = _first_form(page.text)
                if form is None:
                    break
                values = dict(form.inputs)
                if "password" in values:
                    if signed_in:
                        break  # the login form came back: the password was refused
                    values.update(login=account, password=password)
                    signed_in = True
                page = browser.post(str(page.url.join(form.action)), data=values)
            raise AssertionError(
                f"device approval did not finish; last page {page.status_code}:\n{page.text}"
            )

    def poll_device_token(self, device: DeviceAuthorization, *, timeout: float = 10.0) -> TokenSet:
        """Poll the token endpoint until the device code is approved (honouring `slow_down`)."""
        deadline = time.monotonic() + timeout
        interval = 0.2  # the spec's 5 s is for devices; the provider does not enforce it on the first polls
        while True:
            try:
                return self.token({"grant_type": DEVICE_CODE_GRANT, "device_code": device.device_code})
            except OAuthError as exc:
                if exc.error == "slow_down":
                    interval += 1
                elif exc.error != "authorization_pending" or time.monotonic() > deadline:
                    raise
            time.sleep(interval)

    def device_login(self, account: str, *, resource: str | None = None, scope: str = USER_SCOPE) -> TokenSet:
        """The whole device flow for `account`: authorize, approve, poll."""
        device = self.device_authorize(scope=scope, resource=resource)
        self.approve_device(device.user_code, account)
        return self.poll_device_token(device)

    def refresh(self, refresh_token: str, *, resource: str | None = None) -> TokenSet:
        data = {"grant_type": "refresh_token", "refresh_token": refresh_token}
        return self.token({**data, **({"resource": resource} if resource else {})})

    def client_credentials(self, scope: str = APP_SCOPE, *, resource: str | None = None) -> TokenSet:
        data = {"grant_type": "client_credentials", "scope": scope}
        return self.token({**data, **({"resource": resource} if resource else {})})

    def token(self, data: Mapping[str, str]) -> TokenSet:
        """POST to the token endpoint as the `pop3gw` client; raises OAuthError on an error response."""
        body = self._post(self.token_endpoint, data)
        return TokenSet(
            access_token=body["access_token"],
            expires_in=int(body["expires_in"]),
            token_type=body["token_type"],
            scope=body.get("scope", ""),
            refresh_token=body.get("refresh_token"),
        )

    def revoke(self, token: str, token_type_hint: str = "refresh_token") -> None:
        """RFC 7009 revocation; oidc-provider revokes the whole grant for a refresh or access token."""
        self._post(self.endpoint("revocation_endpoint"), {"token": token, "token_type_hint": token_type_hint})

    def introspect(self, token: str) -> dict[str, Any]:
        """RFC 7662 introspection as the `dovecot` client (the resource server's own credentials)."""
        return self._post(self.introspection_endpoint, {"token": token}, auth=self.introspector)

    def _post(self, url: str, data: Mapping[str, str], auth: OidcClient | None = None) -> dict[str, Any]:
        credentials = (auth or self.client).auth
        response = httpx.post(url, data=dict(data), auth=credentials, timeout=10)
        body: dict[str, Any] = response.json() if response.content else {}
        if response.status_code != 200 or "error" in body:
            raise OAuthError(response.status_code, body.get("error", "?"), body.get("error_description", ""))
        return body

    # --- process -----------------------------------------------------------------------------------------

    def stop(self) -> None:
        """SIGTERM node and wait; safe to call twice."""
        process, self._process = self._process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STOP_TIMEOUT)
        finally:
            if process.stdout is not None:
                process.stdout.close()


def start_oidc(
    root: Path,
    *,
    access_token_ttl: int = 20,
    refresh_token_ttl: int = 3600,
    accounts: Mapping[str, str] = DEFAULT_ACCOUNTS,
    jwt_typ: str | None = "JWT",
) -> OidcProvider:
    """Start oidc-provider under `root` on a free loopback port (another on a bind race) and wait until its
    discovery document answers. Raises `MissingProgram` without node or oidc-provider, RuntimeError (with
    the log tail) when it does not come up. `jwt_typ` is the access tokens' header `typ`: "JWT" because
    Dovecot 2.3 accepts nothing else; None keeps oidc-provider's RFC 9068 "at+jwt"."""
    node = require_program("node")
    if not (MODULE_DIR / "node_modules" / "oidc-provider" / "package.json").is_file():
        raise MissingProgram(
            f"oidc-provider is not installed in {MODULE_DIR}; run `make deps` (scripts/setup-deps.sh)"
        )
    root = root.absolute()
    for sub in ("state", "log"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    client = OidcClient("pop3gw", os.urandom(16).hex())
    introspector = OidcClient("dovecot", os.urandom(16).hex())
    last_error = ""
    for _attempt in range(3):
        (port,) = free_ports(1)
        server = OidcProvider(root, HOST, port, access_token_ttl, client, introspector, dict(accounts))
        config = {**_config(server, refresh_token_ttl), "jwt_typ": jwt_typ}
        (root / "config.json").write_text(json.dumps(config, indent=2))
        (root / "config.json").chmod(0o600)
        with server.log_file.open("ab") as log:
            server._process = subprocess.Popen(
                [node, str(SERVER_SCRIPT), str(root / "config.json")],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                start_new_session=True,
            )
        try:
            _wait_ready(server)
        except (OSError, ValueError, httpx.HTTPError, ChildProcessError) as exc:
            last_error = repr(exc)
            returncode = server._process.poll() if server._process else None
            server.stop()
            if returncode == EXIT_ADDRESS_IN_USE:
                continue
            break
        return server
    raise RuntimeError(
        f"oidc-provider in {root} did not start ({last_error})\n{tail(root / 'log' / 'oidc.log')}"
    )


def _config(server: OidcProvider, refresh_token_ttl: int) -> dict[str, Any]:
    return {
        "module_dir": str(MODULE_DIR),
        "state_dir": str(server.root / "state"),
        "host": server.host,
        "port": server.port,
        "issuer": server.issuer,
        "access_token_ttl": server.access_token_ttl,
        "refresh_token_ttl": refresh_token_ttl,
        "device_code_ttl": 300,
        "accounts": dict(server.accounts),
        "default_resource": RESOURCE,
        "resources": {
            RESOURCE: {"scope": f"{USER_SCOPE} {APP_SCOPE}", "format": "jwt"},
            OPAQUE_RESOURCE: {"scope": USER_SCOPE, "format": "opaque"},
        },
        "clients": [
            {
                "client_id": server.client.client_id,
                "client_secret": server.client.client_secret,
                "grant_types": [DEVICE_CODE_GRANT, "refresh_token", "client_credentials"],
                "response_types": [],
                "redirect_uris": [],
                "token_endpoint_auth_method": "client_secret_basic",
            },
            {
                "client_id": server.introspector.client_id,
                "client_secret": server.introspector.client_secret,
                "grant_types": [],
                "response_types": [],
                "redirect_uris": [],
                "token_endpoint_auth_method": "client_secret_basic",
            },
        ],
    }


def _wait_ready(server: OidcProvider) -> None:
    """Read node's ready line (bounded by a deadline), then fetch the discovery document."""
    process = server._process
    assert process is not None and process.stdout is not None
    deadline = time.monotonic() + START_TIMEOUT
    os.set_blocking(process.stdout.fileno(), False)
    buffer = b""
    while b"\n" not in buffer:
        if process.poll() is not None:
            raise ChildProcessError(f"node exited {process.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"oidc-provider not ready after {START_TIMEOUT:.0f} s")
        chunk = process.stdout.read(4096)
        if chunk:
            buffer += chunk
            if len(buffer) > 65536:
                raise ValueError("oidc-provider's ready line is too long")
        else:
            time.sleep(0.02)
    ready = json.loads(buffer.split(b"\n", 1)[0])
    if not ready.get("ready") or ready.get("issuer") != server.issuer:
        raise ValueError(f"unexpected ready line {ready!r}")
    server.kid, server.alg = ready["kid"], ready["alg"]
    response = httpx.get(server.issuer + "/.well-known/openid-configuration", timeout=5)
    response.raise_for_status()
    server._metadata = response.json()


@dataclass
class _Form:
    action: str
    inputs: list[tuple[str, str]]


class _FormParser(html.parser.HTMLParser):
    """The first <form> of a page with its named <input>s (values unescaped), as a browser would submit it."""

    def __init__(self) -> None:
        super().__init__()
        self.form: _Form | None = None
        self._in_form = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {key: value or "" for key, value in attrs}
        if tag == "form" and self.form is None:
            self.form = _Form(values.get("action", ""), [])
            self._in_form = True
        elif tag == "input" and self._in_form and self.form is not None and values.get("name"):
            self.form.inputs.append((values["name"], values.get("value", "")))

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._in_form = False


def _first_form(page: str) -> _Form | None:
    parser = _FormParser()
    parser.feed(page)
    return parser.form
