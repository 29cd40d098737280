"""The users file of the embedded Maildir backend.

Format
======
UTF-8 text, one record per line, LF (or CRLF) line ends. Blank lines and lines whose first non-blank
character is ``#`` are comments and are kept as they are when the file is rewritten. A record is
two or three fields separated by ``:``::

    name:$scrypt$ln=<log2 N>,r=<r>,p=<p>$<salt>$<hash>[:<apop>]

- ``name`` is a valid user name (see :func:`validate_username`): no ``:``, no whitespace, never a
  leading ``#`` or ``.``; it is also the name of the user's Maildir directory.
- the second field is the password hash: ``hashlib.scrypt`` with N = 2**ln, block size r and
  parallelism p, over the UTF-8 password and a random 16-byte salt; ``salt`` and ``hash`` are
  standard base64 (RFC 4648 section 4, with padding). The password itself is never stored.
- ``apop`` (optional; empty or absent means "no APOP for this user") is the base64 of the UTF-8 APOP
  shared secret. APOP (RFC 1939 section 7) needs the secret itself, so it is stored recoverably: the
  file is written with mode 0600 and must stay readable only by the gateway's user.

Example::

    # pop3-gateway users
    alice:$scrypt$ln=14,r=8,p=1$q0Vh1cQZ5h8pBq8c3w6VtA==$3vZ...Q=:
    bob:$scrypt$ln=14,r=8,p=1$Hc2Qz4bq2Lr0mP4n1e0w9g==$7aB...k=:c2VjcmV0

Rewrites (:func:`add_user`) go through a temporary file in the same directory and ``os.replace``,
so a reader sees the old file or the new one, never half of one. Two concurrent writers are not
serialised: the last one wins.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import email.utils
import hashlib
import hmac
import os
import re
import secrets
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Final

from gateway import files

__all__ = [
    "DUMMY_HASH",
    "UserRecord",
    "add_user",
    "ensure_demo",
    "hash_password",
    "load_users",
    "remove_user",
    "validate_username",
    "verify_password",
]

USERNAME_MAX: Final = 64

# scrypt cost used for new hashes: N = 2**14, r = 8, p = 1 (16 MiB, ~50 ms).
_LN: Final = 14
_R: Final = 8
_P: Final = 1
_SALT_BYTES: Final = 16
_HASH_BYTES: Final = 32

# Bounds accepted when verifying, so a hand-edited file cannot make a login eat the machine.
_MAX_SCRYPT_MEMORY: Final = 128 * 1024 * 1024
_PARAMS = re.compile(r"ln=([0-9]{1,2}),r=([0-9]{1,3}),p=([0-9]{1,3})")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    """Strict standard base64; raises ValueError (binascii.Error) on anything else."""
    return base64.b64decode(text.encode("ascii"), validate=True)


# Verified for unknown users so that a login costs the same whether or not the user exists; no
# password matches it (its hash is not the scrypt of anything we know of).
DUMMY_HASH: Final = f"$scrypt$ln={_LN},r={_R},p={_P}${_b64(bytes(_SALT_BYTES))}${_b64(bytes(_HASH_BYTES))}"


@dataclasses.dataclass(frozen=True, slots=True)
class UserRecord:
    name: str
    password_hash: str = dataclasses.field(repr=False)
    apop_secret: str | None = dataclasses.field(default=None, repr=False)


def hash_password(password: str) -> str:
    """A new salted scrypt hash of ``password`` in the users-file notation."""
    salt = secrets.token_bytes(_SALT_BYTES)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=2**_LN, r=_R, p=_P, dklen=_HASH_BYTES)
    return f"$scrypt$ln={_LN},r={_R},p={_P}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, stored: str) -> bool:
    """Whether ``password`` matches ``stored``. A malformed ``stored`` is False, never an exception."""
    try:
        empty, scheme, params, salt_b64, hash_b64 = stored.split("$")
        if empty or scheme != "scrypt":
            return False
        m = _PARAMS.fullmatch(params)
        if m is None:
            return False
        ln, r, p = (int(g) for g in m.groups())
        n = 2**ln
        memory = 128 * r * (n + p + 2)
        if not (1 <= ln <= 24 and 1 <= r <= 64 and 1 <= p <= 16) or memory > _MAX_SCRYPT_MEMORY:
            return False
        salt = _unb64(salt_b64)
        expected = _unb64(hash_b64)
        if not (8 <= len(salt) <= 64 and 16 <= len(expected) <= 64):
            return False
        actual = hashlib.scrypt(
            password.encode("utf-8"),
            salt=salt,
            n=n,
            r=r,
            p=p,
            dklen=len(expected),
            maxmem=memory + 1024 * 1024,
        )
    except ValueError:
        # ValueError covers the split, binascii.Error, non-ASCII base64 and unencodable passwords.
        return False
    return hmac.compare_digest(actual, expected)


def validate_username(name: str) -> None:
    """Raise ValueError unless ``name`` is safe both as a users-file key and as a directory name."""
    if not name:
        raise ValueError("user name is empty")
    if len(name) > USERNAME_MAX:
        raise ValueError(f"user name is longer than {USERNAME_MAX} characters")
    for bad in ("/", "\\", ":", ".."):
        if bad in name:
            raise ValueError(f"user name contains {bad!r}")
    if name.startswith("."):
        raise ValueError("user name starts with '.'")
    if name.startswith("#"):
        raise ValueError("user name starts with '#' (a comment in the users file)")
    if any(c.isspace() for c in name):
        raise ValueError("user name contains whitespace")
    if not name.isprintable():
        raise ValueError("user name contains a control or non-printable character")


def _split_lines(text: str) -> list[str]:
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def _is_comment(line: str) -> bool:
    stripped = line.strip()
    return not stripped or stripped.startswith("#")


def _parse_record(line: str) -> UserRecord:
    fields = line.strip().split(":")
    if len(fields) not in (2, 3):
        raise ValueError(f"expected 2 or 3 ':'-separated fields, got {len(fields)}")
    name, password_hash = fields[0], fields[1]
    validate_username(name)
    if not password_hash:
        raise ValueError("empty password hash")
    apop_secret: str | None = None
    if len(fields) == 3 and fields[2]:
        try:
            apop_secret = _unb64(fields[2]).decode("utf-8")
        except (ValueError, binascii.Error) as exc:
            raise ValueError("APOP secret is not base64 of UTF-8 text") from exc
        if not apop_secret:
            raise ValueError("APOP secret is empty")
    return UserRecord(name, password_hash, apop_secret)


def _parse(text: str, path: str | os.PathLike[str]) -> dict[str, UserRecord]:
    users: dict[str, UserRecord] = {}
    for lineno, line in enumerate(_split_lines(text), start=1):
        if _is_comment(line):
            continue
        try:
            record = _parse_record(line)
        except ValueError as exc:
            # No line content in the message: it may hold a secret.
            raise ValueError(f"{os.fspath(path)}:{lineno}: {exc}") from None
        if record.name in users:
            raise ValueError(f"{os.fspath(path)}:{lineno}: user {record.name!r} appears twice")
        users[record.name] = record
    return users


def load_users(path: str | os.PathLike[str]) -> dict[str, UserRecord]:
    """Read the users file. Raises OSError if unreadable, ValueError (with the line number, never
    the line) if malformed."""
    return _parse(Path(path).read_text(encoding="utf-8"), path)


def _format_record(name: str, password_hash: str, apop_secret: str | None) -> str:
    apop = _b64(apop_secret.encode("utf-8")) if apop_secret is not None else ""
    return f"{name}:{password_hash}:{apop}"


def _atomic_write(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` (mode 0600) through a temporary file in the same directory."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def add_user(
    path: str | os.PathLike[str],
    name: str,
    password: str,
    apop_secret: str | None = None,
    *,
    replace: bool = True,
) -> None:
    """Add ``name`` (or, with ``replace``, overwrite its whole record in place) and rewrite the file
    atomically with mode 0600. Other records and comments are kept byte for byte. The file is
    created if missing. Raises ValueError for an invalid name, an empty APOP secret, an existing
    user when ``replace`` is false, or a malformed existing file (which is then left untouched)."""
    validate_username(name)
    if apop_secret is not None and not apop_secret:
        raise ValueError("APOP secret is empty (use None for no APOP)")
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        text = ""
    existing = _parse(text, path)
    if name in existing and not replace:
        raise ValueError(f"user {name!r} already exists")
    record = _format_record(name, hash_password(password), apop_secret)
    out: list[str] = []
    for line in _split_lines(text):
        if not _is_comment(line) and line.strip().split(":", 1)[0] == name:
            out.append(record)
            record = ""
        else:
            out.append(line)
    if record:
        out.append(record)
    _atomic_write(path, "".join(f"{line}\n" for line in out))


def remove_user(path: str | os.PathLike[str], name: str) -> bool:
    """Remove ``name``'s record (comments and other records kept byte for byte), atomically, mode 0600.
    False when the file or the record is missing. Raises ValueError for a malformed file (left untouched)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return False
    if name not in _parse(text, path):
        return False
    kept = [line for line in _split_lines(text) if _is_comment(line) or line.strip().split(":", 1)[0] != name]
    _atomic_write(path, "".join(f"{line}\n" for line in kept))
    return True


