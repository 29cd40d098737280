"""JMAP (RFC 8620 core, RFC 8621 mail) as plain data: the requests the gateway sends, the answers it accepts.

Sans-IO: no sockets, no HTTP, no clock. The backend moves the bytes; this module builds request bodies and
turns response bodies into frozen dataclasses.

Invariants:
- Every ``parse_*`` function and every ``Response`` accessor either returns well-typed values or raises a
  ``JmapError``; no KeyError, TypeError, ValueError or RecursionError escapes, whatever the bytes were.
- ``MalformedResponse``: the server broke RFC 8620 (not JSON, wrong shape, wrong call id, a bad Id).
  ``RequestError``: the whole request was refused (RFC 8620 section 3.6.1 problem details).
  ``MethodError``: one method call was refused (section 3.6.2). The two last know whether trying later
  may help (``temporary``).
- Ids that come from the server are checked against the RFC 8620 ``Id`` syntax (1-255 of ``A-Za-z0-9-_``)
  before they are used in a URL, a JSON pointer or a UIDL.
- A request never holds credentials: authentication is the transport's business. Where they may go is
  decided here, once: ``CredentialScope`` (the configured URL's origin, the operator's extra origins,
  never cleartext when the configured scheme is TLS), and which account a shared token serves a POP3
  user is ``choose_account`` (an explicit mapping, else one exact name match).
"""

from __future__ import annotations

import dataclasses
import json
import re
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

from gateway.proto.common import RemoteProtocolError, uidl_or_sha1

__all__ = [
    "CORE",
    "MAIL",
    "Account",
    "CredentialScope",
    "EmailRecord",
    "JmapError",
    "MailboxRecord",
    "MalformedResponse",
    "MethodError",
    "NoAccount",
    "Origin",
    "QueryPage",
    "Request",
    "RequestError",
    "Response",
    "Session",
    "SetOutcome",
    "choose_account",
    "download_url",
    "email_add_keyword",
    "email_destroy",
    "email_get",
    "email_move",
    "email_query",
    "email_records",
    "email_set_seen",
    "find_mailbox",
    "is_id",
    "mailbox_get",
    "mailboxes",
    "origin_of",
    "parse_account_map",
    "parse_problem",
    "parse_response",
    "parse_session",
    "query_page",
    "set_outcome",
    "uidl_for",
]

CORE: Final = "urn:ietf:params:jmap:core"
MAIL: Final = "urn:ietf:params:jmap:mail"
PROBLEM_PREFIX: Final = "urn:ietf:params:jmap:error:"
EMAIL_PROPERTIES: Final = ("id", "blobId", "size")
MAILBOX_PROPERTIES: Final = ("id", "name", "parentId", "role")
MAX_SIZE: Final = 2**53 - 1  # RFC 8620 UnsignedInt

# RFC 8620 3.6.2 / RFC 8621: the method errors after which the same call may succeed later.
TEMPORARY_METHOD_ERRORS: Final = frozenset(
    {"serverUnavailable", "serverFail", "serverPartialFail", "stateMismatch", "rateLimit", "tooManyRequests"}
)
# RFC 8620 3.6.1 request-level problems worth retrying (the server's concurrency or rate limits).
TEMPORARY_PROBLEMS: Final = frozenset({"limit"})

_ID = re.compile(r"[A-Za-z0-9_-]{1,255}")


class JmapError(Exception):
    """Base of what this module raises. ``str(exc)`` is for logs, never for a POP3 client."""

    temporary = True


class MalformedResponse(JmapError, RemoteProtocolError):
    """The server's answer does not follow RFC 8620/8621 (bad JSON, bad shape, bad ids): the peer's
    mistake, so also a ``common.RemoteProtocolError``. The two refusals below are answers, not mistakes."""


