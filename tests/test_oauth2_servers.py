"""The OAuth2 test servers themselves, with plain clients (httpx, imaplib) and no gateway code.

The `oidc` provider (panva's oidc-provider) issues tokens through its real endpoints; `dovecot_oauth2`
takes its JWT access tokens over IMAP XOAUTH2 and OAUTHBEARER, `dovecot_oauth2_introspect` takes opaque
tokens by asking the provider's introspection endpoint. What holds here is what the gateway's OAuth2
upstream (issue 11) can rely on.
"""

from __future__ import annotations

import base64
import imaplib
import json
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.realservers.corpus import message
from tests.realservers.dovecot import Dovecot
from tests.realservers.oidc import OPAQUE_RESOURCE, RESOURCE, OAuthError, OidcProvider

pytestmark = [pytest.mark.realserver, pytest.mark.timeout(60)]


def jwt_claims(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    claims: dict[str, Any] = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return claims


def xoauth2(user: str, token: str) -> bytes:
    return f"user={user}\x01auth=Bearer {token}\x01\x01".encode()


def oauthbearer(user: str, token: str, server: Dovecot) -> bytes:
    fields = f"host={server.host}\x01port={server.imap_port}\x01auth=Bearer {token}"
    return f"n,a={user},\x01{fields}\x01\x01".encode()


def sasl_login(server: Dovecot, mechanism: str, payload: bytes) -> imaplib.IMAP4:
    """AUTHENTICATE over plain IMAP. On a failure Dovecot sends an error challenge, answered empty
    (RFC 7628)."""
    sent: list[bytes] = []

    def respond(_challenge: bytes) -> bytes:
        answer = b"" if sent else payload
        sent.append(answer)
        return answer

    imap = imaplib.IMAP4(server.host, server.imap_port, timeout=10)
    try:
        imap.authenticate(mechanism, respond)
    except BaseException:
        imap.shutdown()
        raise
    return imap


def inbox_count(imap: imaplib.IMAP4) -> int:
    status, data = imap.select("INBOX", readonly=True)
    assert status == "OK"
    return int(data[0] or 0)


def refused(server: Dovecot, mechanism: str, payload: bytes) -> str:
    """The NO text of a refused AUTHENTICATE."""
    with pytest.raises(imaplib.IMAP4.error) as failure:
        sasl_login(server, mechanism, payload).logout()
    return str(failure.value)


def wait_until(condition: Callable[[], bool], deadline: float, what: str) -> None:
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not {what} by the deadline")
        time.sleep(0.25)


def test_device_flow_gives_jwt_access_and_refresh_tokens(oidc: OidcProvider) -> None:
    device = oidc.device_authorize()
    assert device.verification_uri == oidc.issuer + "/device"
    assert device.user_code in device.verification_uri_complete
    with pytest.raises(OAuthError) as pending:
        oidc.poll_device_token(device, timeout=0)
    assert pending.value.error == "authorization_pending"

    oidc.approve_device(device.user_code, "alice")
    tokens = oidc.poll_device_token(device)

    assert (
        tokens.refresh_token and tokens.token_type == "Bearer" and tokens.expires_in == oidc.access_token_ttl
    )
    claims = jwt_claims(tokens.access_token)
    assert claims["iss"] == oidc.issuer and claims["sub"] == "alice" and claims["aud"] == RESOURCE
    assert claims["scope"] == "imap" and claims["exp"] - claims["iat"] == oidc.access_token_ttl


def test_a_wrong_password_at_the_provider_leaves_the_device_code_pending(oidc: OidcProvider) -> None:
    device = oidc.device_authorize()
    with pytest.raises(AssertionError, match="Invalid login or password"):
        oidc.approve_device(device.user_code, "alice", password="wrong")
    with pytest.raises(OAuthError) as pending:
        oidc.poll_device_token(device, timeout=0)
    assert pending.value.error == "authorization_pending"


def test_jwt_access_token_logs_in_with_xoauth2_and_oauthbearer(
    oidc: OidcProvider, dovecot_oauth2: Dovecot
) -> None:
    dovecot_oauth2.append("alice", oidc.accounts["alice"], [message("oauth2", [b"hello"])])
    tokens = oidc.device_login("alice")

    with sasl_login(dovecot_oauth2, "XOAUTH2", xoauth2("alice", tokens.access_token)) as imap:
        assert inbox_count(imap) >= 1
    with sasl_login(
        dovecot_oauth2, "OAUTHBEARER", oauthbearer("alice", tokens.access_token, dovecot_oauth2)
    ) as imap:
        assert inbox_count(imap) >= 1
    # alice's token is not bob's.
    answer = refused(dovecot_oauth2, "XOAUTH2", xoauth2("bob", tokens.access_token))
    assert "[AUTHENTICATIONFAILED]" in answer


def test_expired_token_is_refused_and_refresh_rotates_the_refresh_token(
    oidc: OidcProvider, dovecot_oauth2: Dovecot
) -> None:
    tokens = oidc.device_login("alice")
    assert tokens.refresh_token is not None
    payload = xoauth2("alice", tokens.access_token)
    sasl_login(dovecot_oauth2, "XOAUTH2", payload).logout()

    expires = jwt_claims(tokens.access_token)["exp"]
    failures: list[str] = []

    def is_refused() -> bool:
        try:
            sasl_login(dovecot_oauth2, "XOAUTH2", payload).logout()
        except imaplib.IMAP4.error as exc:
            failures.append(str(exc))
            return True
        return False

    wait_until(is_refused, time.monotonic() + oidc.access_token_ttl + 5, "refused after expiry")
    assert time.time() >= expires - 1
    assert "[AUTHENTICATIONFAILED]" in failures[-1]
    # The reason reaches the log through Dovecot's log process, a moment after the client hears NO.
    wait_until(lambda: "Token has expired" in dovecot_oauth2.log_text(), time.monotonic() + 5, "logged")

    fresh = oidc.refresh(tokens.refresh_token)
    assert fresh.access_token != tokens.access_token
    assert fresh.refresh_token is not None and fresh.refresh_token != tokens.refresh_token
    sasl_login(dovecot_oauth2, "XOAUTH2", xoauth2("alice", fresh.access_token)).logout()

    with pytest.raises(OAuthError) as stale:
        oidc.refresh(tokens.refresh_token)
    assert stale.value.error == "invalid_grant"
    # Replaying a rotated-out refresh token revokes the whole grant (the provider's reuse detection): a
    # client that loses the new refresh token and retries the old one loses both.
    with pytest.raises(OAuthError) as revoked:
        oidc.refresh(fresh.refresh_token)
    assert revoked.value.error == "invalid_grant"


def test_revoking_the_grant_makes_the_refresh_token_invalid_grant(oidc: OidcProvider) -> None:
    tokens = oidc.device_login("bob")
    assert tokens.refresh_token is not None
    rotated = oidc.refresh(tokens.refresh_token)
    assert rotated.refresh_token is not None

    oidc.revoke(rotated.refresh_token)

    with pytest.raises(OAuthError) as failure:
        oidc.refresh(rotated.refresh_token)
    assert failure.value.error == "invalid_grant"


def test_client_credentials_token_logs_in_as_the_user_named_in_xoauth2(
    oidc: OidcProvider, dovecot_oauth2: Dovecot
) -> None:
    app = oidc.client_credentials()
    assert app.refresh_token is None
    claims = jwt_claims(app.access_token)
    assert claims["sub"] == oidc.client.client_id and claims["scope"] == "imap.app"

    for user in ("alice", "bob"):
        with sasl_login(dovecot_oauth2, "XOAUTH2", xoauth2(user, app.access_token)) as imap:
            assert inbox_count(imap) >= 0
    # A user's token is no app token: the app-only passdb wants the app scope.
    users = oidc.device_login("alice")
    answer = refused(dovecot_oauth2, "XOAUTH2", xoauth2("bob", users.access_token))
    assert "[AUTHENTICATIONFAILED]" in answer


def test_introspection_variant_accepts_an_opaque_token_until_it_is_revoked(
    oidc: OidcProvider, dovecot_oauth2_introspect: Dovecot
) -> None:
    tokens = oidc.device_login("bob", resource=OPAQUE_RESOURCE)
    assert tokens.access_token.count(".") == 0  # opaque, not a JWT
    assert oidc.introspect(tokens.access_token)["sub"] == "bob"

    with sasl_login(dovecot_oauth2_introspect, "XOAUTH2", xoauth2("bob", tokens.access_token)) as imap:
        assert inbox_count(imap) >= 0
    sasl_login(
        dovecot_oauth2_introspect,
        "OAUTHBEARER",
        oauthbearer("bob", tokens.access_token, dovecot_oauth2_introspect),
    ).logout()
    answer = refused(dovecot_oauth2_introspect, "XOAUTH2", xoauth2("alice", tokens.access_token))
    assert "[AUTHENTICATIONFAILED]" in answer

    oidc.revoke(tokens.access_token, "access_token")
    answer = refused(dovecot_oauth2_introspect, "XOAUTH2", xoauth2("bob", tokens.access_token))
    assert "[AUTHENTICATIONFAILED]" in answer
