"""The Python client (gateway.client) against a faulty or hostile gateway.

Each gateway here is a small `websockets` server on 127.0.0.1 that speaks
just enough of protocol v1 to do one wrong thing: hold the client's memory,
stall it, or flood its log. What the client must do instead is in
docs/security.md ("The Python and browser clients against a hostile
gateway"); the browser client's counterparts are in tests/test_browser.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec
from websockets.asyncio.server import ServerConnection, serve

from core.infra.backoff import Backoff
from gateway.client import Client, Gap, Publication
from tests.servers import UNIT

FAST = Backoff(base=0.01, cap=0.05)
Handler = Callable[[ServerConnection, int], Awaitable[None]]


def frame(**fields: Any) -> str:
    return msgspec.json.encode(fields).decode()


async def commands(ws: ServerConnection) -> AsyncIterator[dict[str, Any]]:
    async for raw in ws:
        yield msgspec.json.decode(raw)


@contextlib.asynccontextmanager
async def fake_gateway(handler: Handler) -> AsyncIterator[str]:
    """A socket URL whose connections ``handler`` serves (with their number, 1, 2…)."""
    count = 0

    async def serve_one(ws: ServerConnection) -> None:
        nonlocal count
        count += 1
        with contextlib.suppress(Exception):
            await handler(ws, count)

    async with serve(serve_one, "127.0.0.1", 0, subprotocols=["gw.v1.json"]) as server:  # type: ignore[list-item]
        port = server.sockets[0].getsockname()[1]
        yield f"ws://127.0.0.1:{port}/ws"


async def subscribed_then_gap(ws: ServerConnection, cmd: dict[str, Any]) -> None:
    """The reply to ``cmd`` (a ``sub`` of ``c``: offset 5), publication 6, then a ``gap``."""
    await ws.send(frame(id=cmd["id"], ok=True, offset=5, epoch="e"))
    await ws.send(frame(op="msg", ch="c", data=6, offset=6, epoch="e"))
    await ws.send(frame(op="gap", ch="c"))


def client(url: str, **options: Any) -> Client:
    options = {"token": "t", "transports": ("websocket",), "backoff": FAST,
               "ping_interval": None, **options}  # fmt: skip
    return Client(url, **options)


async def next_event(sub: Any) -> Any:
    return await asyncio.wait_for(anext(sub), 5 * UNIT)


async def test_live_publications_held_by_a_repair_are_bounded_and_the_client_recovers_instead():
    # A gap, then live pushes and no history answer: the client held every live
    # publication while it waited (28,780 in 3 s from a server paging forever, never
    # delivered). Now past max_queue it drops the socket, as the gateway does with its
    # own held ones, and the next connection recovers from the last position.
    subs: list[dict[str, Any]] = []
    recovered = asyncio.Event()

    async def handler(ws: ServerConnection, n: int) -> None:
        async for cmd in commands(ws):
            if cmd["op"] == "sub" and n == 1:
                subs.append(cmd)
                await subscribed_then_gap(ws, cmd)
            elif cmd["op"] == "history":
                for offset in range(100, 120):  # live ones; the history never answers
                    await ws.send(frame(op="msg", ch="c", data=offset, offset=offset, epoch="e"))
            elif cmd["op"] == "sub":
                subs.append(cmd)
                await ws.send(frame(id=cmd["id"], ok=True, recovered=True, offset=7, epoch="e"))
                await ws.send(frame(op="msg", ch="c", data=7, offset=7, epoch="e"))
                recovered.set()

    async with fake_gateway(handler) as url, client(url, max_queue=8) as gw:
        sub = await gw.subscribe("c")
        assert (await next_event(sub)).offset == 6
        await asyncio.wait_for(recovered.wait(), 5 * UNIT)
        assert subs[1]["since"] == {"offset": 6, "epoch": "e"}
        event = await next_event(sub)
        assert isinstance(event, Publication) and event.offset == 7  # no Gap, no hole
        assert not sub.holding and gw.connections == 2


async def test_a_history_page_that_makes_no_progress_ends_the_repair_with_a_gap():
    # A history reply whose channel top stays ahead while its publications are ones
    # already seen: the client asked again from the same offset, forever, at network
    # speed, holding the live publications back all the while.
    pages = 0

    async def handler(ws: ServerConnection, n: int) -> None:
        nonlocal pages
        async for cmd in commands(ws):
            if cmd["op"] == "sub":
                await subscribed_then_gap(ws, cmd)
            elif cmd["op"] == "history":
                pages += 1
                stale = [{"offset": cmd["since"], "data": 0}]
                await ws.send(frame(id=cmd["id"], ok=True, offset=1000, epoch="e",
                                    publications=stale))  # fmt: skip

    async with fake_gateway(handler) as url, client(url) as gw:
        sub = await gw.subscribe("c")
        assert (await next_event(sub)).offset == 6
        gap = await next_event(sub)
        assert isinstance(gap, Gap) and gap.reason == "broker" and pages == 1


async def test_a_connection_lost_during_a_repair_is_recovered_by_the_next_one_without_a_gap():
    # The history request failed with the lost connection (1006): the client gave up the
    # repair with a Gap and delivered the live pushes it held after the hole, moving its
    # position past it, so the next connection's `since` skipped what was missed.
    async def handler(ws: ServerConnection, n: int) -> None:
        async for cmd in commands(ws):
            if cmd["op"] == "sub" and n == 1:
                await subscribed_then_gap(ws, cmd)
                await ws.send(frame(op="msg", ch="c", data=9, offset=9, epoch="e"))  # held
            elif cmd["op"] == "history":
                return  # the connection drops before the answer
            elif cmd["op"] == "sub":
                since = cmd["since"]["offset"]
                await ws.send(frame(id=cmd["id"], ok=True, recovered=True, offset=9, epoch="e"))
                for offset in range(since + 1, 10):
                    await ws.send(frame(op="msg", ch="c", data=offset, offset=offset, epoch="e"))

    async with fake_gateway(handler) as url, client(url) as gw:
        sub = await gw.subscribe("c")
        got = [await next_event(sub) for _ in range(4)]
        assert [e.offset if isinstance(e, Publication) else e for e in got] == [6, 7, 8, 9]


async def test_a_server_made_subscription_nobody_reads_does_not_stop_the_socket():
    # The server API subscribed the connection (a `subscribed` push) and the application
    # never read it (no on_subscribed): at max_queue publications the client stopped
    # reading the socket, so every reply and ping waited behind them, the ping timed out
    # and each new connection stopped again: no command ever succeeded.
    async def handler(ws: ServerConnection, n: int) -> None:
        await ws.send(frame(op="subscribed", ch="srv", offset=0, epoch="e"))
        for offset in range(1, 3 * 8 + 1):
            await ws.send(frame(op="msg", ch="srv", data=offset, offset=offset, epoch="e"))
        async for cmd in commands(ws):
            await ws.send(frame(id=cmd["id"], ok=True))

    async with (
        fake_gateway(handler) as url,
        client(url, max_queue=8, request_timeout=3 * UNIT) as gw,
    ):
        await gw.ping()
        sub = gw.subscription("srv")
        assert sub is not None and gw.connections == 1
        gap = await next_event(sub)
        assert isinstance(gap, Gap) and gap.reason == "unread"
        rest = [event.offset for event in list(sub._events)]
        assert rest == list(range(24 - len(rest) + 1, 25)) and len(rest) <= 8  # the newest


async def test_frames_the_client_cannot_use_log_one_warning_per_connection(caplog):
    # 10,000 undecodable frames, or error replies to no command, made 10,000 warnings.
    async def handler(ws: ServerConnection, n: int) -> None:
        async for cmd in commands(ws):
            for i in range(50):
                await ws.send("{not json")
                await ws.send(b"\xff\x00")
                await ws.send(frame(id=10**6 + i, ok=False, error={"code": 100, "message": "x"}))
                for odd in ({"op": "msg", "ch": 5}, {"op": "future"}, [], None, {"id": "x"}):
                    await ws.send(msgspec.json.encode(odd).decode())
            await ws.send(frame(id=cmd["id"], ok=True))

    caplog.set_level(logging.DEBUG, "gateway.client")
    async with fake_gateway(handler) as url, client(url) as gw:
        await gw.ping()
        assert gw.connections == 1
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert sum(r.name == "gateway.client" for r in caplog.records) >= 400  # at DEBUG


async def test_the_client_s_debug_log_shows_no_token(caplog):
    # With DEBUG on (logging.basicConfig(level=logging.DEBUG)), `websockets` wrote
    # "> Authorization: Bearer <token>" and every `refresh` frame with its new token.
    async def handler(ws: ServerConnection, n: int) -> None:
        async for cmd in commands(ws):
            await ws.send(frame(id=cmd["id"], ok=True))

    caplog.set_level(logging.DEBUG)
    async with fake_gateway(handler) as url:
        async with client(url, token="SECRET-first", headers={"Cookie": "sid=SECRET-c"}) as gw:
            await gw.refresh("SECRET-second")
    mine = [r.getMessage() for r in caplog.records if r.name.startswith("gateway.client")]
    assert any("Authorization: [redacted]" in line for line in mine)
    assert any("> TEXT [redacted]" in line for line in mine)  # the refresh frame
    assert not [line for line in mine if "SECRET" in line]
    # A MessagePack refresh frame, as `websockets` shows one (its start and end).
    logging.getLogger("gateway.client.wire").debug(
        "> %s", "BINARY 83 a2 6f 70 a7 72 65 66 72 65 73 68 ... 45 4e [43 bytes]"
    )
    assert caplog.records[-1].getMessage() == "> BINARY [redacted] [43 bytes]"
