"""SIGTERM drain: readiness red at once, sockets told to reconnect, paced, before the deadline."""

from __future__ import annotations

import asyncio
import json
import signal
import time
import urllib.error
import urllib.request

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from proto import CloseCode
from tests.harness import SECRET, until
from tests.servers import UNIT
from tests.test_processes import mint, processes  # noqa: F401  (fixture)

SOCKETS = 1000


def _status(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


async def test_sigterm_drains_1000_sockets_paced_before_the_deadline(
    processes,  # noqa: F811
    data_dir,
    database_url,
    core_schema,
):
    gp = processes(JWT_SECRET=SECRET, RATE_CONNECT_IP="off", DRAIN_SECONDS="2",
                   SHUTDOWN_TIMEOUT="10", MAX_CONNECTIONS_PER_USER="0",  # one token, 1,000 sockets
                   DATABASE_URL=database_url, DATABASE_SCHEMA=core_schema)  # fmt: skip
    token = mint(data_dir)
    url = f"ws://127.0.0.1:{gp.port}/ws?token={token}"
    sockets = [
        await connect(url, open_timeout=10 * UNIT, ping_interval=None) for _ in range(SOCKETS)
    ]
    closed_at: list[float] = []
    codes: list[int] = []

    async def wait_close(ws) -> None:
        try:
            await ws.recv()
        except ConnectionClosed as exc:
            codes.append(exc.rcvd.code if exc.rcvd else 1006)
            closed_at.append(time.monotonic())

    waiters = [asyncio.ensure_future(wait_close(ws)) for ws in sockets]
    started = time.monotonic()
    gp.proc.send_signal(signal.SIGTERM)

    async def red() -> bool:
        return (await asyncio.to_thread(_status, f"http://127.0.0.1:{gp.port}/readyz"))[0] == 503

    await until(red, 1.0 * UNIT)  # at once: well within the 2 s drain
    ready = await asyncio.to_thread(_status, f"http://127.0.0.1:{gp.port}/readyz")
    assert ready == (503, {"status": "draining"})
    try:
        async with connect(url, open_timeout=5 * UNIT):
            raise AssertionError("a new socket was accepted while draining")
    except InvalidStatus as exc:
        assert exc.response.status_code == 503
    await asyncio.wait_for(asyncio.gather(*waiters), 12 * UNIT)
    exit_code = await asyncio.to_thread(gp.proc.wait, 12 * UNIT)
    assert codes == [CloseCode.SHUTDOWN] * SOCKETS
    spread = max(closed_at) - min(closed_at)
    assert spread >= 1.0, f"all closed within {spread:.2f}s: not paced"
    assert max(closed_at) - started < 10.0  # the deadline
    assert exit_code == 0
    print(f"\n{SOCKETS} sockets closed with 4000 over {spread:.2f}s; "
          f"last {max(closed_at) - started:.2f}s after SIGTERM; exit {exit_code}")  # fmt: skip


async def test_a_socket_waiting_for_its_drain_turn_takes_no_new_subscription():
    import contextlib

    from proto import ErrorCode
    from tests.harness import running_gateway, token_for, ws_client

    async with running_gateway(drain_seconds=3.0 * UNIT, shutdown_timeout=10.0 * UNIT) as gw:
        token = token_for(gw)
        async with contextlib.AsyncExitStack() as stack:
            clients = [
                await stack.enter_async_context(ws_client(gw.port, token)) for _ in range(40)
            ]
            closing = asyncio.ensure_future(gw.close())
            # Draining: one socket closed every 75 ms; the first has gone.
            await until(lambda: any(c.ws.state.name != "OPEN" for c in clients))
            waiting = [c for c in clients if c.ws.state.name == "OPEN"]
            assert len(waiting) > 20, "the drain is paced: most sockets wait for their turn"
            last = waiting[-1]
            reply = await last.request("sub", ch="room:2")
            assert reply["error"]["code"] == ErrorCode.CLOSING and reply["error"]["temporary"]
            assert (await last.request("ping"))["ok"]  # what it had goes on until its close
        await closing
