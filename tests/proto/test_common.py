"""The toolkit every core shares: one NEED_DATA, one protocol-error family, one UIDL sanitiser."""

from __future__ import annotations

import copy
import hashlib
import pickle

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.backends import maildir
from gateway.proto import common, imap, jmap, proxy, uidl
from gateway.proto.common import (
    NEED_DATA,
    LocalProtocolError,
    NeedData,
    ProtocolError,
    RemoteProtocolError,
    is_valid_uidl,
    uidl_or_sha1,
)

# ---------------------------------------------------------------- NEED_DATA


def test_every_core_answers_the_same_need_data() -> None:
    assert imap.NEED_DATA is NEED_DATA
    assert proxy.NEED_DATA is NEED_DATA
    assert imap.ResponseParser().next_event() is NEED_DATA
    assert proxy.ProxyParser().next_event() is NEED_DATA


def test_need_data_is_a_plain_singleton() -> None:
    assert repr(NEED_DATA) == "NEED_DATA"
    assert isinstance(NEED_DATA, NeedData)
    assert list(NeedData) == [NEED_DATA]
    assert copy.copy(NEED_DATA) is NEED_DATA
    assert copy.deepcopy(NEED_DATA) is NEED_DATA
    assert pickle.loads(pickle.dumps(NEED_DATA)) is NEED_DATA


# ---------------------------------------------------------------- errors


def test_the_peers_mistakes_are_remote_protocol_errors() -> None:
    for cls in (imap.ImapProtocolError, proxy.ProxyProtocolError, jmap.MalformedResponse):
        assert issubclass(cls, RemoteProtocolError)
        assert issubclass(cls, ProtocolError)
        assert not issubclass(cls, LocalProtocolError)
    assert issubclass(jmap.MalformedResponse, jmap.JmapError)  # still caught where JMAP errors are


def test_jmap_refusals_are_answers_not_protocol_errors() -> None:
    assert not issubclass(jmap.RequestError, ProtocolError)
    assert not issubclass(jmap.MethodError, ProtocolError)


def test_our_own_misuse_is_one_local_protocol_error() -> None:
    assert imap.LocalProtocolError is LocalProtocolError
    assert proxy.LocalProtocolError is LocalProtocolError
    assert issubclass(LocalProtocolError, ProtocolError)
    assert not issubclass(LocalProtocolError, RemoteProtocolError)
    with pytest.raises(LocalProtocolError):
        _ = proxy.ProxyParser().trailing_data


def test_a_remote_error_carries_a_reply_hint_apart_from_its_log_text() -> None:
    exc = RemoteProtocolError("line of 9000 octets", reply_hint="Line too long")
    assert str(exc) == "line of 9000 octets"
    assert exc.reply_hint == "Line too long"
    assert RemoteProtocolError("x").reply_hint is None
    assert imap.ImapProtocolError("malformed").reply_hint is None
    assert jmap.MalformedResponse("not JSON").reply_hint is None


def test_a_core_raises_the_shared_family() -> None:
    parser = proxy.ProxyParser()
    parser.receive_data(b"GET / HTTP/1.1\r\n")
    with pytest.raises(RemoteProtocolError):
        parser.next_event()
    with pytest.raises(RemoteProtocolError):
        jmap.parse_response(b"not json", jmap.Request())


# ---------------------------------------------------------------- the UIDL sanitiser


@pytest.mark.parametrize("text", ["a", "x" * 70, "!~", "1700000000.M1P2.host", "0000002a00000007"])
def test_a_valid_uidl_is_kept(text: str) -> None:
    assert is_valid_uidl(text)
    assert uidl_or_sha1(text) == text


@pytest.mark.parametrize("text", ["", "x" * 71, "a b", "tab\tin", "caf\u00e9", "del\x7f", "nl\n"])
def test_anything_else_becomes_the_sha1_of_its_utf8(text: str) -> None:
    assert not is_valid_uidl(text)
    assert uidl_or_sha1(text) == hashlib.sha1(text.encode()).hexdigest()


def test_an_undecodable_file_name_hashes_as_its_bytes() -> None:
    name = b"3.caf\xe9".decode("utf-8", "surrogateescape")  # what os.listdir gives for a Latin-1 name
    assert uidl_or_sha1(name) == hashlib.sha1(b"3.caf\xe9").hexdigest()


def test_a_lone_surrogate_from_json_does_not_raise() -> None:
    out = uidl_or_sha1("\ud800")
    assert out == hashlib.sha1("\ud800".encode("utf-8", "surrogatepass")).hexdigest()
    assert is_valid_uidl(out)


def test_the_cores_and_backends_use_the_one_sanitiser() -> None:
    assert uidl.is_valid is is_valid_uidl
    assert uidl.MAX_UIDL == common.MAX_UIDL == 70
    assert not hasattr(maildir, "_uidl")
    for text in ("x" * 71, "M6a8d374fa6cb33bc47bccd75", "a b"):
        assert jmap.uidl_for(text) == uidl_or_sha1(text)
        assert uidl.propose("native", key="k", native=text, uid=0, uidvalidity=0) == uidl_or_sha1(text)


def _old_rule(text: str) -> bool:
    """The rule as jmap.py and maildir.py spelled it before the toolkit."""
    return 1 <= len(text) <= 70 and all("\x21" <= c <= "\x7e" for c in text)


@given(st.text(max_size=80))
def test_the_sanitiser_agrees_with_the_old_three(text: str) -> None:
    out = uidl_or_sha1(text)
    assert is_valid_uidl(out)
    assert uidl_or_sha1(out) == out
    assert is_valid_uidl(text) is _old_rule(text)
    if not _old_rule(text):
        try:
            old = hashlib.sha1(text.encode("utf-8", "surrogateescape")).hexdigest()  # jmap, maildir
        except UnicodeEncodeError:
            old = hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()  # they raised here
        assert out == old
