"""SASL for OAuth2 upstreams, sans-IO: the initial responses of XOAUTH2 and OAUTHBEARER, and the server's
error challenge.

- ``xoauth2(user, token)``: ``user=<user>\\x01auth=Bearer <token>\\x01\\x01`` (Google's and Microsoft's
  XOAUTH2).
- ``oauthbearer(token, authzid=..., host=..., port=...)``: RFC 7628 section 3.1: the GS2 header
  ``n,a=<authzid>,`` (RFC 5801 escaping: ``=`` as ``=3D``, ``,`` as ``=2C``; ``n,,`` without an authzid),
  then ``\\x01host=<host>\\x01port=<port>\\x01auth=Bearer <token>\\x01\\x01``.
- Both give an ``InitialResponse``: ``raw`` is the payload, ``b64()`` its base64 as IMAP ``AUTHENTICATE``
  sends it (as the SASL-IR argument or after the ``+`` continuation). Its repr never shows the payload.
- ``parse_challenge(line)``: the ``+ <base64>`` continuation a server sends when the token is refused:
  RFC 7628's JSON ``{"status": ..., "scope": ..., "openid-configuration": ...}``, and XOAUTH2's base64
  JSON (``{"status":"401","schemes":"bearer","scope":"..."}``) alike, into a ``Challenge`` with a
  ``ChallengeKind``. The client then answers with ``ERROR_ACK[mechanism]`` (RFC 7628: ``\\x01``; XOAUTH2:
  an empty line) and the server completes with a tagged NO.
- ``parse_xoauth2`` and ``parse_oauthbearer``: the server's side, for fakes and for round trips.

Anything malformed raises ``SaslError``, whose text never carries a token. Values are checked before
they go out: a user or host with ``\\x01``, or a token outside RFC 6750's ``b64token`` alphabet, would
let one field end another.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import enum
import json
import re
from typing import Literal

Mechanism = Literal["XOAUTH2", "OAUTHBEARER"]

MAX_CHALLENGE_BYTES = 8192  # a challenge is a short JSON object; anything longer is refused
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")  # RFC 6750 section 2.1
_TEXT = re.compile(r"[^\x00-\x1f\x7f]*")  # no control character, so no field separator


class SaslError(ValueError):
    """A value that cannot go into a payload, or a server message that does not parse."""


@dataclasses.dataclass(frozen=True, slots=True)
class InitialResponse:
    mechanism: Mechanism
    raw: bytes = dataclasses.field(repr=False)

    def b64(self) -> bytes:
        return base64.b64encode(self.raw)


# What the client sends after an error challenge, so the server can finish with a tagged NO.
ERROR_ACK: dict[Mechanism, bytes] = {"OAUTHBEARER": base64.b64encode(b"\x01"), "XOAUTH2": b""}


def _check_token(token: str) -> None:
    if not _B64TOKEN.fullmatch(token):
        raise SaslError("the access token is not an RFC 6750 b64token")


def _check_text(value: str, what: str) -> None:
    if not value or not _TEXT.fullmatch(value):
        raise SaslError(f"the {what} is empty or has control characters")


def xoauth2(user: str, token: str) -> InitialResponse:
    _check_text(user, "user name")
    _check_token(token)
    return InitialResponse("XOAUTH2", f"user={user}\x01auth=Bearer {token}\x01\x01".encode())


def gs2_escape(name: str) -> str:
    """RFC 5801 saslname: ``=`` and ``,`` escaped (``=`` first, so the escapes are not escaped again)."""
    return name.replace("=", "=3D").replace(",", "=2C")


def gs2_unescape(name: str) -> str:
    if re.search(r"=(?!2C|3D)", name) or "," in name:
        raise SaslError("bad escaping in the GS2 authzid")
    return name.replace("=2C", ",").replace("=3D", "=")


def oauthbearer(
    token: str, *, authzid: str | None = None, host: str | None = None, port: int | None = None
) -> InitialResponse:
    _check_token(token)
    header = "n,,"
    if authzid is not None:
        _check_text(authzid, "authzid")
        header = f"n,a={gs2_escape(authzid)},"
    fields = []
    if host is not None:
        _check_text(host, "host")
        fields.append(f"host={host}")
    if port is not None:
        if not 0 < port < 65536:
            raise SaslError("the port is out of range")
        fields.append(f"port={port}")
    fields.append(f"auth=Bearer {token}")
    return InitialResponse("OAUTHBEARER", ("\x01".join([header, *fields]) + "\x01\x01").encode())


@dataclasses.dataclass(frozen=True, slots=True)
class ClientResponse:
    """A parsed initial response (the server's view)."""

    user: str | None  # XOAUTH2's user, OAUTHBEARER's authzid
    token: str = dataclasses.field(repr=False)
    host: str | None = None
    port: int | None = None


def _kvpairs(text: str) -> dict[str, str]:
    if not text.endswith("\x01\x01"):
        raise SaslError("the payload does not end with two ^A")
    pairs: dict[str, str] = {}
    for item in text[:-2].split("\x01"):
        key, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z]+", key) or key in pairs:
            raise SaslError("a malformed key/value pair")
        pairs[key] = value
    return pairs


