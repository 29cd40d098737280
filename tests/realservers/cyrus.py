"""A private Cyrus 3.6 for tests: JMAP over HTTP (httpd) and IMAP (to create and fill mailboxes).

Nothing reads /etc/imapd.conf or /etc/cyrus.conf. Everything lives under one folder:

    ROOT/imapd.conf   ROOT/cyrus.conf   ROOT/sasldb2   ROOT/master.pid   ROOT/syslog.log
    ROOT/conf/{db,socket,proc,log,msg,user,quota,sync,lock,ptclient}   (configdirectory)
    ROOT/spool/                                                          (partition-default)

See /work/shared/LAB.md ("Cyrus as a private JMAP upstream") for why each setting is there. In short:
- Debian's `cyrus-imapd` package must never be installed beside `dovecot-imapd` (apt would remove one),
  so its `imapd` is unpacked privately by scripts/setup-deps.sh (`apt-get download` + `dpkg-deb -x`) and
  run by absolute path. `$POP3GW_CYRUS_IMAPD` overrides where it is looked for.
- every `cmd=` in cyrus.conf carries its own `-C ROOT/imapd.conf`: the master does not pass it on.
- the master runs in the foreground (no `-d`) as our child, so `stop()` reaps it; it drops to `cyrus`.
- users are added with `saslpasswd2 -u SERVERNAME` (the SASL realm is the servername); a user's INBOX is
  created at their first IMAP login (`autocreate_quota: 0`), which `add_user` does at once.
- Cyrus logs only to syslog. When this machine has no /dev/log, the helper binds a datagram socket there
  while the server runs and keeps the lines tagged with this server's `syslog_prefix` (`log_text()`).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.realservers.fs import MissingProgram, check_searchable, require_program, tail
from tests.realservers.rawimap import ImapConnection as _ImapConnection
from tests.realservers.rawimap import append_messages
from tests.realservers.rawimap import free_ports as _free_ports
from tests.realservers.rawimap import quote as _quote

HOST = "127.0.0.1"
SERVERNAME = "pop3gw.test"
CYRUS_BIN = Path("/usr/lib/cyrus/bin")
PRIVATE_IMAPD = Path("/opt/pop3-gateway/cyrus-imapd/usr/lib/cyrus/bin/imapd")
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
CONFIG_SUBDIRS = ("db", "socket", "proc", "log", "msg", "user", "quota", "sync", "lock", "ptclient")
_SYSLOG_PRI = re.compile(rb"^<\d+>")
MAX_OBJECTS_IN_GET = 100  # the server's maxObjectsInGet (Cyrus's default is 4096)
RECEIVED_START = 1_704_067_200  # 2024-01-01T00:00:00Z: internal dates count up from here


@dataclass
class Cyrus:
    root: Path
    host: str
    imap_port: int
    http_port: int
    prefix: str  # syslog ident prefix of this instance
    _master: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _received: int = field(default=RECEIVED_START, repr=False)
    _syslog: _SyslogCatcher | None = field(default=None, repr=False)

    @property
    def conf(self) -> Path:
        return self.root / "imapd.conf"

    @property
    def jmap_url(self) -> str:
        """The gateway's upstream URL for this server (session discovery starts at /.well-known/jmap)."""
        return f"jmap+http://{self.host}:{self.http_port}/"

    @property
    def imap_url(self) -> str:
        """The gateway's upstream URL for this server's IMAP (plain, loopback; Cyrus has OBJECTID)."""
        return f"imap://{self.host}:{self.imap_port}"

    @property
    def http_base(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def running(self) -> bool:
        return self._master is not None and self._master.poll() is None

    def add_user(self, name: str, password: str) -> None:
        """Create a SASL user and their INBOX (by one IMAP login). Idempotent."""
        if not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", name) or set(password) & set("\r\n\0"):
            raise ValueError(f"unsupported user name or password for the test Cyrus: {name!r}")
        saslpasswd2 = require_program("saslpasswd2")
        proc = subprocess.run(
            [saslpasswd2, "-f", str(self.root / "sasldb2"), "-u", SERVERNAME, "-c", "-p", name],
            input=password.encode(),
            capture_output=True,
            timeout=30,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"saslpasswd2 failed: {proc.stderr.decode(errors='replace')}")
        _chown_cyrus(self.root / "sasldb2")
        with _ImapConnection.open(self.host, self.imap_port) as imap:
            imap.command(f"LOGIN {_quote(name)} {_quote(password)}".encode())
            imap.command(b"SELECT INBOX")
            imap.command(b"LOGOUT")

    def append(
        self, user: str, password: str, messages: Sequence[bytes], mailbox: str = "INBOX"
    ) -> list[int]:
        """APPEND `messages` over IMAP, pipelined with LITERAL+; returns their UIDs (from APPENDUID).

        Every message gets an internal date (JMAP receivedAt) one second after the previous one appended
        to this server, so a JMAP listing sorted by receivedAt is the order of the appends.

        Another mailbox than INBOX is created first when missing (a top-level `INBOX.name` in Cyrus's
        default namespace is written `INBOX.name`; JMAP shows it as a child of the inbox named `name`)."""
        return append_messages(
            self.host,
            self.imap_port,
            user,
            password,
            messages,
            mailbox,
            exists_marker=b"already exists",
            date=lambda: _internaldate(self._next_received()),
        )

    def _next_received(self) -> int:
        self._received += 1
        return self._received

    def imap_uids(self, user: str, password: str, mailbox: str = "INBOX") -> list[int]:
        """The UIDs in `mailbox` (none when it does not exist), over IMAP: what is really stored."""
        with _ImapConnection.open(self.host, self.imap_port) as imap:
            imap.command(f"LOGIN {_quote(user)} {_quote(password)}".encode())
            try:
                imap.command(f"EXAMINE {_quote(mailbox)}".encode())
            except RuntimeError:
                return []
            lines = imap.command_lines(b"UID SEARCH ALL")
            imap.command(b"LOGOUT")
        found: list[int] = []
        for line in lines:
            if line.startswith(b"* SEARCH"):
                found += [int(x) for x in line[8:].split()]
        return sorted(found)

    def imap_flags(self, user: str, password: str, mailbox: str = "INBOX") -> dict[int, set[str]]:
        """UID -> flags/keywords (lowercased) of every message in `mailbox`, over IMAP."""
        with _ImapConnection.open(self.host, self.imap_port) as imap:
            imap.command(f"LOGIN {_quote(user)} {_quote(password)}".encode())
            imap.command(f"EXAMINE {_quote(mailbox)}".encode())
            lines = imap.command_lines(b"UID FETCH 1:* (UID FLAGS)")
            imap.command(b"LOGOUT")
        out: dict[int, set[str]] = {}
        for line in lines:
            m = re.search(rb"UID (\d+)", line)
            f = re.search(rb"FLAGS \(([^)]*)\)", line)
            if line.startswith(b"* ") and m and f:
                out[int(m.group(1))] = {x.decode().lower() for x in f.group(1).split()}
        return out

    def jmap(self, user: str, password: str, calls: list[list[object]]) -> list[list[object]]:
        """One JMAP API request with the stdlib (independent of the gateway's JMAP code)."""
        auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        body = json.dumps(
            {"using": ["urn:ietf:params:jmap:core", "urn:ietf:params:jmap:mail"], "methodCalls": calls}
        ).encode()
        req = urllib.request.Request(
            self.http_base + "/jmap/",
            data=body,
            headers={"Authorization": auth, "Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            result: list[list[object]] = json.loads(resp.read())["methodResponses"]
        return result

    def log_text(self) -> str:
        """What this Cyrus sent to syslog so far (empty when another syslog owns /dev/log)."""
        path = self.root / "syslog.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        """SIGTERM the master (it stops its children) and reap it. Safe to call twice."""
        master, self._master = self._master, None
        if master is not None:
            if master.poll() is None:
                master.send_signal(signal.SIGTERM)
            try:
                master.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                master.kill()
                master.wait(STOP_TIMEOUT)
            # httpd/imapd children that were serving a connection may outlive the master for a moment
            _kill_strays(self.root)
        catcher, self._syslog = self._syslog, None
        if catcher is not None:
            catcher.close()

    def restart(self) -> None:
        """Start the master again on the same ports and data (after `stop()`)."""
        if self.running:
            return
        if self._syslog is None:
            self._syslog = _SyslogCatcher.maybe_start(self.root / "syslog.log", self.prefix)
        _spawn(self)
        _wait_ready(self)


def imapd_path() -> str:
    """The privately unpacked Cyrus imapd (see the module docstring)."""
    path = Path(os.environ.get("POP3GW_CYRUS_IMAPD", str(PRIVATE_IMAPD)))
    if not os.access(path, os.X_OK):
        raise MissingProgram(
            f"Cyrus imapd is not unpacked at {path}; run `make deps` (scripts/setup-deps.sh) as root, "
            "which does `apt-get download cyrus-imapd` + `dpkg-deb -x` (never `apt-get install`)"
        )
    return str(path)


def start_cyrus(root: Path) -> Cyrus:
    """Start a private Cyrus under `root` (a folder searchable by others: not pytest's tmp_path).

    Raises MissingProgram when a Cyrus program is missing and RuntimeError (with the log) when the
    server does not come up."""
    master = CYRUS_BIN / "master"
    for program in (master, CYRUS_BIN / "httpd"):
        if not os.access(program, os.X_OK):
            raise MissingProgram(f"{program} is missing: install cyrus-common and cyrus-caldav (`make deps`)")
    imapd = imapd_path()
    require_program("saslpasswd2")
    root = root.absolute()
    root.chmod(0o755)
    check_searchable(root)
    for sub in CONFIG_SUBDIRS:
        (root / "conf" / sub).mkdir(parents=True, exist_ok=True)
    (root / "spool").mkdir(exist_ok=True)
    prefix = "pop3gw-" + secrets.token_hex(4)
    last_error = ""
    for _attempt in range(3):  # another process may take a free port before the master binds it
        imap_port, http_port = _free_ports(2)
        server = Cyrus(root, HOST, imap_port, http_port, prefix)
        server.conf.write_text(_imapd_conf(root, prefix))
        (root / "cyrus.conf").write_text(_cyrus_conf(root, imapd, imap_port, http_port))
        _chown_cyrus(root)
        server._syslog = _SyslogCatcher.maybe_start(root / "syslog.log", prefix)
        _spawn(server)
        try:
            _wait_ready(server)
        except (OSError, TimeoutError, ChildProcessError) as exc:
            last_error = repr(exc)
            log = server.log_text()
            server.stop()
            if "in use" not in log.lower():
                break
        else:
            return server
    raise RuntimeError(
        f"private Cyrus in {root} did not start ({last_error})\n"
        f"--- stdio.log ---\n{tail(root / 'stdio.log')}\n--- syslog ---\n{tail(root / 'syslog.log')}"
    )


def _spawn(server: Cyrus) -> None:
    root = server.root
    with (root / "stdio.log").open("ab") as stdio:
        server._master = subprocess.Popen(
            [
                str(CYRUS_BIN / "master"),
                "-C",
                str(root / "imapd.conf"),
                "-M",
                str(root / "cyrus.conf"),
                "-p",
                str(root / "master.pid"),
                "-D",
            ],
            stdin=subprocess.DEVNULL,
            stdout=stdio,
            stderr=stdio,
            start_new_session=True,
        )


def _imapd_conf(root: Path, prefix: str) -> str:
    return f"""\
# Generated by tests/realservers/cyrus.py; never reads /etc/imapd.conf.
configdirectory: {root}/conf
partition-default: {root}/spool
servername: {SERVERNAME}
syslog_prefix: {prefix}
admins: cyrus
allowplaintext: yes
sasl_pwcheck_method: auxprop
sasl_auxprop_plugin: sasldb
sasl_sasldb_path: {root}/sasldb2
sasl_mech_list: PLAIN LOGIN
httpmodules: jmap
conversations: yes
conversations_db: twoskip
autocreate_quota: 0
autocreate_post: 0
tls_required: no
# keep 8-bit header bytes as appended (the default rewrites them to 'X')
munge8bit: no
# small on purpose: a mailbox of a few hundred messages needs several Email/get batches
jmap_max_objects_in_get: {MAX_OBJECTS_IN_GET}
"""


def _cyrus_conf(root: Path, imapd: str, imap_port: int, http_port: int) -> str:
    conf = f"-C {root}/imapd.conf"
    return f"""\
# Generated by tests/realservers/cyrus.py; every cmd carries its own -C (the master does not pass it on).
START {{
  recover cmd="{CYRUS_BIN}/ctl_cyrusdb {conf} -r"
}}
SERVICES {{
  imap cmd="{imapd} {conf}" listen="{HOST}:{imap_port}" prefork=0 maxchild=50
  http cmd="{CYRUS_BIN}/httpd {conf}" listen="{HOST}:{http_port}" prefork=0 maxchild=50
}}
EVENTS {{
  checkpoint cmd="{CYRUS_BIN}/ctl_cyrusdb {conf} -c" period=30
}}
"""


def _wait_ready(server: Cyrus) -> None:
    """Poll until IMAP greets and the JMAP well-known URL answers (any HTTP status)."""
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            with _ImapConnection.open(server.host, server.imap_port):
                pass
            req = urllib.request.Request(server.http_base + "/.well-known/jmap", method="GET")
            with contextlib.suppress(urllib.error.HTTPError):
                urllib.request.urlopen(req, timeout=2).close()
            return
        except (OSError, RuntimeError) as exc:
            if server._master is None or server._master.poll() is not None:
                code = server._master.returncode if server._master else None
                raise ChildProcessError(f"cyrus master exited {code}") from exc
            if time.monotonic() > deadline:
                raise TimeoutError(f"Cyrus not ready after {START_TIMEOUT:.0f} s: {exc!r}") from exc
            time.sleep(0.05)


def _chown_cyrus(path: Path) -> None:
    """`chown -R cyrus:mail` (the master drops to `cyrus`, which must own its data and read sasldb2)."""
    import grp
    import pwd

    try:
        uid = pwd.getpwnam("cyrus").pw_uid
        gid = grp.getgrnam("mail").gr_gid
    except KeyError:
        raise MissingProgram("system user 'cyrus' is missing: install cyrus-common (`make deps`)") from None
    os.chown(path, uid, gid)
    if path.is_dir():
        for dirpath, dirnames, filenames in os.walk(path):
            for name in [*dirnames, *filenames]:
                os.chown(os.path.join(dirpath, name), uid, gid, follow_symlinks=False)


def _kill_strays(root: Path) -> None:
    """SIGKILL any Cyrus process still running with this server's config (children of a stopped master).

    Matches on the exact `-C ROOT/imapd.conf` argument, so nothing of another server is touched."""
    needle = f"{root}/imapd.conf".encode()
    for _ in range(50):
        found = False
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if needle in cmdline:
                found = True
                with contextlib.suppress(OSError):
                    os.kill(int(proc.name), signal.SIGKILL)
        if not found:
            return
        time.sleep(0.02)


class _SyslogCatcher:
    """Receives syslog datagrams on /dev/log (only when nobody else serves it) into a file."""

    DEV_LOG = "/dev/log"

    def __init__(self, sock: socket.socket, out: Path, prefix: str) -> None:
        self._sock = sock
        self._out = out
        self._prefix = prefix.encode()
        self._thread = threading.Thread(target=self._run, name="cyrus-syslog", daemon=True)
        self._thread.start()

    @classmethod
    def maybe_start(cls, out: Path, prefix: str) -> _SyslogCatcher | None:
        if os.path.lexists(cls.DEV_LOG):
            if not cls._stale():
                return None
            with contextlib.suppress(OSError):
                os.unlink(cls.DEV_LOG)  # left behind by a test run that was killed
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind(cls.DEV_LOG)
            os.chmod(cls.DEV_LOG, 0o666)
        except OSError:
            sock.close()
            return None
        sock.settimeout(0.2)
        return cls(sock, out, prefix)

    @classmethod
    def _stale(cls) -> bool:
        """A socket file that nobody receives on (a regular file or a live syslog is not stale)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as probe:
            try:
                probe.connect(cls.DEV_LOG)
            except ConnectionRefusedError:
                return True
            except OSError:
                return False
        return False

    def _run(self) -> None:
        with self._out.open("ab") as out:
            while self._sock.fileno() >= 0:
                try:
                    data = self._sock.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    return
                line = _SYSLOG_PRI.sub(b"", data).rstrip(b"\n")
                if self._prefix in line:
                    out.write(line + b"\n")
                    out.flush()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.DEV_LOG)
        self._sock.close()
        self._thread.join(2)


def _internaldate(epoch: int) -> bytes:
    """An IMAP date-time (RFC 3501) in UTC (month names spelled out: strftime's %b follows the locale)."""
    t = time.gmtime(epoch)
    month = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"][t.tm_mon - 1]
    return f"{t.tm_mday:02d}-{month}-{t.tm_year} {t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} +0000".encode()


__all__ = ["Cyrus", "imapd_path", "start_cyrus"]