class RequestError(JmapError):
    """The request as a whole was refused (problem details, RFC 8620 section 3.6.1)."""

    def __init__(self, problem: str, status: int, detail: str = "") -> None:
        super().__init__(f"HTTP {status} {problem}" + (f": {detail}" if detail else ""))
        self.problem = problem  # the part after urn:ietf:params:jmap:error:, or the whole type
        self.status = status
        self.detail = detail
        self.temporary = problem in TEMPORARY_PROBLEMS or status >= 500 or status == 429


class MethodError(JmapError):
    """One method call answered ``["error", {"type": ...}, callId]`` (RFC 8620 section 3.6.2)."""

    def __init__(self, method: str, error_type: str, description: str = "") -> None:
        super().__init__(f"{method} failed: {error_type}" + (f" ({description})" if description else ""))
        self.method = method
        self.type = error_type
        self.description = description
        self.temporary = error_type in TEMPORARY_METHOD_ERRORS


def is_id(value: object) -> bool:
    """Whether ``value`` is an RFC 8620 Id (1-255 octets of URL-safe base64 characters)."""
    return isinstance(value, str) and _ID.fullmatch(value) is not None


def uidl_for(email_id: str) -> str:
    """The UIDL proposed for an Email: its id when that is a valid POP3 unique-id (1-70 characters of
    0x21-0x7E, RFC 1939 section 7), else the 40 hex digits of its SHA-1. Email ids never change."""
    return uidl_or_sha1(email_id)


# ------------------------------------------------------------------ the session resource


@dataclasses.dataclass(frozen=True, slots=True)
class Account:
    id: str
    name: str
    is_primary: bool  # the server's primary account for mail
    sort_options: tuple[str, ...]  # emailsListSortOptions (RFC 8621 section 1.3.1)


@dataclasses.dataclass(frozen=True, slots=True)
class Session:
    """What the gateway uses of the session resource (RFC 8620 section 2), URLs already absolute."""

    username: str
    api_url: str
    download_url: str  # a URI template with {accountId}, {blobId}, {type} and {name}
    accounts: tuple[Account, ...]  # only accounts with the mail capability
    max_objects_in_get: int
    max_objects_in_set: int
    max_calls_in_request: int
    max_size_request: int

    def account(self, name: str | None = None) -> Account | None:
        """The mail account named ``name`` (case-insensitive), or the primary one when ``name`` is None
        (the only one, when the server names no primary mail account)."""
        if name is None:
            primary = next((a for a in self.accounts if a.is_primary), None)
            return primary if primary or len(self.accounts) != 1 else self.accounts[0]
        folded = name.casefold()
        return next((a for a in self.accounts if a.name.casefold() == folded), None)


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise MalformedResponse(f"not JSON: {exc.__class__.__name__}") from None


