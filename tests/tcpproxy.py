"""A loopback TCP proxy for tests: records both directions, can cut the server side after N bytes,
and can rewrite server bytes. It stands between the gateway and a real upstream; it fakes nothing."""

from __future__ import annotations

from collections.abc import Callable

import trio


class RecordingProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.client_bytes: list[bytes] = []  # what the gateway sent upstream, one entry per connection
        self.server_bytes: list[int] = []  # how many bytes the upstream sent, per connection
        self.cut_server_after: int | None = None  # close both sides after relaying this many server bytes
        self.cut_after_marker: bytes | None = None  # start counting only once this was seen from the server
        self.rewrite: Callable[[bytes], bytes] | None = None
        self.port = 0

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        try:
            async with trio.open_nursery() as nursery:
                task_status.started(self.port)
                await trio.serve_listeners(self._handle, listeners, handler_nursery=nursery)
        finally:
            with trio.CancelScope(shield=True):
                for listener in listeners:
                    await listener.aclose()

    async def _handle(self, downstream: trio.SocketStream) -> None:
        index = len(self.client_bytes)
        self.client_bytes.append(b"")
        self.server_bytes.append(0)
        try:
            upstream = await trio.open_tcp_stream(*self.target)
        except OSError:
            await downstream.aclose()
            return
        async with downstream, upstream, trio.open_nursery() as nursery:

            async def up() -> None:
                try:
                    while data := await downstream.receive_some(65536):
                        self.client_bytes[index] += data
                        await upstream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
                nursery.cancel_scope.cancel()

            async def down() -> None:
                relayed = 0
                armed = self.cut_after_marker is None
                seen = b""
                try:
                    while data := await upstream.receive_some(65536):
                        self.server_bytes[index] += len(data)
                        if self.rewrite is not None:
                            data = self.rewrite(data)
                        if not armed and self.cut_after_marker is not None:
                            seen = (seen + data)[-65536:]
                            pos = seen.find(self.cut_after_marker)
                            if pos >= 0:
                                armed = True
                                relayed = -(len(seen) - pos)  # count from the marker on
                        if armed and self.cut_server_after is not None:
                            room = self.cut_server_after - relayed
                            if room <= len(data):
                                await downstream.send_all(data[: max(room, 0)])
                                break
                        relayed += len(data)
                        await downstream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
                nursery.cancel_scope.cancel()

            nursery.start_soon(up)
            nursery.start_soon(down)
