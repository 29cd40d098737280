"""SIGHUP: a new config is built whole before anything is swapped, or refused with one sentence."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import trustme

from gateway import config as cfg
from gateway.reload import ReloadRefused, build, plan_reload


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("certs")
    ca = trustme.CA()
    out = {}
    for name in ("old", "new"):
        cert = ca.issue_cert("localhost")
        cert.cert_chain_pems[0].write_to_path(str(d / f"{name}-cert.pem"))
        cert.private_key_pem.write_to_path(str(d / f"{name}-key.pem"))
        out[f"{name}_cert"], out[f"{name}_key"] = str(d / f"{name}-cert.pem"), str(d / f"{name}-key.pem")
    return out


def running_text(certs: dict[str, str], tmp_path: Path) -> str:
    state = tmp_path / "state"
    state.mkdir(mode=0o700, exist_ok=True)
    return f"""\
[server]
state_dir = "{state}"
login_timeout = 60

[[listen]]
address = "127.0.0.1:1110"
tls = "starttls"
cert_file = "{certs["old_cert"]}"
key_file = "{certs["old_key"]}"

[[listen]]
address = "127.0.0.1:1995"
tls = "implicit"
cert_file = "{certs["old_cert"]}"
key_file = "{certs["old_key"]}"

[[listen]]
address = "127.0.0.1:2110"
proxy_protocol = true

[upstream]
url = "imaps://mail.example.org/"
token = "s3cret-token"

