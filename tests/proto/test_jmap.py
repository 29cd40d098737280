"""The JMAP model (gateway.proto.jmap) with bytes in and dataclasses out, and the JMAP backend against an
in-memory JMAP server on httpx.MockTransport: discovery, paging, streaming, deletions and every failure."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import json
import re
import ssl
import urllib.parse
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from gateway.accounts import add_user
from gateway.backends import jmap as jmap_backend
from gateway.backends import make_backend
from gateway.backends.base import (
    ApopLogin,
    AuthFailed,
    MessageGone,
    PasswordLogin,
    PermFailure,
    SizeChanged,
    TempFailure,
)
from gateway.backends.jmap import JmapBackend, JmapMaildrop, JmapSettings
from gateway.config import Config, ConfigError, UpstreamConfig
from gateway.proto import jmap

_TLS_CONTEXTS: dict[tuple[str, bool], ssl.SSLContext] = {}


@pytest.fixture(autouse=True)
def _one_tls_context_per_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests reach their fakes through httpx.MockTransport and never open TLS, yet every JmapBackend
    builds a verified client context, loading the system CA bundle: ~40 ms each, 4 s of the fast loop over
    ~100 backends. One context per (ca_file, insecure) serves them all."""
    real = jmap_backend.client_tls_context

    def shared(settings: JmapSettings) -> ssl.SSLContext:
        key = (settings.ca_file, settings.insecure)
        if key not in _TLS_CONTEXTS:
            _TLS_CONTEXTS[key] = real(settings)
        return _TLS_CONTEXTS[key]

    monkeypatch.setattr(jmap_backend, "client_tls_context", shared)


# ------------------------------------------------------------------ the model, synchronously


SESSION = {
    "username": "alice",
    "apiUrl": "/jmap/",
    "downloadUrl": "/jmap/download/{accountId}/{blobId}/{name}?accept={type}",
    "uploadUrl": "/jmap/upload/{accountId}/",
    "state": "0",
    "capabilities": {
        jmap.CORE: {
            "maxObjectsInGet": 100,
            "maxObjectsInSet": 50,
            "maxCallsInRequest": 8,
            "maxSizeRequest": 1000,
        },
        jmap.MAIL: {},
    },
    "accounts": {
        "alice": {
            "name": "alice",
            "isPrimary": True,
            "accountCapabilities": {jmap.MAIL: {"emailsListSortOptions": ["receivedAt", "id"]}},
        },
        "shared1": {"name": "Team@Example.com", "accountCapabilities": {jmap.MAIL: {}}},
        "cal": {"name": "calendars", "accountCapabilities": {"urn:ietf:params:jmap:calendars": {}}},
    },
    "primaryAccounts": {jmap.MAIL: "alice"},
}


def encoded(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def test_session_resolves_relative_urls_against_where_it_was_found() -> None:
    s = jmap.parse_session(encoded(SESSION), "http://h:8080/jmap")
    assert s.api_url == "http://h:8080/jmap/"
    assert s.download_url == "http://h:8080/jmap/download/{accountId}/{blobId}/{name}?accept={type}"
    assert (s.max_objects_in_get, s.max_objects_in_set, s.max_calls_in_request) == (100, 50, 8)
    assert s.max_size_request == 1000
    assert [a.id for a in s.accounts] == ["alice", "shared1"]  # only accounts with the mail capability
    assert s.account(None) == jmap.Account("alice", "alice", True, ("receivedAt", "id"))
    assert s.account("team@example.COM") is not None and s.account("team@example.COM").id == "shared1"  # type: ignore[union-attr]
    assert s.account("nobody") is None


def test_session_absolute_urls_and_default_limits() -> None:
    raw = dict(SESSION, apiUrl="https://api.example/jmap/api/", capabilities={jmap.CORE: {}, jmap.MAIL: {}})
    raw["downloadUrl"] = "https://dl.example/{accountId}/{blobId}?n={name}&t={type}"
    s = jmap.parse_session(encoded(raw), "https://example/.well-known/jmap")
    assert s.api_url == "https://api.example/jmap/api/"
    assert s.download_url.startswith("https://dl.example/")
    assert s.max_objects_in_get == 500


def test_session_without_a_primary_mail_account_uses_the_only_one() -> None:
    raw = dict(SESSION, primaryAccounts={})
    raw["accounts"] = {"a1": {"name": "x", "accountCapabilities": {jmap.MAIL: {}}}}
    assert jmap.parse_session(encoded(raw), "http://h/").account(None).id == "a1"  # type: ignore[union-attr]
    raw["accounts"] = {k: {"name": k, "accountCapabilities": {jmap.MAIL: {}}} for k in ("a1", "a2")}
    assert jmap.parse_session(encoded(raw), "http://h/").account(None) is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"capabilities": {jmap.CORE: {}}}, "jmap:mail"),
        ({"apiUrl": 5}, "apiUrl"),
        ({"apiUrl": "ftp://x/"}, "apiUrl is not an http"),
        ({"apiUrl": "http://[::1/"}, "apiUrl is not a URL"),
        ({"downloadUrl": "/download/{blobId}"}, "downloadUrl lacks"),
        ({"accounts": []}, "expected an object"),
        ({"accounts": {"bad id!": {"name": "x", "accountCapabilities": {jmap.MAIL: {}}}}}, "Id"),
        (
            {
                "accounts": {
                    "a": {"name": "x", "accountCapabilities": {jmap.MAIL: {"emailsListSortOptions": 1}}}
                }
            },
            "list",
        ),
        ({"capabilities": {jmap.CORE: {"maxObjectsInGet": -1}, jmap.MAIL: {}}}, "unsigned"),
        ({"capabilities": {jmap.CORE: {"maxObjectsInGet": True}, jmap.MAIL: {}}}, "unsigned"),
        ({"username": None}, "username"),
    ],
)
def test_bad_sessions_are_malformed_responses(change: dict[str, Any], message: str) -> None:
    with pytest.raises(jmap.MalformedResponse, match=message):
        jmap.parse_session(encoded({**SESSION, **change}), "http://h/")


@pytest.mark.parametrize("body", [b"", b"{", b"\xff\xfe", b"[1]", b"null", b"[" * 100_000 + b"]" * 100_000])
def test_session_that_is_not_a_json_object_is_malformed(body: bytes) -> None:
    with pytest.raises(jmap.MalformedResponse):
        jmap.parse_session(body, "http://h/")


@given(st.binary(max_size=300))
def test_arbitrary_bytes_parse_or_raise_jmap_errors(data: bytes) -> None:
    request = jmap.Request()
    jmap.email_query(request, "a", "m", position=0, limit=5)
    for parse in (lambda: jmap.parse_session(data, "http://h/"), lambda: jmap.parse_response(data, request)):
        with contextlib.suppress(jmap.JmapError):
            parse()
    assert isinstance(jmap.parse_problem(data, 400), jmap.RequestError)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["Email/query", "Email/get", "error", "x"]),
            json_values,
            st.sampled_from(["c0", "c1", "zz"]),
        ),
        max_size=4,
    )
)
def test_arbitrary_method_responses_parse_or_raise_jmap_errors(items: list[tuple[str, Any, str]]) -> None:
    request = jmap.Request()
    query = jmap.email_query(request, "a", "m", position=0, limit=5)
    get = jmap.email_get(request, "a", query)
    body = encoded({"methodResponses": [list(i) for i in items]})
    try:
        response = jmap.parse_response(body, request)
        jmap.query_page(response, query)
        jmap.email_records(response, get)
    except jmap.JmapError:
        pass


@given(json_values)
def test_arbitrary_session_json_parses_or_raises_jmap_errors(value: Any) -> None:
    body = encoded({**SESSION, "accounts": value}) if isinstance(value, dict) else encoded(value)
    with contextlib.suppress(jmap.JmapError):
        jmap.parse_session(body, "http://h/")


def test_request_encoding_with_back_references() -> None:
    request = jmap.Request()
    q = jmap.email_query(
        request, "acc", "box", position=10, limit=5, hide_keyword="$pop3deleted", sort_by_id=True
    )
    g = jmap.email_get(request, "acc", q)
    body = json.loads(request.encode())
    assert body["using"] == [jmap.CORE, jmap.MAIL]
    [query, get] = body["methodCalls"]
    assert query == [
        "Email/query",
        {
            "accountId": "acc",
            "filter": {"inMailbox": "box", "notKeyword": "$pop3deleted"},
            "sort": [
                {"property": "receivedAt", "isAscending": True},
                {"property": "id", "isAscending": True},
            ],
            "position": 10,
            "limit": 5,
            "calculateTotal": True,
        },
        q,
    ]
    assert get == [
        "Email/get",
        {
            "accountId": "acc",
            "#ids": {"resultOf": q, "name": "Email/query", "path": "/ids"},
            "properties": ["id", "blobId", "size"],
        },
        g,
    ]
    with pytest.raises(KeyError):
        request.ref("c99", "/ids")


