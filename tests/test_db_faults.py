"""PostgreSQL lost: REST answers 503 at once, sockets carry on, and it heals."""

from __future__ import annotations

import asyncio
import time

from tests.harness import ApiClient, running_gateway, token_for, ws_client
from tests.servers import ThrowawayPostgres, postgres_dir
from tests.test_core_rest import PROJECT


async def test_lost_database_is_a_quick_503_and_sockets_are_unaffected():
    with postgres_dir() as directory:
        pg = await asyncio.to_thread(ThrowawayPostgres(directory).start)
        try:
            async with running_gateway(
                database_url=pg.url, db_pool_min=1, migrate_on_start=True
            ) as gw:
                api = ApiClient(gw.port, token_for(gw, extra={"role": "admin"}))
                try:
                    assert (await api.call("POST", "/api/projects", PROJECT))[0] == 201
                    async with ws_client(gw.port, token_for(gw)) as c:
                        await asyncio.to_thread(pg.stop)
                        started = time.monotonic()
                        status, headers, body = await api.call("GET", "/api/projects")
                        assert status == 503 and body["error"]["code"] == "unavailable"
                        assert headers["Retry-After"]
                        assert time.monotonic() - started < 2.0  # fails fast, no hang
                        assert (await api.call("GET", "/api/projects"))[0] == 503
                        assert (await c.request("sub", ch="room:1"))["ok"]  # sockets go on
                        assert (await c.request("pub", ch="room:1", data=1))["ok"]
                        assert (await c.next_push())["data"] == 1
                    # PostgreSQL back on the same data: the pool reconnects by itself.
                    pg = await asyncio.to_thread(ThrowawayPostgres(directory).start)
                    status = 0
                    async with asyncio.timeout(10):
                        while status != 200:
                            status, _, body = await api.call("GET", "/api/projects")
                            await asyncio.sleep(0.1)
                    assert len(body["items"]) == 1  # and the data is there
                finally:
                    api.close()
        finally:
            await asyncio.to_thread(pg.stop)
