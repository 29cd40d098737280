"""Routing: which upstream profile serves a login that has no account of its own (pure, no I/O).

A route is a glob on the account key (``gateway.identity.normalize`` of the typed name): ``*`` matches any
run of characters (``@`` and ``.`` included), ``?`` one character, everything else itself. Matching is
ASCII case-insensitive, whatever ``server.username_case`` says, because domains are. Character classes
(``[...]``) are refused rather than half supported. Routes are tried in order; the first match wins; no
match falls back to the default profile (``accounts.default_upstream``, normally ``"default"``, i.e.
``[upstream]``), or, when that is empty, to nothing: the login is refused.

A route only ever passes the login through as typed (``credential = "pass-through"``): a stored secret or
a token belongs to one account, never to a pattern. A first login through a route claims nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Sequence
from typing import Final, Literal

__all__ = ["MAX_GLOB_CHARS", "Route", "glob_problem", "resolve"]

MAX_GLOB_CHARS: Final = 255
_ASCII_LOWER: Final = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def glob_problem(pattern: str) -> str:
    """Why ``pattern`` cannot be a route's ``match`` ("" when it can)."""
    if not pattern:
        return "is empty"
    if len(pattern) > MAX_GLOB_CHARS:
        return f"is longer than {MAX_GLOB_CHARS} characters"
    if not pattern.isprintable() or any(c.isspace() for c in pattern):
        return "must have no whitespace or control characters"
    if "[" in pattern or "]" in pattern:
        return "character classes ([...]) are not supported: use * and ?"
    return ""


@functools.lru_cache(maxsize=1024)
def _compiled(pattern: str) -> re.Pattern[str]:
    parts = []
    for c in pattern.translate(_ASCII_LOWER):
        parts.append(".*" if c == "*" else "." if c == "?" else re.escape(c))
    return re.compile("".join(parts), re.DOTALL)


@dataclasses.dataclass(frozen=True, slots=True)
class Route:
    match: str  # a glob on the account key, e.g. "*@example.org"
    upstream: str  # a profile name: "default" ([upstream]) or a [upstreams.NAME]
    credential: Literal["pass-through"] = "pass-through"

    def __post_init__(self) -> None:
        if problem := glob_problem(self.match):
            raise ValueError(f"route match {self.match!r} {problem}")
        if self.credential != "pass-through":
            raise ValueError("a route only passes logins through (credential = 'pass-through')")

    def matches(self, key: str) -> bool:
        return _compiled(self.match).fullmatch(key.translate(_ASCII_LOWER)) is not None


def resolve(routes: Sequence[Route], key: str, default: str) -> str | None:
    """The profile for the account key ``key``: the first matching route's, else ``default`` ("" = none)."""
    for route in routes:
        if route.matches(key):
            return route.upstream
    return default or None
