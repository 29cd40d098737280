"""One TLS module: every context the gateway builds has TLS 1.2 as its minimum and refuses renegotiation."""

from __future__ import annotations

import io
import ssl
from pathlib import Path

import pytest
import trustme

from gateway import cli, migrate, tls
from gateway.backends.imap import ImapSettings
from gateway.backends.imap import client_tls_context as imap_context
from gateway.backends.jmap import JmapSettings
from gateway.backends.jmap import client_tls_context as jmap_context


@pytest.fixture(scope="module")
def pem(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    d = tmp_path_factory.mktemp("pem")
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    cert.cert_chain_pems[0].write_to_path(str(d / "cert.pem"))
    cert.private_key_pem.write_to_path(str(d / "key.pem"))
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    return d / "cert.pem", d / "key.pem", d / "ca.pem"


def assert_minimums(ctx: ssl.SSLContext) -> None:
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.options & ssl.OP_NO_RENEGOTIATION


def test_server_context_has_the_minimums(pem: tuple[Path, Path, Path]) -> None:
    cert, key, _ = pem
    ctx = tls.server_context(str(cert), str(key))
    assert_minimums(ctx)
    assert ctx.verify_mode == ssl.CERT_NONE  # no client certificates asked for


@pytest.mark.parametrize(
    "ctx",
    [
        pytest.param(lambda ca: tls.client_context(), id="default"),
        pytest.param(lambda ca: tls.client_context(ca), id="ca_file"),
        pytest.param(lambda ca: tls.client_context(insecure=True), id="insecure"),
        pytest.param(lambda ca: imap_context(ImapSettings.from_url("imaps://h/", ca_file=ca)), id="imap"),
        pytest.param(lambda ca: jmap_context(JmapSettings.from_url("jmap+https://h/")), id="jmap"),
    ],
)
def test_every_client_context_has_the_minimums(ctx: object, pem: tuple[Path, Path, Path]) -> None:
    assert callable(ctx)
    built = ctx(str(pem[2]))
    assert isinstance(built, ssl.SSLContext)
    assert_minimums(built)


def test_client_context_verifies_unless_insecure(pem: tuple[Path, Path, Path]) -> None:
    assert tls.client_context(str(pem[2])).verify_mode == ssl.CERT_REQUIRED
    assert tls.client_context(str(pem[2])).check_hostname
    loose = tls.client_context(insecure=True)
    assert loose.verify_mode == ssl.CERT_NONE and not loose.check_hostname


@pytest.mark.parametrize("source", ["pop3s://old@127.0.0.1:1", "pop3://old@127.0.0.1:1"])
def test_uidl_import_connects_with_the_same_minimums(
    source: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    seen: list[ssl.SSLContext | None] = []

    def fake_read_old_server(src: object, password: str, ctx: ssl.SSLContext | None) -> list[object]:
        seen.append(ctx)
        raise OSError("stop here")

    monkeypatch.setattr(migrate, "read_old_server", fake_read_old_server)
    monkeypatch.setattr("sys.stdin", io.StringIO("secret\n"))
    args = ["uidl", "import", "--account", "a", "--from", source, "--password-stdin"]
    args += ["--state-dir", str(tmp_path / "state"), "--dry-run"]
    if source.startswith("pop3://"):
        args.append("--starttls")
    assert cli.main(args) == 1
    assert "import failed" in capsys.readouterr().err
    [ctx] = seen
    assert ctx is not None
    assert_minimums(ctx)
    assert ctx.verify_mode == ssl.CERT_REQUIRED


def test_a_missing_certificate_is_named(pem: tuple[Path, Path, Path], tmp_path: Path) -> None:
    with pytest.raises(tls.TlsFileError) as info:
        tls.server_context(str(tmp_path / "nope.pem"), str(pem[1]))
    assert info.value.which == "cert_file"
    assert "nope.pem" in str(info.value) and "No such file" in str(info.value)


def test_a_key_given_as_certificate_is_named(pem: tuple[Path, Path, Path]) -> None:
    with pytest.raises(tls.TlsFileError) as info:
        tls.server_context(str(pem[1]), str(pem[1]))
    assert info.value.which == "cert_file"


def test_a_certificate_given_as_key_is_named(pem: tuple[Path, Path, Path]) -> None:
    with pytest.raises(tls.TlsFileError) as info:
        tls.server_context(str(pem[0]), str(pem[0]))
    assert info.value.which == "key_file"


def test_a_key_of_another_certificate_is_named(pem: tuple[Path, Path, Path], tmp_path: Path) -> None:
    other = tmp_path / "other-key.pem"
    trustme.CA().issue_cert("localhost").private_key_pem.write_to_path(str(other))
    with pytest.raises(tls.TlsFileError) as info:
        tls.server_context(str(pem[0]), str(other))
    assert info.value.which == "key_file"
    assert "match" in str(info.value)


def test_an_encrypted_key_is_refused_not_prompted_for(pem: tuple[Path, Path, Path], tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(pem[1].read_bytes(), password=None)
    encrypted = tmp_path / "encrypted.pem"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )
    with pytest.raises(tls.TlsFileError) as info:
        tls.server_context(str(pem[0]), str(encrypted))
    assert info.value.which == "key_file"
    assert "encrypted" in str(info.value)
