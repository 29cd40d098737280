"""A private Dovecot for tests: IMAP (STARTTLS), IMAPS, POP3 (STLS) and POP3S on free loopback ports.

The generated config never reads /etc/dovecot. Everything lives under one folder:

    ROOT/dovecot.conf   ROOT/passwd/USER (root:dovecot 0640)   ROOT/ssl/{ca,server}.pem, server.key
    ROOT/run/ (base_dir, master.pid)   ROOT/state/   ROOT/log/dovecot.log, stdio.log   ROOT/mail/USER/Maildir

Mail processes run as the `vmail` system user (Dovecot refuses root for mail). See /work/shared/LAB.md for
why each setting is there.
"""

from __future__ import annotations

import grp
import hashlib
import os
import re
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import trustme

from tests.realservers.fs import (
    MissingProgram,
    check_searchable,
    chown_tree,
    require_program,
    tail,
    vmail_ids,
)
from tests.realservers.rawimap import append_messages
from tests.realservers.rawimap import free_ports as _free_ports

HOST = "127.0.0.1"
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
# Unix sockets live under base_dir; sun_path holds 108 bytes and Dovecot's longest name adds ~35.
MAX_BASE_DIR_LEN = 70


@dataclass(frozen=True)
class MailUser:
    name: str
    password: str


@dataclass(frozen=True)
class OAuth2Validation:
    """How an OAuth2 Dovecot (`start_dovecot_oauth2`) checks bearer tokens in XOAUTH2 and OAUTHBEARER.

    `mode="local"`: JWT access tokens, verified against `key_pem` (a PEM public key, `alg`, `kid`) and
    `issuer`. Two passdbs: user tokens (scope `user_scope`, `sub` must equal the SASL user name) and app-only
    tokens (scope `app_scope`, accepted for any existing user: the upstream user is whatever the client put
    in XOAUTH2 `user=`, as Microsoft's IMAP.AccessAsApp does; access control is the client's).
    `mode="post"`: opaque tokens, sent to `introspection_url` (RFC 7662, with the resource server's client
    credentials in the URL's userinfo); `active` must be true and `sub` must equal the user name.
    """

    mode: str
    issuer: str = ""
    key_pem: str = field(default="", repr=False)
    alg: str = "RS256"
    kid: str = "default"
    introspection_url: str = field(default="", repr=False)
    user_scope: str = "imap"
    app_scope: str = "imap.app"


