"""The reference server: a `websockets` echo server, run as its own process.

``python -m tests.conformance.reference --port N --max-size BYTES --open-timeout S``

It echoes every message, with the same largest message as the gateway's
``MAX_FRAME_BYTES`` and an opening-handshake timeout equal to the gateway's
``HEADER_TIMEOUT``, so that a case's verdict can be checked against an
independent RFC 6455 implementation. It prints ``ready`` once listening.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

__all__ = ["main"]


async def _echo(ws: ServerConnection) -> None:
    with contextlib.suppress(ConnectionClosed):
        async for message in ws:
            await ws.send(message)


async def _serve(port: int, max_size: int, open_timeout: float) -> None:
    stop = asyncio.get_running_loop().create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set_result, None)
    async with serve(
        _echo,
        "127.0.0.1",
        port,
        max_size=max_size,
        open_timeout=open_timeout,
        compression="deflate",  # only for the cases that offer it (groups 12, 13)
        ping_interval=None,
    ):
        print("ready", flush=True)
        await stop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--max-size", type=int, default=65536)
    parser.add_argument("--open-timeout", type=float, default=10.0)
    args = parser.parse_args()
    asyncio.run(_serve(args.port, args.max_size, args.open_timeout))


if __name__ == "__main__":
    main()
