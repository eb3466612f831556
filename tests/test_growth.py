"""State that one party could make a process, Redis or PostgreSQL keep, without bound.

Found by the growth review of the fifteenth session (2026-12-03), each test
failed before its fix:

* header names were remembered whatever their length: 1,000 requests from a
  client with no token, each with one made-up 60 KB name, left ~90 MB in the
  process for good and ~120 MB more until other names pushed them out;
* the memory broker (one process, no ``REDIS_URL``: ``make run``) forgot an
  expired history only when its channel was used again, so every project
  ever written kept its ``projects:<id>`` history for the process's life;
* one account could create projects without end (2,382 in a minute, 53 MB of
  table and 246 MB of Redis history from one ordinary account), and every
  user's ``GET /api/projects`` pages through them.
"""

from __future__ import annotations

import asyncio
import gc
import tracemalloc

from core.infra.broker import MemoryBroker
from tests.harness import running_gateway
from tests.servers import UNIT

#: A header name no client needs, distinct per request.
NAME_BYTES = 20_000


def _head(path: str, i: int, extra: bytes = b"") -> bytes:
    name = b"X-%06d-" % i + b"a" * (NAME_BYTES - 9)
    return b"GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\n%s%s: 1\r\n\r\n" % (path.encode(), extra, name)


async def _answer(reader: asyncio.StreamReader) -> int:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5 * UNIT)
    length = next(
        (int(line.split(b":")[1]) for line in head.split(b"\r\n")
         if line.lower().startswith(b"content-length:")),
        0,
    )  # fmt: skip
    await asyncio.wait_for(reader.readexactly(length), 5 * UNIT)
    return int(head.split(b" ", 2)[1])


async def test_long_header_names_from_a_client_with_no_token_are_not_kept() -> None:
    upgrade = (
        b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    )
    async with running_gateway() as gw:
        tracemalloc.start()
        try:
            gc.collect()
            before = tracemalloc.get_traced_memory()[0]
            # Tornado's path, on one kept-alive connection
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            statuses = []
            for i in range(300):
                writer.write(_head("/healthz", i))
                statuses.append(await _answer(reader))
            writer.close()
            # the listener's own parser: a handshake whole at its accept
            for i in range(300, 600):
                reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
                writer.write(_head("/ws", i, upgrade))
                statuses.append(await _answer(reader))
                writer.close()
            await asyncio.sleep(0.1 * UNIT)
            gc.collect()
            kept = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
    assert statuses == [200] * 300 + [401] * 300
    # 600 names of 20 KB were sent (12 MB); before, ~24 MB of them were kept
    assert kept < 3_000_000, f"{kept:,} bytes kept after 600 requests"


async def test_the_memory_broker_forgets_expired_histories_nobody_uses_again() -> None:
    broker = MemoryBroker()
    await broker.start(lambda ch, data, position: None)
    ttl = 0.2 * UNIT
    tracemalloc.start()
    try:
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        for i in range(1000):  # a project's channel each, written once (50 MB)
            data = b'"%d%s"' % (i, b"x" * 50_000)
            await broker.publish_history(f"projects:{i}", data, 100, ttl)
        await asyncio.sleep(2 * ttl)
        await broker.publish_history("projects:next", b"1", 100, ttl)
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
        await broker.close()
    assert await broker.history("projects:0", 0, 100) == ([], None)
    # before, all 50 MB stayed until each channel was used again
    assert kept < 1_000_000, f"{kept:,} bytes kept after the histories expired"