@dataclass
class Dovecot:
    root: Path
    host: str
    imap_port: int
    imaps_port: int
    pop3_port: int
    pop3s_port: int
    ca_file: Path
    debug: bool = False
    oauth2: OAuth2Validation | None = None
    # The master runs in the foreground (`dovecot -F`) as our child, so that stop() reaps it: PID 1 on
    # these machines does not reap orphans, and a daemonised master would stay behind as a zombie.
    _master: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def conf(self) -> Path:
        return self.root / "dovecot.conf"

    @property
    def log_file(self) -> Path:
        return self.root / "log" / "dovecot.log"

    def ssl_context(self) -> ssl.SSLContext:
        """A client context that trusts this server's certificate (valid for 127.0.0.1 and localhost)."""
        return ssl.create_default_context(cafile=str(self.ca_file))

    def add_user(self, name: str, password: str) -> None:
        """Create a user with an empty Maildir; idempotent. A new password takes up to 1 s to apply."""
        if not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]*", name) or set(password) & set(":\r\n"):
            raise ValueError(f"unsupported user name or password for a passwd-file: {name!r}")
        uid, gid = vmail_ids()
        home = self.root / "mail" / name
        for sub in ("cur", "new", "tmp"):
            (home / "Maildir" / sub).mkdir(parents=True, exist_ok=True)
        chown_tree(home, uid, gid)
        entry = self.root / "passwd" / name
        line = f"{name}:{{PLAIN}}{password}:{uid}:{gid}::{home}::\n"
        if not entry.exists() or entry.read_text() != line:
            _write_root_dovecot(entry, line)

    def append(
        self, user: str, password: str, messages: Sequence[bytes], mailbox: str = "INBOX"
    ) -> list[int]:
        """APPEND `messages` over IMAP, pipelined with LITERAL+; returns their UIDs (from APPENDUID)."""
        return append_messages(
            self.host, self.imap_port, user, password, messages, mailbox, exists_marker=b"[ALREADYEXISTS]"
        )

    def expunge_all(self, user: str) -> None:
        """Expunge every message in every mailbox of `user`."""
        self.doveadm("expunge", "-u", user, "mailbox", "*", "all")

    def mailbox_status(self, user: str, mailbox: str = "INBOX") -> dict[str, int]:
        """messages, uidnext, uidvalidity, unseen and vsize of one mailbox, from doveadm."""
        out = self.doveadm(
            "-f", "tab", "mailbox", "status", "-u", user, "messages uidnext uidvalidity unseen vsize", mailbox
        )
        header, values = out.splitlines()[:2]
        fields = dict(zip(header.split("\t"), values.split("\t"), strict=True))
        del fields["mailbox"]
        return {key: int(value) for key, value in fields.items()}

    def set_uidvalidity(self, user: str, uidvalidity: int, mailbox: str = "INBOX") -> None:
        self.doveadm("mailbox", "update", "-u", user, "--uid-validity", str(uidvalidity), mailbox)

    def doveadm(self, *args: str) -> str:
        """Run `doveadm -c CONF ARGS...` and return its stdout; raise with stderr on failure."""
        cmd = [require_program("doveadm"), "-c", str(self.conf), *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc.stdout

    def log_text(self) -> str:
        """Everything Dovecot logged so far (logins, auth failures, errors)."""
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def stop(self) -> None:
        """SIGTERM the master and wait until it is gone (Dovecot takes about 1 s). Safe to call twice."""
        master, self._master = self._master, None
        if master is None:
            return
        master.send_signal(signal.SIGTERM)
        try:
            master.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            master.kill()
            master.wait(STOP_TIMEOUT)


def start_dovecot(root: Path, *, debug: bool = False) -> Dovecot:
    """Start a private Dovecot under `root` and wait until all four listeners answer.

    Dovecot's own processes run as `dovecot` and `vmail`, so every folder above `root` must be searchable
    by others: not under pytest's tmp_path (see `check_searchable`); a `tempfile.mkdtemp()` folder is fine.
    `debug=True` adds auth_debug/mail_debug/verbose_ssl lines to the log. Raises `MissingProgram` when
    Dovecot or the `vmail` user is missing, and RuntimeError (with the log tail) when it does not come up.
    """
    return _start(root, debug=debug, oauth2=None)


def start_dovecot_oauth2(root: Path, oauth2: OAuth2Validation, *, debug: bool = False) -> Dovecot:
    """Like `start_dovecot`, plus XOAUTH2 and OAUTHBEARER checked by Dovecot's `oauth2` passdb (see
    `OAuth2Validation`). PLAIN and LOGIN keep working with the passwd-file passwords (`add_user`), so
    `append` fills mailboxes as before. The public key is written to ROOT/keys/default/ALG/KID, where
    Dovecot's key dict looks for a token without `azp`."""
    if oauth2.mode not in ("local", "post"):
        raise ValueError(f"unknown OAuth2 validation mode {oauth2.mode!r}")
    return _start(root, debug=debug, oauth2=oauth2)


def _start(root: Path, *, debug: bool, oauth2: OAuth2Validation | None) -> Dovecot:
    dovecot_bin = require_program("dovecot")
    uid, gid = vmail_ids()
    root = root.absolute()
    if len(str(root / "run")) > MAX_BASE_DIR_LEN:
        raise ValueError(f"{root} is too long for Dovecot's unix sockets (keep it under ~60 characters)")
    for sub in ("run", "state", "log", "ssl", "mail"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)
    check_searchable(root)
    os.chown(root / "mail", uid, gid)
    ca_file = _write_certs(root / "ssl")
    (root / "passwd").mkdir(exist_ok=True)
    os.chown(root / "passwd", os.geteuid(), _dovecot_gid())
    (root / "passwd").chmod(0o750)
    if oauth2 is not None:
        _write_oauth2_files(root, oauth2)

    last_error = ""
    for _attempt in range(3):  # another process may take one of the free ports before Dovecot binds it
        imap, imaps, pop3, pop3s = _free_ports(4)
        server = Dovecot(root, HOST, imap, imaps, pop3, pop3s, ca_file=ca_file, debug=debug, oauth2=oauth2)
        server.conf.write_text(_config(server, uid, gid))
        # Dovecot's stdout/stderr go to a file: a captured CI step would otherwise wait on them.
        with (root / "log" / "stdio.log").open("ab") as stdio:
            server._master = subprocess.Popen(
                [dovecot_bin, "-F", "-c", str(server.conf)],
                stdin=subprocess.DEVNULL,
                stdout=stdio,
                stderr=stdio,
                start_new_session=True,
            )
        try:
            _wait_ready(server)
        except (OSError, ssl.SSLError) as exc:
            last_error = repr(exc)
            server.stop()
        else:
            return server
        if "Address already in use" not in server.log_text() + tail(root / "log" / "stdio.log"):
            break
    raise RuntimeError(
        f"private Dovecot in {root} did not start ({last_error})\n"
        f"--- stdio.log ---\n{tail(root / 'log' / 'stdio.log')}\n"
        f"--- dovecot.log ---\n{tail(root / 'log' / 'dovecot.log')}"
    )


def _config(server: Dovecot, uid: int, gid: int) -> str:
    root = server.root
    instance = "pop3gw-" + hashlib.sha1(str(root).encode()).hexdigest()[:10]
    debug_lines = (
        "auth_verbose = yes\nauth_debug = yes\nmail_debug = yes\nverbose_ssl = yes\n" if server.debug else ""
    )
    if server.oauth2 is not None and not server.debug:
        # Why a token was refused ("Token has expired", "Incorrect JWT signature"): never the token itself.
        debug_lines = "auth_verbose = yes\n"
    return f"""\
# Generated by tests/realservers/dovecot.py; never reads /etc/dovecot.
instance_name = {instance}
base_dir = {root}/run
state_dir = {root}/state
listen = {server.host}
protocols = imap pop3
log_path = {root}/log/dovecot.log
{debug_lines}
ssl = yes
ssl_cert = <{root}/ssl/server.pem
ssl_key = <{root}/ssl/server.key
disable_plaintext_auth = no
auth_mechanisms = plain login{" xoauth2 oauthbearer" if server.oauth2 else ""}
auth_failure_delay = 0

mail_uid = {uid}
mail_gid = {gid}
first_valid_uid = {uid}
last_valid_uid = {uid}
first_valid_gid = {gid}
last_valid_gid = {gid}
mail_location = maildir:~/Maildir
mail_max_userip_connections = 1000
pop3_uidl_format = %08Xu%08Xv

# Room for load tests: the default process_limit (100) would queue the 101st IMAP session.
default_process_limit = 1000
default_client_limit = 4000

# Answers a bad password in ms instead of 0.5 s: this passdb only sets nodelay, then the next one decides.
passdb {{
  driver = static
  args = noauthenticate=yes nodelay=yes
}}
# One passwd-file per user: Dovecot re-reads a passwd-file at most once a second, so a user added to a
# shared file right after another login would be unknown for up to a second. A new file is read at once.
passdb {{
  driver = passwd-file
  args = scheme=PLAIN {root}/passwd/%u
}}
{_oauth2_passdbs(server)}userdb {{
  driver = passwd-file
  args = {root}/passwd/%u
}}

service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
service imap-login {{
  inet_listener imap {{
    address = {server.host}
    port = {server.imap_port}
  }}
  inet_listener imaps {{
    address = {server.host}
    port = {server.imaps_port}
    ssl = yes
  }}
}}
service pop3-login {{
  inet_listener pop3 {{
    address = {server.host}
    port = {server.pop3_port}
  }}
  inet_listener pop3s {{
    address = {server.host}
    port = {server.pop3s_port}
    ssl = yes
  }}
}}
"""


def _oauth2_passdbs(server: Dovecot) -> str:
    """The oauth2 passdbs (after the passwd-file one, so PLAIN logins never reach them); "" without OAuth2."""
    if server.oauth2 is None:
        return ""
    names = ["oauth2-user", "oauth2-app"] if server.oauth2.mode == "local" else ["oauth2-introspect"]
    return "".join(
        f"passdb {{\n  driver = oauth2\n  mechanisms = xoauth2 oauthbearer\n"
        f"  args = {server.root}/{name}.conf.ext\n}}\n"
        for name in names
    )


def _write_oauth2_files(root: Path, oauth2: OAuth2Validation) -> None:
    """The oauth2 passdbs' settings files and, for local validation, the public key in the key dict."""
    if oauth2.mode == "local":
        if not re.fullmatch(r"[A-Za-z0-9_-]+", oauth2.kid) or not re.fullmatch(r"[A-Z]{2}\d{3}", oauth2.alg):
            raise ValueError(f"unsupported kid or alg for Dovecot's key dict: {oauth2.kid!r} {oauth2.alg!r}")
        key_dir = root / "keys" / "default" / oauth2.alg
        key_dir.mkdir(parents=True, exist_ok=True)
        for directory in (root / "keys", root / "keys" / "default", key_dir):
            directory.chmod(0o755)
        (key_dir / oauth2.kid).write_text(oauth2.key_pem)
        (key_dir / oauth2.kid).chmod(0o644)
        common = (
            "introspection_mode = local\n"
            f"local_validation_key_dict = fs:posix:prefix={root}/keys/\n"
            "username_attribute = sub\n"
            f"issuers = {oauth2.issuer}\n"
        )
        _write_root_dovecot(root / "oauth2-user.conf.ext", common + f"scope = {oauth2.user_scope}\n")
        # The same literal on both sides of Dovecot's user-name comparison: any user name matches, and only
        # a token with the app scope gets here.
        _write_root_dovecot(
            root / "oauth2-app.conf.ext",
            common + f"username_format = app-only\nscope = {oauth2.app_scope}\n",
        )
    else:
        _write_root_dovecot(
            root / "oauth2-introspect.conf.ext",
            "introspection_mode = post\n"
            f"introspection_url = {oauth2.introspection_url}\n"
            "username_attribute = sub\n"
            "active_attribute = active\n"
            "active_value = true\n"
            f"scope = {oauth2.user_scope}\n",
        )


def _write_certs(directory: Path) -> Path:
    ca = trustme.CA()
    # fetchmail cannot verify an IP address (it asks OpenSSL for a DNS name): it checks "localhost".
    leaf = ca.issue_cert(HOST, "localhost", common_name="localhost")
    ca_file = directory / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    cert = directory / "server.pem"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    key = directory / "server.key"
    key.touch(mode=0o600)
    leaf.private_key_pem.write_to_path(str(key))
    ca_file.chmod(0o644)
    return ca_file


def _write_root_dovecot(path: Path, text: str) -> None:
    """Write a passwd-file atomically, root:dovecot 0640 (auth runs as `dovecot` and must read it)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.chown(tmp, os.geteuid(), _dovecot_gid())
    tmp.chmod(0o640)
    tmp.replace(path)


def _dovecot_gid() -> int:
    try:
        return grp.getgrnam("dovecot").gr_gid
    except KeyError:
        raise MissingProgram(
            "group 'dovecot' is missing: is dovecot-core installed? run `make deps`"
        ) from None


def _wait_ready(server: Dovecot) -> None:
    """Poll until each listener greets (through TLS with the CA for the implicit-TLS ones)."""
    deadline = time.monotonic() + START_TIMEOUT
    context = server.ssl_context()
    checks = [
        (server.imap_port, None, b"* OK"),
        (server.imaps_port, context, b"* OK"),
        (server.pop3_port, None, b"+OK"),
        (server.pop3s_port, context, b"+OK"),
    ]
    for port, tls, greeting in checks:
        while True:
            try:
                _expect_greeting(server.host, port, tls, greeting)
                break
            except (OSError, ssl.SSLError) as exc:
                if server._master is not None and server._master.poll() is not None:
                    raise ChildProcessError(f"dovecot exited {server._master.returncode}") from exc
                if time.monotonic() > deadline:
                    raise TimeoutError(f"port {port} not ready after {START_TIMEOUT:.0f} s: {exc!r}") from exc
                time.sleep(0.02)


def _expect_greeting(host: str, port: int, tls: ssl.SSLContext | None, greeting: bytes) -> None:
    with socket.create_connection((host, port), timeout=2) as raw:
        sock: socket.socket = tls.wrap_socket(raw, server_hostname=host) if tls else raw
        with sock:
            line = sock.recv(512)
            if not line.startswith(greeting):
                raise ConnectionError(f"unexpected greeting on port {port}: {line!r}")
