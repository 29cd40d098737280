"""The OAuth2 client against fake token endpoints (httpx.MockTransport, and one real loopback h11 server)."""

from __future__ import annotations

import base64
import hashlib
import json
import urllib.parse
from collections.abc import Callable
from typing import Any

import h11
import httpx
import pytest
import trio

from gateway.oauth2 import flows, providers
from gateway.oauth2.flows import (
    AccessDenied,
    Endpoints,
    ExpiredToken,
    InvalidGrant,
    OAuth2Client,
    Refused,
    StateMismatch,
    Temporary,
    TokenSet,
    Unsupported,
)

ENDPOINTS = Endpoints(
    token="https://as.example/token",
    authorization="https://as.example/authorize",
    device_authorization="https://as.example/device",
    revocation="https://as.example/revoke",
)
SECRET = "s3cr3t-client-value"
ACCESS, REFRESH, NEW_REFRESH = "at-0123456789", "rt-old-abcdef", "rt-new-fedcba"
NOW = 1_700_000_000.0


class FakeAS:
    """A scripted authorization server: each request takes the next answer of its path."""

    def __init__(self) -> None:
        self.script: dict[str, list[Callable[[], httpx.Response] | httpx.Response | Exception]] = {}
        self.requests: list[httpx.Request] = []
        self.times: list[float] = []

    def on(self, path: str, *answers: httpx.Response | Exception | Callable[[], httpx.Response]) -> None:
        self.script.setdefault(path, []).extend(answers)

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        self.times.append(trio.current_time())
        answer = self.script[request.url.path].pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer() if callable(answer) else answer

    def form(self, i: int = -1) -> dict[str, str]:
        return dict(urllib.parse.parse_qsl(self.requests[i].content.decode()))


def ok(**doc: Any) -> httpx.Response:
    return httpx.Response(200, json=doc)


def err(status: int, error: str, **doc: Any) -> httpx.Response:
    return httpx.Response(status, json={"error": error, **doc})


def tokens(**extra: Any) -> httpx.Response:
    return ok(access_token=ACCESS, token_type="Bearer", expires_in=3600, **extra)


def client(fake: FakeAS, secret: str | None = SECRET, **kw: Any) -> OAuth2Client:
    http = httpx.AsyncClient(transport=httpx.MockTransport(fake.handler))
    return OAuth2Client(ENDPOINTS, "gw-client", secret, http=http, clock=lambda: NOW, **kw)


# ---------------------------------------------------------------- device authorization


def device_answer(**extra: Any) -> httpx.Response:
    return ok(
        device_code="dc-secret-123",
        user_code="WDJB-MJHT",
        verification_uri="https://as.example/device-verify",
        expires_in=600,
        interval=5,
        **extra,
    )


async def test_device_flow_waits_out_pending_and_slow_down(autojump_clock: trio.abc.Clock) -> None:
    fake = FakeAS()
    fake.on("/device", device_answer())
    fake.on(
        "/token",
        err(400, "authorization_pending"),
        err(400, "slow_down"),
        err(400, "authorization_pending"),
        tokens(refresh_token=REFRESH, scope="mail"),
    )
    c = client(fake)
    device = await c.start_device("mail offline_access")
    assert (device.user_code, device.verification_uri) == ("WDJB-MJHT", "https://as.example/device-verify")
    assert "dc-secret-123" not in repr(device)
    start = trio.current_time()
    token = await c.poll_device(device)
    assert token == TokenSet(ACCESS, "Bearer", NOW + 3600, REFRESH, "mail")
    gaps = [b - a for a, b in zip([start, *fake.times[1:]], fake.times[1:], strict=False)]
    assert [round(g) for g in gaps] == [5, 5, 10, 10]  # slow_down adds 5 s from then on
    assert fake.form()["grant_type"] == "urn:ietf:params:oauth:grant-type:device_code"
    assert fake.form()["device_code"] == "dc-secret-123"
    assert fake.form(0)["scope"] == "mail offline_access"


async def test_device_flow_expired_token(autojump_clock: trio.abc.Clock) -> None:
    fake = FakeAS()
    fake.on("/device", device_answer())
    fake.on("/token", err(400, "authorization_pending"), err(400, "expired_token"))
    c = client(fake)
    with pytest.raises(ExpiredToken):
        await c.poll_device(await c.start_device("mail"))


async def test_device_flow_denied(autojump_clock: trio.abc.Clock) -> None:
    fake = FakeAS()
    fake.on("/device", device_answer())
    fake.on("/token", err(400, "access_denied"))
    c = client(fake)
    with pytest.raises(AccessDenied):
        await c.poll_device(await c.start_device("mail"))


