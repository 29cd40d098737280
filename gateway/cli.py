"""The ``pop3-gateway`` command: serve, check-config, user add, uidl; ``oauth`` (gateway/cli_oauth.py)."""

from __future__ import annotations

import argparse
import errno
import functools
import getpass
import logging
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import trio

from gateway import __version__
from gateway import config as cfg
from gateway.logsetup import setup as setup_logging

if TYPE_CHECKING:
    from gateway.metrics import Metrics
    from gateway.oauth2.credentials import Credentials

log = logging.getLogger("gateway")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pop3-gateway",
        description="A POP3 server that serves every session from a modern mailbox (IMAP, JMAP or Maildir).",
    )
    parser.add_argument("--version", action="version", version=f"pop3-gateway {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser(
        "serve",
        help="run the POP3 server",
        description="Run the POP3 server. Without --config and --upstream it serves the embedded demo: "
        "a local Maildir with a demo account, in the state directory.",
    )
    serve.add_argument("--config", metavar="FILE", help="TOML configuration file")
    serve.add_argument(
        "--listen", metavar="HOST:PORT", help="one plain listener instead of the configured ones"
    )
    serve.add_argument(
        "--upstream",
        metavar="URL",
        help="the upstream mailbox: "
        + ", ".join(f"{scheme}://" for scheme in cfg.UPSTREAM_SCHEMES)
        + " (maildir:///path; without it, the embedded demo)",
    )
    serve.add_argument("--state-dir", metavar="DIR", help="where the UIDL store and the demo live")
    serve.add_argument(
        "--admin-listen",
        metavar="HOST:PORT",
        help='the admin HTTP endpoint (healthz, readyz, metrics); "" disables it',
    )
    serve.add_argument("--log-format", choices=("text", "json"), help="log line format")
    serve.add_argument("--log-level", choices=("debug", "info", "warning", "error"), help="log level")

    check = sub.add_parser("check-config", help="validate a configuration file", description="Validate FILE.")
    check.add_argument("file", metavar="FILE")

    user = sub.add_parser("user", help="manage the embedded Maildir accounts", description="Manage accounts.")
    user_sub = user.add_subparsers(dest="user_command", required=True, metavar="ACTION")
    add = user_sub.add_parser(
        "add",
        help="add or replace an account",
        description="Add or replace an account. The password is read from a prompt, or from stdin with "
        "--password-stdin; never from the command line.",
    )
    add.add_argument("name", metavar="NAME")
    add.add_argument("--config", metavar="FILE", help="configuration file (for the state dir / users file)")
    add.add_argument("--state-dir", metavar="DIR", help="state directory holding the users file")
    add.add_argument("--users-file", metavar="FILE", help="the users file (default: STATE_DIR/users)")
    add.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    add.add_argument("--apop", action="store_true", help="also store an APOP secret (asked the same way)")
    uidl = sub.add_parser("uidl", help="inspect, export and import UIDLs", description="The UIDL store.")
    uidl_sub = uidl.add_subparsers(dest="uidl_command", required=True, metavar="ACTION")
    imp = uidl_sub.add_parser(
        "import",
        help="take the UIDLs and order of an old POP3 server",
        description="Read UIDL, LIST and TOP n 0 from an old POP3 server, match its messages to the "
        "upstream account's, and store the old UIDLs and order so clients download nothing again. "
        "Passwords come from a prompt, stdin or a file; never from the command line.",
    )
    imp.add_argument("--account", required=True, help="the account on the upstream")
    imp.add_argument(
        "--from", dest="source", required=True, metavar="URL", help="pop3://user@host:port or pop3s://"
    )
    imp.add_argument("--starttls", action="store_true", help="use STLS on a pop3:// source")
    imp.add_argument("--ca-file", help="CA file to verify the old server's certificate")
    imp.add_argument("--insecure", action="store_true", help="do not verify the old server's certificate")
    imp.add_argument("--password-file", help="file holding the old server's password")
    imp.add_argument(
        "--password-stdin", action="store_true", help="read the old server's password from stdin"
    )
    imp.add_argument(
        "--upstream-password-file", help="file holding the upstream password (default: the same password)"
    )
    imp.add_argument("--dry-run", action="store_true", help="show the report, write nothing")
    exp = uidl_sub.add_parser(
        "export", help="write UIDLs as JSON or CSV", description="Export the UIDL store."
    )
    exp.add_argument("--account", help="only this account")
    exp.add_argument("--format", choices=("json", "csv"), default="json")
    show = uidl_sub.add_parser(
        "show", help="print an account's UIDLs", description="Print an account's UIDLs."
    )
    show.add_argument("--account", required=True)
    for p in (imp, exp, show):
        p.add_argument("--config", metavar="FILE", help="TOML configuration file")
        p.add_argument("--state-dir", metavar="DIR", help="state directory holding uidl.sqlite3")
        p.add_argument("--upstream", metavar="URL", help="the upstream (for import)")
    from gateway import cli_oauth

    cli_oauth.register(sub)
    from gateway import cli_accounts

    cli_accounts.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        handler = getattr(args, "handler", None)  # commands registered by their own modules
        if handler is not None:
            return int(handler(args))
        if args.command == "serve":
            return _serve(args)
        if args.command == "check-config":
            return _check_config(args.file)
        if args.command == "user":
            return _user_add(args)
        if args.command == "uidl":
            return _uidl(args)
    except cfg.ConfigError as exc:
        print(f"pop3-gateway: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    raise AssertionError(args.command)  # pragma: no cover


def _load(args: argparse.Namespace) -> cfg.Config:
    config = cfg.load(args.config) if getattr(args, "config", None) else cfg.Config()
    return cfg.with_overrides(
        config,
        listen=getattr(args, "listen", None),
        upstream=getattr(args, "upstream", None),
        state_dir=getattr(args, "state_dir", None),
        admin=getattr(args, "admin_listen", None),
    )


def _check_config(path: str) -> int:
    """As strict as ``serve``: the loader, the backend and every object ``serve`` builds (TLS included)."""
    config = cfg.load(path)
    from gateway import reload
    from gateway.backends import make_backend

    make_backend(config, **_credentials(config))
    built = reload.build(config)
    for warning in built.warnings:
        print(f"{path}: warning: {warning}")
    print(f"{path}: OK ({len(config.listen)} listener(s), upstream {config.upstream.url or 'embedded demo'})")
    return 0


def _credentials(config: cfg.Config, metrics: Metrics | None = None) -> dict[str, Credentials]:
    """``make_backend``'s ``tokens`` and ``secrets`` for the mapped accounts (none when the config maps
    nothing: httpx and the AEAD then stay unimported). When the accounts file already holds an account
    that needs the token key (oauth2, stored, bearer), the key is read now: a missing or unsafe key is a
    configuration error at start, not a [SYS/PERM] at the first poll."""
    from gateway.backends import mapped

    if not mapped.wanted(config):
        return {}
    from gateway.oauth2.credentials import Credentials
    from gateway.oauth2.vault import KeyFileError

    credentials = Credentials(config, metrics=metrics)
    needing = mapped.accounts_needing_keys(config)
    if needing:
        try:
            credentials.check()
        except KeyFileError as exc:
            raise cfg.ConfigError(
                f"account {needing[0]} needs the token key: {exc} "
                "(create one with: pop3-gateway oauth keygen)",
                key="oauth2.key_file",
            ) from None
    return {"tokens": credentials, "secrets": credentials}


def _start_checks(config: cfg.Config) -> None:
    """At serve start: descriptors raised, codecs loaded while descriptors are plenty, config warnings."""
    from gateway import fdlimit, reload

    for warning in fdlimit.raise_nofile_limit(config.server.max_sessions):
        log.warning("%s", warning)
    fdlimit.preload_codecs()
    for warning in reload.build(config).warnings:
        log.warning("%s", warning)


def _user_add(args: argparse.Namespace) -> int:
    from gateway import accounts, files

    config = _load(args)
    users_file = Path(args.users_file or config.upstream.users_file or config.state_path / "users")
    try:
        accounts.validate_username(args.name)
    except ValueError as exc:
        print(f"pop3-gateway: invalid user name: {exc}", file=sys.stderr)
        return 2
    password = _read_secret("Password: ", args.password_stdin)
    if not password:
        print("pop3-gateway: empty password refused", file=sys.stderr)
        return 2
    apop = _read_secret("APOP secret: ", args.password_stdin) if args.apop else None
    files.make_private_dir(users_file.parent)
    accounts.add_user(users_file, args.name, password, apop)
    print(f"user {args.name} written to {users_file}")
    return 0


def _uidl(args: argparse.Namespace) -> int:
    from gateway.store import UidlStore

    config = _load(args)
    path = config.state_path / "uidl.sqlite3"
    if args.uidl_command == "import":
        return _uidl_import(args, config)
    if not path.exists():
        print(f"pop3-gateway: no UIDL store at {path}", file=sys.stderr)
        return 1
    store = UidlStore(path)
    try:
        boxes = store.mailboxes(args.account)
        if args.uidl_command == "show":
            if not boxes:
                print(f"pop3-gateway: no UIDLs stored for {args.account!r}", file=sys.stderr)
                return 1
            for name, _ in boxes:
                print(f"# {name}")
                for row in store.rows(name):
                    print(f"{row.uidl}\t{row.state}\t{row.size}\t{row.key}")
            return 0
        rows = [(name, account, r) for name, account in boxes for r in store.rows(name)]
        if args.format == "json":
            import json

            out = [
                {
                    "mailbox": n,
                    "account": a,
                    "uidl": r.uidl,
                    "key": r.key,
                    "size": r.size,
                    "state": r.state,
                    "order": r.order_pos,
                }
                for n, a, r in rows
            ]
            json.dump(out, sys.stdout, indent=1)
            print()
        else:
            import csv

            w = csv.writer(sys.stdout)
            w.writerow(["mailbox", "account", "uidl", "key", "size", "state", "order"])
            for n, a, r in rows:
                w.writerow([n, a, r.uidl, r.key, r.size, r.state, "" if r.order_pos is None else r.order_pos])
        return 0
    finally:
        store.close()


def _uidl_import(args: argparse.Namespace, config: cfg.Config) -> int:
    from gateway import migrate, tls
    from gateway.backends import make_backend
    from gateway.store import UidlStore

    try:
        src = migrate.parse_source(args.source, starttls=args.starttls)
    except ValueError as exc:
        print(f"pop3-gateway: {exc}", file=sys.stderr)
        return 2
    if args.password_file:
        password = Path(args.password_file).read_text(encoding="utf-8").rstrip("\r\n")
    else:
        password = _read_secret("Old server password: ", args.password_stdin)
    upstream_password = (
        Path(args.upstream_password_file).read_text(encoding="utf-8").rstrip("\r\n")
        if args.upstream_password_file
        else password
    )
    use_tls = src.implicit_tls or src.starttls
    ctx = tls.client_context(args.ca_file or "", args.insecure) if use_tls else None
    backend = make_backend(config)

    async def run() -> tuple[list[migrate.OldMessage], str, list[migrate.NewMessage]]:
        old = await trio.to_thread.run_sync(migrate.read_old_server, src, password, ctx)
        try:
            name, new = await migrate.read_upstream(backend, args.account, upstream_password)
        finally:
            await backend.aclose()
        return old, name, new

    try:
        old, name, new = trio.run(run)
    except Exception as exc:
        print(f"pop3-gateway: import failed: {exc}", file=sys.stderr)
        return 1
    report = migrate.match(old, new)
    print("\n".join(report.lines()))
    if args.dry_run:
        print("dry run: nothing written")
        return 0
    store = UidlStore(config.state_path / "uidl.sqlite3")
    try:
        written = migrate.write(store, name, args.account, report)
    except ValueError as exc:
        print(f"pop3-gateway: import refused, nothing written: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()
    print(f"imported {written} UIDLs into {config.state_path / 'uidl.sqlite3'}")
    return 0 if not (report.unmatched_old or report.ambiguous) else 3


def _read_secret(prompt: str, from_stdin: bool) -> str:
    if from_stdin or not sys.stdin.isatty():
        line = sys.stdin.readline()
        return line.rstrip("\r\n")
    first = getpass.getpass(prompt)
    if getpass.getpass("Again: ") != first:
        raise SystemExit("pop3-gateway: the two entries differ")
    return first


def _serve(args: argparse.Namespace) -> int:
    config = _load(args)
    setup_logging(args.log_level or config.log.level, args.log_format or config.log.format)
    _start_checks(config)
    from gateway.backends import make_backend
    from gateway.server import Server

    demo = None
    if not config.upstream.url:
        from gateway import accounts

        demo = accounts.ensure_demo(config.state_path)
    from gateway.metrics import Metrics

    metrics = Metrics()
    backend = make_backend(config, **_credentials(config, metrics))
    try:
        server = Server(config, backend, metrics=metrics)
    except (OSError, ValueError) as exc:
        print(f"pop3-gateway: cannot load TLS certificates: {exc}", file=sys.stderr)
        return 2
    try:
        trio.run(_serve_until_signal, server, demo, lambda: _load(args))
    except (OSError, BaseExceptionGroup) as exc:
        errors = _os_errors(exc)
        if errors is None:
            raise
        for error in errors:  # one line each: ListenError says "cannot listen on HOST:PORT (ROLE): ..."
            print(f"pop3-gateway: {error}", file=sys.stderr)
        return 1
    return 0


def _os_errors(exc: BaseException) -> list[OSError] | None:
    """The OSErrors ``exc`` is made of (groups flattened), or None when it holds anything else."""
    if isinstance(exc, OSError):
        return [exc]
    if isinstance(exc, BaseExceptionGroup):
        found: list[OSError] = []
        for inner in exc.exceptions:
            errors = _os_errors(inner)
            if errors is None:
                return None
            found += errors
        return found
    return None


_BIND_ERRNOS = frozenset({errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES})


def _pop3_listen_error(config: cfg.Config, exc: OSError) -> OSError:
    """A bind failure of the POP3 listeners as a ``ListenError``, unless the server said which already."""
    from gateway.errors import ListenError

    if isinstance(exc, ListenError) or not (exc.errno in _BIND_ERRNOS or isinstance(exc, socket.gaierror)):
        return exc
    # The server does not say which of its listeners failed: name them all (one is the usual case).
    return ListenError(", ".join(lc.address for lc in config.listen), "pop3", exc)


async def _serve_until_signal(
    server: object, demo: tuple[str, str] | None, reload_config: Callable[[], cfg.Config]
) -> None:
    from gateway.server import Server
    from gateway.store import AsyncUidlStore

    assert isinstance(server, Server)
    st = server.config.store
    store = AsyncUidlStore(
        server.config.state_path / "uidl.sqlite3",
        retention=st.retention_days * 86400,
        max_fingerprints=st.max_fingerprints,
        fingerprint_concurrency=st.fingerprint_concurrency,
    )
    store.operations = lambda op: server.metrics.uidl_store(_STORE_OPS.get(op, "write"))
    await store.open()
    server.store = store
    try:
        await _serve_signals(server, demo, reload_config)
    finally:
        with trio.CancelScope(shield=True):
            await store.aclose()


_STORE_OPS: dict[str, Literal["read", "write", "import", "prune"]] = {
    "open": "read",
    "plan": "read",
    "assign": "write",
    "fingerprints": "write",
    "mark_deleted": "write",
    "sizes": "write",
    "prune": "prune",
}


async def _serve_signals(
    server: object, demo: tuple[str, str] | None, reload_config: Callable[[], cfg.Config]
) -> None:
    from gateway.admin import AdminSettings, load_token, serve_admin
    from gateway.reload import ReloadRefused
    from gateway.server import Server

    assert isinstance(server, Server)
    admin = server.config.admin
    # Read before anything listens: a bad token file is a configuration error (exit 2), never half a start.
    settings = AdminSettings.from_config(admin, load_token(admin)) if admin.address else None
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            try:
                addresses = await nursery.start(server.serve)
            except OSError as exc:
                error = _pop3_listen_error(server.config, exc)
                if error is exc:
                    raise
                raise error from exc
            for bound in addresses:
                log.info("listening on %s:%d (tls=%s)", bound.host, bound.port, bound.tls)
            if settings is not None:
                admin_bound = await nursery.start(
                    functools.partial(
                        serve_admin, admin.address, server.metrics, server.ready, settings=settings
                    )
                )
                for host, port in admin_bound:  # with port 0, the port the kernel picked
                    shown = f"[{host}]" if ":" in host else host
                    log.info("admin endpoint on http://%s:%d/ (healthz, readyz, metrics)", shown, port)
            if demo is not None:
                user, password = demo
                host, port = addresses[0].host, addresses[0].port
                shown = f"[{host}]" if ":" in host else host
                print(
                    f"\npop3-gateway is serving the embedded demo Maildir on {shown}:{port}\n"
                    f"  account:  {user}\n  password: {password}\n"
                    f"  try:      curl -u {user}:{password} pop3://{shown}:{port}/1\n"
                    f"  or:       python3 -c \"import poplib; p=poplib.POP3('{host}', {port}); "
                    f"p.user('{user}'); p.pass_('{password}'); print(p.stat())\"\n",
                    flush=True,
                )
            async for signum in signals:
                if signum == signal.SIGHUP:
                    try:
                        plan = server.reload(reload_config())
                    except ReloadRefused as exc:
                        log.error("SIGHUP: reload refused, keeping the running configuration: %s", exc.reason)
                    except (cfg.ConfigError, OSError, ValueError) as exc:
                        log.error("SIGHUP: reload failed, keeping the running configuration: %s", exc)
                    else:
                        for warning in plan.built.warnings:
                            log.warning("%s", warning)
                        log.info("SIGHUP: configuration and TLS certificates reloaded (%s)", plan.describe())
                    continue
                log.info("signal %s: draining", signal.Signals(signum).name)
                server.drain()
                break
            # the admin endpoint goes when the POP3 service has drained
            await server.drained.wait()
            nursery.cancel_scope.cancel()
    await server.backend.aclose()