# --- the demo account -------------------------------------------------------------------------

DEMO_USER: Final = "demo"

_DEMO_BODIES: Final = (
    (
        "Welcome to pop3-gateway",
        "Hello!\n"
        "\n"
        "This mailbox is served by pop3-gateway's embedded Maildir backend.\n"
        "Point any POP3 client at the gateway, log in as 'demo' with the password\n"
        "printed at startup (also in the state directory's demo-password file),\n"
        "and this message is what RETR 1 returns.\n",
    ),
    (
        "Lines that start with a dot",
        "POP3 ends a multi-line reply with a line holding a single dot, so lines\n"
        "of the message that start with a dot are sent with one more dot in front.\n"
        "The next three lines start with a dot:\n"
        ".signature\n"
        ".\n"
        "..two dots\n"
        "Your client removes the extra dots again; you should see them as written.\n",
    ),
    (
        "Deleting messages",
        "DELE marks a message; nothing is deleted until QUIT.\n"
        "RSET unmarks everything, and a dropped connection deletes nothing.\n"
        "These welcome messages are only created once: delete them freely.\n",
    ),
)


def _demo_messages() -> list[bytes]:
    messages = []
    now = time.time()
    token = secrets.token_hex(8)
    for i, (subject, body) in enumerate(_DEMO_BODIES, start=1):
        text = (
            "From: pop3-gateway <postmaster@pop3-gateway.invalid>\n"
            f"To: {DEMO_USER} <{DEMO_USER}@pop3-gateway.invalid>\n"
            f"Subject: {subject}\n"
            f"Date: {email.utils.formatdate(now + i, usegmt=True)}\n"
            f"Message-ID: <welcome-{i}.{token}@pop3-gateway.invalid>\n"
            "MIME-Version: 1.0\n"
            "Content-Type: text/plain; charset=us-ascii\n"
            "\n"
            f"{body}"
        )
        messages.append(text.replace("\n", "\r\n").encode("ascii"))
    return messages


