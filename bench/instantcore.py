"""A stand-in for the REST core that answers at once: what a hop in front of it costs, hot.

Every request on a kept-alive connection gets the same 200 with a JSON body
of ``--body-bytes`` (the bench's ``GET /api/projects?limit=20`` is about
15 KB), written as the core writes its answers (`core.fastrest.answer_bytes`:
the request id it was sent echoed, ``Date``, ``Content-Type``,
``Content-Length``), so the gateway in front of it takes the same verbatim
path as in front of the real core. No database, no token check, no routing:
bench/proxylatency.py ``--instant-core`` puts it where the core was, so that
what a hop adds, and the CPU it spends per request, is measured with no
core and no PostgreSQL running between two requests to empty the caches
(the regime of a gateway under steady load), and the figure moves by
microseconds, not by what the core's minute was like.

    .venv/bin/python -m bench.instantcore --port 9000
"""

from __future__ import annotations

import argparse
import asyncio
import re
import socket
from email.utils import formatdate
from typing import cast

import uvloop

from core.fastrest import answer_bytes
from core.request import Response

_REQUEST_ID = re.compile(rb"\r\nx-request-id: *([A-Za-z0-9._:-]{1,64}) *\r\n", re.IGNORECASE)


def body_of(size: int) -> bytes:
    """A JSON page of projects of about ``size`` bytes (at least one project)."""
    items = []
    total = 12
    n = 0
    while total < size or not items:
        item = (
            f'{{"id":{n},"name":"project {n:06d}","owner_id":"user-{n % 97:03d}",'
            f'"created_at":"2026-01-01T00:00:00.000000Z","updated_at":"2026-01-01T00:00:00Z"}}'
        )
        items.append(item)
        total += len(item) + 1
        n += 1
    return ('{"items":[' + ",".join(items) + '],"next":null}').encode()


class _Answering(asyncio.Protocol):
    """One connection: each whole request head (no body is expected) gets the answer."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head, self.buffer = self.buffer[: end + 2], self.buffer[end + 4 :]
            found = _REQUEST_ID.search(head)
            rid = found.group(1).decode() if found else "instant"
            resp = Response(200, self.body, {"X-Request-Id": rid})
            date = formatdate(usegmt=True)
            assert self.transport is not None
            self.transport.write(answer_bytes(resp, "GET", date, close=False))


async def _serve(port: int, body: bytes) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Answering(body), "127.0.0.1", port)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.instantcore", description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--body-bytes", type=int, default=15000)
    args = parser.parse_args(argv)
    uvloop.run(_serve(args.port, body_of(args.body_bytes)))


if __name__ == "__main__":
    main()
