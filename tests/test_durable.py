"""The durable layer on the in-memory backend: the per-login cap on fingerprint reads, reads in parallel,
and size corrections that outlive the process."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from pathlib import Path

import pytest
import trio

from gateway import durable
from gateway.backends.base import Entry, SizeChanged
from gateway.proto.uidl import header_hash
from gateway.store import AsyncUidlStore, StoreError
from tests.fakes import FakeBackend, FakeMaildrop

NAME = "fake:alice"


def message(n: int, tag: str = "spam") -> bytes:
    return f"Subject: {tag} {n:06d}\r\nMessage-ID: <{tag}{n:06d}@x>\r\n\r\nsame length body\r\n".encode()


class Counting:
    """A maildrop that counts streams, and the most open at once."""

    def __init__(self, inner: FakeMaildrop) -> None:
        self.inner = inner
        self.streams = 0
        self.active = 0
        self.most = 0

    @property
    def entries(self) -> Sequence[Entry]:
        return self.inner.entries

    @property
    def identity(self) -> str:
        return self.inner.identity

    async def stream(self, index: int, *, top_lines: int | None = None) -> AsyncGenerator[bytes, None]:
        self.streams += 1
        self.active += 1
        self.most = max(self.most, self.active)
        try:
            for _ in range(3):
                await trio.lowlevel.checkpoint()
            async with contextlib.aclosing(self.inner.stream(index, top_lines=top_lines)) as chunks:
                async for chunk in chunks:
                    yield chunk
        finally:
            self.active -= 1

    def note_size(self, index: int, octets: int) -> None:
        self.inner.note_size(index, octets)

    async def apply_deletions(self, indexes: Sequence[int]) -> None:
        await self.inner.apply_deletions(indexes)


@contextlib.asynccontextmanager
async def opened(path: Path, **kwargs: int) -> AsyncIterator[AsyncUidlStore]:
    store = AsyncUidlStore(path, **kwargs)  # type: ignore[arg-type]
    await store.open()
    try:
        yield store
    finally:
        await store.aclose()


async def attach(
    backend: FakeBackend, store: AsyncUidlStore, **kwargs: int
) -> tuple[durable.DurableMaildrop, Counting]:
    drop = Counting(FakeMaildrop(backend, "alice"))
    wrapped = await durable.attach(drop, store, name=NAME, account="alice", fmt="native", **kwargs)  # type: ignore[arg-type]
    return wrapped, drop


async def test_a_flood_of_messages_the_size_of_a_vanished_one_costs_a_capped_number_of_reads_once(
    tmp_path: Path,
) -> None:
    real = message(0, tag="real")
    box = {"m0": real}
    backend = FakeBackend({"alice": "pw"}, {"alice": box})
    async with opened(tmp_path / "u.db") as store:
        first, _ = await attach(backend, store)
        uidl = first.entries[0].uidl
        await store.record_fingerprints(
            NAME, [("m0", header_hash(real.split(b"\r\n\r\n")[0] + b"\r\n\r\n"), None)]
        )
        # the message comes back under a new id, behind 40 others of its very size
        box.clear()
        box["r0"] = real
        box.update({f"s{i}": message(i) for i in range(40)})
        wrapped, drop = await attach(backend, store, max_fingerprints=5, concurrency=4)
        assert drop.streams == 5  # not 41: the rest got new UIDLs
        assert drop.most > 1  # read in parallel
        uidls = [e.uidl for e in wrapped.entries]
        assert uidls[0] == uidl  # the renumbered message is rematched
        assert len(set(uidls)) == 41
        # and they are stored: the next login reads nothing
        again, drop = await attach(backend, store, max_fingerprints=5)
        assert drop.streams == 0
        assert [e.uidl for e in again.entries] == uidls


async def test_a_failed_header_read_fails_the_login_and_gives_no_uidl(tmp_path: Path) -> None:
    real = message(0, tag="real")
    box = {"m0": real}
    backend = FakeBackend({"alice": "pw"}, {"alice": box})
    async with opened(tmp_path / "u.db") as store:
        await attach(backend, store)
        await store.record_fingerprints(NAME, [("m0", "H", None)])
        box.clear()
        box.update({f"s{i}": message(i) for i in range(6)})
        backend.fail_after_chunks = 0
        with pytest.raises(Exception) as caught:
            await attach(backend, store)
        assert "upstream died" in str(caught.value)
        backend.fail_after_chunks = None
        wrapped, _ = await attach(backend, store)
        assert len({e.uidl for e in wrapped.entries}) == 6


async def test_a_size_correction_is_listed_by_the_next_session_after_a_restart(tmp_path: Path) -> None:
    box = {"a": message(1), "b": message(2)}
    backend = FakeBackend({"alice": "pw"}, {"alice": box})
    listed = len(box["a"])
    async with opened(tmp_path / "u.db") as store:
        wrapped, _ = await attach(backend, store)
        wrapped.note_size(0, listed + 7)  # RETR sent 7 octets more than LIST said
        await wrapped.flush()
        assert backend.noted_sizes == {"a": listed + 7}  # the backend still learns it too
    async with opened(tmp_path / "u.db") as store:  # a new process: the backend's memory is gone
        wrapped, _ = await attach(backend, store)
        assert [e.size for e in wrapped.entries] == [listed + 7, len(box["b"])]
        again, _ = await attach(backend, store)  # the cached answer says the same
        assert [e.size for e in again.entries] == [listed + 7, len(box["b"])]


async def test_a_size_the_backend_learns_itself_is_kept_too(tmp_path: Path) -> None:
    box = {"a": message(1)}
    backend = FakeBackend({"alice": "pw"}, {"alice": box})

    class Changing(FakeMaildrop):
        async def stream(self, index: int, *, top_lines: int | None = None) -> AsyncGenerator[bytes, None]:
            raise SizeChanged("listed one size, upstream sends another", 999)
            yield b""  # pragma: no cover

    async with opened(tmp_path / "u.db") as store:
        wrapped = await durable.attach(
            Changing(backend, "alice"), store, name=NAME, account="alice", fmt="native"
        )
        with pytest.raises(SizeChanged):
            async with contextlib.aclosing(wrapped.stream(0)) as chunks:
                async for _ in chunks:
                    pass
        await wrapped.flush()
    async with opened(tmp_path / "u.db") as store:
        wrapped, _ = await attach(backend, store)
        assert wrapped.entries[0].size == 999


async def test_a_store_failure_at_login_is_a_temporary_failure(tmp_path: Path) -> None:
    from gateway.backends.base import TempFailure

    backend = FakeBackend({"alice": "pw"}, {"alice": {"a": message(1)}})
    async with opened(tmp_path / "u.db") as store:
        store._s().engine.db.close()  # type: ignore[attr-defined]
        for reader in store._s().engine._all_readers:  # type: ignore[attr-defined]
            reader.close()
        with pytest.raises(StoreError) as caught:
            await attach(backend, store)
        assert isinstance(caught.value, TempFailure)
