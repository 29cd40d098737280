"""Provider profiles: where each provider's endpoints are, and which scopes reach its mailboxes.

Written from the providers' published documentation (nothing here can reach them; tests use fakes):

- Microsoft 365 / Outlook.com (Microsoft identity platform v2.0): ``https://login.microsoftonline.com/
  {tenant}/oauth2/v2.0/authorize``, ``/token`` and ``/devicecode``. ``tenant`` is a tenant id or domain, or
  ``organizations`` / ``consumers`` / ``common``. Delegated IMAP scope
  ``https://outlook.office.com/IMAP.AccessAsUser.All offline_access`` (``offline_access`` is what makes
  Microsoft send a refresh token); app-only (client credentials, IMAP.AccessAsApp / POP.AccessAsApp
  granted to the app and the Exchange service principal registered) ``https://outlook.office365.com/
  .default``, which needs a real tenant, not ``common``. Microsoft has no RFC 7009 revocation endpoint,
  and rotates the refresh token on every use.
- Google: ``https://accounts.google.com/o/oauth2/v2/auth``, ``https://oauth2.googleapis.com/token``,
  revocation ``https://oauth2.googleapis.com/revoke``; scope ``https://mail.google.com/``. Google's device
  flow (``https://oauth2.googleapis.com/device/code``) allows only a short list of scopes, and the mail
  scope is not among them, so the profile offers no device endpoint: use the authorization code flow.
  The authorisation URL asks for ``access_type=offline`` and ``prompt=consent``, without which Google sends
  no refresh token. Gmail has no client-credentials grant for users' mail (that is a service account with
  domain-wide delegation, a signed JWT grant not offered here).
- Any OpenID Connect provider by issuer discovery: ``discover(http, issuer, scope=...)`` fetches
  ``<issuer>/.well-known/openid-configuration`` (``parse_discovery`` is the pure half), requires the
  document's ``issuer`` to equal the configured one exactly (OpenID Connect Discovery 1.0 section 4.3),
  and every endpoint to be https (http only on loopback, for tests and a local provider).
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import json
import re
import ssl
import urllib.parse
from collections.abc import Mapping
from typing import Any

import httpx

from gateway.oauth2.flows import MAX_RESPONSE_BYTES, AuthMethod, Endpoints, Temporary


class DiscoveryError(Exception):
    """A discovery document that cannot be used (wrong issuer, bad endpoints). Not temporary."""


@dataclasses.dataclass(frozen=True, slots=True)
class Provider:
    name: str
    endpoints: Endpoints
    user_scope: str  # the delegated scope that reaches the mailbox (with what gets a refresh token)
    app_scope: str | None  # the client-credentials scope, when the provider has one for mail
    auth_method: AuthMethod = "client_secret_post"
    authorization_extra: tuple[tuple[str, str], ...] = ()  # parameters its authorisation URL needs

    @property
    def authorization_params(self) -> dict[str, str]:
        return dict(self.authorization_extra)


MICROSOFT_LOGIN = "https://login.microsoftonline.com"
MICROSOFT_IMAP_SCOPE = "https://outlook.office.com/IMAP.AccessAsUser.All offline_access"
MICROSOFT_POP_SCOPE = "https://outlook.office.com/POP.AccessAsUser.All offline_access"
MICROSOFT_APP_SCOPE = "https://outlook.office365.com/.default"
GOOGLE_MAIL_SCOPE = "https://mail.google.com/"
_TENANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,252}")


def microsoft(tenant: str = "organizations") -> Provider:
    if not _TENANT.fullmatch(tenant):
        raise ValueError("a Microsoft tenant is a tenant id, a domain, or organizations/consumers/common")
    base = f"{MICROSOFT_LOGIN}/{tenant}/oauth2/v2.0"
    generic = tenant.lower() in ("common", "organizations", "consumers")
    return Provider(
        name="microsoft",
        endpoints=Endpoints(
            token=f"{base}/token",
            authorization=f"{base}/authorize",
            device_authorization=f"{base}/devicecode",
            revocation=None,
            issuer=None,  # the v2.0 issuer names the tenant's GUID, which a domain or alias does not give
        ),
        user_scope=MICROSOFT_IMAP_SCOPE,
        app_scope=None if generic else MICROSOFT_APP_SCOPE,
    )


def google() -> Provider:
    return Provider(
        name="google",
        endpoints=Endpoints(
            token="https://oauth2.googleapis.com/token",  # noqa: S106 (a URL)
            authorization="https://accounts.google.com/o/oauth2/v2/auth",
            device_authorization=None,
            revocation="https://oauth2.googleapis.com/revoke",
            issuer="https://accounts.google.com",
        ),
        user_scope=GOOGLE_MAIL_SCOPE,
        app_scope=None,
        authorization_extra=(("access_type", "offline"), ("prompt", "consent")),
    )


def _allowed_url(url: object) -> bool:
    if not isinstance(url, str) or len(url) > 2048:
        return False
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return True
    if parts.scheme != "http" or not parts.hostname:
        return False
    if parts.hostname == "localhost":
        return True
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(parts.hostname).is_loopback
    return False


def discovery_url(issuer: str) -> str:
    return issuer.rstrip("/") + "/.well-known/openid-configuration"


def parse_discovery(issuer: str, body: bytes, *, scope: str, name: str = "oidc") -> Provider:
    """A provider from its discovery document, checked against the configured issuer."""
    if not _allowed_url(issuer):
        raise DiscoveryError("the issuer must be an https URL (http only on loopback)")
    try:
        doc = json.loads(body.decode("utf-8"))
    except (ValueError, RecursionError):
        raise Temporary("discovery: the document is not JSON") from None
    if not isinstance(doc, dict):
        raise Temporary("discovery: the document is not a JSON object")
    if doc.get("issuer") != issuer:
        raise DiscoveryError("discovery: the document's issuer is not the configured issuer")
    token = doc.get("token_endpoint")
    if not _allowed_url(token):
        raise DiscoveryError("discovery: no usable token_endpoint")
    assert isinstance(token, str)

    def optional(key: str) -> str | None:
        value = doc.get(key)
        if value is None:
            return None
        if not _allowed_url(value):
            raise DiscoveryError(f"discovery: {key} is not an https URL")
        assert isinstance(value, str)
        return value

    return Provider(
        name=name,
        endpoints=Endpoints(
            token=token,
            authorization=optional("authorization_endpoint"),
            device_authorization=optional("device_authorization_endpoint"),
            revocation=optional("revocation_endpoint"),
            issuer=issuer,
        ),
        user_scope=scope,
        app_scope=scope,
        auth_method=_auth_method(doc),
    )


def _auth_method(doc: Mapping[str, Any]) -> AuthMethod:
    """client_secret_basic unless the provider lists only client_secret_post (the spec's default is basic)."""
    methods = doc.get("token_endpoint_auth_methods_supported")
    if isinstance(methods, list) and "client_secret_basic" not in methods and "client_secret_post" in methods:
        return "client_secret_post"
    return "client_secret_basic"


async def discover(http: httpx.AsyncClient, issuer: str, *, scope: str, name: str = "oidc") -> Provider:
    """Fetch and check ``issuer``'s discovery document. ``Temporary`` when it cannot be fetched now,
    ``DiscoveryError`` when it is not this issuer's or not usable."""
    if not _allowed_url(issuer):
        raise DiscoveryError("the issuer must be an https URL (http only on loopback)")
    url = discovery_url(issuer)
    try:
        async with http.stream("GET", url, headers={"Accept": "application/json"}) as response:
            if response.status_code != 200:
                raise Temporary(f"discovery: HTTP {response.status_code}")
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > MAX_RESPONSE_BYTES:
                    raise Temporary("discovery: the document is over the size cap")
    except httpx.TimeoutException:
        raise Temporary("discovery: timed out") from None
    except (httpx.HTTPError, httpx.InvalidURL, OSError, ssl.SSLError) as exc:
        raise Temporary(f"discovery: {exc.__class__.__name__}") from None
    return parse_discovery(issuer, bytes(body), scope=scope, name=name)