async def test_device_flow_stops_at_the_codes_own_expiry(autojump_clock: trio.abc.Clock) -> None:
    fake = FakeAS()
    fake.on("/device", device_answer())
    fake.on("/token", *[err(400, "authorization_pending") for _ in range(200)])
    c = client(fake)
    device = await c.start_device("mail")
    with pytest.raises(ExpiredToken):
        await c.poll_device(device)
    assert trio.current_time() <= device.deadline
    assert len(fake.requests) - 1 == 120  # every 5 s of the 600, the last one at the deadline


async def test_device_flow_rides_out_a_short_outage_but_not_a_long_one(
    autojump_clock: trio.abc.Clock,
) -> None:
    fake = FakeAS()
    fake.on("/device", device_answer(), device_answer())
    fake.on("/token", httpx.Response(503), httpx.ConnectError("down"), tokens())
    c = client(fake)
    assert (await c.poll_device(await c.start_device("mail"))).access_token == ACCESS
    fake.on("/token", httpx.Response(502), httpx.Response(500), httpx.ReadTimeout("slow"))
    with pytest.raises(Temporary):
        await c.poll_device(await c.start_device("mail"))


async def test_device_flow_without_an_endpoint_is_unsupported() -> None:
    c = OAuth2Client(Endpoints(token="https://as.example/token"), "id", http=httpx.AsyncClient())
    with pytest.raises(Unsupported):
        await c.start_device("mail")


async def test_device_answer_without_a_user_code_is_temporary() -> None:
    fake = FakeAS()
    fake.on("/device", ok(device_code="x", verification_uri="https://as.example/v"))
    with pytest.raises(Temporary):
        await client(fake).start_device("mail")


async def test_device_answer_with_a_javascript_uri_is_refused() -> None:
    fake = FakeAS()
    fake.on("/device", ok(device_code="x", user_code="A", verification_uri="javascript:alert(1)"))
    with pytest.raises(Temporary):
        await client(fake).start_device("mail")


# ---------------------------------------------------------------- authorization code with PKCE


async def test_authorization_code_with_pkce_round_trip() -> None:
    fake = FakeAS()
    fake.on("/token", tokens(refresh_token=REFRESH))
    c = client(fake)
    url, pending = c.authorization_url(
        "mail offline_access", "http://localhost:8765/cb", extra={"prompt": "consent"}
    )
    query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))
    assert url.startswith("https://as.example/authorize?")
    assert query["response_type"] == "code"
    assert query["code_challenge_method"] == "S256"
    assert query["prompt"] == "consent"
    assert query["scope"] == "mail offline_access"
    digest = hashlib.sha256(pending.code_verifier.encode()).digest()
    assert query["code_challenge"] == base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
    assert 43 <= len(pending.code_verifier) <= 128
    assert pending.state not in repr(pending) and pending.code_verifier not in repr(pending)

    pasted = f"  http://localhost:8765/cb?code=the-code&state={query['state']}\n"
    token = await c.exchange_redirect(pending, pasted)
    assert token.refresh_token == REFRESH
    form = fake.form()
    assert form["grant_type"] == "authorization_code"
    assert form["code"] == "the-code"
    assert form["code_verifier"] == pending.code_verifier
    assert form["redirect_uri"] == "http://localhost:8765/cb"


@pytest.mark.parametrize(
    "pasted",
    [
        "http://localhost:8765/cb?code=c&state=WRONG",
        "http://localhost:8765/cb?code=c",
        "http://evil.example/cb?code=c&state={state}",
        "http://localhost:8765/other?code=c&state={state}",
        "http://localhost:8765/cb?state={state}",
        "http://localhost:8765/cb?code=c&state={state}&state={state}",
    ],
)
async def test_a_pasted_url_that_does_not_answer_this_request_is_refused(pasted: str) -> None:
    fake = FakeAS()
    c = client(fake)
    _, pending = c.authorization_url("mail", "http://localhost:8765/cb")
    with pytest.raises(StateMismatch) as info:
        await c.exchange_redirect(pending, pasted.format(state=pending.state))
    assert pending.state not in str(info.value)
    assert fake.requests == []  # no code is sent anywhere


async def test_a_declined_authorization_is_access_denied() -> None:
    c = client(FakeAS())
    _, pending = c.authorization_url("mail", "http://localhost/cb")
    with pytest.raises(AccessDenied):
        await c.exchange_redirect(pending, f"http://localhost/cb?error=access_denied&state={pending.state}")
    with pytest.raises(Refused) as info:
        await c.exchange_redirect(pending, f"http://localhost/cb?error=invalid_scope&state={pending.state}")
    assert info.value.error == "invalid_scope"


