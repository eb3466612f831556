"""A byte relay in Python (asyncio protocols on uvloop): the least a Python hop can cost.

Every connection accepted on ``--port`` gets its own connection to
``--target``; bytes go both ways as they come, one ``transport.write`` per
``data_received``, with reading paused while the other side's buffer is
full. No HTTP, no pool, no headers: bench/proxylatency.py runs it beside
``socat`` (the same relay in C) and the gateway's ``CORE_URL`` hop, so that
the added p50 splits into what any second process costs, what Python's event
loop adds to that, and what the gateway's own work adds.

    .venv/bin/python -m bench.pyrelay --port 9001 --target 127.0.0.1:9000
"""

from __future__ import annotations

import argparse
import asyncio
import socket
from typing import cast

import uvloop


class _Side(asyncio.Protocol):
    """One end of a relayed pair: what it receives, its peer writes."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = None
        #: What came before the other side was connected (uvloop starts reading
        #: after ``connection_made`` whatever it asked).
        self.early: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.write(data)
        else:
            self.early.append(data)

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()


class _Front(_Side):
    def __init__(self, host: str, port: int) -> None:
        super().__init__()
        self._target = (host, port)
        self._connecting: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._connecting = asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, back = await loop.create_connection(_Side, *self._target)
        except OSError:
            if self.transport is not None:
                self.transport.close()
            return
        if self.transport is None or self.transport.is_closing():  # the client left meanwhile
            if back.transport is not None:
                back.transport.close()
            return
        back.peer, self.peer = self, back
        if back.transport is not None and self.early:
            back.transport.write(b"".join(self.early))
            self.early = []


async def _serve(port: int, host: str, target_port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Front(host, target_port), "127.0.0.1", port)
    async with server:
        await server.serve_forever()


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--target", required=True, help="host:port")
    args = p.parse_args()
    host, _, port = args.target.rpartition(":")
    uvloop.run(_serve(args.port, host, int(port)))


if __name__ == "__main__":
    main()
