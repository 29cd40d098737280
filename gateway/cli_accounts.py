"""``pop3-gateway account add|list|show|remove|test``: the mapped accounts (``gateway.mapping``).

Secrets (the local POP3 password, the APOP secret, a stored upstream password or bearer token) come from a
prompt (getpass, asked twice), from stdin (``--password-stdin`` / ``--secret-stdin``: one line each, in the
order local password, APOP secret, upstream secret) or from a file (``--password-file`` / ``--secret-file``:
its first line); never from the command line. None of them is ever printed.

The local password and APOP secret go to the users file (``gateway.accounts``), the account to the accounts
file, a stored secret to the ``SecretWriter`` (the secret vault).
"""

from __future__ import annotations

import argparse
import dataclasses
import getpass
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Protocol

import trio

from gateway import accounts, files
from gateway import config as cfg
from gateway.backends.base import BackendError
from gateway.mapping import CREDENTIALS, FLOWS, Account, AccountBook, MappingError, Window

__all__ = ["SecretWriter", "register"]

TEST_UIDLS = 5  # how many UIDLs `account test` shows


class SecretWriter(Protocol):
    async def put(self, account: str, kind: Literal["password", "bearer"], value: str) -> None: ...

    async def delete(self, account: str, kind: Literal["password", "bearer"]) -> bool: ...


def _vault_writer(config: cfg.Config) -> SecretWriter:
    from gateway.oauth2.credentials import Credentials
    from gateway.oauth2.vault import KeyFileError

    credentials = Credentials(config)
    try:
        credentials.check()  # no key: one line from _guarded, before anything is written
    except KeyFileError as exc:
        raise _Fail(f"{exc} (create one with: pop3-gateway oauth keygen)") from None
    return credentials


# The secret vault's writer (tests replace it).
secret_writer: Callable[[cfg.Config], SecretWriter] = _vault_writer


class _Fail(Exception):
    """A user error: one line on stderr, exit 2."""


def register(sub: Any) -> None:
    account = sub.add_parser("account", help="manage mapped accounts", description="Mapped accounts.")
    acts = account.add_subparsers(dest="account_command", required=True, metavar="ACTION")

    add = acts.add_parser(
        "add",
        help="add (or with --replace, replace) a mapped account",
        description="Map the POP3 account NAME to an upstream identity. Secrets come from a prompt, "
        "stdin or a file; never from the command line.",
    )
    add.add_argument("name", metavar="NAME")
    add.add_argument("--upstream", default=cfg.DEFAULT_PROFILE, metavar="PROFILE", help='default: "default"')
    add.add_argument("--upstream-user", metavar="USER", help="the identity upstream (default: NAME)")
    add.add_argument("--credential", choices=CREDENTIALS, default="pass-through")
    add.add_argument("--provider", metavar="P", help="oauth2: the [oauth2.providers.P] profile")
    add.add_argument("--flow", choices=FLOWS, help="oauth2: how `oauth login` authorises it")
    add.add_argument("--folder", metavar="F")
    add.add_argument("--delete-policy", metavar="P", help='"expunge", "move:<folder>" or "flag:<keyword>"')
    add.add_argument("--mark-seen", action=argparse.BooleanOptionalAction, default=None)
    add.add_argument("--uidl-format", choices=cfg.UIDL_FORMATS)
    add.add_argument("--window", default="all", help="all | since:YYYY-MM-DD | days:N | newest:N")
    add.add_argument(
        "--apop", action="store_true", help="also store an APOP secret (asked like the password)"
    )
    add.add_argument(
        "--local-password",
        action="store_true",
        help="pass-through: also check a local password first (other kinds always have one)",
    )
    add.add_argument("--replace", action="store_true", help="replace an existing account")
    add.add_argument("--password-stdin", action="store_true", help="read the local password from stdin")
    add.add_argument("--password-file", metavar="FILE", help="read the local password from FILE")
    add.add_argument("--secret-stdin", action="store_true", help="read the upstream secret from stdin")
    add.add_argument("--secret-file", metavar="FILE", help="read the upstream secret from FILE")
    add.set_defaults(handler=_add)

    acts.add_parser("list", help="list the mapped accounts").set_defaults(handler=_list)
    show = acts.add_parser("show", help="show one account (never a secret)")
    show.add_argument("name", metavar="NAME")
    show.set_defaults(handler=_show)
    remove = acts.add_parser("remove", help="remove an account and its local password")
    remove.add_argument("name", metavar="NAME")
    remove.set_defaults(handler=_remove)
    set_secret = acts.add_parser(
        "set-secret",
        help="replace the stored upstream password (stored) or bearer token (bearer) of an account",
        description="Read the new upstream secret from a prompt, stdin or a file and seal it with the "
        "token key; the running gateway uses it from the next login.",
    )
    set_secret.add_argument("name", metavar="NAME")
    set_secret.add_argument("--secret-stdin", action="store_true", help="read the secret from stdin")
    set_secret.add_argument("--secret-file", metavar="FILE", help="read the secret from FILE")
    set_secret.set_defaults(handler=_set_secret)
    test = acts.add_parser(
        "test",
        help="log in upstream as the account and show what a POP3 session would see",
        description="Log in upstream (no local password needed; a pass-through account asks for the "
        "upstream password) and print the message count, total octets and the first UIDLs.",
    )
    test.add_argument("name", metavar="NAME")
    test.add_argument("--password-stdin", action="store_true", help="pass-through: the upstream password")
    test.add_argument("--password-file", metavar="FILE")
    test.set_defaults(handler=_test)
    for p in (add, show, remove, set_secret, test, acts.choices["list"]):
        p.add_argument("--config", metavar="FILE", help="TOML configuration file")
        p.add_argument("--state-dir", metavar="DIR", help="state directory (accounts.json, users)")


