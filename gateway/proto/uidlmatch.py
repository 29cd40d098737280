"""Which known message is which new one: the one matching rule of the UIDL store and ``uidl import`` (pure).

A *known* message has a UIDL already: a row of the store whose message vanished from the snapshot (the
upstream renumbered it), or a message of the old POP3 server ``uidl import`` reads. A *seen* message is
new in the snapshot and has none yet. The rule, as Dovecot's pop3-migration plugin matches:

1. Only the same size and the same header SHA-1 (``gateway.proto.uidl.header_hash``) can match; a
   message whose header hash is unknown matches nothing.
2. Within one (size, header) group: when the known messages have different bodies, the headers are not
   enough and the body SHA-1 decides (a seen message without a body hash, or with another body, matches
   nothing); otherwise the messages are identical as far as anyone can tell and are paired in order.
3. ``strict`` (``uidl import``, where the old server says nothing about bodies): a group whose counts
   differ on the two sides is ambiguous and pairs nothing; then, for the known messages whose group had
   no seen message at all, the header hash alone, when it is unique on both sides among those left
   (servers that count sizes differently).

Invariants (tested with hypothesis): a known message is paired at most once, a seen message at most
once (so a UIDL is never given to two messages), and a pair always agrees on size and header (rule 1),
except for the header-alone pass of ``strict``, which agrees on the header.

Which seen messages are worth a header read (``header_candidates``) and which then need their body read
(``body_candidates``) follow from the same rule; ``header_candidates`` takes the per-login cap, so that
a sender who mails many messages of a vanished row's size cannot make every login read them all.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import NamedTuple

__all__ = ["Known", "Pairing", "Seen", "body_candidates", "header_candidates", "pair"]


class Known(NamedTuple):
    """A message that has a UIDL (a vanished row, an old server's message)."""

    ident: str
    size: int
    header_sha1: str | None
    body_sha1: str | None = None


class Seen(NamedTuple):
    """A message of the snapshot that has no UIDL yet."""

    ident: str
    size: int
    header_sha1: str | None = None
    body_sha1: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Pairing:
    pairs: tuple[tuple[Known, Seen], ...]  # in the order of the seen messages (strict: of the known)
    ambiguous: tuple[Known, ...] = ()  # strict only: groups whose counts differ
    by_header_only: int = 0
    paired_duplicates: int = 0  # pairs made in order inside a group of identical messages

    def unmatched_known(self, known: Iterable[Known]) -> list[Known]:
        used = {k.ident for k, _ in self.pairs} | {k.ident for k in self.ambiguous}
        return [k for k in known if k.ident not in used]

    def unmatched_seen(self, seen: Iterable[Seen]) -> list[Seen]:
        used = {s.ident for _, s in self.pairs}
        return [s for s in seen if s.ident not in used]


def _sizes_with_header(known: Iterable[Known]) -> set[int]:
    return {k.size for k in known if k.header_sha1 is not None}


def header_candidates(known: Sequence[Known], seen: Sequence[Seen], cap: int) -> tuple[list[str], int]:
    """The seen messages worth a header read (a known one with a header hash has their size), in the
    given order, at most ``cap`` of them; and how many more there were (they will get new UIDLs)."""
    if not known or not seen:
        return [], 0
    sizes = _sizes_with_header(known)
    wanted = [s.ident for s in seen if s.size in sizes]
    cap = max(cap, 0)
    return wanted[:cap], max(len(wanted) - cap, 0)


def _groups(known: Iterable[Known]) -> dict[tuple[int, str], list[Known]]:
    groups: dict[tuple[int, str], list[Known]] = {}
    for k in known:
        if k.header_sha1 is not None:
            groups.setdefault((k.size, k.header_sha1), []).append(k)
    return groups


def _bodies_differ(group: Sequence[Known]) -> bool:
    return len(group) > 1 and len({k.body_sha1 for k in group}) > 1


def body_candidates(known: Sequence[Known], seen: Sequence[Seen]) -> list[str]:
    """The seen messages (with their header hash) whose group's known messages differ in body."""
    groups = _groups(known)
    out = []
    for s in seen:
        if s.header_sha1 is None:
            continue
        group = groups.get((s.size, s.header_sha1))
        if group is not None and _bodies_differ(group):
            out.append(s.ident)
    return out


def pair(known: Sequence[Known], seen: Sequence[Seen], *, strict: bool = False) -> Pairing:
    """Pair known and seen messages by the rule above. Order matters: inside a group of identical
    messages the first known goes to the first seen."""
    groups = _groups(known)
    seen_groups: dict[tuple[int, str], list[Seen]] = {}
    for s in seen:
        if s.header_sha1 is not None:
            seen_groups.setdefault((s.size, s.header_sha1), []).append(s)
    pairs: list[tuple[Known, Seen]] = []
    ambiguous: list[Known] = []
    blocked: set[str] = set()  # seen messages of ambiguous groups: not for the header-alone pass either
    duplicates = 0
    for gkey, news in seen_groups.items():
        olds = groups.get(gkey)
        if not olds:
            continue
        if strict and len(olds) != len(news):
            ambiguous += olds
            blocked.update(s.ident for s in news)
            continue
        if _bodies_differ(olds):
            free = list(olds)
            for s in news:
                chosen = next(
                    (k for k in free if s.body_sha1 is not None and k.body_sha1 == s.body_sha1), None
                )
                if chosen is not None:
                    free.remove(chosen)
                    pairs.append((chosen, s))
        else:
            made = list(zip(olds, news, strict=False))
            if len(olds) > 1 and len(news) > 1:
                duplicates += len(made)
            pairs += made
    by_header_only = 0
    if strict:
        used_seen = {s.ident for _, s in pairs} | blocked
        used_known = {k.ident for k, _ in pairs} | {k.ident for k in ambiguous}
        left_known = [
            k
            for k in known
            if k.ident not in used_known
            and k.header_sha1 is not None
            and (k.size, k.header_sha1) not in seen_groups
        ]
        left_seen = [s for s in seen if s.ident not in used_seen and s.header_sha1 is not None]
        by_header_known: dict[str, list[Known]] = {}
        for k in left_known:
            by_header_known.setdefault(k.header_sha1 or "", []).append(k)
        by_header_seen: dict[str, list[Seen]] = {}
        for s in left_seen:
            by_header_seen.setdefault(s.header_sha1 or "", []).append(s)
        for header, olds in by_header_known.items():
            news = by_header_seen.get(header, [])
            if len(olds) == 1 and len(news) == 1:
                pairs.append((olds[0], news[0]))
                by_header_only += 1
        order = {k.ident: i for i, k in enumerate(known)}
        pairs.sort(key=lambda p: order[p[0].ident])
    else:
        order = {s.ident: i for i, s in enumerate(seen)}
        pairs.sort(key=lambda p: order[p[1].ident])
    return Pairing(tuple(pairs), tuple(ambiguous), by_header_only, duplicates)
