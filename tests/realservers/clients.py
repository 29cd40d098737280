"""Real POP3 clients (fetchmail, mpop, getmail6, curl) run against any POP3 server at host:port.

Each `run_*` function downloads in keep + UIDL mode into `workdir` and returns how many messages it
delivered in that run; `workdir` keeps the client's UIDL memory, so a second run over an unchanged maildrop
returns 0. `delivered_messages(workdir)` gives the bytes delivered so far.

    fetchmail: workdir/fetchmailrc, workdir/ids (idfile), workdir/out/000000.eml ... (one file per message,
               numbered in delivery order, written by the MDA script workdir/mda.sh)
    mpop:      workdir/mpoprc, workdir/uidls, workdir/Maildir/
    getmail6:  workdir/getmailrc, workdir/oldmail-* (getmaildir), workdir/out/ as for fetchmail
               (an MDA_external destination: as root a Maildir destination needs a non-root `user =` that
               can reach workdir, and pytest's tmp folders are 0700 and reset to it by every pytest start)

TLS modes: "none" (plain, TLS refused even if offered), "starttls" (STLS, required), "implicit" (POP3S).
With `ca_file` the client verifies the server certificate against it (the Dovecot fixture's certificate is
valid for 127.0.0.1 and localhost); without it verification is switched off (fetchmail `no sslcertck`, mpop
`tls_certcheck off`, getmail no `ca_certs`, curl `-k`). getmail6 has no POP3 STARTTLS: "starttls" raises.

Delivered bytes have LF line ends (fetchmail strips CRs for an MDA, mpop writes Maildir files with LF,
getmail writes the native line end); `corpus.normalize_crlf()` them and compare with `corpus.pop3_view()`.
Headers stay as served (fetchmail `invisible` + `no rewrite`, mpop `received_header off`, getmail
`delivered_to = false` + `received = false`) except that getmail always puts a `Return-Path:` line first.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Literal

from tests.realservers.fs import require_program

Tls = Literal["none", "starttls", "implicit"]
CLIENT_TIMEOUT = 60.0


class ClientError(RuntimeError):
    """A client program failed; the message carries its exit code and output."""


def run_fetchmail(
    host: str,
    port: int,
    user: str,
    password: str,
    workdir: Path,
    *,
    tls: Tls = "none",
    ca_file: Path | None = None,
    cert_name: str = "localhost",
    timeout: float = CLIENT_TIMEOUT,
) -> int:
    """One `fetchmail` run (keep, uidl, mda to workdir/out). Exit 1 ("no new mail") is not an error.

    With `keep`, fetchmail 6.4 fetches with `LIST n` + `TOP n 99999999`, never RETR. Its idfile keys UIDLs
    by user@host, not by port: use one workdir per server. fetchmail verifies the certificate against a
    DNS name only (an IP SAN never matches `127.0.0.1`), so with `ca_file` it checks `cert_name` instead
    (`sslcommonname`); the certificate must carry that DNS name.
    """
    fetchmail = require_program("fetchmail")
    mda, out = _mda(workdir)
    tls_options = {
        "none": "sslproto ''",
        "starttls": "sslproto 'TLS1.2+'",
        "implicit": "ssl sslproto 'TLS1.2+'",
    }[tls]
    if tls != "none":
        tls_options += (
            f' sslcertck sslcertfile "{ca_file}" sslcommonname "{cert_name}"' if ca_file else " no sslcertck"
        )
    rc = workdir / "fetchmailrc"
    rc.touch(mode=0o600)
    rc.chmod(0o600)
    rc.write_text(
        "set no syslog\n"
        "set invisible\n"
        f"poll {host} service {port} protocol POP3 uidl timeout {int(timeout)}\n"
        f'  user "{_rc_escape(user)}" password "{_rc_escape(password)}"\n'
        f"  keep no rewrite {tls_options}\n"
        f'  mda "/bin/sh {mda}"\n'
    )
    before = _count(out)
    proc = _run(
        [fetchmail, "-f", str(rc), "-i", str(workdir / "ids"), "--pidfile", str(workdir / "fetchmail.pid")],
        timeout=timeout,
        env={"FETCHMAILHOME": str(workdir)},
        ok=(0, 1),
    )
    delivered = _count(out) - before
    if proc.returncode == 1 and delivered:
        raise ClientError(f"fetchmail said 'no mail' but delivered {delivered}:\n{_output(proc)}")
    return delivered


def run_mpop(
    host: str,
    port: int,
    user: str,
    password: str,
    workdir: Path,
    *,
    tls: Tls = "none",
    ca_file: Path | None = None,
    auth: str = "user",
    timeout: float = CLIENT_TIMEOUT,
) -> int:
    """One `mpop` run (keep on, only_new on, uidls_file, delivery to workdir/Maildir). mpop pipelines."""
    mpop = require_program("mpop")
    workdir.mkdir(parents=True, exist_ok=True)
    maildir = _maildir(workdir / "Maildir")
    tls_lines = {
        "none": "tls off\n",
        "starttls": "tls on\ntls_starttls on\n",
        "implicit": "tls on\ntls_starttls off\n",
    }[tls]
    if tls != "none":
        tls_lines += f"tls_trust_file {ca_file}\n" if ca_file else "tls_certcheck off\n"
    rc = workdir / "mpoprc"
    rc.touch(mode=0o600)
    rc.chmod(0o600)
    rc.write_text(
        "defaults\n"
        "account test\n"
        f"host {host}\n"
        f"port {port}\n"
        f"user {user}\n"
        f'password "{_rc_escape(password)}"\n'
        f"auth {auth}\n"
        f"{tls_lines}"
        "keep on\n"
        "only_new on\n"
        "received_header off\n"
        f"timeout {int(timeout)}\n"
        f"uidls_file {workdir / 'uidls'}\n"
        f"delivery maildir {maildir}\n"
    )
    before = _count(maildir)
    _run([mpop, "-Q", "-C", str(rc), "test"], timeout=timeout)
    return _count(maildir) - before


def run_getmail(
    host: str,
    port: int,
    user: str,
    password: str,
    workdir: Path,
    *,
    tls: Tls = "none",
    ca_file: Path | None = None,
    timeout: float = CLIENT_TIMEOUT,
) -> int:
    """One `getmail` run (SimplePOP3[SSL]Retriever, read_all = false, delete = false, MDA to workdir/out)."""
    getmail = require_program("getmail")
    if tls == "starttls":
        raise ValueError("getmail6 has no POP3 STARTTLS; use tls='none' or tls='implicit'")
    mda, out = _mda(workdir)
    retriever = "SimplePOP3SSLRetriever" if tls == "implicit" else "SimplePOP3Retriever"
    ca_line = f"ca_certs = {ca_file}\n" if tls == "implicit" and ca_file else ""
    rc = workdir / "getmailrc"
    rc.touch(mode=0o600)
    rc.chmod(0o600)
    rc.write_text(
        "[retriever]\n"
        f"type = {retriever}\n"
        f"server = {host}\n"
        f"port = {port}\n"
        f"username = {user}\n"
        f"password = {password}\n"
        f"timeout = {int(timeout)}\n"
        f"{ca_line}"
        "\n[destination]\n"
        "type = MDA_external\n"
        "path = /bin/sh\n"
        f'arguments = ("{mda}",)\n'
        "allow_root_commands = true\n"
        "\n[options]\n"
        "verbose = 0\n"
        "read_all = false\n"
        "delete = false\n"
        "delivered_to = false\n"
        "received = false\n"
    )
    before = _count(out)
    _run([getmail, f"--getmaildir={workdir}", f"--rcfile={rc}"], timeout=timeout)
    return _count(out) - before


def curl_pop3(
    url: str,
    *extra_args: str,
    user: str,
    password: str,
    ca_file: Path | None = None,
    timeout: float = CLIENT_TIMEOUT,
) -> bytes:
    """`curl URL EXTRA...` as user:password; returns stdout, raises ClientError with stderr on failure.

    `pop3://H:P/` lists, `/N` retrieves, `-X UIDL`, `-X 'TOP 1 0'`; add `--ssl-reqd` for STLS; use
    `pop3s://` for implicit TLS. `ca_file` adds `--cacert` (pass `-k` in extra_args instead to skip checks).
    """
    curl = require_program("curl")
    cmd = [curl, "-sS", "--max-time", str(timeout), "--user", f"{user}:{password}"]
    if ca_file:
        cmd += ["--cacert", str(ca_file)]
    return _run([*cmd, *extra_args, url], timeout=timeout + 5).stdout


def pop3_url(host: str, port: int, path: str = "", *, implicit_tls: bool = False) -> str:
    scheme = "pop3s" if implicit_tls else "pop3"
    return f"{scheme}://{host}:{port}/{path}"


def delivered_messages(workdir: Path) -> list[bytes]:
    """Messages a client delivered into `workdir` so far.

    fetchmail's and getmail's files come in delivery order; mpop's Maildir files sorted by name, which is
    roughly delivery time: compare mpop's as sorted lists or by Message-ID.
    """
    paths = sorted((workdir / "out").glob("*.eml"))
    for sub in ("new", "cur"):
        paths += sorted(p for p in (workdir / "Maildir" / sub).glob("*") if p.is_file())
    return [p.read_bytes() for p in paths]


def _mda(workdir: Path) -> tuple[Path, Path]:
    """An MDA script that stores stdin as workdir/out/NNNNNN.eml, numbered in delivery order."""
    out = workdir / "out"
    out.mkdir(parents=True, exist_ok=True)
    mda = workdir / "mda.sh"
    mda.write_text(
        "#!/bin/sh\n"
        "# MDA for fetchmail and getmail: one file per message, numbered in delivery order.\n"
        f'out="{out}"\n'
        'n=$(ls -1 "$out" | wc -l)\n'
        'exec cat > "$out/$(printf %06d "$n").eml"\n'
    )
    return mda, out


def _maildir(path: Path) -> Path:
    for sub in ("cur", "new", "tmp"):
        (path / sub).mkdir(parents=True, exist_ok=True)
    return path


def _count(directory: Path) -> int:
    if (directory / "new").is_dir():
        return sum(1 for sub in ("new", "cur") for p in (directory / sub).iterdir() if p.is_file())
    return sum(1 for p in directory.iterdir() if p.is_file())


def run_fdm(
    host: str, port: int, user: str, password: str, workdir: Path, *, timeout: float = CLIENT_TIMEOUT
) -> int:
    """One `fdm fetch` run (POP3, keep, new-only with a UIDL cache, delivery to workdir/Maildir).

    fdm tries APOP by itself whenever the greeting carries a `<...>` timestamp, and gives up when APOP
    fails: the reason the gateway offers APOP only where it can succeed. As root, fdm fetches as the
    unprivileged `debianfdm` (and delivers as root): `workdir` must be reachable by it (not under
    pytest's 0700 tmp folders), and its cache folder is given to that user."""
    fdm = require_program("fdm")
    import pwd
    import shutil

    workdir.mkdir(parents=True, exist_ok=True)
    maildir = _maildir(workdir / "Maildir")  # delivery runs as the invoking user
    state = workdir / "state"  # the UIDL cache: written by the fetching child
    state.mkdir(exist_ok=True)
    if os.geteuid() == 0:
        entry = pwd.getpwnam("debianfdm")
        workdir.chmod(0o755)
        shutil.chown(state, entry.pw_uid, entry.pw_gid)
    conf = workdir / "fdm.conf"
    conf.touch(mode=0o600)
    conf.chmod(0o600)
    conf.write_text(
        f'set lock-file "{workdir / "lock"}"\n'
        f'account "gw" pop3 server "{host}" port {port} user "{_rc_escape(user)}" '
        f'pass "{_rc_escape(password)}" new-only cache "{state / "cache"}" keep\n'
        f'action "drop" maildir "{maildir}"\n'
        'match all action "drop"\n'
    )
    before = _count(maildir)
    _run([fdm, "-q", "-f", str(conf), "fetch"], timeout=timeout)
    return _count(maildir) - before


def _rc_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def _run(
    cmd: list[str], *, timeout: float, env: dict[str, str] | None = None, ok: tuple[int, ...] = (0,)
) -> subprocess.CompletedProcess[bytes]:
    full_env = {**os.environ, "LC_ALL": "C", **(env or {})}
    try:
        proc = subprocess.run(
            cmd, capture_output=True, stdin=subprocess.DEVNULL, timeout=timeout, env=full_env, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise ClientError(f"{cmd[0]} timed out after {timeout} s:\n{exc.stdout!r}\n{exc.stderr!r}") from None
    if proc.returncode not in ok:
        raise ClientError(f"{' '.join(cmd)} exited {proc.returncode}:\n{_output(proc)}")
    return proc


def _output(proc: subprocess.CompletedProcess[bytes]) -> str:
    return (proc.stdout + proc.stderr).decode(errors="replace")
