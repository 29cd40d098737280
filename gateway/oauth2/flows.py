"""An OAuth2 client for the gateway's upstream tokens, over httpx (which runs on trio through anyio).

Flows, as ``OAuth2Client`` methods:

- device authorization (RFC 8628): ``start_device(scope)`` gives a ``DeviceAuthorization`` (the
  ``verification_uri`` and ``user_code`` to print); ``poll_device(device)`` polls at ``interval``,
  adds 5 s on ``slow_down``, waits on ``authorization_pending``, and ends with a ``TokenSet``,
  ``ExpiredToken`` (also when the code's own ``expires_in`` passes) or ``AccessDenied``. A few
  ``Temporary`` failures in a row are ridden out; more end the poll.
- authorization code with PKCE (RFC 6749 section 4.1, RFC 7636 S256): ``authorization_url(scope,
  redirect_uri)`` gives the URL to open and the ``PendingAuthorization`` (state, verifier);
  ``exchange_redirect(pending, pasted_url)`` checks the pasted redirect (same redirect URI, ``state``
  compared in constant time, ``error`` mapped) and exchanges the code.
- client credentials (RFC 6749 section 4.4): ``client_credentials(scope)``.
- refresh (section 6): ``refresh(token)`` keeps the new refresh token when the server rotates it and the
  old one when it sends none.
- revocation (RFC 7009): ``revoke(token_value, hint)``.

Errors are typed, and their text never holds a token, code, verifier or client secret:

- ``InvalidGrant``: the grant is gone (revoked, expired, consent withdrawn): re-authorise. The only error
  after which a stored token is useless.
- ``Temporary``: the endpoint is down, slow (httpx's own timeout), answers 5xx/408/429, or sends something
  that does not parse (malformed JSON, a 200 without a token, an HTML page from a proxy). Never a reason
  to drop a stored token.
- ``AccessDenied``, ``ExpiredToken`` (device flow), ``StateMismatch`` (a pasted URL from another
  attempt), ``Unsupported`` (the provider has no such endpoint), ``Refused`` (any other OAuth error code:
  ``invalid_client``, ``invalid_scope``, ``unauthorized_client``...; ``.error`` holds the code).

Bounds: every response body is read at most ``MAX_RESPONSE_BYTES``; a server's ``interval`` and
``expires_in`` are clamped. No ``timeout`` argument: callers bound each call with ``trio.fail_after``
(httpx's own timeout, set by ``open_http``, is the backstop). Credentials go only to the endpoints of the
``Endpoints`` given; redirects are not followed.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import hmac
import json
import math
import re
import secrets
import ssl
import time
import urllib.parse
from collections.abc import Callable, Mapping
from typing import Any, Literal

import httpx
import trio

from gateway import __version__

MAX_RESPONSE_BYTES = 64 * 1024
MAX_INTERVAL = 300.0  # seconds between device polls, whatever the server asks
MAX_LIFETIME = 10 * 365 * 86400.0  # an expires_in beyond this is clamped
TEMPORARY_IN_A_ROW = 3  # while polling a device code
AuthMethod = Literal["client_secret_basic", "client_secret_post", "none"]


class OAuthError(Exception):
    """Base of the client's errors. The text is safe to log: no secret is ever put in it."""


class InvalidGrant(OAuthError):
    """The grant is gone: the account must be authorised again."""


class Temporary(OAuthError):
    """The endpoint cannot answer now; try later and keep every stored token."""


class AccessDenied(OAuthError):
    """The user (or an admin policy) declined the authorisation."""


class ExpiredToken(OAuthError):
    """The device code expired before the user approved it."""


class StateMismatch(OAuthError):
    """The pasted redirect is not the answer to this authorisation request."""


class Unsupported(OAuthError):
    """The provider has no endpoint for this flow."""


class Refused(OAuthError):
    """Any other OAuth error response; ``error`` is the (sanitised) error code."""

    def __init__(self, message: str, error: str) -> None:
        super().__init__(message)
        self.error = error


