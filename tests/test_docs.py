"""The docs cannot drift from the code: config keys, cited tests, metric names and file paths are checked."""

from __future__ import annotations

import ast
import dataclasses
import functools
import re
import tomllib
import typing
from pathlib import Path
from typing import Any, Literal

import pytest

from gateway.config import Config, DeletePolicy
from gateway.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
ROW = re.compile(r"^\|\s*`([a-z0-9_]+(?:\.(?:[a-z0-9_]+|NAME))+)`\s*\|")


# ---------------------------------------------------------------- configuration reference


def loader_keys() -> dict[str, tuple[Any, Any]]:
    """Every key the config loader accepts: ``section.key`` -> (type, default)."""
    keys: dict[str, tuple[Any, Any]] = {}
    for field in dataclasses.fields(Config):
        section_type = typing.get_type_hints(Config)[field.name]
        if typing.get_origin(section_type) is tuple:  # [[listen]]: an array of tables
            section_type = typing.get_args(section_type)[0]
        if typing.get_origin(section_type) is dict:  # [section.NAME] named tables: their keys, each
            table = typing.get_args(section_type)[1]
            table_hints = typing.get_type_hints(table)
            for leaf in dataclasses.fields(table):
                keys[f"{field.name}.NAME.{leaf.name}"] = (table_hints[leaf.name], getattr(table(), leaf.name))
            continue
        assert dataclasses.is_dataclass(section_type), field.name
        section = section_type()
        hints = typing.get_type_hints(section_type)
        for sub in dataclasses.fields(section_type):
            tp = hints[sub.name]
            if typing.get_origin(tp) is dict:  # [section.key.NAME] named tables: their keys, each
                table = typing.get_args(tp)[1]
                table_hints = typing.get_type_hints(table)
                for leaf in dataclasses.fields(table):
                    keys[f"{field.name}.{sub.name}.NAME.{leaf.name}"] = (
                        table_hints[leaf.name],
                        getattr(table(), leaf.name),
                    )
                continue
            keys[f"{field.name}.{sub.name}"] = (tp, getattr(section, sub.name))
    return keys


def documented_rows(text: str) -> dict[str, list[str]]:
    rows: dict[str, list[str]] = {}
    for line in text.splitlines():
        if match := ROW.match(line):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            assert match.group(1) not in rows, f"{match.group(1)} is documented twice"
            rows[match.group(1)] = cells
    return rows


