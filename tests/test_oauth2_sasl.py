"""XOAUTH2 and OAUTHBEARER payloads and error challenges, as the IMAP upstream will send and read them."""

from __future__ import annotations

import base64
import contextlib
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.oauth2 import sasl
from gateway.oauth2.sasl import Challenge, ChallengeKind, SaslError

TOKEN = "ya29.vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg=="
tokens = st.from_regex(r"[A-Za-z0-9\-._~+/]{1,60}={0,2}", fullmatch=True)
names = st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=40)


def test_xoauth2_payload_is_the_documented_layout() -> None:
    payload = sasl.xoauth2("someuser@example.com", TOKEN)
    assert payload.raw == f"user=someuser@example.com\x01auth=Bearer {TOKEN}\x01\x01".encode()
    assert base64.b64decode(payload.b64()) == payload.raw
    assert payload.mechanism == "XOAUTH2"


def test_oauthbearer_payload_matches_rfc7628_example() -> None:
    # RFC 7628 section 4.1
    payload = sasl.oauthbearer(
        "vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg==",
        authzid="user@example.com",
        host="server.example.com",
        port=143,
    )
    assert payload.raw == (
        b"n,a=user@example.com,\x01host=server.example.com\x01port=143\x01"
        b"auth=Bearer vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg==\x01\x01"
    )


def test_oauthbearer_without_authzid_host_or_port() -> None:
    assert sasl.oauthbearer(TOKEN).raw == f"n,,\x01auth=Bearer {TOKEN}\x01\x01".encode()


def test_oauthbearer_escapes_comma_and_equals_in_the_authzid() -> None:
    payload = sasl.oauthbearer(TOKEN, authzid="a,b=c")
    assert payload.raw.startswith(b"n,a=a=2Cb=3Dc,\x01")
    assert sasl.parse_oauthbearer(payload.raw).user == "a,b=c"


@pytest.mark.parametrize("bad", ["", "tok en", "tok\x01en", "tök", "=abc"])
def test_a_token_outside_b64token_is_refused_without_echoing_it(bad: str) -> None:
    with pytest.raises(SaslError) as info:
        sasl.xoauth2("u", bad)
    if bad:
        assert bad not in str(info.value)
    with pytest.raises(SaslError):
        sasl.oauthbearer(bad)


@pytest.mark.parametrize("user", ["", "a\x01b", "a\r\nb"])
def test_a_user_with_control_characters_cannot_end_a_field(user: str) -> None:
    with pytest.raises(SaslError):
        sasl.xoauth2(user, TOKEN)
    with pytest.raises(SaslError):
        sasl.oauthbearer(TOKEN, authzid=user)
    with pytest.raises(SaslError):
        sasl.oauthbearer(TOKEN, host=user)


@pytest.mark.parametrize("port", [0, 65536, -1])
def test_a_port_out_of_range_is_refused(port: int) -> None:
    with pytest.raises(SaslError):
        sasl.oauthbearer(TOKEN, port=port)


def test_the_token_never_shows_in_a_repr() -> None:
    for payload in (sasl.xoauth2("u", TOKEN), sasl.oauthbearer(TOKEN, authzid="u")):
        assert TOKEN not in repr(payload)
        assert TOKEN.encode() not in repr(payload).encode()
        assert base64.b64encode(payload.raw).decode() not in repr(payload)
    parsed = sasl.parse_xoauth2(sasl.xoauth2("u", TOKEN).raw)
    assert TOKEN not in repr(parsed)


@given(user=names, token=tokens)
def test_xoauth2_round_trips(user: str, token: str) -> None:
    parsed = sasl.parse_xoauth2(sasl.xoauth2(user, token).raw)
    assert (parsed.user, parsed.token) == (user, token)