[limits]
ipv6_prefix = 64
"""


@pytest.fixture
def running(certs: dict[str, str], tmp_path: Path) -> tuple[cfg.Config, str]:
    text = running_text(certs, tmp_path)
    return cfg.loads(text), text


def test_a_good_reload_builds_everything_and_lists_the_changes(
    running: tuple[cfg.Config, str], certs: dict[str, str]
) -> None:
    config, text = running
    text = text.replace(certs["old_cert"], certs["new_cert"]).replace(certs["old_key"], certs["new_key"])
    text = text.replace("login_timeout = 60", 'login_timeout = 30\ntrusted_proxies = ["192.0.2.1"]')
    text = text.replace("ipv6_prefix = 64", "ipv6_prefix = 64\nmax_sessions_per_ip = 7\nauth_delay_base = 2")
    new = cfg.loads(text)
    plan = plan_reload(config, new, open_sessions=3)
    assert plan.config is new
    assert plan.changed == (
        "server.login_timeout",
        "server.trusted_proxies",
        "listen[0].cert_file",
        "listen[0].key_file",
        "listen[1].cert_file",
        "listen[1].key_file",
        "limits.max_sessions_per_ip",
        "limits.auth_delay_base",
    )
    built = plan.built
    assert sorted(built.tls_contexts) == [0, 1]
    assert built.trusted_proxies.contains("192.0.2.1") and not built.trusted_proxies.contains("192.0.2.2")
    assert built.throttle_policy.base_delay == 2.0
    assert built.limits.max_per_ip == 7 and built.limits.ipv6_prefix == 64
    built.limits.acquire_connection("192.0.2.9")  # fresh counts
    assert built.limits.acquire_connection("192.0.2.9") is None
    assert "server.login_timeout" in plan.describe()


def test_an_unchanged_config_reloads_and_rereads_the_certificates(running: tuple[cfg.Config, str]) -> None:
    config, text = running
    plan = plan_reload(config, cfg.loads(text), open_sessions=0)
    assert plan.changed == ()
    assert sorted(plan.built.tls_contexts) == [0, 1]
    assert plan.describe() == "configuration unchanged; TLS certificates re-read"


@pytest.mark.parametrize(
    ("edit", "keys"),
    [
        (("127.0.0.1:1995", "127.0.0.1:1996"), ("listen[1].address",)),
        (('tls = "starttls"', 'tls = "implicit"'), ("listen[0].tls",)),
        (("proxy_protocol = true", "proxy_protocol = false"), ("listen[2].proxy_protocol",)),
        (("imaps://mail.example.org/", "imaps://other.example.org/"), ("upstream.url",)),
        (('token = "s3cret-token"', 'token = "other-token"'), ("upstream.token",)),
        (("login_timeout = 60", 'login_timeout = 60\nstate_dir = "/elsewhere"'), ("server.state_dir",)),
        (("[limits]", '[admin]\naddress = "127.0.0.1:9111"\n\n[limits]'), ("admin.address",)),
        (("[limits]", '[log]\nlevel = "debug"\n\n[limits]'), ("log.level",)),
        (('[[listen]]\naddress = "127.0.0.1:2110"\nproxy_protocol = true\n', ""), ("listen",)),
    ],
    ids=[
        "address",
        "tls-mode",
        "proxy-protocol",
        "upstream",
        "upstream-token",
        "state-dir",
        "admin",
        "log",
        "listener-count",
    ],
)
def test_what_cannot_change_live_is_refused(
    running: tuple[cfg.Config, str], edit: tuple[str, str], keys: tuple[str, ...]
) -> None:
    config, text = running
    old, new = edit
    assert old in text
    text = text.replace(old, new, 1)
    if "state_dir" in new:  # a second state_dir line replaces the first
        text = text.replace(f'state_dir = "{config.server.state_dir}"\n', "", 1)
    with pytest.raises(ReloadRefused) as info:
        plan_reload(config, cfg.loads(text), open_sessions=0)
    assert info.value.keys == keys
    message = str(info.value)
    assert message.startswith("reload refused, the running configuration stays: " + keys[0])
    assert message.endswith("only with a restart")
    assert "\n" not in message
    assert "other-token" not in message and "s3cret" not in message  # key names only, never values


def test_swapping_two_listeners_is_refused(running: tuple[cfg.Config, str]) -> None:
    config, _ = running
    swapped = dataclasses.replace(config, listen=(config.listen[1], config.listen[0], config.listen[2]))
    with pytest.raises(ReloadRefused) as info:
        plan_reload(config, swapped, open_sessions=0)
    assert set(info.value.keys) >= {
        "listen[0].address",
        "listen[0].tls",
        "listen[1].address",
        "listen[1].tls",
    }


def test_ipv6_prefix_is_refused_while_sessions_are_open(running: tuple[cfg.Config, str]) -> None:
    config, text = running
    new = cfg.loads(text.replace("ipv6_prefix = 64", "ipv6_prefix = 56"))
    with pytest.raises(ReloadRefused) as info:
        plan_reload(config, new, open_sessions=2)
    assert info.value.keys == ("limits.ipv6_prefix",)
    assert "2 open" in str(info.value)
    plan = plan_reload(config, new, open_sessions=0)
    assert plan.changed == ("limits.ipv6_prefix",)
    assert plan.built.limits.ipv6_prefix == 56


def test_why_ipv6_prefix_cannot_change_under_open_sessions() -> None:
    """The bookkeeping that crashed the server: a slot taken under /64 cannot be released under /56."""
    config = cfg.loads("[limits]\nipv6_prefix = 64\n")
    limits = build(config).limits
    assert limits.acquire_connection("2001:db8:0:1::5") is None
    limits.ipv6_prefix = 56
    with pytest.raises(ValueError, match="never acquired"):
        limits.release_connection("2001:db8:0:1::5")


def test_a_bad_new_certificate_refuses_the_whole_reload(
    running: tuple[cfg.Config, str], certs: dict[str, str], tmp_path: Path
) -> None:
    config, text = running
    text = text.replace(f'key_file = "{certs["old_key"]}"', f'key_file = "{certs["new_key"]}"', 1)
    text = text.replace("login_timeout = 60", "login_timeout = 30")
    with pytest.raises(cfg.ConfigError) as info:
        plan_reload(config, cfg.loads(text), open_sessions=0)
    assert info.value.key == "listen[0].key_file"
    assert "match" in str(info.value)


def test_a_new_config_is_validated_as_strictly_as_use(running: tuple[cfg.Config, str]) -> None:
    config, _ = running
    bad = dataclasses.replace(
        config, server=dataclasses.replace(config.server, plaintext_auth_networks=("10.0.0.1/8",))
    )
    with pytest.raises(cfg.ConfigError) as info:
        plan_reload(config, bad, open_sessions=0)
    assert info.value.key == "server.plaintext_auth_networks[0]"


def test_build_warns_about_a_broad_trusted_proxy(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    config = cfg.loads(f'[server]\nstate_dir = "{state}"\ntrusted_proxies = ["10.0.0.0/8"]\n')
    [warning] = build(config).warnings
    assert "server.trusted_proxies[0]: 10.0.0.0/8 is 16777216 addresses" in warning


def test_reprs_name_no_secret(running: tuple[cfg.Config, str]) -> None:
    config, text = running
    plan = plan_reload(
        config, cfg.loads(text.replace("login_timeout = 60", "login_timeout = 5")), open_sessions=0
    )
    assert "s3cret" not in repr(plan) and "s3cret" not in repr(plan.built)
    assert "server.login_timeout" in repr(plan)
