"""deploy/: what can be checked without systemd running, a container engine or a cluster.

- the systemd unit: ``systemd-analyze verify`` and its offline ``security`` score, plus the keys the
  operations doc promises;
- the Containerfile: every RUN step executed as a script on this machine, into a scratch directory (the
  Containerfile's ARGs point the paths there), then its HEALTHCHECK command against a real admin endpoint;
- every YAML file parses; compose and Kubernetes references resolve; every gateway config in deploy/
  loads with the real config loader; the compose Dovecot config passes ``doveconf -n``.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
import yaml

from gateway import config as cfg
from gateway.admin import serve_admin
from gateway.cli import _parser as cli_parser
from gateway.metrics import Metrics
from gateway.server import DELETE_SHIELD_SECONDS

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
UNIT = DEPLOY / "pop3-gateway.service"
CONTAINERFILE = DEPLOY / "Containerfile"
VENV_BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    found = shutil.which(name) or next(
        (str(p) for d in ("/usr/bin", "/usr/sbin", "/bin") if (p := Path(d) / name).exists()), None
    )
    assert found, (
        f"{name} is needed (Debian package: systemd / dovecot-core); scripts/setup-deps.sh installs it"
    )
    return found


# ---------------------------------------------------------------- systemd unit


def unit_settings(text: str) -> list[tuple[str, str, str]]:
    section, out = "", []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.append((section, key.strip(), value.strip()))
    return out


def unit_value(key: str, section: str = "Service") -> list[str]:
    return [v for s, k, v in unit_settings(UNIT.read_text()) if (s, k) == (section, key)]


def installable_unit(tmp_path: Path, text: str | None = None) -> Path:
    """The unit as installed, with ExecStart pointing at this venv's entry point (verify checks it exists)."""
    text = UNIT.read_text() if text is None else text
    assert "/opt/pop3-gateway/bin/pop3-gateway " in text
    path = tmp_path / "pop3-gateway.service"
    path.write_text(text.replace("/opt/pop3-gateway/bin/pop3-gateway", str(VENV_BIN / "pop3-gateway")))
    return path