async def test_a_used_code_is_invalid_grant() -> None:
    fake = FakeAS()
    fake.on("/token", err(400, "invalid_grant", error_description="AADSTS54005: code already redeemed"))
    c = client(fake)
    _, pending = c.authorization_url("mail", "http://localhost/cb")
    with pytest.raises(InvalidGrant) as info:
        await c.exchange_redirect(pending, f"http://localhost/cb?code=c&state={pending.state}")
    assert "AADSTS54005" in str(info.value)


# ---------------------------------------------------------------- client credentials and client auth


async def test_client_credentials_with_basic_auth_form_encodes_the_pair() -> None:
    fake = FakeAS()
    fake.on("/token", tokens())
    http = httpx.AsyncClient(transport=httpx.MockTransport(fake.handler))
    c = OAuth2Client(ENDPOINTS, "id:with space", "p&ss:w%rd", http=http, clock=lambda: NOW)
    token = await c.client_credentials("https://outlook.office365.com/.default")
    assert token.refresh_token is None and token.expires_at == NOW + 3600
    auth = fake.requests[0].headers["authorization"]
    assert base64.b64decode(auth.removeprefix("Basic ")) == b"id%3Awith+space:p%26ss%3Aw%25rd"
    assert fake.form() == {
        "grant_type": "client_credentials",
        "scope": "https://outlook.office365.com/.default",
    }


async def test_client_secret_post_sends_the_secret_in_the_body() -> None:
    fake = FakeAS()
    fake.on("/token", tokens())
    await client(fake, auth_method="client_secret_post").client_credentials("s")
    assert "authorization" not in fake.requests[0].headers
    assert fake.form()["client_id"] == "gw-client" and fake.form()["client_secret"] == SECRET


async def test_a_public_client_sends_only_its_id() -> None:
    fake = FakeAS()
    fake.on("/token", tokens())
    await client(fake, secret=None).refresh(TokenSet("a", "Bearer", None, REFRESH))
    assert fake.form()["client_id"] == "gw-client" and "client_secret" not in fake.form()


# ---------------------------------------------------------------- refresh


OLD = TokenSet("at-old", "Bearer", NOW - 10, REFRESH, "mail")


async def test_refresh_keeps_a_rotated_refresh_token() -> None:
    fake = FakeAS()
    fake.on("/token", tokens(refresh_token=NEW_REFRESH))
    new = await client(fake).refresh(OLD)
    assert (new.access_token, new.refresh_token, new.expires_at) == (ACCESS, NEW_REFRESH, NOW + 3600)
    assert fake.form() == {"grant_type": "refresh_token", "refresh_token": REFRESH}


async def test_refresh_keeps_the_old_refresh_token_when_not_rotated() -> None:
    fake = FakeAS()
    fake.on("/token", tokens())
    new = await client(fake).refresh(OLD)
    assert new.refresh_token == REFRESH and new.scope == "mail"


async def test_refresh_of_a_revoked_grant_is_invalid_grant() -> None:
    fake = FakeAS()
    fake.on("/token", err(400, "invalid_grant"))
    with pytest.raises(InvalidGrant):
        await client(fake).refresh(OLD)


async def test_refresh_without_a_refresh_token_asks_for_reauthorisation() -> None:
    with pytest.raises(InvalidGrant):
        await client(FakeAS()).refresh(TokenSet("a", "Bearer", None, None))


@pytest.mark.parametrize(
    "answer",
    [
        httpx.Response(503),
        httpx.Response(500, json={"error": "invalid_grant"}),  # a 5xx is never a verdict on the grant
        httpx.Response(429),
        httpx.Response(200, content=b"{not json"),
        httpx.Response(200, json=["a"]),
        httpx.Response(200, json={"token_type": "Bearer"}),
        httpx.Response(200, json={"access_token": "a", "token_type": "mac"}),
        httpx.Response(400, content=b"<html>proxy error</html>"),
        httpx.Response(200, content=b"{" + b" " * (flows.MAX_RESPONSE_BYTES + 10) + b"}"),
        httpx.ConnectError("refused"),
        httpx.ReadTimeout("slow"),
        httpx.RemoteProtocolError("broken"),
    ],
    ids=lambda a: getattr(a, "status_code", None) or a.__class__.__name__,
)
async def test_refresh_failures_that_say_nothing_about_the_grant_are_temporary(
    answer: httpx.Response | Exception,
) -> None:
    fake = FakeAS()
    fake.on("/token", answer)
    with pytest.raises(Temporary):
        await client(fake).refresh(OLD)