@given(
    token=tokens,
    authzid=st.none() | names,
    host=st.none() | names,
    port=st.none() | st.integers(1, 65535),
)
def test_oauthbearer_round_trips(token: str, authzid: str | None, host: str | None, port: int | None) -> None:
    parsed = sasl.parse_oauthbearer(sasl.oauthbearer(token, authzid=authzid, host=host, port=port).raw)
    assert (parsed.token, parsed.user, parsed.host, parsed.port) == (token, authzid, host, port)


@given(st.binary(max_size=200))
def test_client_response_parsers_take_any_bytes(data: bytes) -> None:
    for parse in (sasl.parse_xoauth2, sasl.parse_oauthbearer):
        with contextlib.suppress(SaslError):
            parse(data)


def test_google_style_xoauth2_challenge() -> None:
    doc = {"status": "401", "schemes": "bearer", "scope": "https://mail.google.com/"}
    line = b"+ " + base64.b64encode(json.dumps(doc).encode()) + b"\r\n"
    assert sasl.parse_challenge(line) == Challenge(
        ChallengeKind.INVALID_TOKEN, "401", scope="https://mail.google.com/", schemes="bearer"
    )


def test_rfc7628_challenge_with_openid_configuration() -> None:
    # RFC 7628 section 4.3's challenge, as sent
    line = (
        b"eyJzdGF0dXMiOiJpbnZhbGlkX3Rva2VuIiwic2NvcGUiOiJleGFtcGxlX3Njb3BlIiwi"
        b"b3BlbmlkLWNvbmZpZ3VyYXRpb24iOiJodHRwczovL2V4YW1wbGUuY29tLy53ZWxsLWtu"
        b"b3duL29wZW5pZC1jb25maWd1cmF0aW9uIn0="
    )
    challenge = sasl.parse_challenge(line)
    assert challenge.kind is ChallengeKind.INVALID_TOKEN
    assert challenge.scope == "example_scope"
    assert challenge.openid_configuration == "https://example.com/.well-known/openid-configuration"


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        ("insufficient_scope", ChallengeKind.INSUFFICIENT_SCOPE),
        ("403", ChallengeKind.INSUFFICIENT_SCOPE),
        ("invalid_request", ChallengeKind.INVALID_REQUEST),
        ("400", ChallengeKind.INVALID_REQUEST),
        ("teapot", ChallengeKind.OTHER),
    ],
)
def test_challenge_status_becomes_a_kind(status: str, kind: ChallengeKind) -> None:
    assert sasl.parse_challenge(base64.b64encode(json.dumps({"status": status}).encode())).kind is kind


def test_a_numeric_status_is_read_as_its_text() -> None:
    assert sasl.parse_challenge(base64.b64encode(b'{"status": 401}')).status == "401"


@pytest.mark.parametrize(
    "line",
    [
        b"+ not base64!",
        base64.b64encode(b"not json"),
        base64.b64encode(b"[1, 2]"),
        base64.b64encode(b'{"scope": "x"}'),
        base64.b64encode(b'{"status": "401", "scope": 7}'),
        base64.b64encode(b'{"status": "401\\u0001"}'),
        b"+ " + b"A" * 10000,
    ],
)
def test_a_malformed_challenge_raises_our_error(line: bytes) -> None:
    with pytest.raises(SaslError):
        sasl.parse_challenge(line)


@given(st.binary(max_size=300))
def test_challenge_parser_takes_any_bytes(data: bytes) -> None:
    with contextlib.suppress(SaslError):
        sasl.parse_challenge(data)


@given(
    status=st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=20),
    scope=st.none() | names,
    config=st.none() | names,
)
def test_challenge_round_trips(status: str, scope: str | None, config: str | None) -> None:
    challenge = sasl.parse_challenge(
        sasl.format_challenge(
            Challenge(ChallengeKind.OTHER, status, scope=scope, openid_configuration=config)
        )
    )
    assert (challenge.status, challenge.scope, challenge.openid_configuration) == (status, scope, config)


def test_error_acknowledgements() -> None:
    assert base64.b64decode(sasl.ERROR_ACK["OAUTHBEARER"]) == b"\x01"
    assert sasl.ERROR_ACK["XOAUTH2"] == b""