def _guarded(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except (_Fail, MappingError, ValueError) as exc:
            print(f"pop3-gateway: {exc}", file=sys.stderr)
            return 2
        except BackendError as exc:  # the secret vault: a record that cannot be read
            print(f"pop3-gateway: {exc}", file=sys.stderr)
            return 2
        except OSError as exc:
            print(f"pop3-gateway: {exc.strerror or exc}: {exc.filename or ''}", file=sys.stderr)
            return 1

    return run


def _config(args: argparse.Namespace) -> cfg.Config:
    config = cfg.load(args.config) if args.config else cfg.Config()
    if args.state_dir:
        config = dataclasses.replace(
            config, server=dataclasses.replace(config.server, state_dir=args.state_dir)
        )
    return config


def _book(config: cfg.Config) -> AccountBook:
    from gateway.identity import IdentityPolicy

    return AccountBook.load(config.accounts_path, IdentityPolicy.from_config(config.server))


def _read_secret(prompt: str, from_stdin: bool, file: str | None) -> str:
    """One secret: the first line of ``file``, the next stdin line, or a prompt (asked twice)."""
    if file:
        try:
            text = Path(file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise _Fail(f"cannot read {file}: {getattr(exc, 'strerror', None) or exc}") from None
        value = text.split("\n", 1)[0].rstrip("\r")
    elif from_stdin or not sys.stdin.isatty():
        value = sys.stdin.readline().rstrip("\r\n")
    else:
        value = getpass.getpass(prompt)
        if getpass.getpass("Again: ") != value:
            raise _Fail("the two entries differ")
    if not value:
        raise _Fail(f"empty {prompt.rstrip(': ').lower()} refused")
    return value


@_guarded
def _add(args: argparse.Namespace) -> int:
    config = _config(args)
    book = _book(config)
    key = book.key(args.name)
    if args.credential != "oauth2" and (args.provider or args.flow):
        raise _Fail("--provider and --flow are for --credential oauth2")
    try:
        window = Window.parse(args.window)
        policy = cfg.DeletePolicy.parse(args.delete_policy) if args.delete_policy else None
    except ValueError as exc:
        raise _Fail(str(exc)) from None
    account = Account(
        name=key,
        upstream_user=args.upstream_user or args.name,
        upstream=args.upstream,
        credential=args.credential,
        provider=args.provider,
        flow=args.flow,
        folder=args.folder,
        delete_policy=policy,
        mark_seen=args.mark_seen,
        uidl_format=args.uidl_format,
        window=window,
    )
    book.add(account, replace=args.replace)
    from gateway.backends.mapped import book_problems

    problems = [p for p in book_problems(book, config) if p.startswith(f"account {key!r}")]
    if problems:
        raise _Fail(problems[0])
    # secrets last, all read before anything is written
    wants_local: bool = args.credential != "pass-through" or bool(args.local_password or args.apop)
    password = (
        _read_secret("Local POP3 password: ", args.password_stdin, args.password_file)
        if wants_local
        else None
    )
    apop = _read_secret("APOP secret: ", args.password_stdin, None) if args.apop else None
    upstream_secret = None
    if args.credential in ("stored", "bearer"):
        what = "Upstream password: " if args.credential == "stored" else "Bearer token: "
        upstream_secret = _read_secret(what, args.secret_stdin, args.secret_file)
    if upstream_secret is not None:
        kind: Literal["password", "bearer"] = "password" if args.credential == "stored" else "bearer"
        trio.run(secret_writer(config).put, key, kind, upstream_secret)
    users_file = files.users_file_path(config)
    files.make_private_dir(config.accounts_path.parent)
    if password is not None:
        files.make_private_dir(users_file.parent)
        accounts.add_user(users_file, key, password, apop)
    elif args.replace:
        accounts.remove_user(users_file, key)  # a pass-through account without a local password now
    book.save()
    print(
        f"account {key} written to {config.accounts_path}"
        + (f" (local password in {users_file})" if password else "")
    )
    if args.credential == "oauth2":
        print(f"next: pop3-gateway oauth login --account {key}")
    return 0


def _describe(a: Account) -> str:
    return f"{a.name}\t{a.upstream}\t{a.upstream_user}\t{a.credential}\t{a.window}"


@_guarded
def _list(args: argparse.Namespace) -> int:
    book = _book(_config(args))
    print("name\tupstream\tupstream_user\tcredential\twindow")
    for a in book:
        print(_describe(a))
    return 0


@_guarded
def _show(args: argparse.Namespace) -> int:
    config = _config(args)
    account = _book(config).get(args.name)
    if account is None:
        raise _Fail(f"no account {args.name!r}")
    try:
        record = accounts.load_users(files.users_file_path(config)).get(account.name)
    except FileNotFoundError:
        record = None
    for field, value in account.to_json().items():
        print(f"{field}: {'(profile default)' if value is None else value}")
    print(f"local password: {'set' if record is not None else 'none'}")
    print(f"apop: {'set' if record is not None and record.apop_secret is not None else 'none'}")
    return 0


@_guarded
def _remove(args: argparse.Namespace) -> int:
    config = _config(args)
    book = _book(config)
    account = book.remove(args.name)
    book.save()
    accounts.remove_user(files.users_file_path(config), account.name)
    print(f"account {account.name} removed")
    if account.credential in ("stored", "bearer"):
        kind: Literal["password", "bearer"] = "password" if account.credential == "stored" else "bearer"
        try:
            deleted = trio.run(secret_writer(config).delete, account.name, kind)
        except Exception as exc:
            print(f"pop3-gateway: warning: its stored {kind} was not deleted: {exc}", file=sys.stderr)
        else:
            print(f"its stored {kind}: {'deleted' if deleted else 'none was stored'}")
    if account.credential == "oauth2":
        print(
            f"its OAuth2 token is kept: pop3-gateway oauth logout --account {account.name} revokes and "
            "deletes it"
        )
    return 0


@_guarded
def _set_secret(args: argparse.Namespace) -> int:
    config = _config(args)
    account = _book(config).get(args.name)
    if account is None:
        raise _Fail(f"no account {args.name!r}")
    if account.credential not in ("stored", "bearer"):
        raise _Fail(
            f"account {account.name} has credential {account.credential}: only stored and bearer "
            "accounts keep an upstream secret"
            + (
                f" (OAuth2: pop3-gateway oauth login --account {account.name})"
                if account.credential == "oauth2"
                else ""
            )
        )
    what = "Upstream password: " if account.credential == "stored" else "Bearer token: "
    secret = _read_secret(what, args.secret_stdin, args.secret_file)
    kind: Literal["password", "bearer"] = "password" if account.credential == "stored" else "bearer"
    trio.run(secret_writer(config).put, account.name, kind, secret)
    print(f"account {account.name}: stored {kind} replaced")
    return 0


@_guarded
def _test(args: argparse.Namespace) -> int:
    from gateway.backends import make_backend
    from gateway.backends.mapped import MappedBackend

    config = _config(args)
    account = _book(config).get(args.name)
    if account is None:
        raise _Fail(f"no account {args.name!r}")
    password = None
    if account.credential == "pass-through":
        password = _read_secret("Upstream password: ", args.password_stdin, args.password_file)
    backend = make_backend(config, **_sources(config))
    if not isinstance(backend, MappedBackend):  # pragma: no cover - an account exists, so it is mapped
        raise _Fail("the configuration does not map accounts")

    async def run() -> tuple[int, int, list[str], str]:
        try:
            with trio.fail_after(config.server.upstream_timeout):
                async with backend.open_upstream(account, password) as drop:
                    entries = list(drop.entries)
                    return (
                        len(entries),
                        sum(e.size for e in entries),
                        [e.uidl for e in entries[:TEST_UIDLS]],
                        getattr(drop, "uidl_format", None) or config.upstream.uidl_format,
                    )
        finally:
            await backend.aclose()

    try:
        count, octets, uidls, fmt = trio.run(run)
    except (BackendError, trio.TooSlowError) as exc:
        reason = "timed out" if isinstance(exc, trio.TooSlowError) else f"{type(exc).__name__}: {exc}"
        print(f"pop3-gateway: account {account.name}: upstream login failed: {reason}", file=sys.stderr)
        return 1
    print(
        f"account {account.name}: upstream {account.upstream} as {account.upstream_user} "
        f"({account.credential})"
    )
    print(f"STAT: +OK {count} {octets}")
    print(f"uidl format for new messages: {fmt} (the UIDL store keeps the ones already given)")
    for i, uidl in enumerate(uidls, start=1):
        print(f"UIDL {i} {uidl}")
    return 0


def _gateway_sources(config: cfg.Config) -> dict[str, Any]:
    from gateway.oauth2.credentials import Credentials

    credentials = Credentials(config)
    return {"tokens": credentials, "secrets": credentials}


# The token source and secret reader `account test` hands to the mapped backend (tests replace it).
sources: Callable[[cfg.Config], dict[str, Any]] = _gateway_sources


def _sources(config: cfg.Config) -> dict[str, Any]:
    return sources(config)
