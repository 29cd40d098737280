"""The ``pop3-gateway`` command: serve, check-config, user add."""

from __future__ import annotations

import argparse
import getpass
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import trio

from gateway import __version__
from gateway import config as cfg
from gateway.logsetup import setup as setup_logging

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
    serve.add_argument("--upstream", metavar="URL", help="maildir:///path (imap://, jmap+https:// later)")
    serve.add_argument("--state-dir", metavar="DIR", help="where the UIDL store and the demo live")
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "check-config":
            return _check_config(args.file)
        if args.command == "user":
            return _user_add(args)
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
    )


def _check_config(path: str) -> int:
    config = cfg.load(path)
    from gateway.backends import make_backend

    make_backend(config)
    print(f"{path}: OK ({len(config.listen)} listener(s), upstream {config.upstream.url or 'embedded demo'})")
    return 0


def _user_add(args: argparse.Namespace) -> int:
    from gateway import accounts

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
    users_file.parent.mkdir(parents=True, exist_ok=True)
    accounts.add_user(users_file, args.name, password, apop)
    print(f"user {args.name} written to {users_file}")
    return 0


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
    from gateway.backends import make_backend
    from gateway.server import Server

    demo = None
    if not config.upstream.url:
        from gateway import accounts

        demo = accounts.ensure_demo(config.state_path)
    backend = make_backend(config)
    try:
        server = Server(config, backend)
    except (OSError, ValueError) as exc:
        print(f"pop3-gateway: cannot load TLS certificates: {exc}", file=sys.stderr)
        return 2
    try:
        trio.run(_serve_until_signal, server, demo)
    except OSError as exc:
        print(f"pop3-gateway: cannot listen: {exc}", file=sys.stderr)
        return 1
    return 0


async def _serve_until_signal(server: object, demo: tuple[str, str] | None) -> None:
    from gateway.server import Server

    assert isinstance(server, Server)
    from gateway.store import AsyncUidlStore

    store = AsyncUidlStore(server.config.state_path / "uidl.sqlite3")
    await store.open()
    server.store = store
    try:
        await _serve_signals(server, demo)
    finally:
        with trio.CancelScope(shield=True):
            await store.aclose()


async def _serve_signals(server: object, demo: tuple[str, str] | None) -> None:
    from gateway.server import Server

    assert isinstance(server, Server)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            addresses = await nursery.start(server.serve)
            for bound in addresses:
                log.info("listening on %s:%d (tls=%s)", bound.host, bound.port, bound.tls)
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
                log.info("signal %s: draining", signal.Signals(signum).name)
                server.drain()
                break
    await server.backend.aclose()