def test_set_requests_escape_json_pointers_and_lowercase_keywords() -> None:
    request = jmap.Request()
    jmap.email_move(request, "a", ["M1", "M2"], "src", "dst")
    jmap.email_add_keyword(request, "a", ["M1"], "$POP3/Deleted~x")
    jmap.email_destroy(request, "a", ["M3"])
    jmap.email_set_seen(request, "a", ["M4"])
    calls = json.loads(request.encode())["methodCalls"]
    assert calls[0][1]["update"] == {
        "M1": {"mailboxIds/src": None, "mailboxIds/dst": True},
        "M2": {"mailboxIds/src": None, "mailboxIds/dst": True},
    }
    assert calls[1][1]["update"] == {"M1": {"keywords/$pop3~1deleted~0x": True}}
    assert calls[2][1] == {"accountId": "a", "destroy": ["M3"]}
    assert calls[3][1]["update"] == {"M4": {"keywords/$seen": True}}


def test_response_results_and_method_errors() -> None:
    request = jmap.Request()
    q = jmap.email_query(request, "a", "m", position=0, limit=2)
    g = jmap.email_get(request, "a", q)
    s = jmap.email_destroy(request, "a", ["M1"])
    body = encoded(
        {
            "methodResponses": [
                ["Email/query", {"ids": ["M1", "M2"], "position": 0, "total": 3, "queryState": "7"}, q],
                ["Email/get", {"list": [{"id": "M1", "blobId": "G1", "size": 10}], "notFound": ["M2"]}, g],
                ["error", {"type": "serverUnavailable", "description": "try later"}, s],
            ]
        }
    )
    response = jmap.parse_response(body, request)
    assert jmap.query_page(response, q) == jmap.QueryPage(("M1", "M2"), 0, 3, "7")
    assert jmap.email_records(response, g) == [jmap.EmailRecord("M1", "G1", 10)]
    with pytest.raises(jmap.MethodError, match="serverUnavailable") as info:
        jmap.set_outcome(response, s)
    assert info.value.temporary and info.value.description == "try later"
    with pytest.raises(jmap.MalformedResponse, match="expected a Email/get"):
        response.result(q, "Email/get")


@pytest.mark.parametrize(
    ("error_type", "temporary"),
    [("serverFail", True), ("stateMismatch", True), ("invalidArguments", False), ("accountNotFound", False)],
)
def test_method_errors_know_whether_trying_later_helps(error_type: str, temporary: bool) -> None:
    request = jmap.Request()
    call = jmap.mailbox_get(request, "a")
    response = jmap.parse_response(
        encoded({"methodResponses": [["error", {"type": error_type}, call]]}), request
    )
    with pytest.raises(jmap.MethodError) as info:
        jmap.mailboxes(response, call)
    assert info.value.temporary is temporary
    assert info.value.type == error_type


@pytest.mark.parametrize(
    "responses",
    [
        {"methodResponses": "x"},
        {"methodResponses": [["Email/query", {}]]},
        {"methodResponses": [[1, {}, "c0"]]},
        {"methodResponses": [["Email/query", [], "c0"]]},
        {"methodResponses": [["Email/query", {}, "c7"]]},  # a call never made
        {"other": 1},
    ],
)
def test_malformed_method_responses(responses: dict[str, Any]) -> None:
    request = jmap.Request()
    jmap.mailbox_get(request, "a")
    with pytest.raises(jmap.MalformedResponse):
        jmap.parse_response(encoded(responses), request)


def test_a_missing_response_and_an_error_after_a_result() -> None:
    request = jmap.Request()
    call = jmap.mailbox_get(request, "a")
    other = jmap.mailbox_get(request, "a")
    body = encoded(
        {"methodResponses": [["Mailbox/get", {"list": []}, call], ["error", {"type": "serverFail"}, call]]}
    )
    response = jmap.parse_response(body, request)
    with pytest.raises(jmap.MethodError):
        jmap.mailboxes(response, call)  # an error answer wins over an earlier result
    with pytest.raises(jmap.MalformedResponse, match="no response"):
        jmap.mailboxes(response, other)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"ids": ["ok", "bad id"], "queryState": "1"}, "ids"),
        ({"ids": "M1", "queryState": "1"}, "ids"),
        ({"ids": [], "queryState": 1}, "queryState"),
        ({"ids": [], "queryState": "1", "total": -1}, "total"),
        ({"ids": [], "queryState": "1", "position": "0"}, "position"),
    ],
)
def test_malformed_query_pages(args: dict[str, Any], message: str) -> None:
    request = jmap.Request()
    call = jmap.email_query(request, "a", "m", position=0, limit=1)
    response = jmap.parse_response(encoded({"methodResponses": [["Email/query", args, call]]}), request)
    with pytest.raises(jmap.MalformedResponse, match=message):
        jmap.query_page(response, call)


@pytest.mark.parametrize(
    "items",
    [
        "x",
        [1],
        [{"id": "M1", "blobId": "bad/blob", "size": 1}],
        [{"id": "M1", "blobId": "G1", "size": -5}],
        [{"id": "M1", "blobId": "G1", "size": 2**60}],
        [{"id": None, "blobId": "G1", "size": 1}],
    ],
)
def test_malformed_email_lists(items: Any) -> None:
    request = jmap.Request()
    call = jmap.email_get(request, "a", jmap.email_query(request, "a", "m", position=0, limit=1))
    response = jmap.parse_response(
        encoded({"methodResponses": [["Email/get", {"list": items}, call]]}), request
    )
    with pytest.raises(jmap.MalformedResponse):
        jmap.email_records(response, call)


@pytest.mark.parametrize(
    "items",
    [
        "x",
        [{"id": "bad id", "name": "x"}],
        [{"id": "m", "name": 3}],
        [{"id": "m", "name": "x", "parentId": "??"}],
    ],
)
def test_malformed_mailbox_lists(items: Any) -> None:
    request = jmap.Request()
    call = jmap.mailbox_get(request, "a")
    response = jmap.parse_response(
        encoded({"methodResponses": [["Mailbox/get", {"list": items}, call]]}), request
    )
    with pytest.raises(jmap.MalformedResponse):
        jmap.mailboxes(response, call)


BOXES = [
    jmap.MailboxRecord("i", "Inbox", None, "inbox"),
    jmap.MailboxRecord("a", "Archive", None, None),
    jmap.MailboxRecord("a24", "2024", "a", None),
    jmap.MailboxRecord("t24", "2024", "t", None),
    jmap.MailboxRecord("t", "Trash", None, "trash"),
    jmap.MailboxRecord("x", "Loop", "y", None),
    jmap.MailboxRecord("y", "Loop2", "x", None),
    jmap.MailboxRecord("o", "Orphan", "missing", None),
]


@pytest.mark.parametrize(
    ("folder", "found"),
    [
        ("INBOX", "i"),
        ("inbox", "i"),
        ("Archive", "a"),
        ("Archive/2024", "a24"),
        ("Trash/2024", "t24"),
        ("2024", None),  # two mailboxes have that name: ambiguous
        ("Orphan", "o"),  # no full path, but the only one of its name
        ("Loop", "x"),
        ("Nowhere", None),
    ],
)
def test_find_mailbox(folder: str, found: str | None) -> None:
    box = jmap.find_mailbox(BOXES, folder)
    assert (box.id if box else None) == found


def test_find_mailbox_without_an_inbox_role() -> None:
    assert jmap.find_mailbox([jmap.MailboxRecord("i", "INBOX", None, None)], "INBOX") is None


def test_parse_mailboxes_lowercases_roles() -> None:
    request = jmap.Request()
    call = jmap.mailbox_get(request, "a")
    items = [
        {"id": "i", "name": "Inbox", "parentId": None, "role": "Inbox"},
        {"id": "c", "name": "C", "parentId": "i"},
    ]
    response = jmap.parse_response(
        encoded({"methodResponses": [["Mailbox/get", {"list": items}, call]]}), request
    )
    assert jmap.mailboxes(response, call) == [
        jmap.MailboxRecord("i", "Inbox", None, "inbox"),
        jmap.MailboxRecord("c", "C", "i", None),
    ]


def test_set_outcome() -> None:
    request = jmap.Request()
    call = jmap.email_destroy(request, "a", ["M1", "M2", "M3"])
    args = {
        "destroyed": ["M1", "M3"],
        "updated": {"M4": None},
        "notDestroyed": {"M2": {"type": "forbidden"}, "M3": {"type": "notFound"}, "M5": {}},
        "notUpdated": None,
    }
    response = jmap.parse_response(encoded({"methodResponses": [["Email/set", args, call]]}), request)
    outcome = jmap.set_outcome(response, call)
    assert outcome.done == {"M1", "M4"}
    assert outcome.failed == {"M2": "forbidden", "M3": "notFound", "M5": "unknown"}
    for bad in ({"destroyed": "M1"}, {"destroyed": [1]}, {"updated": []}, {"notDestroyed": {"M1": 5}}):
        response = jmap.parse_response(encoded({"methodResponses": [["Email/set", bad, call]]}), request)
        with pytest.raises(jmap.MalformedResponse):
            jmap.set_outcome(response, call)


