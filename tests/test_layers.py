"""The architecture is enforced, not just described: gateway/proto stays sans-IO."""

from __future__ import annotations

import ast
from pathlib import Path

import gateway.proto

FORBIDDEN = {"trio", "socket", "ssl", "sqlite3", "time", "logging", "asyncio", "httpx", "h11", "selectors"}
PROTO = Path(gateway.proto.__file__).parent


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
            if node.module.startswith("gateway.") and not node.module.startswith("gateway.proto"):
                found.add(node.module)
    return found


def test_proto_modules_import_no_io() -> None:
    files = sorted(PROTO.glob("*.py"))
    assert len(files) >= 4
    for path in files:
        bad = imported_modules(path) & FORBIDDEN
        assert not bad, f"{path.name} imports {bad}"


def test_proto_does_not_depend_on_outer_layers() -> None:
    for path in PROTO.glob("*.py"):
        outer = {m for m in imported_modules(path) if m.startswith("gateway.")}
        assert not outer, f"{path.name} imports {outer}"


def test_proto_has_no_async_code() -> None:
    for path in PROTO.glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        asyncs = [n for n in ast.walk(tree) if isinstance(n, ast.AsyncFunctionDef | ast.Await)]
        assert not asyncs, f"{path.name} has async code"


def test_the_checker_catches_a_forbidden_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import trio\nfrom socket import socket\nfrom gateway.server import Server\n")
    assert {"trio", "socket"} <= imported_modules(bad)
    assert "gateway.server" in imported_modules(bad)