@dataclasses.dataclass(frozen=True, slots=True)
class Endpoints:
    token: str
    authorization: str | None = None
    device_authorization: str | None = None
    revocation: str | None = None
    issuer: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class TokenSet:
    """What a token endpoint granted. ``expires_at`` is wall-clock epoch seconds (None: not said)."""

    access_token: str = dataclasses.field(repr=False)
    token_type: str
    expires_at: float | None
    refresh_token: str | None = dataclasses.field(default=None, repr=False)
    scope: str | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> TokenSet:
        access, ttype = doc.get("access_token"), doc.get("token_type")
        expires, refresh, scope = doc.get("expires_at"), doc.get("refresh_token"), doc.get("scope")
        if not isinstance(access, str) or not isinstance(ttype, str):
            raise ValueError("a token set needs access_token and token_type")
        if expires is not None and (not isinstance(expires, int | float) or isinstance(expires, bool)):
            raise ValueError("expires_at is not a number")
        if refresh is not None and not isinstance(refresh, str):
            raise ValueError("refresh_token is not a string")
        if scope is not None and not isinstance(scope, str):
            raise ValueError("scope is not a string")
        return cls(access, ttype, None if expires is None else float(expires), refresh, scope)


@dataclasses.dataclass(frozen=True, slots=True)
class DeviceAuthorization:
    device_code: str = dataclasses.field(repr=False)
    user_code: str
    verification_uri: str
    verification_uri_complete: str | None
    interval: float
    deadline: float  # trio.current_time() at which the device code expires
    scope: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class PendingAuthorization:
    """One authorisation-code attempt: what ``exchange_redirect`` needs to check and finish it."""

    redirect_uri: str
    state: str = dataclasses.field(repr=False)
    code_verifier: str = dataclasses.field(repr=False)
    scope: str = ""


def _printable(value: object, cap: int = 200) -> str:
    """A server-given string made safe for exception text and log lines."""
    text = value if isinstance(value, str) else ""
    return re.sub(r"[^\x20-\x7e]", "?", text)[:cap]


def pkce_pair() -> tuple[str, str]:
    """(code_verifier, code_challenge) for S256: 43 characters of 32 random bytes, and its SHA-256."""
    verifier = base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


def open_http(verify: ssl.SSLContext | None = None) -> httpx.AsyncClient:
    """The client the flows share: no proxies or netrc from the environment, no redirects, a 30 s
    backstop timeout (callers bound each call with ``trio.fail_after``). ``async with`` it, or
    ``aclose()`` it."""
    return httpx.AsyncClient(
        verify=verify if verify is not None else ssl.create_default_context(),
        timeout=httpx.Timeout(30.0, connect=15.0),
        trust_env=False,
        follow_redirects=False,
        headers={"User-Agent": f"pop3-gateway/{__version__}", "Accept": "application/json"},
    )


def _clamp(value: object, default: float, low: float, high: float) -> float:
    number: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str) and re.fullmatch(r"[0-9]{1,12}", value):
        number = float(value)  # some servers send numbers as strings
    if number is None or not math.isfinite(number):
        return default
    return min(max(number, low), high)