def type_word(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(f'`"{c}"`' for c in typing.get_args(tp))
    if typing.get_origin(tp) is tuple:
        return "array of " + type_word(typing.get_args(tp)[0]) + "s"
    # DeletePolicy is written as a string in TOML and parsed once by the loader
    return {str: "string", int: "integer", float: "number", bool: "boolean", DeletePolicy: "string"}[tp]


def check_configuration_doc(text: str) -> list[str]:
    """The problems of a configuration reference; empty when it matches the loader exactly."""
    problems: list[str] = []
    keys, rows = loader_keys(), documented_rows(text)
    problems += [f"{k}: in the loader, missing from the docs" for k in sorted(keys.keys() - rows.keys())]
    problems += [
        f"{k}: documented, but the loader has no such key" for k in sorted(rows.keys() - keys.keys())
    ]
    for key in sorted(keys.keys() & rows.keys()):
        tp, default = keys[key]
        cells = rows[key]
        if len(cells) != 4:
            problems.append(f"{key}: a row needs 4 cells (key, type, default, meaning), has {len(cells)}")
            continue
        if cells[1] != type_word(tp):
            problems.append(f"{key}: type {cells[1]!r}, the loader says {type_word(tp)!r}")
        literal = cells[2].strip("`")
        try:
            documented = tomllib.loads(f"v = {literal}")["v"]
        except tomllib.TOMLDecodeError:
            problems.append(f"{key}: default {cells[2]!r} is no TOML value")
            continue
        if isinstance(default, tuple):
            default = list(default)
        if isinstance(default, DeletePolicy):  # parsed from its TOML text, which the docs show
            default = str(default)
        if documented != default or isinstance(documented, bool) != isinstance(default, bool):
            problems.append(f"{key}: default {documented!r}, the loader says {default!r}")
        if not cells[3]:
            problems.append(f"{key}: no meaning given")
    return problems


def test_configuration_doc_lists_every_key_of_the_loader_and_no_other() -> None:
    text = (DOCS / "configuration.md").read_text()
    assert len(documented_rows(text)) >= 20
    assert check_configuration_doc(text) == []


def test_the_configuration_check_catches_drift_both_ways() -> None:
    text = (DOCS / "configuration.md").read_text()
    missing = "\n".join(line for line in text.splitlines() if not line.startswith("| `server.expire` |"))
    assert check_configuration_doc(missing) == ["server.expire: in the loader, missing from the docs"]
    invented = text + "\n| `server.no_such_key` | integer | `1` | made up |\n"
    assert check_configuration_doc(invented) == [
        "server.no_such_key: documented, but the loader has no such key"
    ]
    wrong_default = text.replace(
        "| `server.max_sessions` | integer | `1000` |", "| `server.max_sessions` | integer | `999` |"
    )
    assert check_configuration_doc(wrong_default) == [
        "server.max_sessions: default 999, the loader says 1000"
    ]
    wrong_type = text.replace("| `server.in_use_lock` | boolean |", "| `server.in_use_lock` | string |")
    assert check_configuration_doc(wrong_type) == [
        "server.in_use_lock: type 'string', the loader says 'boolean'"
    ]


# ---------------------------------------------------------------- cited tests and paths


CITATION = re.compile(r"`?(tests/[\w/]+\.py)::(test_\w+)`?")
PATH = re.compile(r"`((?:gateway|tests|deploy|docs)/[\w./-]+)`")


@functools.cache  # the docs cite hundreds of tests in a few big files: parse each file once
def defined_tests(path: Path) -> frozenset[str]:
    tree = ast.parse(path.read_text())
    return frozenset(
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test_")
    )


def broken_citations(text: str) -> list[str]:
    broken = []
    for file, name in CITATION.findall(text):
        path = ROOT / file
        if not path.exists() or name not in defined_tests(path):
            broken.append(f"{file}::{name}")
    return broken


def test_the_rfc_matrix_cites_only_tests_that_exist() -> None:
    text = (DOCS / "rfc-compliance.md").read_text()
    assert len(CITATION.findall(text)) >= 50
    for rfc in ("RFC 1939", "RFC 2449", "RFC 3206", "RFC 5034", "RFC 2595", "RFC 8314"):
        assert f"## {rfc}" in text, rfc
    assert broken_citations(text) == []
    assert broken_citations("`tests/test_server.py::test_that_never_was`") == [
        "tests/test_server.py::test_that_never_was"
    ]


CHECKED_DOCS = ("architecture.md", "configuration.md", "operations.md", "rfc-compliance.md", "security.md")


@pytest.mark.parametrize("doc", [DOCS / name for name in CHECKED_DOCS], ids=lambda p: p.name)
def test_every_cited_test_and_path_in_the_docs_exists(doc: Path) -> None:
    text = doc.read_text()
    assert broken_citations(text) == []
    missing = [p for p in PATH.findall(text) if not (ROOT / p.rstrip("/.")).exists()]
    assert missing == []


def test_the_architecture_doc_names_every_module() -> None:
    text = (DOCS / "architecture.md").read_text()
    modules = {
        p.relative_to(ROOT).as_posix() for p in (ROOT / "gateway").rglob("*.py") if p.name != "__init__.py"
    }
    unnamed = sorted(m for m in modules if f"`{m}`" not in text)
    assert unnamed == []


# ---------------------------------------------------------------- metric names


def test_operations_doc_names_exactly_the_metrics_the_registry_exposes() -> None:
    exposed = {
        family.name + ("_total" if family.type == "counter" else "")
        for family in Metrics(process=False).registry.collect()
    }
    documented = set(re.findall(r"`(pop3_gateway_[a-z0-9_]+)`", (DOCS / "operations.md").read_text()))
    assert documented == exposed
