"""bench/pyrelay.py relays bytes both ways, including what the client sent at once.

It measures the least a Python hop can add (bench/proxylatency.py); a relay that
dropped the bytes sent before its upstream connection was up would hang that
benchmark, as it once did.
"""

from __future__ import annotations

import asyncio

from bench import pyrelay
from tests.servers import UNIT, connect_once_listening, free_port


async def test_bytes_go_both_ways_from_the_first() -> None:
    async def shout(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(100):
            writer.write(data.upper())
        writer.close()

    upstream = await asyncio.start_server(shout, "127.0.0.1", 0)
    target = upstream.sockets[0].getsockname()[1]
    port = free_port()
    relay = asyncio.create_task(pyrelay._serve(port, "127.0.0.1", target))
    try:
        reader, writer = await connect_once_listening(port)
        writer.write(b"sent at once")  # before the relay's own connection is up
        assert await asyncio.wait_for(reader.readexactly(12), 5 * UNIT) == b"SENT AT ONCE"
        writer.write(b"and again")
        assert await asyncio.wait_for(reader.readexactly(9), 5 * UNIT) == b"AND AGAIN"
        writer.close()
        await writer.wait_closed()
    finally:
        relay.cancel()
        await asyncio.gather(relay, return_exceptions=True)
        upstream.close()
        await upstream.wait_closed()