class OAuth2Client:
    """One registered client at one provider. ``http`` is the caller's (see ``open_http``)."""

    def __init__(
        self,
        endpoints: Endpoints,
        client_id: str,
        client_secret: str | None = None,
        *,
        http: httpx.AsyncClient,
        auth_method: AuthMethod | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.endpoints = endpoints
        self.client_id = client_id
        self._secret = client_secret
        self._http = http
        self._clock = clock
        self.auth_method: AuthMethod = auth_method or ("client_secret_basic" if client_secret else "none")
        if self.auth_method != "none" and not client_secret:
            raise ValueError(f"{self.auth_method} needs a client secret")

    def __repr__(self) -> str:
        return f"OAuth2Client(token={self.endpoints.token!r}, client_id={self.client_id!r})"

    # ------------------------------------------------------------------ the wire

    def _auth(self, form: dict[str, str]) -> dict[str, str]:
        headers: dict[str, str] = {}
        if self.auth_method == "client_secret_basic":
            assert self._secret is not None
            quote = urllib.parse.quote_plus  # RFC 6749 section 2.3.1: form-encoded before base64
            pair = f"{quote(self.client_id)}:{quote(self._secret)}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(pair).decode()
        else:
            form["client_id"] = self.client_id
            if self.auth_method == "client_secret_post":
                assert self._secret is not None
                form["client_secret"] = self._secret
        return headers

    async def _post(self, url: str, form: dict[str, str], what: str) -> tuple[int, bytes]:
        headers = self._auth(form)
        headers["Accept"] = "application/json"
        headers["Accept-Encoding"] = "identity"
        try:
            async with self._http.stream("POST", url, data=form, headers=headers) as response:
                declared = response.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > MAX_RESPONSE_BYTES:
                    raise Temporary(f"{what}: a response of {declared} bytes is over the cap")
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_RESPONSE_BYTES:
                        raise Temporary(f"{what}: a response over {MAX_RESPONSE_BYTES} bytes")
                return response.status_code, bytes(body)
        except httpx.TimeoutException:
            raise Temporary(f"{what}: timed out") from None
        except (httpx.HTTPError, httpx.InvalidURL, OSError, ssl.SSLError) as exc:
            raise Temporary(f"{what}: {exc.__class__.__name__}") from None

    async def _token_request(self, form: dict[str, str], what: str) -> dict[str, Any]:
        """The JSON of a successful token response; the typed error for every other answer."""
        status, body = await self._post(self.endpoints.token, form, what)
        doc = _json_object(body)
        if status == 200:
            if doc is None:
                raise Temporary(f"{what}: the token endpoint sent no JSON object")
            return doc
        raise _error(status, doc, what)

    def _tokens(self, doc: Mapping[str, Any], what: str, previous: TokenSet | None = None) -> TokenSet:
        access, ttype = doc.get("access_token"), doc.get("token_type")
        if not isinstance(access, str) or not access or len(access) > 16384:
            raise Temporary(f"{what}: the response has no access_token")
        if not isinstance(ttype, str) or ttype.lower() != "bearer":
            raise Temporary(f"{what}: token_type {_printable(ttype, 40)!r} is not Bearer")
        refresh = doc.get("refresh_token")
        if not isinstance(refresh, str) or not refresh:
            refresh = previous.refresh_token if previous is not None else None  # not rotated: keep it
        scope = doc.get("scope")
        if not isinstance(scope, str):
            scope = previous.scope if previous is not None else None
        expires_in = doc.get("expires_in")
        expires_at = None
        if expires_in is not None:
            expires_at = self._clock() + _clamp(expires_in, 0.0, 0.0, MAX_LIFETIME)
        return TokenSet(access, "Bearer", expires_at, refresh, scope)

    # ------------------------------------------------------------------ device authorization

    async def start_device(self, scope: str) -> DeviceAuthorization:
        url = self.endpoints.device_authorization
        if url is None:
            raise Unsupported("the provider has no device authorization endpoint")
        what = "device authorization"
        status, body = await self._post(url, {"scope": scope}, what)
        doc = _json_object(body)
        if status != 200:
            raise _error(status, doc, what)
        if doc is None:
            raise Temporary(f"{what}: no JSON object")
        code, user_code = doc.get("device_code"), doc.get("user_code")
        # Microsoft's v1 endpoints said verification_url; RFC 8628 and v2.0 say verification_uri
        uri = doc.get("verification_uri", doc.get("verification_url"))
        complete = doc.get("verification_uri_complete")
        if not (isinstance(code, str) and code and isinstance(user_code, str) and isinstance(uri, str)):
            raise Temporary(f"{what}: the response lacks device_code, user_code or verification_uri")
        if not _is_http_url(uri):
            raise Temporary(f"{what}: verification_uri is not an http(s) URL")
        return DeviceAuthorization(
            device_code=code,
            user_code=_printable(user_code, 64),
            verification_uri=_printable(uri, 2048),
            verification_uri_complete=_printable(complete, 2048)
            if isinstance(complete, str) and _is_http_url(complete)
            else None,
            interval=_clamp(doc.get("interval"), 5.0, 1.0, MAX_INTERVAL),
            deadline=trio.current_time() + _clamp(doc.get("expires_in"), 900.0, 1.0, 86400.0),
            scope=scope,
        )

    async def poll_device(self, device: DeviceAuthorization) -> TokenSet:
        interval = device.interval
        temporary = 0
        form = {
            "grant_type": "urn:ietf:params:oauth:grant-type:device_code",
            "device_code": device.device_code,
        }
        while True:
            if trio.current_time() + interval > device.deadline:
                raise ExpiredToken("the device code expired before it was approved")
            await trio.sleep(interval)
            try:
                doc = await self._token_request(dict(form), "device token")
            except Refused as exc:
                if exc.error == "authorization_pending":
                    temporary = 0
                    continue
                if exc.error == "slow_down":  # RFC 8628 section 3.5: 5 seconds more from now on
                    interval = min(interval + 5.0, MAX_INTERVAL)
                    temporary = 0
                    continue
                raise
            except Temporary:
                temporary += 1
                if temporary >= TEMPORARY_IN_A_ROW:
                    raise
                continue
            return self._tokens(doc, "device token")

    # ------------------------------------------------------------------ authorization code + PKCE

    def authorization_url(
        self, scope: str, redirect_uri: str, *, extra: Mapping[str, str] | None = None
    ) -> tuple[str, PendingAuthorization]:
        base = self.endpoints.authorization
        if base is None:
            raise Unsupported("the provider has no authorization endpoint")
        verifier, challenge = pkce_pair()
        state = secrets.token_urlsafe(24)
        params = {
            "response_type": "code",
            "client_id": self.client_id,
            "redirect_uri": redirect_uri,
            "scope": scope,
            "state": state,
            "code_challenge": challenge,
            "code_challenge_method": "S256",
            **(extra or {}),
        }
        joiner = "&" if "?" in base else "?"
        url = base + joiner + urllib.parse.urlencode(params, quote_via=urllib.parse.quote)
        return url, PendingAuthorization(redirect_uri, state, verifier, scope)

    async def exchange_redirect(self, pending: PendingAuthorization, pasted: str) -> TokenSet:
        pasted = pasted.strip()
        if len(pasted) > 16384:
            raise StateMismatch("the pasted URL is too long")
        got, want = urllib.parse.urlsplit(pasted), urllib.parse.urlsplit(pending.redirect_uri)
        if (got.scheme.lower(), got.netloc.lower(), got.path or "/") != (
            want.scheme.lower(),
            want.netloc.lower(),
            want.path or "/",
        ):
            raise StateMismatch("the pasted URL is not the redirect URI of this request")
        params = urllib.parse.parse_qs(got.query, keep_blank_values=True)
        if not params and got.fragment:  # a provider that answered in the fragment
            params = urllib.parse.parse_qs(got.fragment, keep_blank_values=True)
        state = params.get("state", [""])
        if len(state) != 1 or not hmac.compare_digest(state[0].encode(), pending.state.encode()):
            raise StateMismatch("the pasted URL's state is not this request's: start again")
        if "error" in params:
            error = _printable(params["error"][0], 64)
            if error == "access_denied":
                raise AccessDenied("the authorisation was declined")
            raise Refused(f"authorization: {error}", error)
        code = params.get("code", [])
        if len(code) != 1 or not code[0]:
            raise StateMismatch("the pasted URL has no code")
        form = {
            "grant_type": "authorization_code",
            "code": code[0],
            "redirect_uri": pending.redirect_uri,
            "code_verifier": pending.code_verifier,
        }
        return self._tokens(await self._token_request(form, "code exchange"), "code exchange")

    # ------------------------------------------------------------------ the others

    async def client_credentials(self, scope: str) -> TokenSet:
        if self._secret is None:
            raise ValueError("client credentials need a client secret")
        form = {"grant_type": "client_credentials", "scope": scope}
        return self._tokens(await self._token_request(form, "client credentials"), "client credentials")

    async def refresh(self, token: TokenSet, scope: str | None = None) -> TokenSet:
        """The refreshed set. Rotation: the new refresh token when sent, else the old one is kept."""
        if not token.refresh_token:
            raise InvalidGrant("no refresh token is stored: authorise the account again")
        form = {"grant_type": "refresh_token", "refresh_token": token.refresh_token}
        if scope is not None:
            form["scope"] = scope
        return self._tokens(await self._token_request(form, "refresh"), "refresh", previous=token)

    async def revoke(self, value: str, hint: Literal["refresh_token", "access_token"]) -> None:
        url = self.endpoints.revocation
        if url is None:
            raise Unsupported("the provider has no revocation endpoint")
        status, body = await self._post(url, {"token": value, "token_type_hint": hint}, "revocation")
        if status != 200:
            raise _error(status, _json_object(body), "revocation")


def _is_http_url(value: str) -> bool:
    parts = urllib.parse.urlsplit(value)
    return parts.scheme in ("https", "http") and bool(parts.netloc)


def _json_object(body: bytes) -> dict[str, Any] | None:
    with contextlib.suppress(ValueError, RecursionError):
        doc = json.loads(body.decode("utf-8"))
        if isinstance(doc, dict):
            return doc
    return None


def _error(status: int, doc: dict[str, Any] | None, what: str) -> OAuthError:
    """The typed error of a response that is not 200."""
    if status >= 500 or status in (408, 429):
        return Temporary(f"{what}: HTTP {status}")
    error = doc.get("error") if doc is not None else None
    if not isinstance(error, str) or not error:
        # not an OAuth error response (a proxy's page, an empty body): nothing to conclude from it
        return Temporary(f"{what}: HTTP {status} without an OAuth error")
    code = _printable(error, 64)
    description = _printable(doc.get("error_description") if doc is not None else None)
    text = f"{what}: {code}" + (f" ({description})" if description else "")
    if code == "invalid_grant":
        return InvalidGrant(text)
    if code == "access_denied":
        return AccessDenied(text)
    if code == "expired_token":
        return ExpiredToken(text)
    return Refused(text, code)