def test_problem_details() -> None:
    problem = jmap.parse_problem(
        encoded({"type": "urn:ietf:params:jmap:error:limit", "status": 400, "detail": "too many"}), 400
    )
    assert (problem.problem, problem.status, problem.detail, problem.temporary) == (
        "limit",
        400,
        "too many",
        True,
    )
    problem = jmap.parse_problem(encoded({"type": "urn:ietf:params:jmap:error:notRequest"}), 400)
    assert (problem.problem, problem.temporary) == ("notRequest", False)
    assert jmap.parse_problem(b"<html>", 404).problem == "http"
    assert jmap.parse_problem(b"", 503).temporary
    assert jmap.parse_problem(b"", 429).temporary


def test_download_url_percent_encodes_the_values() -> None:
    template = "https://h/d/{accountId}/{blobId}/{name}?accept={type}"
    assert jmap.download_url(template, "a b", "G1") == (
        "https://h/d/a%20b/G1/message.eml?accept=application%2Foctet-stream"
    )


@pytest.mark.parametrize(
    ("email_id", "uidl"),
    [
        ("M6a8d374fa6cb33bc47bccd75", "M6a8d374fa6cb33bc47bccd75"),
        ("x" * 70, "x" * 70),
        ("x" * 71, hashlib.sha1(b"x" * 71).hexdigest()),
        ("", hashlib.sha1(b"").hexdigest()),
        ("a b", hashlib.sha1(b"a b").hexdigest()),
    ],
)
def test_uidl_is_the_email_id_when_pop3_allows_it(email_id: str, uidl: str) -> None:
    assert jmap.uidl_for(email_id) == uidl


def test_is_id() -> None:
    assert jmap.is_id("Ab-_09") and not jmap.is_id("") and not jmap.is_id("a" * 256) and not jmap.is_id(5)


# ------------------------------------------------------------------ where credentials may go


@pytest.mark.parametrize(
    ("url", "origin", "text"),
    [
        ("https://Mail.Example/jmap", jmap.Origin("https", "mail.example", 443), "https://mail.example"),
        ("HTTP://h:8080", jmap.Origin("http", "h", 8080), "http://h:8080"),
        ("http://h:80/x?y", jmap.Origin("http", "h", 80), "http://h"),
        ("https://[::1]:8443/", jmap.Origin("https", "::1", 8443), "https://[::1]:8443"),
        (
            "https://bücher.example/",
            jmap.Origin("https", "xn--bcher-kva.example", 443),
            "https://xn--bcher-kva.example",
        ),
    ],
)
def test_origins_fill_in_default_ports_and_lowercase_hosts(url: str, origin: jmap.Origin, text: str) -> None:
    assert jmap.origin_of(url) == origin
    assert str(origin) == text


@pytest.mark.parametrize(
    "url",
    [
        "ftp://h/",
        "/relative",
        "http:///nohost",
        "http://h:99999/",
        "http://[::1/",
        "https://" + "ü" * 70 + "/",
    ],
)
def test_urls_without_an_origin_raise_value_error(url: str) -> None:
    with pytest.raises(ValueError):
        jmap.origin_of(url)


def test_credentials_go_only_to_the_configured_origin_and_allowed_ones() -> None:
    scope = jmap.CredentialScope.build("https://mail.example/.well-known/jmap", ["https://api.example:8443/"])
    assert scope.refusal("https://MAIL.example:443/jmap/") is None
    assert scope.refusal("https://api.example:8443/jmap/") is None
    assert "not the upstream's origin" in (scope.refusal("https://evil.example/jmap/") or "")
    assert "not the upstream's origin" in (scope.refusal("https://mail.example:8443/") or "")
    assert "not the upstream's origin" in (scope.refusal("https://api.example/") or "")
    assert "cleartext" in (scope.refusal("http://mail.example/jmap/") or "")
    assert "no host" in (scope.refusal("https:///x") or "")
    plain = jmap.CredentialScope.build("http://h:8080/x")
    assert plain.refusal("http://h:8080/y") is None
    assert plain.refusal("https://h:8080/y") is not None  # another scheme is another origin
    assert plain.refusal("http://h/") is not None
    with pytest.raises(ValueError, match="never go over http"):
        jmap.CredentialScope.build("https://h/", ["http://h2"])
    for entry in ("https://h2/path", "https://h2/?q", "https://h2/#f", "h2"):
        with pytest.raises(ValueError):
            jmap.CredentialScope.build("https://h/", [entry])


def test_account_maps_are_user_equals_account_id() -> None:
    assert jmap.parse_account_map(["a=b=c1", "team@example.com=shared1"]) == {
        "a=b": "c1",
        "team@example.com": "shared1",
    }
    for bad in (["nouser"], ["=x"], ["u="], ["u=not an id"]):
        with pytest.raises(ValueError, match="POP3USER=ACCOUNTID"):
            jmap.parse_account_map(bad)
    with pytest.raises(ValueError, match="mapped twice"):
        jmap.parse_account_map(["u=a", "u=b"])


def _session(*accounts: tuple[str, str], username: str = "owner", primary: str | None = None) -> jmap.Session:
    raw = {
        **SESSION,
        "username": username,
        "accounts": {i: {"name": n, "accountCapabilities": {jmap.MAIL: {}}} for i, n in accounts},
        "primaryAccounts": {jmap.MAIL: primary} if primary else {},
    }
    return jmap.parse_session(encoded(raw), "http://h/")


def test_a_token_account_is_chosen_by_mapping_then_exact_unique_name_then_the_owner() -> None:
    s = _session(
        ("a1", "alice"), ("a2", "Alice"), ("t1", "team"), ("t2", "team"), ("o1", "own"), primary="o1"
    )
    assert jmap.choose_account(s, "alice", {}).id == "a1"
    assert jmap.choose_account(s, "Alice", {}).id == "a2"  # exact: never the other one by case folding
    assert jmap.choose_account(s, "team", {"team": "t2"}).id == "t2"
    assert jmap.choose_account(s, "someone", {"someone": "a1"}).id == "a1"
    assert jmap.choose_account(s, "owner", {}).id == "o1"  # the session's own user: its primary account
    with pytest.raises(jmap.NoAccount, match=r"2 mail accounts are named 'team' \(t1, t2\)") as err:
        jmap.choose_account(s, "team", {})
    assert err.value.misconfigured and not err.value.temporary
    with pytest.raises(jmap.NoAccount, match="lacks") as err:
        jmap.choose_account(s, "alice", {"alice": "gone"})
    assert err.value.misconfigured
    for user in ("ALICE", "Owner", "nobody"):
        with pytest.raises(jmap.NoAccount, match="no mail account named") as err:
            jmap.choose_account(s, user, {})
        assert not err.value.misconfigured
    no_primary = _session(("a1", "x"), ("a2", "y"))
    with pytest.raises(jmap.NoAccount):
        jmap.choose_account(no_primary, "owner", {})


# ------------------------------------------------------------------ an in-memory JMAP server


@dataclasses.dataclass
class FakeEmail:
    id: str
    raw: bytes
    mailboxes: set[str]
    keywords: set[str] = dataclasses.field(default_factory=set)
    received: str = "2024-01-01T00:00:00Z"  # receivedAt, a UTCDate (compares as text)

    @property
    def blob_id(self) -> str:
        return "G" + self.id[1:]