async def test_other_oauth_errors_are_refused_with_their_code() -> None:
    fake = FakeAS()
    fake.on("/token", err(401, "invalid_client", error_description="secret \x1b[31mexpired"))
    with pytest.raises(Refused) as info:
        await client(fake).refresh(OLD)
    assert info.value.error == "invalid_client"
    assert "\x1b" not in str(info.value)


async def test_expires_in_as_a_string_and_absurd_values() -> None:
    fake = FakeAS()
    fake.on("/token", ok(access_token="a", token_type="bearer", expires_in="3599"))
    fake.on("/token", ok(access_token="a", token_type="Bearer", expires_in=10**30))
    fake.on("/token", ok(access_token="a", token_type="Bearer", expires_in=-5))
    fake.on("/token", ok(access_token="a", token_type="Bearer"))
    c = client(fake)
    assert (await c.refresh(OLD)).expires_at == NOW + 3599
    assert (await c.refresh(OLD)).expires_at == NOW + flows.MAX_LIFETIME
    assert (await c.refresh(OLD)).expires_at == NOW
    assert (await c.refresh(OLD)).expires_at is None


# ---------------------------------------------------------------- revocation


async def test_revocation() -> None:
    fake = FakeAS()
    fake.on("/revoke", httpx.Response(200), httpx.Response(503))
    c = client(fake)
    await c.revoke(REFRESH, "refresh_token")
    assert fake.form() == {"token": REFRESH, "token_type_hint": "refresh_token"}
    with pytest.raises(Temporary):
        await c.revoke(REFRESH, "refresh_token")
    bare = OAuth2Client(Endpoints(token="https://as.example/token"), "id", http=httpx.AsyncClient())
    with pytest.raises(Unsupported):
        await bare.revoke(REFRESH, "refresh_token")


# ---------------------------------------------------------------- secrets


async def test_no_secret_in_reprs_or_error_text() -> None:
    fake = FakeAS()
    fake.on("/token", tokens(refresh_token=NEW_REFRESH), err(400, "invalid_grant"), httpx.Response(503))
    fake.on("/token", httpx.ConnectError(f"oops {REFRESH}"))
    c = client(fake)
    texts = [repr(c), repr(await c.refresh(OLD))]
    for _ in range(3):
        with pytest.raises(flows.OAuthError) as info:
            await c.refresh(OLD)
        texts += [str(info.value), repr(info.value)]
    for secret in (SECRET, ACCESS, REFRESH, NEW_REFRESH, "at-old"):
        assert not [t for t in texts if secret in t]


def test_a_confidential_method_needs_a_secret() -> None:
    with pytest.raises(ValueError, match="secret"):
        OAuth2Client(ENDPOINTS, "id", None, http=httpx.AsyncClient(), auth_method="client_secret_post")


def test_token_set_json_round_trip() -> None:
    token = TokenSet("a", "Bearer", 12.5, "r", "s")
    assert TokenSet.from_json(json.loads(json.dumps(token.to_json()))) == token
    for bad in ({}, {"access_token": "a", "token_type": "Bearer", "expires_at": "x"}):
        with pytest.raises(ValueError):
            TokenSet.from_json(bad)


# ---------------------------------------------------------------- a real socket under trio


async def serve_token_endpoint(
    reply: dict[str, Any], seen: list[bytes], *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
) -> None:
    """A one-route HTTP/1.1 server on loopback port 0 (h11): answers every POST with ``reply``."""

    async def handle(stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        body = b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
                continue
            if isinstance(event, h11.Data):
                body += event.data
            if isinstance(event, h11.EndOfMessage):
                break
        seen.append(body)
        payload = json.dumps(reply).encode()
        headers = [("content-type", "application/json"), ("content-length", str(len(payload)))]
        await stream.send_all(conn.send(h11.Response(status_code=200, headers=headers)) or b"")
        await stream.send_all(conn.send(h11.Data(data=payload)) or b"")
        await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
        await stream.aclose()

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handle, listeners)


async def test_refresh_over_a_real_loopback_socket() -> None:
    seen: list[bytes] = []
    async with trio.open_nursery() as nursery:
        port = await nursery.start(
            serve_token_endpoint, {"access_token": ACCESS, "token_type": "Bearer"}, seen
        )
        async with flows.open_http() as http:
            c = OAuth2Client(Endpoints(token=f"http://127.0.0.1:{port}/token"), "id", SECRET, http=http)
            with trio.fail_after(10):
                token = await c.refresh(OLD)
        nursery.cancel_scope.cancel()
    assert token.access_token == ACCESS and token.refresh_token == REFRESH
    assert b"grant_type=refresh_token" in seen[0]