def _object(value: object, what: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise MalformedResponse(f"{what}: expected an object, got {type(value).__name__}")
    return value


def _str(obj: Mapping[str, Any], key: str, what: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise MalformedResponse(f"{what}.{key}: expected a string")
    return value


def _uint(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SIZE:
        raise MalformedResponse(f"{what}: expected an unsigned integer")
    return value


def _limit(caps: Mapping[str, Any], key: str, default: int) -> int:
    value = caps.get(key)
    if value is None:
        return default
    return max(1, _uint(value, f"capabilities.{key}"))


def _absolute(base_url: str, url: str, what: str) -> str:
    try:
        joined = urllib.parse.urljoin(base_url, url)
        scheme = urllib.parse.urlsplit(joined).scheme.lower()
    except ValueError:  # e.g. "Invalid IPv6 URL"
        raise MalformedResponse(f"{what} is not a URL") from None
    if scheme not in ("http", "https"):
        raise MalformedResponse(f"{what} is not an http(s) URL")
    return joined


def parse_session(body: bytes, base_url: str) -> Session:
    """Parse the session resource fetched from ``base_url`` (its final URL after redirects)."""
    top = _object(_json(body), "session")
    caps = _object(top.get("capabilities"), "session.capabilities")
    if MAIL not in caps:
        raise MalformedResponse("the server does not offer urn:ietf:params:jmap:mail")
    core = _object(caps.get(CORE), "capabilities[core]")
    api_url = _absolute(base_url, _str(top, "apiUrl", "session"), "apiUrl")
    download = _str(top, "downloadUrl", "session")
    if "{blobId}" not in download or "{accountId}" not in download:
        raise MalformedResponse("downloadUrl lacks {accountId} or {blobId}")
    # resolve the template's base only: the braces must survive urljoin untouched
    download_url = _absolute(base_url, download, "downloadUrl")
    primary = top.get("primaryAccounts")
    primary_mail = _object(primary, "session.primaryAccounts").get(MAIL) if primary is not None else None
    accounts: list[Account] = []
    for account_id, raw in _object(top.get("accounts"), "session.accounts").items():
        account = _object(raw, "account")
        account_caps = _object(account.get("accountCapabilities", {}), "accountCapabilities")
        if MAIL not in account_caps:
            continue
        if not is_id(account_id):
            raise MalformedResponse("an account id is not a JMAP Id")
        mail_caps = _object(account_caps[MAIL] or {}, "accountCapabilities[mail]")
        options = mail_caps.get("emailsListSortOptions", [])
        if not isinstance(options, list):
            raise MalformedResponse("emailsListSortOptions: expected a list")
        accounts.append(
            Account(
                id=account_id,
                name=_str(account, "name", "account"),
                is_primary=account_id == primary_mail,
                sort_options=tuple(o for o in options if isinstance(o, str)),
            )
        )
    return Session(
        username=_str(top, "username", "session"),
        api_url=api_url,
        download_url=download_url,
        accounts=tuple(accounts),
        max_objects_in_get=_limit(core, "maxObjectsInGet", 500),
        max_objects_in_set=_limit(core, "maxObjectsInSet", 500),
        max_calls_in_request=_limit(core, "maxCallsInRequest", 16),
        max_size_request=_limit(core, "maxSizeRequest", 10_000_000),
    )


def download_url(
    template: str,
    account_id: str,
    blob_id: str,
    *,
    name: str = "message.eml",
    media_type: str = "application/octet-stream",
) -> str:
    """Expand the session's downloadUrl (RFC 6570 level-1 variables, values percent-encoded)."""
    values = {"accountId": account_id, "blobId": blob_id, "name": name, "type": media_type}
    out = template
    for key, value in values.items():
        out = out.replace("{" + key + "}", urllib.parse.quote(value, safe=""))
    return out


# ------------------------------------------------------------------ where credentials may go

_DEFAULT_PORTS: Final = {"http": 80, "https": 443}


@dataclasses.dataclass(frozen=True, slots=True)
class Origin:
    """An RFC 6454 origin: scheme, host (lowercase, IDNA-encoded) and port (the default one filled in)."""

    scheme: str
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        port = "" if _DEFAULT_PORTS[self.scheme] == self.port else f":{self.port}"
        return f"{self.scheme}://{host}{port}"


def origin_of(url: str) -> Origin:
    """The origin of an absolute http(s) URL; ValueError when it has none (no host, a bad port...)."""
    parts = urllib.parse.urlsplit(url)  # ValueError for a bad IPv6 literal
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise ValueError(f"not an http(s) URL: {url[:100]!r}")
    host = parts.hostname or ""
    if not host:
        raise ValueError(f"no host in {url[:100]!r}")
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            raise ValueError(f"not a host name: {host[:100]!r}") from None
    port = parts.port  # ValueError when it is not a number in 0..65535
    return Origin(scheme, host.lower(), port if port is not None else _DEFAULT_PORTS[scheme])


@dataclasses.dataclass(frozen=True, slots=True)
class CredentialScope:
    """Where the upstream credentials (a user's password, the shared token) may be sent.

    Only to the origin of the configured URL and to the origins the operator lists; and never over
    cleartext ``http`` when the configured URL is ``https``, whatever the list says. Everything the
    upstream hands out (a redirect's Location, ``apiUrl``, ``downloadUrl``) is checked against it before
    a request carrying credentials is built."""

    home: Origin
    extra: frozenset[Origin] = frozenset()

    @classmethod
    def build(cls, configured_url: str, allowed: Iterable[str] = ()) -> CredentialScope:
        """ValueError names the entry of ``allowed`` that is not a bare origin or would be cleartext."""
        home = origin_of(configured_url)
        extra: set[Origin] = set()
        for entry in allowed:
            origin = origin_of(entry)
            if urllib.parse.urlsplit(entry).path not in ("", "/") or "?" in entry or "#" in entry:
                raise ValueError(f"{entry!r} is not an origin: write scheme://host[:port] only")
            if home.scheme == "https" and origin.scheme != "https":
                raise ValueError(f"{entry!r}: the upstream is https, credentials never go over http")
            extra.add(origin)
        return cls(home, frozenset(extra))

    def refusal(self, url: str) -> str | None:
        """None when a request to ``url`` may carry the credentials, else why not (for a log line)."""
        try:
            origin = origin_of(url)
        except ValueError as exc:
            return str(exc)
        if self.home.scheme == "https" and origin.scheme != "https":
            return f"{origin} is cleartext and the upstream is https"
        if origin != self.home and origin not in self.extra:
            return f"{origin} is not the upstream's origin {self.home} nor an allowed one"
        return None


class NoAccount(JmapError):
    """No mail account of a shared token's session is the POP3 user's. ``misconfigured``: the operator
    must act (two accounts bear the name, or the mapping names an account the session lacks); else the
    user simply has no account there."""

    temporary = False

    def __init__(self, message: str, *, misconfigured: bool = False) -> None:
        super().__init__(message)
        self.misconfigured = misconfigured


def parse_account_map(entries: Iterable[str]) -> dict[str, str]:
    """``POP3USER=ACCOUNTID`` lines (the account id is a JMAP Id, which has no ``=``) as a mapping.
    ValueError names a malformed entry or a user mapped twice."""
    out: dict[str, str] = {}
    for entry in entries:
        user, sep, account_id = entry.rpartition("=")
        if not sep or not user or not is_id(account_id):
            raise ValueError(
                f"{entry[:100]!r} is not POP3USER=ACCOUNTID (an account id is 1-255 of A-Za-z0-9_-)"
            )
        if user in out:
            raise ValueError(f"{user[:100]!r} is mapped twice")
        out[user] = account_id
    return out


def choose_account(session: Session, user: str, mapping: Mapping[str, str]) -> Account:
    """The mail account a shared token's session serves the POP3 ``user`` (already authenticated locally).

    1. ``mapping`` (the operator's ``user -> accountId``) decides for the users it names.
    2. Else the one account whose name is exactly ``user``; two such accounts are ambiguous.
    3. Else, when the session's own username is exactly ``user``, its primary mail account.
    Names are compared exactly: case folding would let ``Alice`` reach the account of ``alice``."""
    if user in mapping:
        wanted = mapping[user]
        found = next((a for a in session.accounts if a.id == wanted), None)
        if found is None:
            raise NoAccount(
                f"the mapping names account {wanted!r}, which the token's session lacks", misconfigured=True
            )
        return found
    named = [a for a in session.accounts if a.name == user]
    if len(named) > 1:
        ids = ", ".join(a.id for a in named[:5])
        raise NoAccount(
            f"{len(named)} mail accounts are named {user[:100]!r} ({ids}): map the user to one",
            misconfigured=True,
        )
    if named:
        return named[0]
    if session.username == user:
        primary = session.account(None)
        if primary is not None:
            return primary
    raise NoAccount(f"the token's session has no mail account named {user[:100]!r}")


# ------------------------------------------------------------------ requests


class Request:
    """One API request: method calls with call ids ``c0``, ``c1``...; back-references to earlier calls."""

    def __init__(self, using: Sequence[str] = (CORE, MAIL)) -> None:
        self.using = tuple(using)
        self.calls: list[tuple[str, dict[str, Any], str]] = []

    def add(self, method: str, args: dict[str, Any]) -> str:
        call_id = f"c{len(self.calls)}"
        self.calls.append((method, args, call_id))
        return call_id

    def method_of(self, call_id: str) -> str:
        for method, _, cid in self.calls:
            if cid == call_id:
                return method
        raise KeyError(call_id)

    def ref(self, call_id: str, path: str) -> dict[str, str]:
        """A ResultReference (RFC 8620 section 3.7) to ``path`` in the result of ``call_id``."""
        return {"resultOf": call_id, "name": self.method_of(call_id), "path": path}

    def encode(self) -> bytes:
        body = {"using": list(self.using), "methodCalls": [[m, a, c] for m, a, c in self.calls]}
        return json.dumps(body, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def mailbox_get(request: Request, account_id: str) -> str:
    """Every mailbox of the account, with what ``find_mailbox`` needs."""
    return request.add(
        "Mailbox/get", {"accountId": account_id, "ids": None, "properties": list(MAILBOX_PROPERTIES)}
    )


def email_query(
    request: Request,
    account_id: str,
    mailbox_id: str,
    *,
    position: int,
    limit: int,
    hide_keyword: str | None = None,
    sort_by_id: bool = False,
    after: str | None = None,
    newest_first: bool = False,
) -> str:
    """One page of the mailbox, oldest first (receivedAt ascending; ties by id when the server can), or
    newest first (the exact reverse order, ties included). ``after``: only Emails received after this
    UTCDate (RFC 8621 4.4.1's ``after`` condition, in the same FilterCondition as ``inMailbox``)."""
    condition: dict[str, Any] = {"inMailbox": mailbox_id}
    if hide_keyword is not None:
        condition["notKeyword"] = hide_keyword
    if after is not None:
        condition["after"] = after
    ascending = not newest_first
    sort: list[dict[str, Any]] = [{"property": "receivedAt", "isAscending": ascending}]
    if sort_by_id:
        sort.append({"property": "id", "isAscending": ascending})
    return request.add(
        "Email/query",
        {
            "accountId": account_id,
            "filter": condition,
            "sort": sort,
            "position": position,
            "limit": limit,
            "calculateTotal": True,
        },
    )


def email_get(request: Request, account_id: str, query_call: str) -> str:
    """id, blobId and size of the ids found by ``query_call``, by back-reference (no extra round trip)."""
    return request.add(
        "Email/get",
        {
            "accountId": account_id,
            "#ids": request.ref(query_call, "/ids"),
            "properties": list(EMAIL_PROPERTIES),
        },
    )


def email_destroy(request: Request, account_id: str, ids: Sequence[str]) -> str:
    return request.add("Email/set", {"accountId": account_id, "destroy": list(ids)})


def _pointer(token: str) -> str:
    """One JSON pointer reference token (RFC 6901): ``~`` and ``/`` escaped."""
    return token.replace("~", "~0").replace("/", "~1")


def email_move(request: Request, account_id: str, ids: Sequence[str], source: str, target: str) -> str:
    """Patch each Email: out of ``source``, into ``target`` (other mailboxes it is in are kept)."""
    patch = {f"mailboxIds/{_pointer(source)}": None, f"mailboxIds/{_pointer(target)}": True}
    return request.add("Email/set", {"accountId": account_id, "update": {i: dict(patch) for i in ids}})


def email_add_keyword(request: Request, account_id: str, ids: Sequence[str], keyword: str) -> str:
    """Patch each Email: set ``keyword`` (lowercased: JMAP keywords are case-insensitive)."""
    patch = {f"keywords/{_pointer(keyword.lower())}": True}
    return request.add("Email/set", {"accountId": account_id, "update": {i: dict(patch) for i in ids}})


def email_set_seen(request: Request, account_id: str, ids: Sequence[str]) -> str:
    return email_add_keyword(request, account_id, ids, "$seen")


# ------------------------------------------------------------------ responses


class Response:
    """The method responses of one request, by call id."""

    def __init__(self, results: Mapping[str, tuple[str, Mapping[str, Any]]]) -> None:
        self._results = results

    def result(self, call_id: str, method: str) -> Mapping[str, Any]:
        """The arguments answered to ``call_id``; MethodError if the server answered an error."""
        found = self._results.get(call_id)
        if found is None:
            raise MalformedResponse(f"no response to {method} ({call_id})")
        name, args = found
        if name == "error":
            description = args.get("description")
            raise MethodError(
                method, str(args.get("type", "unknown")), description if isinstance(description, str) else ""
            )
        if name != method:
            raise MalformedResponse(f"{call_id}: expected a {method} response, got {name[:50]!r}")
        return args


def parse_response(body: bytes, request: Request) -> Response:
    """Parse an API response to ``request``; responses to calls it did not make are errors."""
    top = _object(_json(body), "response")
    items = top.get("methodResponses")
    if not isinstance(items, list):
        raise MalformedResponse("methodResponses: expected a list")
    known = {cid for _, _, cid in request.calls}
    results: dict[str, tuple[str, Mapping[str, Any]]] = {}
    for item in items:
        if not (isinstance(item, list) and len(item) == 3):
            raise MalformedResponse("a method response is not [name, arguments, callId]")
        name, args, call_id = item
        if not isinstance(name, str) or not isinstance(call_id, str):
            raise MalformedResponse("a method response has a non-string name or call id")
        if call_id not in known:
            raise MalformedResponse(f"a response to a call never made ({call_id[:20]!r})")
        # A method may answer more than once (implicit calls); the first answer of its own name wins,
        # an error answer always wins.
        args_obj = _object(args, f"arguments of {name[:50]}")
        if call_id not in results or name == "error":
            results[call_id] = (name, args_obj)
    return Response(results)


def parse_problem(body: bytes, status: int) -> RequestError:
    """The problem details (RFC 7807) of a refused request; a generic one when the body is not that."""
    try:
        top = json.loads(body)
    except (ValueError, RecursionError):
        top = None
    if isinstance(top, dict) and isinstance(top.get("type"), str):
        problem = top["type"]
        problem = problem.removeprefix(PROBLEM_PREFIX)
        detail = top.get("detail")
        return RequestError(problem[:100], status, detail[:200] if isinstance(detail, str) else "")
    return RequestError("http", status)


@dataclasses.dataclass(frozen=True, slots=True)
class QueryPage:
    ids: tuple[str, ...]
    position: int
    total: int | None
    query_state: str


def query_page(response: Response, call_id: str) -> QueryPage:
    args = response.result(call_id, "Email/query")
    ids = args.get("ids")
    if not isinstance(ids, list) or not all(is_id(i) for i in ids):
        raise MalformedResponse("Email/query: ids is not a list of Ids")
    total = args.get("total")
    return QueryPage(
        ids=tuple(ids),
        position=_uint(args.get("position", 0), "Email/query position"),
        total=None if total is None else _uint(total, "Email/query total"),
        query_state=_str(args, "queryState", "Email/query"),
    )


@dataclasses.dataclass(frozen=True, slots=True)
class EmailRecord:
    id: str
    blob_id: str
    size: int


def email_records(response: Response, call_id: str) -> list[EmailRecord]:
    """The Emails of an ``email_get`` call; ids the server did not find are left out."""
    args = response.result(call_id, "Email/get")
    items = args.get("list")
    if not isinstance(items, list):
        raise MalformedResponse("Email/get: list is not a list")
    records = []
    for raw in items:
        obj = _object(raw, "Email")
        email_id, blob_id = obj.get("id"), obj.get("blobId")
        if not is_id(email_id) or not is_id(blob_id):
            raise MalformedResponse("Email/get: an id or blobId is not a JMAP Id")
        assert isinstance(email_id, str) and isinstance(blob_id, str)
        records.append(EmailRecord(email_id, blob_id, _uint(obj.get("size"), "Email size")))
    return records


@dataclasses.dataclass(frozen=True, slots=True)
class MailboxRecord:
    id: str
    name: str
    parent_id: str | None
    role: str | None


def mailboxes(response: Response, call_id: str) -> list[MailboxRecord]:
    args = response.result(call_id, "Mailbox/get")
    items = args.get("list")
    if not isinstance(items, list):
        raise MalformedResponse("Mailbox/get: list is not a list")
    out = []
    for raw in items:
        obj = _object(raw, "Mailbox")
        mailbox_id, parent = obj.get("id"), obj.get("parentId")
        if not is_id(mailbox_id) or not (parent is None or is_id(parent)):
            raise MalformedResponse("Mailbox/get: an id is not a JMAP Id")
        assert isinstance(mailbox_id, str)
        role = obj.get("role")
        out.append(
            MailboxRecord(
                id=mailbox_id,
                name=_str(obj, "name", "Mailbox"),
                parent_id=parent if isinstance(parent, str) else None,
                role=role.lower() if isinstance(role, str) else None,
            )
        )
    return out


def find_mailbox(boxes: Iterable[MailboxRecord], folder: str) -> MailboxRecord | None:
    """The mailbox a configured folder names.

    ``INBOX`` (any case) is the mailbox with role ``inbox``. Otherwise the folder is a path of names from
    the top, joined by ``/`` (``Archive/2024``), or failing that, the name of exactly one mailbox."""
    boxes = list(boxes)
    if folder.upper() == "INBOX":
        return next((b for b in boxes if b.role == "inbox"), None)
    by_id = {b.id: b for b in boxes}

    def path(box: MailboxRecord) -> str | None:
        names = [box.name]
        seen = {box.id}
        while box.parent_id is not None:
            parent = by_id.get(box.parent_id)
            if parent is None or parent.id in seen:
                return None
            seen.add(parent.id)
            names.append(parent.name)
            box = parent
        return "/".join(reversed(names))

    exact = [b for b in boxes if path(b) == folder]
    if len(exact) == 1:
        return exact[0]
    named = [b for b in boxes if b.name == folder]
    return named[0] if len(named) == 1 else None


@dataclasses.dataclass(frozen=True, slots=True)
class SetOutcome:
    done: frozenset[str]  # destroyed or updated
    failed: Mapping[str, str]  # id -> SetError type


def set_outcome(response: Response, call_id: str) -> SetOutcome:
    """What an Email/set did. Ids the server reports ``notFound`` count as failed here: the caller decides."""
    args = response.result(call_id, "Email/set")
    done: set[str] = set()
    destroyed = args.get("destroyed")
    if destroyed is not None:
        if not isinstance(destroyed, list) or not all(isinstance(i, str) for i in destroyed):
            raise MalformedResponse("Email/set: destroyed is not a list of ids")
        done.update(destroyed)
    updated = args.get("updated")
    if updated is not None:
        done.update(_object(updated, "Email/set updated").keys())
    failed: dict[str, str] = {}
    for key in ("notDestroyed", "notUpdated"):
        errors = args.get(key)
        if errors is None:
            continue
        for email_id, error in _object(errors, f"Email/set {key}").items():
            kind = _object(error, "SetError").get("type")
            failed[email_id] = kind if isinstance(kind, str) else "unknown"
    return SetOutcome(frozenset(done - failed.keys()), failed)
