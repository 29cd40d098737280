"""``pop3-gateway uidl import``: take the UIDLs (and the order) an old POP3 server gave, so that clients in
"leave messages on server" mode download nothing again after the switch.

1. The old server: UIDL, LIST and ``TOP n 0`` of every message (poplib; pop3://, pop3s://, or STLS).
2. The upstream: the account's snapshot through the configured backend, and each message's header block.
3. Match by the store's own rule (``gateway.proto.uidlmatch``, strict): the same size and the same header
   SHA-1 (headers that differ between stores dropped). Groups of identical messages are paired in order.
   Then, for what is left, the header hash alone when it is unique on both sides (servers that count
   sizes differently). Everything else is reported.
4. Unless ``--dry-run``: one store transaction writes the old UIDLs and positions. Nothing unmatched is
   dropped silently: the report lists every message on either side that got no old UIDL.
"""

from __future__ import annotations

import dataclasses
import poplib
import ssl
import urllib.parse
from collections.abc import Sequence

from gateway.backends.base import Backend, Entry, PasswordLogin
from gateway.durable import fingerprint
from gateway.proto import uidl as rules
from gateway.proto.uidlmatch import Known, Seen, pair
from gateway.store import Item, UidlStore


@dataclasses.dataclass(frozen=True, slots=True)
class OldMessage:
    number: int
    uidl: str
    size: int
    header_sha1: str
    label: str  # Subject / Message-ID, for the report


@dataclasses.dataclass(frozen=True, slots=True)
class NewMessage:
    index: int
    entry: Entry
    header_sha1: str | None


@dataclasses.dataclass
class Report:
    matched: list[tuple[OldMessage, NewMessage]] = dataclasses.field(default_factory=list)
    matched_by_headers_only: int = 0
    paired_duplicates: int = 0
    ambiguous: list[OldMessage] = dataclasses.field(default_factory=list)
    unmatched_old: list[OldMessage] = dataclasses.field(default_factory=list)
    unmatched_new: list[NewMessage] = dataclasses.field(default_factory=list)

    def lines(self) -> list[str]:
        out = [
            f"old server messages:      {len(self.matched) + len(self.ambiguous) + len(self.unmatched_old)}",
            f"upstream messages:        {len(self.matched) + len(self.unmatched_new)}",
            f"matched:                  {len(self.matched)}"
            f" (by headers only: {self.matched_by_headers_only}, identical copies paired in order:"
            f" {self.paired_duplicates})",
            f"ambiguous (not imported): {len(self.ambiguous)}",
            f"unmatched on old server:  {len(self.unmatched_old)}",
            f"unmatched upstream:       {len(self.unmatched_new)}",
        ]
        for m in self.ambiguous:
            out.append(f"  ambiguous old #{m.number} uidl={m.uidl} size={m.size} {m.label}")
        for m in self.unmatched_old:
            out.append(f"  only on old server: #{m.number} uidl={m.uidl} size={m.size} {m.label}")
        for n in self.unmatched_new:
            out.append(f"  only upstream: id={n.entry.upstream_id} size={n.entry.size}")
        return out


@dataclasses.dataclass(frozen=True, slots=True)
class OldServer:
    host: str
    port: int
    user: str
    implicit_tls: bool
    starttls: bool


def parse_source(url: str, *, starttls: bool = False) -> OldServer:
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("pop3", "pop3s"):
        raise ValueError(f"--from must be pop3://user@host:port or pop3s://..., got {url!r}")
    if not parts.hostname or not parts.username:
        raise ValueError("--from needs a user and a host: pop3://user@host:port")
    implicit = scheme == "pop3s"
    port = parts.port or (995 if implicit else 110)
    return OldServer(parts.hostname, port, urllib.parse.unquote(parts.username), implicit, starttls)


def _label(header_block: bytes) -> str:
    subject = mid = ""
    for line in header_block.split(b"\n"):
        low = line.lower()
        if low.startswith(b"subject:") and not subject:
            subject = line[8:].strip().decode("utf-8", "replace")[:60]
        elif low.startswith(b"message-id:") and not mid:
            mid = line[11:].strip().decode("utf-8", "replace")[:80]
    return f"subject={subject!r} message-id={mid}"


def read_old_server(
    src: OldServer, password: str, ctx: ssl.SSLContext | None, timeout: float = 60
) -> list[OldMessage]:
    """Everything needed from the old server, in its order (blocking: run it in a thread)."""
    if src.implicit_tls:
        p: poplib.POP3 = poplib.POP3_SSL(src.host, src.port, context=ctx, timeout=timeout)
    else:
        p = poplib.POP3(src.host, src.port, timeout=timeout)
        if src.starttls:
            p.stls(context=ctx)
    try:
        p.user(src.user)
        p.pass_(password)
        uidls: dict[int, str] = {}
        for line in p.uidl()[1]:
            num_text, uid = line.decode("ascii", "replace").split(" ", 1)
            uidls[int(num_text)] = uid.strip()
        sizes: dict[int, int] = {}
        for line in p.list()[1]:
            num_raw, size_raw = line.split()
            sizes[int(num_raw)] = int(size_raw)
        out = []
        for number in sorted(uidls):
            lines = p.top(number, 0)[1]
            block = b"\r\n".join(lines) + b"\r\n"
            header = rules.header_hash(block)
            out.append(OldMessage(number, uidls[number], sizes.get(number, -1), header, _label(block)))
        return out
    finally:
        try:
            p.quit()
        except (poplib.error_proto, OSError):
            p.close()


async def read_upstream(backend: Backend, account: str, password: str) -> tuple[str, list[NewMessage]]:
    async with backend.open_maildrop(PasswordLogin(account, password)) as drop:
        out = []
        for i, entry in enumerate(drop.entries):
            header, _ = await fingerprint(drop, i, whole=False)
            out.append(NewMessage(i, entry, header))
        name = backend.lock_key(drop.identity)  # the namespace logins use, however the name was typed
    return name, out


def match(old: Sequence[OldMessage], new: Sequence[NewMessage]) -> Report:
    """The store's matching rule (``gateway.proto.uidlmatch``), strict: see the module's step 3."""
    known = [Known(str(o.number), o.size, o.header_sha1) for o in old]
    seen = [Seen(str(n.index), n.entry.size, n.header_sha1) for n in new]
    result = pair(known, seen, strict=True)
    olds = {str(o.number): o for o in old}
    news = {str(n.index): n for n in new}
    return Report(
        matched=[(olds[k.ident], news[s.ident]) for k, s in result.pairs],
        matched_by_headers_only=result.by_header_only,
        paired_duplicates=result.paired_duplicates,
        ambiguous=[olds[k.ident] for k in result.ambiguous],
        unmatched_old=[olds[k.ident] for k in result.unmatched_known(known)],
        unmatched_new=[news[s.ident] for s in result.unmatched_seen(seen)],
    )


def write(store: UidlStore, name: str, account: str, report: Report) -> int:
    mapping = [
        (
            Item(n.entry.stable_key, n.entry.size, n.entry.uidl, n.entry.uid, n.entry.uidvalidity),
            o.uidl,
            o.number,
        )
        for o, n in report.matched
    ]
    return store.import_uidls(name, account, mapping)
