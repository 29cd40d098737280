"""TOML config: unknown keys and bad values are errors that name the key and its line."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import trustme

from gateway import cli
from gateway import config as cfg
from gateway.config import DeletePolicy, loads

GOOD = """\
[server]
state_dir = "/tmp/x"
idle_timeout = 900
login_delay = 60
expire = "30"

[[listen]]
address = "127.0.0.1:1110"

[[listen]]
address = "127.0.0.1:1995"
tls = "implicit"
cert_file = "/c.pem"
key_file = "/k.pem"

[upstream]
url = "maildir:///var/mail"

[log]
format = "json"
"""


def test_good_config_loads() -> None:
    c = cfg.loads(GOOD)
    assert c.server.idle_timeout == 900.0
    assert c.server.login_delay == 60
    assert [lc.address for lc in c.listen] == ["127.0.0.1:1110", "127.0.0.1:1995"]
    assert c.listen[1].tls == "implicit"
    assert c.upstream.url == "maildir:///var/mail"
    assert c.log.format == "json"


def test_empty_config_is_the_embedded_default() -> None:
    c = cfg.loads("")
    assert c.listen[0].address == "127.0.0.1:1110"
    assert c.upstream.url == ""
    assert c.server.idle_timeout >= 600


def test_unknown_key_is_named_with_its_line() -> None:
    text = GOOD.replace('expire = "30"', 'expire = "30"\nidle_timout = 5')
    with pytest.raises(cfg.ConfigError) as info:
        cfg.loads(text)
    assert info.value.key == "server.idle_timout"
    assert info.value.line == 6
    assert "line 6: server.idle_timout: unknown key" in str(info.value)


def test_unknown_key_in_second_listener() -> None:
    text = GOOD.replace('tls = "implicit"', 'tls = "implicit"\ntsl = "x"')
    with pytest.raises(cfg.ConfigError) as info:
        cfg.loads(text)
    assert info.value.key == "listen[1].tsl"
    assert info.value.line == 13


def test_unknown_table() -> None:
    with pytest.raises(cfg.ConfigError, match=r"line 1: sever: unknown key"):
        cfg.loads("[sever]\nx = 1\n")


@pytest.mark.parametrize(
    ("snippet", "key", "line"),
    [
        ('[server]\nidle_timeout = "ten"\n', "server.idle_timeout", 2),
        ("[server]\nmax_sessions = 0\n", "server.max_sessions", 2),
        ("[server]\nin_use_lock = 1\n", "server.in_use_lock", 2),
        ("[server]\nmax_sessions = true\n", "server.max_sessions", 2),
        ('[server]\nexpire = "soon"\n', "server.expire", 2),
        ("[server]\nlogin_timeout = -1\n", "server.login_timeout", 2),
        ('[[listen]]\naddress = "nohost"\n', "listen[0].address", 2),
        ('[[listen]]\naddress = "h:1"\ntls = "maybe"\n', "listen[0].tls", 3),
        ('[[listen]]\naddress = "h:1"\ntls = "implicit"\n', "listen[0].tls", 3),
        ('[upstream]\nurl = "pop3://old"\n', "upstream.url", 2),
        ('[upstream]\ndelete_policy = "shred"\n', "upstream.delete_policy", 2),
        ('[log]\nlevel = "loud"\n', "log.level", 2),
        ('server = "x"\n', "server", 1),
        ("listen = 3\n", "listen", 1),
    ],
)
def test_bad_values_name_key_and_line(snippet: str, key: str, line: int) -> None:
    with pytest.raises(cfg.ConfigError) as info:
        cfg.loads(snippet)
    assert info.value.key == key
    assert info.value.line == line


def test_invalid_toml_reports_its_line() -> None:
    with pytest.raises(cfg.ConfigError) as info:
        cfg.loads("[server]\nidle_timeout = = 3\n")
    assert info.value.line == 2


def test_unknown_scheme_is_refused_clearly() -> None:
    with pytest.raises(cfg.ConfigError, match=r"unknown upstream scheme 'gopher://'.*maildir://"):
        cfg.with_overrides(cfg.Config(), upstream="gopher://x")


def test_flags_override_the_file() -> None:
    c = cfg.with_overrides(cfg.loads(GOOD), listen="0.0.0.0:2110", upstream="maildir:///srv", state_dir="/s")
    assert [(lc.address, lc.tls) for lc in c.listen] == [("0.0.0.0:2110", "none")]
    assert c.upstream.url == "maildir:///srv"
    assert c.server.state_dir == "/s"
    assert c.server.idle_timeout == 900.0  # untouched keys stay


def test_load_missing_file() -> None:
    with pytest.raises(cfg.ConfigError, match="cannot read"):
        cfg.load("/nonexistent/gw.toml")


def test_ipv6_listen_address() -> None:
    assert cfg.parse_host_port("[::1]:110") == ("::1", 110)
    with pytest.raises(ValueError, match="out of range"):
        cfg.parse_host_port("h:70000")


# ---------------------------------------------------------------- as strict as serve (issue 9, weakness 3)


@pytest.mark.parametrize("key", ["trusted_proxies", "plaintext_auth_networks"])
def test_a_network_with_host_bits_is_refused_with_key_and_line(key: str) -> None:
    text = f'[server]\nidle_timeout = 700\n{key} = ["10.0.0.1/8"]\n'
    with pytest.raises(cfg.ConfigError) as info:
        cfg.loads(text)
    assert info.value.key == f"server.{key}[0]"
    assert info.value.line == 3
    assert "host bits" in str(info.value) and "'10.0.0.0/8'" in str(info.value)


def test_networks_and_single_addresses_load() -> None:
    c = cfg.loads('[server]\ntrusted_proxies = ["10.0.0.0/8", "192.0.2.7", "2001:db8::/32", "::1"]\n')
    assert len(c.server.trusted_proxies) == 4


def test_two_listeners_on_one_address_are_refused() -> None:
    text = '[[listen]]\naddress = "127.0.0.1:1110"\n\n[[listen]]\naddress = "127.0.0.1:1110"\n'
    with pytest.raises(cfg.ConfigError) as info:
        cfg.loads(text)
    assert info.value.key == "listen[1].address"
    assert "listen[0]" in str(info.value)


def test_a_trusted_proxy_network_is_warned_about_and_one_host_is_not() -> None:
    c = cfg.loads('[server]\ntrusted_proxies = ["10.0.0.0/24", "192.0.2.7", "2001:db8::1/128"]\n')
    [warning] = cfg.warnings(c)
    assert warning.startswith("server.trusted_proxies[0]: 10.0.0.0/24 is 256 addresses")


def _check_config(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(["check-config", str(path)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_check_config_refuses_host_bits(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "gw.toml"
    f.write_text('[server]\ntrusted_proxies = ["10.0.0.1/8"]\n')
    code, out, err = _check_config(f, capsys)
    assert (code, out) == (2, "")
    assert "line 2: server.trusted_proxies[0]:" in err and "host bits" in err


def test_serve_refuses_host_bits_as_a_configuration_error_not_a_tls_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "gw.toml"
    f.write_text(f'[server]\nstate_dir = "{tmp_path / "state"}"\nplaintext_auth_networks = ["10.0.0.1/8"]\n')
    assert cli.main(["serve", "--config", str(f)]) == 2
    err = capsys.readouterr().err
    assert "server.plaintext_auth_networks[0]" in err
    assert "TLS" not in err


def test_check_config_loads_the_tls_certificates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "gw.toml"
    f.write_text(
        '[[listen]]\naddress = "127.0.0.1:1110"\n\n[[listen]]\naddress = "127.0.0.1:1995"\ntls = "implicit"\n'
        f'cert_file = "{tmp_path / "missing-cert.pem"}"\nkey_file = "{tmp_path / "key.pem"}"\n'
    )
    code, out, err = _check_config(f, capsys)
    assert (code, out) == (2, "")
    assert "listen[1].cert_file: cannot read" in err and "missing-cert.pem" in err


def test_check_config_names_a_key_that_does_not_fit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ca = trustme.CA()
    ca.issue_cert("localhost").cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    ca.issue_cert("localhost").private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    f = tmp_path / "gw.toml"
    f.write_text(
        f'[[listen]]\naddress = "127.0.0.1:1995"\ntls = "starttls"\ncert_file = "{tmp_path / "cert.pem"}"\n'
        f'key_file = "{tmp_path / "key.pem"}"\n'
    )
    code, _, err = _check_config(f, capsys)
    assert code == 2
    assert "listen[0].key_file:" in err and "match" in err


def test_check_config_prints_warnings_and_passes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "gw.toml"
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    f.write_text(f'[server]\nstate_dir = "{state}"\ntrusted_proxies = ["10.1.0.0/16"]\n')
    code, out, _ = _check_config(f, capsys)
    assert code == 0
    assert f"{f}: warning: server.trusted_proxies[0]: 10.1.0.0/16 is 65536 addresses" in out
    assert out.rstrip().endswith("OK (1 listener(s), upstream embedded demo)")


# ---------------------------------------------------------------- parsed once


@pytest.mark.parametrize("text", ["expunge", "move:Trash", "move:INBOX/Old mail", "flag:$POP3Deleted"])
def test_a_delete_policy_parses_once_and_prints_back_as_written(text: str) -> None:
    policy = DeletePolicy.parse(text)
    assert str(policy) == text
    assert loads(f'[upstream]\ndelete_policy = "{text}"\n').upstream.delete_policy == policy


@pytest.mark.parametrize("text", ["shred", "move:", "flag:", "Move:Trash", "expunge:now", ""])
def test_a_bad_delete_policy_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match='must be "expunge"'):
        DeletePolicy.parse(text)


def test_nothing_but_the_config_parses_a_delete_policy() -> None:
    """Five places parsed the policy text before; now the backends read DeletePolicy.kind/target."""
    root = Path(__file__).resolve().parent.parent / "gateway"
    offenders = [
        str(path.relative_to(root))
        for path in root.rglob("*.py")
        if path.name != "config.py" and re.search(r"""["'](move|flag):["']""", path.read_text())
    ]
    assert offenders == []