class FakeJmap:
    """RFC 8620/8621 as far as the backend uses it, plus switches to make it misbehave."""

    def __init__(self) -> None:
        self.password = "pw"
        self.token = ""
        self.mailboxes = {"inbox1": ("Inbox", None, "inbox"), "arch": ("Archive", None, None)}
        self.emails: list[FakeEmail] = []
        self.state = 1
        self.max_objects_in_get = 100
        self.max_calls = 16
        self.cap_limit: int | None = None  # the query caps pages lower than asked
        self.cap_after_first = False  # ... but not the first page
        self.overlap = False  # a broken server: every page after the first repeats one id
        self.requests: list[httpx.Request] = []
        self.api_calls: list[list[Any]] = []
        self.api_hook: Callable[[httpx.Request], httpx.Response | None] | None = None
        self.method_errors: dict[str, str] = {}
        self.set_failures: dict[str, str] = {}  # email id -> SetError type
        self.after_request: Callable[[], None] | None = None
        self.download_hook: Callable[[FakeEmail], httpx.Response | None] | None = None
        self.session_extra: dict[str, Any] = {}

    def add(self, raw: bytes, mailbox: str = "inbox1", received: str = "2024-01-01T00:00:00Z") -> FakeEmail:
        email = FakeEmail("M" + hashlib.sha1(raw).hexdigest()[:24], raw, {mailbox}, received=received)
        self.emails.append(email)
        self.state += 1
        return email

    def in_box(self, mailbox: str = "inbox1") -> list[str]:
        return [e.id for e in self.emails if mailbox in e.mailboxes]

    # -- HTTP

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        path = request.url.path
        if path == "/.well-known/jmap":
            return httpx.Response(301, headers={"Location": "/jmap"})
        if not self._authorized(request):
            return httpx.Response(401, headers={"WWW-Authenticate": 'Basic realm="x"'}, text="no")
        if path == "/jmap" and request.method == "GET":
            session = {
                **SESSION,
                "capabilities": {
                    jmap.CORE: {
                        "maxObjectsInGet": self.max_objects_in_get,
                        "maxObjectsInSet": 3,
                        "maxCallsInRequest": self.max_calls,
                        "maxSizeRequest": 100_000,
                    },
                    jmap.MAIL: {},
                },
                **self.session_extra,
            }
            return httpx.Response(200, json=session)
        if path == "/jmap/" and request.method == "POST":
            if self.api_hook is not None:
                hooked = self.api_hook(request)
                if hooked is not None:
                    return hooked
            body = json.loads(request.content)
            self.api_calls.append(body["methodCalls"])
            out = self._api(body["methodCalls"])
            if self.after_request is not None:
                self.after_request()
            return httpx.Response(200, json={"methodResponses": out, "sessionState": "0"})
        m = re.fullmatch(r"/jmap/download/([^/]+)/([^/]+)/([^/]+)", path)
        if m and request.method == "GET":
            for email in self.emails:
                if email.blob_id == m.group(2):
                    if self.download_hook is not None:
                        hooked = self.download_hook(email)
                        if hooked is not None:
                            return hooked
                    return httpx.Response(
                        200, headers={"Content-Type": "application/octet-stream"}, stream=Chunks(email.raw)
                    )
            return httpx.Response(404, text="<html>not found</html>", headers={"Content-Type": "text/html"})
        return httpx.Response(404)

    def _authorized(self, request: httpx.Request) -> bool:
        header = request.headers.get("authorization", "")
        if self.token:
            return header == "Bearer " + self.token
        expected = "Basic " + base64.b64encode(b"alice:" + self.password.encode()).decode()
        return header == expected

    # -- methods

    def _api(self, calls: list[list[Any]]) -> list[list[Any]]:
        results: dict[str, tuple[str, dict[str, Any]]] = {}
        out: list[list[Any]] = []
        for name, args, call_id in calls:
            if name in self.method_errors:
                out.append(["error", {"type": self.method_errors[name]}, call_id])
                continue
            args = dict(args)
            refs = {k: args.pop(k) for k in [k for k in args if k.startswith("#")]}
            if any(ref["resultOf"] not in results for ref in refs.values()):
                out.append(["error", {"type": "invalidResultReference"}, call_id])
                continue
            for key, ref in refs.items():
                args[key[1:]] = results[ref["resultOf"]][1][ref["path"].strip("/")]
            result = getattr(self, "_" + name.replace("/", "_"))(args)
            results[call_id] = (name, result)
            out.append([name, result, call_id])
        return out

    def _Mailbox_get(self, args: dict[str, Any]) -> dict[str, Any]:
        items = [{"id": k, "name": n, "parentId": p, "role": r} for k, (n, p, r) in self.mailboxes.items()]
        return {"accountId": args["accountId"], "state": "1", "list": items, "notFound": []}

    def _Email_query(self, args: dict[str, Any]) -> dict[str, Any]:
        cond = args["filter"]
        found = [
            e
            for e in self.emails
            if cond["inMailbox"] in e.mailboxes
            and cond.get("notKeyword") not in e.keywords
            and ("after" not in cond or e.received > cond["after"])
        ]
        found.sort(key=lambda e: e.received)  # stable: ties keep the order they were added in
        if not args["sort"][0]["isAscending"]:
            found.reverse()
        hits = [e.id for e in found]
        limit = args["limit"]
        pos = args["position"]
        if self.cap_limit is not None and not (self.cap_after_first and pos == 0):
            limit = min(limit, self.cap_limit)
        if self.overlap and pos > 0:
            return {
                "queryState": str(self.state),
                "position": pos,
                "total": len(hits),
                "ids": hits[pos - 1 : pos - 1 + limit],
            }
        return {
            "queryState": str(self.state),
            "position": pos,
            "total": len(hits),
            "ids": hits[pos : pos + limit],
        }

    def _Email_get(self, args: dict[str, Any]) -> dict[str, Any]:
        assert len(args["ids"]) <= self.max_objects_in_get, "over maxObjectsInGet"
        by_id = {e.id: e for e in self.emails}
        found = [by_id[i] for i in args["ids"] if i in by_id]
        return {
            "list": [{"id": e.id, "blobId": e.blob_id, "size": len(e.raw)} for e in found],
            "notFound": [i for i in args["ids"] if i not in by_id],
        }

    def _Email_set(self, args: dict[str, Any]) -> dict[str, Any]:
        by_id = {e.id: e for e in self.emails}
        result: dict[str, Any] = {"destroyed": [], "updated": {}, "notDestroyed": {}, "notUpdated": {}}
        for email_id in args.get("destroy", []):
            if email_id in self.set_failures:
                result["notDestroyed"][email_id] = {"type": self.set_failures[email_id]}
            elif email_id not in by_id:
                result["notDestroyed"][email_id] = {"type": "notFound"}
            else:
                self.emails.remove(by_id[email_id])
                result["destroyed"].append(email_id)
        for email_id, patch in args.get("update", {}).items():
            if email_id in self.set_failures or email_id not in by_id:
                result["notUpdated"][email_id] = {"type": self.set_failures.get(email_id, "notFound")}
                continue
            for pointer, value in patch.items():
                prop, key = pointer.split("/", 1)
                target = by_id[email_id].mailboxes if prop == "mailboxIds" else by_id[email_id].keywords
                key = key.replace("~1", "/").replace("~0", "~")
                (target.add if value else target.discard)(key)
            result["updated"][email_id] = None
        self.state += 1
        return result


class Chunks(httpx.AsyncByteStream):
    """A response body in small chunks; optionally dying after `cut` bytes."""

    def __init__(self, data: bytes, size: int = 7, cut: int | None = None) -> None:
        self.data, self.size, self.cut = data, size, cut
        self.closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for i in range(0, len(self.data), self.size):
            if self.cut is not None and i >= self.cut:
                raise httpx.ReadError("connection reset")
            yield self.data[i : i + self.size]

    async def aclose(self) -> None:
        self.closed = True


@pytest.fixture
def fake() -> FakeJmap:
    return FakeJmap()


@pytest.fixture
async def make(fake: FakeJmap) -> AsyncIterator[Callable[..., JmapBackend]]:
    backends: list[JmapBackend] = []

    def build(url: str = "jmap+http://jmap.test:8080/", **kw: Any) -> JmapBackend:
        backend = JmapBackend(JmapSettings.from_url(url, **kw), transport=httpx.MockTransport(fake.handler))
        backends.append(backend)
        return backend

    yield build
    for backend in backends:
        await backend.aclose()


ALICE = PasswordLogin("alice", "pw")


async def read(drop: JmapMaildrop, index: int, *, limit: int | None = None) -> bytes:
    out = b""
    async with contextlib.aclosing(drop.stream(index)) as chunks:
        async for chunk in chunks:
            out += chunk
            if limit is not None and len(out) >= limit:
                break
    return out


def message(n: int, size: int = 60) -> bytes:
    head = b"Subject: %d\r\n\r\n" % n
    return head + b"x" * max(0, size - len(head) - 2) + b"\r\n"


# ------------------------------------------------------------------ the backend on the fake server


async def test_discovery_follows_the_redirect_with_credentials_and_lists_oldest_first(
    fake: FakeJmap, make: Callable[..., JmapBackend]
) -> None:
    emails = [fake.add(message(n)) for n in range(5)]
    backend = make()
    async with backend.open_maildrop(ALICE) as drop:
        assert [e.upstream_id for e in drop.entries] == [e.id for e in emails]
        assert [e.uidl for e in drop.entries] == [e.id for e in emails]
        assert [e.size for e in drop.entries] == [len(e.raw) for e in emails]
        assert await read(drop, 3) == emails[3].raw
    urls = [str(r.url) for r in fake.requests[:3]]
    assert urls == [
        "http://jmap.test:8080/.well-known/jmap",
        "http://jmap.test:8080/jmap",
        "http://jmap.test:8080/jmap/",
    ]
    assert all(r.headers["authorization"].startswith("Basic ") for r in fake.requests)
    assert fake.requests[-1].url.path.startswith("/jmap/download/alice/G")
    query = fake.api_calls[1][0][1]
    assert query["sort"] == [
        {"property": "receivedAt", "isAscending": True},
        {"property": "id", "isAscending": True},
    ]
    assert "notKeyword" not in query["filter"]