def _seed_demo_maildir(maildir: Path) -> None:
    """Create ``maildir`` with the welcome messages, atomically: it appears whole or not at all."""
    staging = Path(tempfile.mkdtemp(dir=maildir.parent, prefix=f".{maildir.name}-seed-"))
    try:
        for sub in ("cur", "new", "tmp"):
            (staging / sub).mkdir(mode=0o700)
        host = socket.gethostname().replace("/", r"\057").replace(":", r"\072") or "localhost"
        stamp = int(time.time())
        for i, message in enumerate(_demo_messages(), start=1):
            name = f"{stamp}.M{i}P{os.getpid()}.{host},S={len(message)},W={len(message)}"
            (staging / "new" / name).write_bytes(message)
        os.rename(staging, maildir)
    except OSError:
        # EEXIST / ENOTEMPTY: someone else made it first, which is fine
        if not maildir.is_dir():
            raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def ensure_demo(state_dir: Path) -> tuple[str, str]:
    """Make sure the demo account exists; return ``(user, password)``.

    - ``state_dir/demo-password`` (0600) holds a random password, made once and re-read later;
    - ``state_dir/users`` gets (or keeps) the user ``demo`` with that password, also as its APOP
      secret; the record is rewritten only if missing or not matching the password file;
    - ``state_dir/mail/demo`` is created once with three welcome messages; it is not re-seeded after
      the user deleted them.
    """
    state_dir = Path(state_dir)
    files.make_private_dir(state_dir)
    password_file = state_dir / "demo-password"
    try:
        fd = os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        password = password_file.read_text(encoding="utf-8").strip()
        if not password:
            raise ValueError(f"{password_file} is empty") from None
    else:
        password = secrets.token_urlsafe(12)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(password + "\n")

    users_file = state_dir / "users"
    try:
        users = load_users(users_file)
    except FileNotFoundError:
        users = {}
    record = users.get(DEMO_USER)
    if (
        record is None
        or record.apop_secret != password
        or not verify_password(password, record.password_hash)
    ):
        add_user(users_file, DEMO_USER, password, apop_secret=password)

    mail = state_dir / "mail"
    mail.mkdir(mode=0o700, exist_ok=True)
    maildir = mail / DEMO_USER
    if not maildir.exists():
        _seed_demo_maildir(maildir)
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(mode=0o700, exist_ok=True)
    return DEMO_USER, password
