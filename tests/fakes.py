"""An in-memory backend for fast tests of the shell. Never a stand-in for the real-server tests."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import AsyncGenerator, AsyncIterator, Sequence

import trio

from gateway.backends.base import (
    ApopLogin,
    AuthFailed,
    Entry,
    Login,
    MessageGone,
    NotReachable,
    PasswordLogin,
    TempFailure,
)
from gateway.proto.body import wire_size


class FakeMaildrop:
    def __init__(self, backend: FakeBackend, user: str) -> None:
        self.backend = backend
        self.user = user
        self.identity = user  # the fake upstream is case-sensitive: the name as given is the account
        box = backend.boxes[user]
        self._ids = list(box)
        self._entries = [Entry(mid, wire_size(box[mid]), f"uid-{mid}") for mid in self._ids]

    @property
    def entries(self) -> Sequence[Entry]:
        return self._entries

    async def stream(self, index: int, *, top_lines: int | None = None) -> AsyncGenerator[bytes, None]:
        mid = self._ids[index]
        box = self.backend.boxes[self.user]
        if mid not in box:
            raise MessageGone(mid)
        data = box[mid]
        step = self.backend.chunk_size
        for i in range(0, len(data), step):
            if self.backend.fail_after_chunks is not None and i // step >= self.backend.fail_after_chunks:
                raise TempFailure("upstream died")
            await trio.sleep(0)
            yield data[i : i + step]

    def note_size(self, index: int, octets: int) -> None:
        self.backend.noted_sizes[self._ids[index]] = octets

    async def apply_deletions(self, indexes: Sequence[int]) -> None:
        self.backend.deletion_batches.append([self._ids[i] for i in indexes])
        if self.backend.fail_deletions:
            raise TempFailure("deletion failed")
        box = self.backend.boxes[self.user]
        for i in indexes:
            box.pop(self._ids[i], None)


class FakeBackend:
    name = "fake"
    supports_apop = True

    async def apop_available(self) -> bool:
        return self.supports_apop

    def __init__(self, users: dict[str, str], boxes: dict[str, dict[str, bytes]]) -> None:
        self.users = users
        self.boxes = boxes
        self.apop_secrets: dict[str, str] = {}
        self.chunk_size = 4096
        self.fail_after_chunks: int | None = None
        self.fail_deletions = False
        self.login_delay = 0.0
        self.deletion_batches: list[list[str]] = []
        self.noted_sizes: dict[str, int] = {}
        self.close_delay = 0.0
        self.open_drops = 0
        self.unreachable = ""  # set: probe() raises NotReachable with this text
        self.probes = 0

    def lock_key(self, username: str) -> str:
        return f"fake:{username}"

    @contextlib.asynccontextmanager
    async def open_maildrop(self, login: Login) -> AsyncIterator[FakeMaildrop]:
        if self.login_delay:
            await trio.sleep(self.login_delay)
        match login:
            case PasswordLogin(user, password):
                if self.users.get(user) != password:
                    raise AuthFailed(user)
            case ApopLogin(user, timestamp, digest):
                secret = self.apop_secrets.get(user)
                if secret is None or hashlib.md5((timestamp + secret).encode()).hexdigest() != digest:
                    raise AuthFailed(user)
        self.open_drops += 1
        try:
            yield FakeMaildrop(self, login.username)
        finally:
            await trio.sleep(self.close_delay)  # an upstream LOGOUT takes a round trip
            self.open_drops -= 1

    async def probe(self) -> None:
        self.probes += 1
        if self.unreachable:
            raise NotReachable(self.unreachable)

    async def aclose(self) -> None:
        pass