def verify(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("systemd-analyze"), "verify", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    result = verify(installable_unit(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr  # verify warns on stderr and still exits 0


def test_verify_would_catch_a_broken_unit(tmp_path: Path) -> None:
    broken = UNIT.read_text().replace("NoNewPrivileges=yes", "NoNewPrivileges=yes\nProtectSystm=strict")
    assert "Unknown key" in verify(installable_unit(tmp_path, broken)).stderr


def security_exposure(path: Path, threshold: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            tool("systemd-analyze"),
            "security",
            "--offline=yes",
            f"--threshold={threshold}",
            "--no-pager",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_unit_exposure_score_stays_low(tmp_path: Path) -> None:
    result = security_exposure(installable_unit(tmp_path), 20)  # 2.0 on systemd's 0-10 scale
    assert "Overall exposure level" in result.stdout
    assert result.returncode == 0, result.stdout[-400:]
    bare = "\n".join(
        line for line in UNIT.read_text().splitlines() if not line.startswith(("Protect", "Restrict"))
    )
    assert security_exposure(installable_unit(tmp_path, bare), 20).returncode != 0


def test_unit_settings_the_docs_promise() -> None:
    for key, value in {
        "DynamicUser": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "NoNewPrivileges": "yes",
        "StateDirectory": "pop3-gateway",
        "ConfigurationDirectory": "pop3-gateway",
        "AmbientCapabilities": "CAP_NET_BIND_SERVICE",
        "CapabilityBoundingSet": "CAP_NET_BIND_SERVICE",
        "KillSignal": "SIGTERM",
        "ExecReload": "/bin/kill -HUP $MAINPID",
        "Type": "exec",
    }.items():
        assert unit_value(key) == [value], key
    assert unit_value("WantedBy", "Install") == ["multi-user.target"]


def test_unit_waits_for_the_drain_and_an_update_under_way() -> None:
    [stop] = unit_value("TimeoutStopSec")
    assert float(stop) > cfg.ServerConfig().shutdown_grace + DELETE_SHIELD_SECONDS


def test_unit_command_line_is_one_the_cli_accepts() -> None:
    [exec_start] = unit_value("ExecStart")
    argv = shlex.split(exec_start)
    assert argv[0] == "/opt/pop3-gateway/bin/pop3-gateway"
    args = cli_parser().parse_args(argv[1:])
    assert (args.command, args.config, args.state_dir) == (
        "serve",
        "${CONFIGURATION_DIRECTORY}/config.toml",
        "${STATE_DIRECTORY}",
    )


def test_unit_credentials_are_where_the_example_config_looks() -> None:
    credentials = {v.split(":", 1)[0] for v in unit_value("LoadCredential")}
    config = cfg.load(DEPLOY / "config.example.toml")
    tls_files = {p for lc in config.listen for p in (lc.cert_file, lc.key_file) if p}
    assert tls_files == {f"/run/credentials/pop3-gateway.service/{name}" for name in credentials}
    assert {Path(v.split(":", 1)[1]).parent for v in unit_value("LoadCredential")} == {
        Path("/etc/pop3-gateway")
    }


# ---------------------------------------------------------------- Containerfile


def containerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), continuation lines joined and comments dropped, as the builder reads it."""
    out: list[tuple[str, str]] = []
    current = ""
    for raw in CONTAINERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1].rstrip() + " "
            continue
        keyword, _, rest = (current + line).partition(" ")
        out.append((keyword.upper(), rest.strip()))
        current = ""
    return out


def substitute(text: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: env.get(m.group(1) or m.group(2), ""), text)


def instructions(keyword: str) -> list[str]:
    return [rest for kw, rest in containerfile() if kw == keyword]


def test_containerfile_is_slim_and_unprivileged() -> None:
    assert instructions("FROM") == ["python:3.11-slim"]
    [user] = instructions("USER")
    args = dict(a.split("=", 1) for a in instructions("ARG"))
    uid, _, gid = substitute(user, args).partition(":")
    assert int(uid) > 0 and int(gid) > 0
    assert [kw for kw, _ in containerfile()].index("USER") > max(
        i for i, (kw, _) in enumerate(containerfile()) if kw == "RUN"
    )
    assert instructions("ENTRYPOINT") == ['["pop3-gateway"]']
    cmd = json.loads(instructions("CMD")[0])
    assert cli_parser().parse_args(cmd).config == "/etc/pop3-gateway/config.toml"


def test_containerfile_run_steps_use_only_its_args_for_paths() -> None:
    """Else the rehearsal below would write outside its scratch directory."""
    for run in instructions("RUN"):
        assert not re.search(r"(?<![\w}])/(opt|var|etc|usr|srv|home|root)\b", run), run


def test_dockerignore_lets_through_exactly_what_the_containerfile_copies() -> None:
    allowed = {line[1:] for line in (ROOT / ".dockerignore").read_text().splitlines() if line.startswith("!")}
    copied = {src for rest in instructions("COPY") for src in rest.split()[:-1]}
    assert copied == allowed


@pytest.mark.realserver  # pip builds and installs the package into a fresh venv: ~10 s, not for the fast loop
def test_containerfile_run_steps_work_as_a_script_here(tmp_path: Path) -> None:
    scratch = {
        "PREFIX": str(tmp_path / "opt"),
        "SRC": str(tmp_path / "src"),
        "STATE_DIR": str(tmp_path / "state"),
        "CONFIG_DIR": str(tmp_path / "etc"),
    }
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME", "PYTHONPATH")}
    if os.geteuid() != 0:  # the image's numeric user; only root may give files away
        scratch["APP_UID"] = str(os.getuid())
    ran = 0
    for keyword, rest in containerfile():
        if keyword == "ARG":
            name, _, default = rest.partition("=")
            assert name in scratch or name == "APP_UID", f"ARG {name} is no path the rehearsal redirects"
            env[name] = scratch.get(name, default)
        elif keyword == "ENV":
            for pair in shlex.split(rest):
                name, _, value = pair.partition("=")
                env[name] = substitute(value, env)
        elif keyword == "COPY":
            *sources, dest = (substitute(p, env) for p in rest.split())
            for source in sources:
                src = ROOT / source
                target = Path(dest) / src.name if dest.endswith("/") else Path(dest)
                target.parent.mkdir(parents=True, exist_ok=True)
                if src.is_dir():
                    shutil.copytree(src, target, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    shutil.copyfile(src, target)
        elif keyword == "RUN":
            result = subprocess.run(
                ["sh", "-ec", rest],
                env=env,
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=300,
                check=False,
            )
            assert result.returncode == 0, f"RUN {rest}\n{result.stdout}\n{result.stderr}"
            ran += 1
    assert ran == len(instructions("RUN")) >= 2
    installed = Path(scratch["PREFIX"]) / "bin" / "pop3-gateway"
    version = subprocess.run([installed, "--version"], capture_output=True, text=True, check=True, timeout=60)
    assert version.stdout.startswith("pop3-gateway ")
    state = Path(scratch["STATE_DIR"])
    assert state.is_dir() and state.stat().st_mode & 0o777 == 0o700
    assert state.stat().st_uid == int(env["APP_UID"])
    assert cfg.load(Path(scratch["CONFIG_DIR"]) / "config.toml").listen[0].address == "0.0.0.0:1110"


def healthcheck_argv(port: int) -> list[str]:
    [healthcheck] = instructions("HEALTHCHECK")
    argv: list[str] = json.loads(healthcheck.split(" CMD ", 1)[1])
    assert argv[0] == "python3" and "http://127.0.0.1:9110/healthz" in argv[2]
    return [sys.executable, argv[1], argv[2].replace(":9110/", f":{port}/")]


async def test_the_healthcheck_command_passes_against_a_live_admin_endpoint_only() -> None:
    async def ready() -> bool:
        return True

    async with trio.open_nursery() as nursery:
        [(_, port)] = await nursery.start(functools.partial(serve_admin, "127.0.0.1:0", Metrics(), ready))
        up = await trio.run_process(healthcheck_argv(port), check=False, capture_stderr=True)
        assert up.returncode == 0, up.stderr
        nursery.cancel_scope.cancel()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free_port = s.getsockname()[1]
    down = await trio.run_process(healthcheck_argv(free_port), check=False, capture_stderr=True)
    assert down.returncode != 0


def test_container_ports_are_the_ones_the_default_config_listens_on() -> None:
    exposed = {int(p) for rest in instructions("EXPOSE") for p in rest.split()}
    config = cfg.load(DEPLOY / "container.toml")
    assert {lc.host_port()[1] for lc in config.listen} <= exposed
    assert 9110 in exposed  # the admin port the HEALTHCHECK asks


# ---------------------------------------------------------------- YAML, compose, Kubernetes, configs


YAML_FILES = sorted(DEPLOY.rglob("*.yaml")) + sorted(DEPLOY.rglob("*.yml"))


def load_yaml(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def test_there_is_yaml_to_check() -> None:
    names = {p.relative_to(DEPLOY).as_posix() for p in YAML_FILES}
    assert {"compose.yaml", "k8s/deployment.yaml", "k8s/configmap.yaml", "k8s/secret.yaml"} <= names


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.relative_to(DEPLOY).as_posix())
def test_every_yaml_file_parses(path: Path) -> None:
    docs = load_yaml(path)
    assert docs and all(isinstance(doc, dict) for doc in docs)


def test_every_gateway_config_in_deploy_loads() -> None:
    configs = sorted(DEPLOY.rglob("*.toml"))
    assert len(configs) >= 3
    for path in configs:
        cfg.load(path)  # raises ConfigError naming the key and line


def test_compose_references_resolve() -> None:
    [compose] = load_yaml(DEPLOY / "compose.yaml")
    services = compose["services"]
    gateway, dovecot = services["gateway"], services["dovecot"]
    build = gateway["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == CONTAINERFILE
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), source
            else:
                assert source in compose["volumes"], source
    mounted = {v.split(":")[1]: DEPLOY / v.split(":")[0] for v in gateway["volumes"] if v.startswith(".")}
    config = cfg.load(mounted["/etc/pop3-gateway/config.toml"])
    assert config.upstream.url == "imap://dovecot:143"
    assert "dovecot" in services and "dovecot" in gateway["depends_on"]
    published = {p.split(":")[-1] for p in gateway["ports"]}
    assert {str(lc.host_port()[1]) for lc in config.listen} <= published
    assert gateway["read_only"] is True and gateway["cap_drop"] == ["ALL"]
    assert (
        int(gateway["stop_grace_period"].rstrip("s")) > config.server.shutdown_grace + DELETE_SHIELD_SECONDS
    )
    assert dovecot["image"].startswith("dovecot/dovecot:2.3")


def test_compose_dovecot_config_is_valid_for_dovecot(tmp_path: Path) -> None:
    result = subprocess.run(
        [tool("doveconf"), "-n", "-c", str(DEPLOY / "compose" / "dovecot.conf")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "protocols = imap" in result.stdout
    bad = tmp_path / "bad.conf"
    bad.write_text((DEPLOY / "compose" / "dovecot.conf").read_text() + "\nno_such_setting = 1\n")
    assert subprocess.run(
        [tool("doveconf"), "-n", "-c", str(bad)], capture_output=True, check=False
    ).returncode


def test_compose_users_file_has_the_account_the_instructions_use() -> None:
    users = (DEPLOY / "compose" / "users").read_text().split()
    assert "demo:{PLAIN}demo-password" in users
    assert "curl -u demo:demo-password" in (DEPLOY / "compose.yaml").read_text()


def k8s_objects() -> dict[tuple[str, str], dict[str, Any]]:
    objects: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in load_yaml(path):
            if doc.get("kind") != "Kustomization":
                objects[(doc["kind"], doc["metadata"]["name"])] = doc
    return objects


def test_kustomization_lists_every_manifest() -> None:
    [kustomization] = load_yaml(DEPLOY / "k8s" / "kustomization.yaml")
    manifests = {p.name for p in (DEPLOY / "k8s").glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == manifests


def test_k8s_gateway_sidecar_probes_config_and_secrets_fit_together() -> None:
    objects = k8s_objects()
    deployment = objects[("Deployment", "legacy-app")]
    pod = deployment["spec"]["template"]["spec"]
    [gateway] = [c for c in pod["initContainers"] if c["name"] == "pop3-gateway"]
    [app] = pod["containers"]
    assert gateway["restartPolicy"] == "Always"  # a native sidecar
    ports = {p["name"]: p["containerPort"] for p in gateway["ports"]}
    assert gateway["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert gateway["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert gateway["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert ports["admin"] == 9110
    sec = gateway["securityContext"]
    assert sec["runAsUser"] > 0 and sec["readOnlyRootFilesystem"] and not sec["allowPrivilegeEscalation"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    # volumes point at objects that exist, and the config from the ConfigMap loads
    volumes = {v["name"]: v for v in pod["volumes"]}
    config_map = objects[("ConfigMap", volumes["config"]["configMap"]["name"])]
    config = cfg.loads(config_map["data"]["config.toml"])
    secret = objects[("Secret", volumes["tls"]["secret"]["secretName"])]
    assert ("PersistentVolumeClaim", volumes["state"]["persistentVolumeClaim"]["claimName"]) in objects
    mounts = {m["mountPath"]: m["name"] for m in gateway["volumeMounts"]}
    assert mounts["/etc/pop3-gateway/config.toml"] == "config"
    assert mounts[config.server.state_dir] == "state"
    tls_dir = next(path for path, name in mounts.items() if name == "tls")
    projected = {item["path"] for item in volumes["tls"]["secret"]["items"]}
    for lc in config.listen:
        if lc.tls != "none":
            for file in (lc.cert_file, lc.key_file):
                assert Path(file).parent == Path(tls_dir) and Path(file).name in projected
                assert Path(file).name in secret["stringData"]
    # the app reaches the gateway on localhost, on a port it listens on, with a password from the Secret
    env = {e["name"]: e for e in app["env"]}
    assert (env["POP3_HOST"]["value"], int(env["POP3_PORT"]["value"])) in {
        lc.host_port() for lc in config.listen
    }
    ref = env["POP3_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert ref["key"] in objects[("Secret", ref["name"])]["stringData"]
    assert "mail-password" not in projected  # the gateway never sees the app's password file
    grace = pod["terminationGracePeriodSeconds"]
    assert grace > config.server.shutdown_grace + DELETE_SHIELD_SECONDS