async def test_an_endpoint_that_refuses_connections_is_temporary() -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    await listeners[0].aclose()
    async with flows.open_http() as http:
        c = OAuth2Client(Endpoints(token=f"http://127.0.0.1:{port}/token"), "id", SECRET, http=http)
        with pytest.raises(Temporary), trio.fail_after(10):
            await c.refresh(OLD)


# ---------------------------------------------------------------- provider profiles


def test_microsoft_profile() -> None:
    p = providers.microsoft("contoso.onmicrosoft.com")
    base = "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0"
    assert p.endpoints.token == f"{base}/token"
    assert p.endpoints.authorization == f"{base}/authorize"
    assert p.endpoints.device_authorization == f"{base}/devicecode"
    assert p.endpoints.revocation is None
    assert p.user_scope == "https://outlook.office.com/IMAP.AccessAsUser.All offline_access"
    assert p.app_scope == "https://outlook.office365.com/.default"
    assert providers.microsoft("common").app_scope is None  # app-only needs a real tenant
    with pytest.raises(ValueError):
        providers.microsoft("evil.example/../x")


def test_google_profile() -> None:
    p = providers.google()
    assert p.endpoints.token == "https://oauth2.googleapis.com/token"
    assert p.endpoints.authorization == "https://accounts.google.com/o/oauth2/v2/auth"
    assert p.endpoints.revocation == "https://oauth2.googleapis.com/revoke"
    assert p.endpoints.device_authorization is None
    assert p.user_scope == "https://mail.google.com/"
    assert p.authorization_params == {"access_type": "offline", "prompt": "consent"}


DISCOVERY = {
    "issuer": "https://id.example.org",
    "token_endpoint": "https://id.example.org/token",
    "authorization_endpoint": "https://id.example.org/auth",
    "device_authorization_endpoint": "https://id.example.org/device",
    "revocation_endpoint": "https://id.example.org/revoke",
    "token_endpoint_auth_methods_supported": ["client_secret_post"],
}


def test_discovery_document_becomes_a_provider() -> None:
    p = providers.parse_discovery("https://id.example.org", json.dumps(DISCOVERY).encode(), scope="mail")
    assert p.endpoints == Endpoints(
        token="https://id.example.org/token",
        authorization="https://id.example.org/auth",
        device_authorization="https://id.example.org/device",
        revocation="https://id.example.org/revoke",
        issuer="https://id.example.org",
    )
    assert p.auth_method == "client_secret_post"
    doc = {k: v for k, v in DISCOVERY.items() if k != "token_endpoint_auth_methods_supported"}
    assert providers.parse_discovery(doc["issuer"], json.dumps(doc).encode(), scope="m").auth_method == (
        "client_secret_basic"
    )


@pytest.mark.parametrize(
    ("issuer", "change"),
    [
        ("https://id.example.org", {"issuer": "https://evil.example"}),
        ("https://id.example.org", {"issuer": "https://id.example.org/"}),
        ("https://id.example.org", {"token_endpoint": "http://id.example.org/token"}),
        ("https://id.example.org", {"token_endpoint": None}),
        ("https://id.example.org", {"device_authorization_endpoint": "ftp://x/"}),
        ("http://id.example.org", {"issuer": "http://id.example.org"}),
    ],
)
def test_discovery_refuses_another_issuer_or_insecure_endpoints(issuer: str, change: dict[str, Any]) -> None:
    doc = {**DISCOVERY, **change}
    with pytest.raises(providers.DiscoveryError):
        providers.parse_discovery(issuer, json.dumps(doc).encode(), scope="mail")


async def test_discover_fetches_the_well_known_document() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(200, json=DISCOVERY)

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        p = await providers.discover(http, "https://id.example.org", scope="mail")
    assert seen == ["https://id.example.org/.well-known/openid-configuration"]
    assert p.endpoints.device_authorization == "https://id.example.org/device"


@pytest.mark.parametrize(
    "answer", [httpx.Response(503), httpx.Response(200, content=b"<html>"), httpx.ConnectError("x")]
)
async def test_discovery_outage_is_temporary(answer: httpx.Response | Exception) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if isinstance(answer, Exception):
            raise answer
        return answer

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        with pytest.raises(Temporary):
            await providers.discover(http, "https://id.example.org", scope="mail")


def test_loopback_http_issuer_is_allowed_for_a_local_provider() -> None:
    doc = {"issuer": "http://127.0.0.1:3000", "token_endpoint": "http://127.0.0.1:3000/token"}
    p = providers.parse_discovery("http://127.0.0.1:3000", json.dumps(doc).encode(), scope="mail")
    assert p.endpoints.token == "http://127.0.0.1:3000/token"