def _bearer(pairs: dict[str, str]) -> str:
    auth = pairs.get("auth", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() != "bearer":
        raise SaslError("no Bearer credential")
    _check_token(token)
    return token


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise SaslError("the payload is not UTF-8") from None


def parse_xoauth2(raw: bytes) -> ClientResponse:
    pairs = _kvpairs(_decode(raw))
    if set(pairs) != {"user", "auth"}:
        raise SaslError("XOAUTH2 needs exactly user and auth")
    _check_text(pairs["user"], "user name")
    return ClientResponse(pairs["user"], _bearer(pairs))


def parse_oauthbearer(raw: bytes) -> ClientResponse:
    text = _decode(raw)
    match = re.match(r"n,(?:a=([^,]*))?,\x01", text)
    if match is None:
        raise SaslError("no GS2 header (only 'n' channel binding is supported)")
    authzid = gs2_unescape(match.group(1)) if match.group(1) is not None else None
    if authzid is not None:
        _check_text(authzid, "authzid")
    pairs = _kvpairs(text[match.end() :])
    if "auth" not in pairs:
        raise SaslError("no auth field")
    port: int | None = None
    if "port" in pairs:
        if not re.fullmatch(r"[0-9]{1,5}", pairs["port"]) or not 0 < int(pairs["port"]) < 65536:
            raise SaslError("a malformed port")
        port = int(pairs["port"])
    host = pairs.get("host")
    if host is not None:
        _check_text(host, "host")
    return ClientResponse(authzid, _bearer(pairs), host, port)


class ChallengeKind(enum.Enum):
    """What the refusal means for the gateway (RFC 7628 section 3.2.2 status values)."""

    INVALID_TOKEN = "invalid_token"  # noqa: S105 (a status name); expired or revoked: refresh once, then re-authorise
    INSUFFICIENT_SCOPE = "insufficient_scope"  # the grant lacks the mail scope: re-authorise with it
    INVALID_REQUEST = "invalid_request"  # our payload was wrong: a bug or a wrong user/authzid
    OTHER = "other"


# XOAUTH2 servers send HTTP-like status codes; RFC 7628 servers the status names.
_KINDS = {
    "invalid_token": ChallengeKind.INVALID_TOKEN,
    "401": ChallengeKind.INVALID_TOKEN,
    "insufficient_scope": ChallengeKind.INSUFFICIENT_SCOPE,
    "403": ChallengeKind.INSUFFICIENT_SCOPE,
    "invalid_request": ChallengeKind.INVALID_REQUEST,
    "400": ChallengeKind.INVALID_REQUEST,
}


@dataclasses.dataclass(frozen=True, slots=True)
class Challenge:
    kind: ChallengeKind
    status: str
    scope: str | None = None
    openid_configuration: str | None = None
    schemes: str | None = None


def _short_text(value: object, what: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > 2048 or not _TEXT.fullmatch(value):
        raise SaslError(f"the challenge's {what} is not a short string")
    return value


def parse_challenge(data: bytes) -> Challenge:
    """The server's error challenge: the base64 text after ``+ `` (with or without the ``+ ``/CRLF)."""
    if len(data) > MAX_CHALLENGE_BYTES:
        raise SaslError("the challenge is too long")
    text = data.strip()
    if text.startswith(b"+"):
        text = text[1:].strip()
    try:
        decoded = base64.b64decode(text, validate=True)
        doc = json.loads(decoded.decode("utf-8"))
    except (binascii.Error, ValueError, RecursionError):
        raise SaslError("the challenge is not base64 JSON") from None
    if not isinstance(doc, dict):
        raise SaslError("the challenge is not a JSON object")
    status = doc.get("status")
    if isinstance(status, int) and not isinstance(status, bool):
        status = str(status)
    if not isinstance(status, str) or not status or len(status) > 64 or not _TEXT.fullmatch(status):
        raise SaslError("the challenge has no status")
    return Challenge(
        kind=_KINDS.get(status.lower(), ChallengeKind.OTHER),
        status=status,
        scope=_short_text(doc.get("scope"), "scope"),
        openid_configuration=_short_text(doc.get("openid-configuration"), "openid-configuration"),
        schemes=_short_text(doc.get("schemes"), "schemes"),
    )


def format_challenge(challenge: Challenge) -> bytes:
    """The base64 challenge a server sends (for fakes and round trips)."""
    doc: dict[str, str] = {"status": challenge.status}
    for key, value in (
        ("scope", challenge.scope),
        ("openid-configuration", challenge.openid_configuration),
        ("schemes", challenge.schemes),
    ):
        if value is not None:
            doc[key] = value
    return base64.b64encode(json.dumps(doc).encode())