async def test_a_session_url_in_the_config_skips_discovery(
    fake: FakeJmap, make: Callable[..., JmapBackend]
) -> None:
    async with make("jmap+http://jmap.test:8080/jmap").open_maildrop(ALICE) as drop:
        assert drop.entries == []
    assert str(fake.requests[0].url) == "http://jmap.test:8080/jmap"


@pytest.mark.parametrize(
    ("page_size", "max_get", "cap", "max_calls"),
    [(4, 100, None, 16), (1024, 3, None, 4), (10, 10, 3, 16), (2, 100, None, 2)],
)
async def test_paging_lists_every_email_once_within_the_server_limits(
    fake: FakeJmap,
    make: Callable[..., JmapBackend],
    page_size: int,
    max_get: int,
    cap: int | None,
    max_calls: int,
) -> None:
    emails = [fake.add(message(n)) for n in range(23)]
    fake.max_objects_in_get, fake.cap_limit, fake.max_calls = max_get, cap, max_calls
    async with make(page_size=page_size).open_maildrop(ALICE) as drop:
        assert [e.upstream_id for e in drop.entries] == [e.id for e in emails]
    for calls in fake.api_calls[1:]:
        assert len(calls) <= max_calls
    limit = min(page_size, max_get)
    pages_per_request = max(1, max_calls // 2)
    if cap is None:
        assert len(fake.api_calls) - 1 == 1 + -(-(23 - limit) // (limit * pages_per_request))


async def test_an_empty_mailbox_and_a_mailbox_by_name(
    fake: FakeJmap, make: Callable[..., JmapBackend]
) -> None:
    archived = fake.add(message(1), mailbox="arch")
    async with make().open_maildrop(ALICE) as drop:
        assert drop.entries == []
    async with make(folder="Archive").open_maildrop(ALICE) as drop:
        assert [e.upstream_id for e in drop.entries] == [archived.id]
    with pytest.raises(PermFailure, match="no mailbox"):
        async with make(folder="Nowhere").open_maildrop(ALICE):
            pass


async def test_a_mailbox_that_changes_between_pages_is_listed_again(
    fake: FakeJmap, make: Callable[..., JmapBackend]
) -> None:
    for n in range(10):
        fake.add(message(n))

    def change() -> None:
        if len(fake.api_calls) == 2:  # after the first page, once
            fake.add(message(99))

    fake.after_request = change
    async with make(page_size=4).open_maildrop(ALICE) as drop:
        assert len(drop.entries) == 11
        assert len({e.upstream_id for e in drop.entries}) == 11


async def test_a_mailbox_that_never_stops_changing_is_temp_failure(
    fake: FakeJmap, make: Callable[..., JmapBackend]
) -> None:
    for n in range(10):
        fake.add(message(n))
    counter = iter(range(100, 1000))
    fake.after_request = lambda: fake.add(message(next(counter))) if len(fake.api_calls) > 1 else None
    with pytest.raises(TempFailure, match="kept changing"):
        async with make(page_size=4).open_maildrop(ALICE):
            pass


async def test_a_mailbox_that_shrinks_between_pages_is_listed_again(
    fake: FakeJmap, make: Callable[..., JmapBackend]
) -> None:
    for n in range(9):
        fake.add(message(n))
    done = []

    def shrink() -> None:
        if len(fake.api_calls) == 2 and not done:
            done.append(1)
            del fake.emails[:8]  # the query state stays the same: only the count tells

    fake.after_request = shrink
    async with make(page_size=4).open_maildrop(ALICE) as drop:
        assert len(drop.entries) == 1


async def test_flag_policy_hides_flagged_emails_and_flags_at_quit(
    fake: FakeJmap, make: Callable[..., JmapBackend]
) -> None:
    emails = [fake.add(message(n)) for n in range(4)]
    emails[0].keywords.add("$pop3deleted")
    backend = make(delete_policy="flag:$POP3Deleted")
    async with backend.open_maildrop(ALICE) as drop:
        assert [e.upstream_id for e in drop.entries] == [e.id for e in emails[1:]]
        await drop.apply_deletions([1])
    assert fake.api_calls[1][0][1]["filter"]["notKeyword"] == "$pop3deleted"
    assert "$pop3deleted" in emails[2].keywords
    async with backend.open_maildrop(ALICE) as drop:
        assert [e.upstream_id for e in drop.entries] == [emails[1].id, emails[3].id]


async def test_expunge_policy_destroys_exactly_the_given_emails_in_chunks(
    fake: FakeJmap, make: Callable[..., JmapBackend]
) -> None:
    emails = [fake.add(message(n)) for n in range(8)]
    async with make().open_maildrop(ALICE) as drop:
        await drop.apply_deletions([])
        await drop.apply_deletions([0, 2, 3, 5, 7])
    assert fake.in_box() == [emails[1].id, emails[4].id, emails[6].id]
    destroys = [c for calls in fake.api_calls for c in calls if c[0] == "Email/set"]
    assert [len(c[1]["destroy"]) for c in destroys] == [3, 2]  # maxObjectsInSet is 3


async def test_move_policy_patches_mailbox_ids(fake: FakeJmap, make: Callable[..., JmapBackend]) -> None:
    emails = [fake.add(message(n)) for n in range(3)]
    async with make(delete_policy="move:Archive").open_maildrop(ALICE) as drop:
        await drop.apply_deletions([1])
    assert emails[1].mailboxes == {"arch"}
    assert fake.in_box() == [emails[0].id, emails[2].id]
    async with make(delete_policy="move:Nowhere").open_maildrop(ALICE) as drop:
        with pytest.raises(TempFailure, match="no mailbox 'Nowhere'"):
            await drop.apply_deletions([0])
    assert fake.in_box() == [emails[0].id, emails[2].id]


@pytest.mark.parametrize("policy", ["expunge", "move:Archive", "flag:$x"])
async def test_partial_failures_are_temp_failure_and_touch_nothing_else(
    fake: FakeJmap, make: Callable[..., JmapBackend], policy: str
) -> None:
    emails = [fake.add(message(n)) for n in range(4)]
    fake.set_failures[emails[1].id] = "forbidden"
    async with make(delete_policy=policy).open_maildrop(ALICE) as drop:
        fake.emails.remove(emails[2])  # gone meanwhile: notFound is not a failure
        with pytest.raises(TempFailure, match=r"1 of 3 message\(s\) not changed upstream.*forbidden"):
            await drop.apply_deletions([0, 1, 2])
    assert emails[1] in fake.emails and "inbox1" in emails[1].mailboxes and not emails[1].keywords
    assert emails[3] in fake.emails and "inbox1" in emails[3].mailboxes and not emails[3].keywords


async def test_a_set_that_reports_nothing_for_an_id_is_temp_failure(
    fake: FakeJmap, make: Callable[..., JmapBackend]
) -> None:
    fake.add(message(1))
    async with make().open_maildrop(ALICE) as drop:
        fake.api_hook = lambda r: httpx.Response(200, json={"methodResponses": [["Email/set", {}, "c0"]]})
        with pytest.raises(TempFailure, match="not reported"):
            await drop.apply_deletions([0])
        fake.api_hook = lambda r: httpx.Response(
            200, json={"methodResponses": [["Email/set", {"destroyed": 5}, "c0"]]}
        )
        with pytest.raises(TempFailure, match="destroyed"):
            await drop.apply_deletions([0])
        fake.api_hook = lambda r: httpx.Response(
            200, json={"methodResponses": [["error", {"type": "forbidden"}, "c0"]]}
        )
        with pytest.raises(PermFailure, match="forbidden"):
            await drop.apply_deletions([0])


async def test_mark_seen_after_a_whole_download_only(
    fake: FakeJmap, make: Callable[..., JmapBackend]
) -> None:
    emails = [fake.add(message(n, 500)) for n in range(2)]
    async with make(mark_seen=True).open_maildrop(ALICE) as drop:
        assert await read(drop, 0) == emails[0].raw
        assert await read(drop, 1, limit=10)
    assert emails[0].keywords == {"$seen"}
    assert emails[1].keywords == set()
    fake.method_errors["Email/set"] = "forbidden"
    async with make(mark_seen=True).open_maildrop(ALICE) as drop:
        assert await read(drop, 1) == emails[1].raw  # a refused $seen does not fail the RETR


async def test_top_cut_closes_the_download(fake: FakeJmap, make: Callable[..., JmapBackend]) -> None:
    big = fake.add(message(1, 400_000))
    small = fake.add(message(2, 5000))
    streams: list[Chunks] = []

    def download(email: FakeEmail) -> httpx.Response:
        stream = Chunks(email.raw, size=4096)
        streams.append(stream)
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(len(email.raw))}
        return httpx.Response(200, headers=headers, stream=stream)

    fake.download_hook = download
    async with make().open_maildrop(ALICE) as drop:
        assert await read(drop, 0, limit=10) == big.raw[:4096]
        # a small message is read ahead whole (and its download closed); what the cut caller took is a prefix
        cut = await read(drop, 1, limit=10)
        assert cut and small.raw.startswith(cut)
        assert await read(drop, 1) == small.raw
    assert all(s.closed for s in streams)


async def test_a_download_with_another_length_is_size_changed_and_remembered(
    fake: FakeJmap, make: Callable[..., JmapBackend]
) -> None:
    email = fake.add(message(1, 100))
    truth = message(1, 130)
    fake.download_hook = lambda e: httpx.Response(
        200,
        headers={"Content-Type": "application/octet-stream", "Content-Length": str(len(truth))},
        stream=Chunks(truth),
    )
    backend = make()
    async with backend.open_maildrop(ALICE) as drop:
        assert drop.entries[0].size == 100
        with pytest.raises(SizeChanged) as info:
            await read(drop, 0)
        assert info.value.actual == 130
    async with backend.open_maildrop(ALICE) as drop:
        assert drop.entries[0].size == 130  # the next session lists what RETR sends
        assert await read(drop, 0) == truth
        drop.note_size(0, 131)  # e.g. bare LFs counted as CRLF by the shell
    async with backend.open_maildrop(ALICE) as drop:
        assert drop.entries[0].size == 131
        assert await read(drop, 0) == truth  # compared with the remembered blob length, not the listing
    assert email.raw != truth


async def test_a_download_cut_midway_is_temp_failure(
    fake: FakeJmap, make: Callable[..., JmapBackend]
) -> None:
    email = fake.add(message(1, 1000))
    fake.download_hook = lambda e: httpx.Response(
        200, headers={"Content-Type": "application/octet-stream"}, stream=Chunks(e.raw, size=100, cut=300)
    )
    got = b""
    async with make().open_maildrop(ALICE) as drop:
        with pytest.raises(TempFailure, match="ReadError"):
            async with contextlib.aclosing(drop.stream(0)) as chunks:
                async for chunk in chunks:
                    got += chunk
    assert got == email.raw[:300]


async def test_a_short_download_without_a_length_is_temp_failure(
    fake: FakeJmap, make: Callable[..., JmapBackend]
) -> None:
    fake.add(message(1, 1000))
    fake.download_hook = lambda e: httpx.Response(
        200, headers={"Content-Type": "application/octet-stream"}, stream=Chunks(e.raw[:500])
    )
    async with make().open_maildrop(ALICE) as drop:
        with pytest.raises(TempFailure, match="500 of 1000 bytes"):
            await read(drop, 0)


@pytest.mark.parametrize(
    ("status", "error"), [(404, MessageGone), (500, TempFailure), (401, TempFailure), (400, PermFailure)]
)
async def test_download_statuses(
    fake: FakeJmap, make: Callable[..., JmapBackend], status: int, error: type[Exception]
) -> None:
    fake.add(message(1))
    fake.download_hook = lambda e: httpx.Response(status, text="no")
    async with make().open_maildrop(ALICE) as drop:
        with pytest.raises(error):
            await read(drop, 0)


async def test_a_blob_the_server_lost_is_message_gone(
    fake: FakeJmap, make: Callable[..., JmapBackend]
) -> None:
    email = fake.add(message(1))
    async with make().open_maildrop(ALICE) as drop:
        fake.emails.remove(email)
        with pytest.raises(MessageGone):
            await read(drop, 0)


async def test_wrong_password_is_auth_failed(fake: FakeJmap, make: Callable[..., JmapBackend]) -> None:
    with pytest.raises(AuthFailed, match="401"):
        async with make().open_maildrop(PasswordLogin("alice", "nope")):
            pass


@pytest.mark.parametrize(
    "login",
    [
        ApopLogin("alice", "<1.2@h>", "0" * 32),
        PasswordLogin("al:ice", "pw"),
        PasswordLogin("", "pw"),
        PasswordLogin("alice", "p" * 1025),
        PasswordLogin("a" * 257, "pw"),
    ],
)
async def test_logins_that_cannot_be_passed_through_are_auth_failed_without_a_request(
    fake: FakeJmap, make: Callable[..., JmapBackend], login: PasswordLogin | ApopLogin
) -> None:
    with pytest.raises(AuthFailed):
        async with make().open_maildrop(login):
            pass
    assert fake.requests == []


async def test_bearer_token_with_the_users_file(
    fake: FakeJmap, make: Callable[..., JmapBackend], tmp_path: Path
) -> None:
    fake.token = "s3cret-token"
    users = tmp_path / "users"
    add_user(users, "alice", "pop3 pass")
    add_user(users, "team@example.com", "team pass")
    add_user(users, "carol", "carol pass")
    email = fake.add(message(1))
    # the shared account is named "Team@Example.com": only an explicit mapping reaches it (no case folding)
    backend = make(token="s3cret-token", users_file=str(users), token_accounts=("team@example.com=shared1",))
    async with backend.open_maildrop(PasswordLogin("alice", "pop3 pass")) as drop:
        assert [e.upstream_id for e in drop.entries] == [email.id]
    assert {r.headers["authorization"] for r in fake.requests if r.url.path != "/.well-known/jmap"} == {
        "Bearer s3cret-token"
    }
    async with backend.open_maildrop(PasswordLogin("team@example.com", "team pass")):
        pass  # the shared account mapped to the POP3 user
    for login in (
        PasswordLogin("alice", "pw"),
        PasswordLogin("nobody", "x"),
        PasswordLogin("carol", "carol pass"),
    ):
        with pytest.raises(AuthFailed):
            async with backend.open_maildrop(login):
                pass
    with pytest.raises(PermFailure, match="users file"):
        async with make(token="t").open_maildrop(ALICE):
            pass
    with pytest.raises(TempFailure, match="users file"):
        async with make(token="t", users_file=str(tmp_path / "missing")).open_maildrop(ALICE):
            pass


def test_secrets_stay_out_of_reprs() -> None:
    settings = JmapSettings.from_url("jmap+https://h/", token="tok-123-secret")
    assert "tok-123-secret" not in repr(settings)
    from gateway.backends.jmap import _Credentials

    creds = _Credentials.basic("alice", "hunter2")
    assert "hunter2" not in repr(creds) and "aHVudGVyMg" not in repr(creds)
    assert "tok-123-secret" not in repr(UpstreamConfig(token="tok-123-secret"))


def session_response(**changes: Any) -> Callable[[httpx.Request], httpx.Response]:
    def respond(request: httpx.Request) -> httpx.Response:
        return httpx.Response(**changes)

    return respond


@pytest.mark.parametrize(
    ("response", "error", "message"),
    [
        (dict(status_code=503), TempFailure, "503"),
        (dict(status_code=429), TempFailure, "429"),
        (dict(status_code=403), AuthFailed, "403"),
        (dict(status_code=404, text="<html>"), PermFailure, "HTTP 404"),
        (
            dict(status_code=200, text="<html>hello</html>", headers={"Content-Type": "text/html"}),
            TempFailure,
            "text/html",
        ),
        (
            dict(status_code=200, content=b"{not json", headers={"Content-Type": "application/json"}),
            TempFailure,
            "not JSON",
        ),
        (dict(status_code=200, json=[1, 2]), TempFailure, "expected an object"),
        (dict(status_code=302), TempFailure, "without a Location"),
        (dict(status_code=302, headers={"Location": "ftp://x/"}), PermFailure, "non-http"),
    ],
)
async def test_session_failures(
    fake: FakeJmap,
    make: Callable[..., JmapBackend],
    response: dict[str, Any],
    error: type[Exception],
    message: str,
) -> None:
    respond = session_response(**response)
    original = fake.handler

    def handler(request: httpx.Request) -> httpx.Response:
        return respond(request) if request.url.path == "/jmap" else original(request)

    fake.handler = handler  # type: ignore[method-assign]
    with pytest.raises(error, match=message):
        async with make().open_maildrop(ALICE):
            pass


async def test_redirect_loops_and_downgrades_are_refused(make: Callable[..., JmapBackend]) -> None:
    def loop(request: httpx.Request) -> httpx.Response:
        return httpx.Response(307, headers={"Location": "/again"})

    backend = JmapBackend(JmapSettings.from_url("jmap+http://h/"), transport=httpx.MockTransport(loop))
    with pytest.raises(PermFailure, match="more than 5 redirects"):
        async with backend.open_maildrop(ALICE):
            pass
    await backend.aclose()

    def downgrade(request: httpx.Request) -> httpx.Response:
        return httpx.Response(301, headers={"Location": "http://h/jmap"})

    backend = JmapBackend(JmapSettings.from_url("jmap+https://h/"), transport=httpx.MockTransport(downgrade))
    with pytest.raises(PermFailure, match="https to http"):
        async with backend.open_maildrop(ALICE):
            pass
    await backend.aclose()


async def test_a_redirect_to_an_allowed_origin_is_followed(make: Callable[..., JmapBackend]) -> None:
    fake = FakeJmap()
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        if request.url.host == "example.test":
            return httpx.Response(308, headers={"Location": "https://api.example.test/jmap"})
        return fake.handler(request)

    backend = JmapBackend(
        JmapSettings.from_url("jmap+https://example.test/", allowed_origins=("https://api.example.test",)),
        transport=httpx.MockTransport(handler),
    )  # followed because the operator allows that origin; otherwise see test_jmap_origins.py
    async with backend.open_maildrop(ALICE) as drop:
        assert drop.entries == []
    await backend.aclose()
    assert seen[:3] == [
        "https://example.test/.well-known/jmap",
        "https://api.example.test/jmap",
        "https://api.example.test/jmap/",
    ]


async def test_a_session_without_a_mail_account(fake: FakeJmap, make: Callable[..., JmapBackend]) -> None:
    fake.session_extra = {"accounts": {}, "primaryAccounts": {}}
    with pytest.raises(PermFailure, match="no primary mail account"):
        async with make().open_maildrop(ALICE):
            pass


@pytest.mark.parametrize(
    ("hook", "error", "message"),
    [
        (lambda r: httpx.Response(500), TempFailure, "HTTP 500"),
        (lambda r: httpx.Response(401), AuthFailed, "401"),
        (
            lambda r: httpx.Response(
                400, json={"type": "urn:ietf:params:jmap:error:notRequest", "detail": "bad"}
            ),
            PermFailure,
            "notRequest: bad",
        ),
        (
            lambda r: httpx.Response(400, json={"type": "urn:ietf:params:jmap:error:limit"}),
            TempFailure,
            "limit",
        ),
        (lambda r: httpx.Response(200, text="ok"), TempFailure, "not JSON"),
        (
            lambda r: httpx.Response(200, json={"methodResponses": [["Mailbox/get", {"list": 1}, "c0"]]}),
            TempFailure,
            "list",
        ),
        (
            lambda r: httpx.Response(
                200, json={"methodResponses": [["error", {"type": "serverFail"}, "c0"]]}
            ),
            TempFailure,
            "serverFail",
        ),
        (
            lambda r: httpx.Response(
                200, json={"methodResponses": [["error", {"type": "accountNotFound"}, "c0"]]}
            ),
            PermFailure,
            "accountNotFound",
        ),
        (lambda r: httpx.Response(200, json={"methodResponses": []}), TempFailure, "no response"),
        (
            lambda r: httpx.Response(200, json={"methodResponses": [["x", {}, "c9"]]}),
            TempFailure,
            "never made",
        ),
    ],
)
async def test_api_failures_at_login(
    fake: FakeJmap,
    make: Callable[..., JmapBackend],
    hook: Callable[[httpx.Request], httpx.Response],
    error: type[Exception],
    message: str,
) -> None:
    fake.api_hook = hook
    with pytest.raises(error, match=message):
        async with make().open_maildrop(ALICE):
            pass


async def test_method_errors_of_the_query_are_mapped(
    fake: FakeJmap, make: Callable[..., JmapBackend]
) -> None:
    fake.add(message(1))
    fake.method_errors["Email/query"] = "unsupportedSort"
    with pytest.raises(PermFailure, match="unsupportedSort"):
        async with make().open_maildrop(ALICE):
            pass
    fake.method_errors["Email/query"] = "serverUnavailable"
    with pytest.raises(TempFailure, match="serverUnavailable"):
        async with make().open_maildrop(ALICE):
            pass


async def test_oversized_responses_are_temp_failure(
    fake: FakeJmap, make: Callable[..., JmapBackend], monkeypatch: pytest.MonkeyPatch
) -> None:
    import gateway.backends.jmap as module

    monkeypatch.setattr(module, "MAX_JSON_BYTES", 2000)
    for n in range(40):
        fake.add(message(n))
    with pytest.raises(TempFailure, match="over the 2000-byte cap"):  # streamed: no Content-Length
        async with make().open_maildrop(ALICE):
            pass
    fake.api_hook = lambda r: httpx.Response(
        200, content=b"{}" + b" " * 5000, headers={"Content-Type": "application/json"}
    )
    with pytest.raises(TempFailure, match="response of 5002 bytes"):
        async with make().open_maildrop(ALICE):
            pass


async def test_a_request_over_max_size_request_is_perm_failure(
    fake: FakeJmap, make: Callable[..., JmapBackend]
) -> None:
    fake.session_extra = {"capabilities": {jmap.CORE: {"maxSizeRequest": 10}, jmap.MAIL: {}}}
    with pytest.raises(PermFailure, match="maxSizeRequest"):
        async with make().open_maildrop(ALICE):
            pass


@pytest.mark.parametrize(
    ("exc", "message"),
    [
        (httpx.ConnectError("refused"), "ConnectError"),
        (httpx.ReadTimeout("slow"), "timed out"),
        (httpx.RemoteProtocolError("garbage"), "RemoteProtocolError"),
    ],
)
async def test_transport_errors_are_temp_failure(exc: Exception, message: str) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc

    backend = JmapBackend(JmapSettings.from_url("jmap+http://h/"), transport=httpx.MockTransport(handler))
    with pytest.raises(TempFailure, match=message):
        async with backend.open_maildrop(ALICE):
            pass
    await backend.aclose()


async def test_a_body_that_times_out_is_temp_failure(
    fake: FakeJmap, make: Callable[..., JmapBackend]
) -> None:
    class Slow(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            yield b"{"
            raise httpx.ReadTimeout("slow")

    fake.api_hook = lambda r: httpx.Response(200, headers={"Content-Type": "application/json"}, stream=Slow())
    with pytest.raises(TempFailure, match="timed out reading"):
        async with make().open_maildrop(ALICE):
            pass


async def test_a_refused_connection_on_a_real_socket_is_temp_failure() -> None:
    with trio.socket.socket() as sock:  # a port that nobody listens on: bound, never listening
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        backend = JmapBackend(JmapSettings.from_url(f"jmap+http://127.0.0.1:{port}/", timeout=5))
        with pytest.raises(TempFailure, match="ConnectError"):
            async with backend.open_maildrop(ALICE):
                pass
        await backend.aclose()


# ------------------------------------------------------------------ settings and make_backend


def test_settings_from_urls() -> None:
    s = JmapSettings.from_url("jmap+https://mail.example/")
    assert s.session_url == "https://mail.example/.well-known/jmap"
    assert s.origin == "https://mail.example"
    s = JmapSettings.from_url("JMAP+HTTP://127.0.0.1:8080")
    assert s.session_url == "http://127.0.0.1:8080/.well-known/jmap"
    s = JmapSettings.from_url("jmap+https://api.example/jmap/session", folder="Archive")
    assert s.session_url == "https://api.example/jmap/session"
    assert s.hide_keyword is None
    assert JmapSettings.from_url("jmap+http://h/", delete_policy="flag:$X").hide_keyword == "$x"
    for bad in ("imap://h/", "jmap+http:///x", "jmap+https://u:p@h/", "jmap+https://h/?a=1"):
        with pytest.raises(ValueError):
            JmapSettings.from_url(bad)


async def test_lock_key_is_account_and_mailbox(make: Callable[..., JmapBackend]) -> None:
    assert make(folder="Archive").lock_key("alice") == "jmap:http://jmap.test:8080:alice:Archive"
    assert make().name == "jmap"


async def test_make_backend_builds_the_jmap_backend(tmp_path: Path) -> None:
    up = UpstreamConfig(
        url="jmap+https://h/", folder="Work", delete_policy="move:Old", mark_seen=True, token="t"
    )
    config = Config(upstream=up)
    backend = make_backend(config)
    assert isinstance(backend, JmapBackend)
    s = backend.settings
    assert (s.folder, str(s.delete_policy), s.mark_seen, s.token, s.timeout) == (
        "Work",
        "move:Old",
        True,
        "t",
        30.0,
    )
    assert s.users_file == str(config.state_path / "users")
    await backend.aclose()
    with pytest.raises(ConfigError, match="no credentials"):
        make_backend(Config(upstream=UpstreamConfig(url="jmap+https://u:p@h/")))
    with pytest.raises(ConfigError, match=r"upstream\.url"):
        make_backend(
            Config(upstream=UpstreamConfig(url="jmap+https://h/", ca_file=str(tmp_path / "none.pem")))
        )


def test_page_size_must_be_positive() -> None:
    with pytest.raises(ValueError):
        JmapBackend(JmapSettings.from_url("jmap+http://h/", page_size=0))


def test_quote_roundtrip_of_download_names() -> None:
    url = jmap.download_url("/d/{accountId}/{blobId}/{name}?t={type}", "acc", "Gabc", name="a/b c.eml")
    assert urllib.parse.unquote(url.split("/")[-1].split("?")[0]) == "a/b c.eml"


async def test_a_server_that_caps_later_pages_is_asked_again_from_where_it_stopped(
    fake: FakeJmap, make: Callable[..., JmapBackend]
) -> None:
    emails = [fake.add(message(n)) for n in range(20)]
    fake.cap_limit, fake.cap_after_first = 2, True
    async with make(page_size=4).open_maildrop(ALICE) as drop:
        assert [e.upstream_id for e in drop.entries] == [e.id for e in emails]


async def test_a_server_whose_pages_overlap_is_temp_failure(
    fake: FakeJmap, make: Callable[..., JmapBackend]
) -> None:
    for n in range(10):
        fake.add(message(n))
    fake.overlap = True
    with pytest.raises(TempFailure, match="kept changing"):
        async with make(page_size=4).open_maildrop(ALICE):
            pass


async def test_a_total_that_the_pages_overrun_is_listed_again(
    fake: FakeJmap, make: Callable[..., JmapBackend]
) -> None:
    for n in range(6):
        fake.add(message(n))

    def lying_total(request: httpx.Request) -> httpx.Response | None:
        calls = json.loads(request.content)["methodCalls"]
        if calls[0][0] != "Email/query":
            return None
        out = fake._api(calls)
        out[0][1]["total"] = 3  # but it sends 4 ids on the first page
        return httpx.Response(200, json={"methodResponses": out})

    fake.api_hook = lying_total
    with pytest.raises(TempFailure, match="kept changing"):
        async with make(page_size=4).open_maildrop(ALICE):
            pass


async def test_streamed_json_over_the_cap_is_temp_failure(
    fake: FakeJmap, make: Callable[..., JmapBackend], monkeypatch: pytest.MonkeyPatch
) -> None:
    import gateway.backends.jmap as module

    monkeypatch.setattr(module, "MAX_JSON_BYTES", 1000)  # the session (about 700 bytes) still fits
    fake.api_hook = lambda r: httpx.Response(
        200, headers={"Content-Type": "application/json"}, stream=Chunks(b"[" + b"1," * 2000 + b"1]")
    )
    with pytest.raises(TempFailure, match="response over the 1000-byte cap"):
        async with make().open_maildrop(ALICE):
            pass


async def test_size_fixes_are_bounded(
    fake: FakeJmap, make: Callable[..., JmapBackend], monkeypatch: pytest.MonkeyPatch
) -> None:
    import gateway.backends.jmap as module

    monkeypatch.setattr(module, "MAX_SIZE_FIXES", 1)
    fake.add(message(1))
    fake.add(message(2))
    backend = make()
    async with backend.open_maildrop(ALICE) as drop:
        drop.note_size(0, 1000)
        drop.note_size(1, 2000)  # the table is full: forgotten
        drop.note_size(0, 1001)  # a known key is still updated
    async with backend.open_maildrop(ALICE) as drop:
        assert [e.size for e in drop.entries] == [1001, 60]


async def test_a_token_session_whose_username_is_the_pop3_user(
    fake: FakeJmap, make: Callable[..., JmapBackend], tmp_path: Path
) -> None:
    fake.token = "tok"
    fake.session_extra = {"username": "bob"}  # exactly: "Bob" is another name (see test_jmap_accounts.py)
    add_user(tmp_path / "users", "bob", "bob pass")
    async with make(token="tok", users_file=str(tmp_path / "users")).open_maildrop(
        PasswordLogin("bob", "bob pass")
    ):
        pass  # no account named bob: the session's own user gets the primary account


async def test_an_unknown_delete_policy_and_a_failing_mailbox_lookup(
    fake: FakeJmap, make: Callable[..., JmapBackend]
) -> None:
    fake.add(message(1))
    # an unknown policy is refused when the settings are made (parsed once), never at QUIT
    with pytest.raises(ValueError, match='must be "expunge"'):
        make(delete_policy="shred")
    async with make(delete_policy="move:Archive").open_maildrop(ALICE) as drop:
        fake.method_errors["Mailbox/get"] = "serverFail"
        with pytest.raises(TempFailure, match="serverFail"):
            await drop.apply_deletions([0])
    assert fake.in_box() == [fake.emails[0].id]


def test_insecure_turns_certificate_checks_off() -> None:
    import ssl

    from gateway.backends.jmap import client_tls_context

    assert client_tls_context(JmapSettings.from_url("jmap+https://h/")).verify_mode == ssl.CERT_REQUIRED
    ctx = client_tls_context(JmapSettings.from_url("jmap+https://h/", insecure=True))
    assert ctx.verify_mode == ssl.CERT_NONE and not ctx.check_hostname


@pytest.mark.parametrize(
    ("change", "pages"),
    [
        ({"total": 10}, 6),  # more than there are: a later page comes back empty
        ({"position": 0}, 6),  # pages after the first claim to start at 0
    ],
)
async def test_a_server_that_misreports_pages_is_temp_failure(
    fake: FakeJmap, make: Callable[..., JmapBackend], change: dict[str, int], pages: int
) -> None:
    for n in range(pages):
        fake.add(message(n))

    def misreport(request: httpx.Request) -> httpx.Response | None:
        calls = json.loads(request.content)["methodCalls"]
        if calls[0][0] != "Email/query":
            return None
        out = fake._api(calls)
        for name, args, _ in out:
            if name == "Email/query" and ("total" in change or args["position"] > 0):
                args.update(change)
        return httpx.Response(200, json={"methodResponses": out})

    fake.api_hook = misreport
    with pytest.raises(TempFailure, match="kept changing"):
        async with make(page_size=4).open_maildrop(ALICE):
            pass


async def test_no_total_and_an_email_gone_between_query_and_get(
    fake: FakeJmap, make: Callable[..., JmapBackend]
) -> None:
    emails = [fake.add(message(n)) for n in range(9)]

    def sloppy(request: httpx.Request) -> httpx.Response | None:
        calls = json.loads(request.content)["methodCalls"]
        if calls[0][0] != "Email/query":
            return None
        out = fake._api(calls)
        for name, args, _ in out:
            if name == "Email/query":
                del args["total"]  # calculateTotal is only a wish
            if name == "Email/get":
                args["list"] = [e for e in args["list"] if e["id"] != emails[5].id]
        return httpx.Response(200, json={"methodResponses": out})

    fake.api_hook = sloppy
    async with make(page_size=4).open_maildrop(ALICE) as drop:
        assert [e.upstream_id for e in drop.entries] == [e.id for e in emails if e is not emails[5]]


@pytest.mark.parametrize("token", ["tok en", "tok\r\nX-Evil: 1", "t\u00f6k"])
async def test_a_token_that_cannot_be_a_header_is_perm_failure(
    fake: FakeJmap, make: Callable[..., JmapBackend], tmp_path: Path, token: str
) -> None:
    with pytest.raises(PermFailure, match="not a valid bearer token"):
        async with make(token=token, users_file=str(tmp_path / "users")).open_maildrop(ALICE):
            pass
    assert fake.requests == []


@pytest.mark.parametrize(
    ("api_url", "message"), [("http://[bad/", "not a URL"), ("http://h:x/", "InvalidURL")]
)
async def test_an_api_url_that_cannot_be_used_is_temp_failure(
    fake: FakeJmap, make: Callable[..., JmapBackend], api_url: str, message: str
) -> None:
    fake.session_extra = {"apiUrl": api_url}
    with pytest.raises(TempFailure, match=message):
        async with make().open_maildrop(ALICE):
            pass


async def test_small_messages_are_read_ahead_and_each_downloaded_once(
    fake: FakeJmap, make: Callable[..., JmapBackend]
) -> None:
    emails = [fake.add(message(i, 3000 + i)) for i in range(1, 11)]
    downloads: list[int] = []

    def count(email: FakeEmail) -> httpx.Response:
        downloads.append(len(email.raw))
        return httpx.Response(
            200,
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(len(email.raw))},
            stream=Chunks(email.raw),
        )

    fake.download_hook = count
    async with make().open_maildrop(ALICE) as drop:
        first = await read(drop, 0)
        assert len(downloads) > 1  # the next messages came with the first
        got = [first] + [await read(drop, i) for i in range(1, 10)]
    assert got == [e.raw for e in emails]
    assert sorted(downloads) == sorted(len(e.raw) for e in emails)  # each exactly once
