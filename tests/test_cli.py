"""The command line, run as a real process."""

from __future__ import annotations

import contextlib
import io
import os
import poplib
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.accounts import load_users, verify_password
from gateway.cli import main
from gateway.config import UPSTREAM_SCHEMES

EXE = [sys.executable, "-m", "gateway"]


def run(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """The command line in this process (``gateway.cli.main``), with stdin, stdout and stderr as a
    process would have them: starting an interpreter for each of these tests cost more than the tests.
    ``test_python_m_gateway_is_the_same_command`` and the serve tests run the real process."""
    out, err = io.StringIO(), io.StringIO()
    saved = sys.stdin
    sys.stdin = io.StringIO(stdin)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as exc:  # argparse: --help, usage errors
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.stdin = saved
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def run_process(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """`python -m gateway ARGS` as a real process: `serve` sets up logging and signals process-wide."""
    return subprocess.run([*EXE, *args], capture_output=True, text=True, timeout=timeout, check=False)


@pytest.mark.parametrize("args", [[], ["serve"], ["check-config"], ["user"], ["user", "add"]])
def test_help_works_everywhere(args: list[str]) -> None:
    out = run(*args, "--help")
    assert out.returncode == 0, out.stderr
    assert "usage:" in out.stdout


def test_serve_help_lists_the_upstream_schemes_there_are() -> None:
    out = run("serve", "--help")
    text = " ".join(out.stdout.split())  # argparse wraps the help
    for scheme in UPSTREAM_SCHEMES:
        assert f"{scheme}://" in text, scheme
    assert "later" not in text


def test_check_config_accepts_a_good_file(tmp_path: Path) -> None:
    f = tmp_path / "gw.toml"
    f.write_text('[server]\nidle_timeout = 700\n\n[upstream]\nurl = "maildir:///var/mail"\n')
    out = run("check-config", str(f))
    assert out.returncode == 0, out.stderr
    assert "OK" in out.stdout


def test_check_config_names_bad_key_and_line(tmp_path: Path) -> None:
    f = tmp_path / "gw.toml"
    f.write_text("[server]\nidle_timeout = 700\nmax_sesions = 3\n")
    out = run("check-config", str(f))
    assert out.returncode == 2
    assert "line 3: server.max_sesions: unknown key" in out.stderr


def test_unknown_upstream_scheme_is_refused(tmp_path: Path) -> None:
    out = run("serve", "--upstream", "pop3://old.example", "--state-dir", str(tmp_path))
    assert out.returncode == 2
    assert "unknown upstream scheme 'pop3://'" in out.stderr


def test_user_add_reads_the_password_from_stdin_never_argv(tmp_path: Path) -> None:
    out = run("user", "add", "carol", "--state-dir", str(tmp_path), "--password-stdin", stdin="s3cret pw\n")
    assert out.returncode == 0, out.stderr
    users = load_users(tmp_path / "users")
    assert verify_password("s3cret pw", users["carol"].password_hash)
    assert "s3cret" not in (tmp_path / "users").read_text()
    assert (tmp_path / "users").stat().st_mode & 0o077 == 0


def test_user_add_refuses_a_bad_name(tmp_path: Path) -> None:
    out = run("user", "add", "../evil", "--state-dir", str(tmp_path), "--password-stdin", stdin="x\n")
    assert out.returncode == 2
    assert "invalid user name" in out.stderr


def test_serve_demo_then_sigterm_drains(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [*EXE, "serve", "--state-dir", str(tmp_path), "--listen", "127.0.0.1:0", "--admin-listen", ""],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        banner = ""
        deadline = time.monotonic() + 20
        while "curl -u demo:" not in banner and time.monotonic() < deadline:
            banner += proc.stdout.readline()
        password = (tmp_path / "demo-password").read_text().strip()
        found = re.search(rf"curl -u demo:{re.escape(password)} pop3://127\.0\.0\.1:(\d+)/1", banner)
        assert found, banner  # port 0: the banner names the port it bound
        port = int(found.group(1))
        p = poplib.POP3("127.0.0.1", port, timeout=10)
        p.user("demo")
        p.pass_(password)
        count, _ = p.stat()
        assert count == 3
        proc.send_signal(signal.SIGTERM)
        while "draining" not in (line := proc.stderr.readline()):  # accepting has stopped
            assert line, "the gateway ended without draining"
        # the live session may still finish during the grace period
        p.dele(1)
        assert p.quit().startswith(b"+OK")
        assert proc.wait(timeout=20) == 0
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2)
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout:
            proc.stdout.close()
        if proc.stderr:
            proc.stderr.close()
    # the deletion was applied at QUIT
    p2 = subprocess.run([*EXE, "--version"], capture_output=True, text=True, check=True)
    assert "pop3-gateway" in p2.stdout
    remaining = list((tmp_path / "mail" / "demo" / "new").iterdir()) + list(
        (tmp_path / "mail" / "demo" / "cur").iterdir()
    )
    assert len(remaining) == 2


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A loopback port this test holds busy (bound on port 0 and listening)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


@pytest.mark.parametrize("role", ["admin", "pop3"])
def test_a_busy_port_ends_in_one_line_naming_it_and_exit_1(role: str, busy_port: int, tmp_path: Path) -> None:
    busy = f"127.0.0.1:{busy_port}"
    listen, admin = (busy, "127.0.0.1:0") if role == "pop3" else ("127.0.0.1:0", busy)
    out = run_process("serve", "--state-dir", str(tmp_path), "--listen", listen, "--admin-listen", admin)
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stderr
    assert (
        out.stderr.splitlines()[-1]
        == f"pop3-gateway: cannot listen on {busy} ({role}): address already in use"
    )


def test_a_token_file_others_can_read_is_a_config_error_before_anything_listens(tmp_path: Path) -> None:
    token = tmp_path / "admin-token"
    token.write_text("0123456789abcdef0123\n")
    token.chmod(0o644)
    config = tmp_path / "gw.toml"
    config.write_text(f'[admin]\naddress = "0.0.0.0:0"\ntoken_file = "{token}"\n')
    out = run_process(
        "serve", "--config", str(config), "--state-dir", str(tmp_path), "--listen", "127.0.0.1:0"
    )
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and "listening on" not in out.stderr
    assert out.stderr.splitlines()[-1] == (
        f"pop3-gateway: configuration error: admin.token_file: {token} is readable or writable by group "
        "or others (mode 0644): chmod 600 it"
    )


def test_an_admin_endpoint_on_port_0_logs_the_port_it_bound(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [
            *EXE,
            "serve",
            "--state-dir",
            str(tmp_path),
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stderr is not None
        found = None
        deadline = time.monotonic() + 20
        while found is None and time.monotonic() < deadline and (line := proc.stderr.readline()):
            found = re.search(
                r"admin endpoint on http://127\.0\.0\.1:(\d+)/ \(healthz, readyz, metrics\)", line
            )
        assert found is not None
        port = int(found.group(1))
        assert port != 0
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).text == "ok\n"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        proc.kill()
        proc.wait()
        if proc.stderr:
            proc.stderr.close()


def test_the_parser_every_command_builds_imports_neither_httpx_nor_the_aead() -> None:
    """``serve`` without mapped accounts must not pay for the oauth commands' imports (about 10 MiB)."""
    code = (
        "import sys; from gateway import cli; cli._parser(); "
        "from gateway.backends import make_backend; from gateway.config import Config; "
        "print(sorted(m for m in ('httpx', 'cryptography') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
