"""Errors the shell raises for the command line to render as one line (never a traceback).

``ListenError``: a listener could not be opened (port in use, address not on this host, a privileged port
without the capability). It carries which listener (``role``: ``"pop3"`` or ``"admin"``) and the address
as configured, so ``pop3-gateway serve`` can say
``pop3-gateway: cannot listen on 127.0.0.1:9110 (admin): address already in use`` and exit 1.
``open_tcp_listeners`` is the one way the shell opens a listener, so every bind failure carries that.
"""

from __future__ import annotations

import os
from typing import Literal

import trio

from gateway.config import parse_host_port

ListenerRole = Literal["pop3", "admin"]


class ListenError(OSError):
    """Binding ``address`` for ``role`` failed; ``errno`` and ``strerror`` are the socket error's."""

    def __init__(self, address: str, role: ListenerRole, cause: OSError) -> None:
        super().__init__(cause.errno, cause.strerror or str(cause))
        self.address = address
        self.role = role

    @property
    def reason(self) -> str:
        """The socket error as words, lower case first: ``address already in use``."""
        text = self.strerror or (os.strerror(self.errno) if self.errno else "failed")
        return text[:1].lower() + text[1:]

    def __str__(self) -> str:
        return f"cannot listen on {self.address} ({self.role}): {self.reason}"


async def open_tcp_listeners(address: str, role: ListenerRole) -> list[trio.SocketListener]:
    """``trio.open_tcp_listeners`` for HOST:PORT, raising ``ListenError`` naming it when binding fails."""
    host, port = parse_host_port(address)
    try:
        return await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise ListenError(address, role, exc) from exc
