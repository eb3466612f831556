"""A TCP proxy on 127.0.0.1 that can stall like a partitioned link: no FIN, no RST, no bytes.

`StallProxy` forwards every connection to ``target``. `stall` holds every byte where it is
(both directions, and new connections are accepted but get no answer), as a network that
drops packets would: the peers see silence, not a closed connection. `flow` delivers what
was held and forwards again, as TCP's retransmissions would after a partition heals. For
tests that need a PostgreSQL (or any server) out of reach without network namespaces.
`cut` closes the connection the next request comes on, unanswered and unforwarded, as a
server closing an idle kept-alive connection just as a request reaches it. `lose` closes the
connection the next answer comes on, the request forwarded and the answer dropped, as a link
lost just after the server acted.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

__all__ = ["StallProxy", "stall_proxy"]


class StallProxy:
    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = 0
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._cuts = 0
        self._losses = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> StallProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stall(self) -> None:
        self._flowing.clear()

    def flow(self) -> None:
        self._flowing.set()

    def cut(self) -> None:
        self._cuts += 1

    def lose(self) -> None:
        self._losses += 1

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _track(self, task: asyncio.Task[None]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            await self._flowing.wait()  # stalled: the connection is accepted, nothing answers
            up_reader, up_writer = await asyncio.open_connection(*self.target)
            self._writers.add(up_writer)
            pipes = [
                asyncio.ensure_future(self._pipe(reader, up_writer, cuttable=True)),
                asyncio.ensure_future(self._pipe(up_reader, writer)),
            ]
            for pipe in pipes:
                self._track(pipe)
            await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
            for w in (writer, up_writer):
                w.close()
        except (OSError, asyncio.CancelledError):
            writer.transport.abort()

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, cuttable: bool = False
    ) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                if cuttable and self._cuts:
                    self._cuts -= 1
                    return  # both ends close, the request neither forwarded nor answered
                if not cuttable and self._losses:
                    self._losses -= 1
                    return  # both ends close, the request forwarded, its answer dropped
                await self._flowing.wait()
                writer.write(data)
                await writer.drain()


@contextlib.asynccontextmanager
async def stall_proxy(target: tuple[str, int]) -> AsyncIterator[StallProxy]:
    proxy = await StallProxy(target).start()
    try:
        yield proxy
    finally:
        await proxy.close()
