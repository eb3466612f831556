"""PostgreSQL lost: REST answers 503 at once, sockets carry on, and it heals."""

from __future__ import annotations

import asyncio
import json
import time
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from tornado.httpclient import AsyncHTTPClient

from core.db import Database, is_outage
from core.infra.errors import Unavailable
from core.infra.settings import Settings
from tests.harness import ApiClient, http_url, running_gateway, token_for, until, ws_client
from tests.servers import ThrowawayPostgres, postgres_dir
from tests.stallproxy import StallProxy, stall_proxy
from tests.test_core_rest import PROJECT
from tests.test_observability import fetch_metrics
from tests.test_websocket import fetch


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


#: DB_COMMAND_TIMEOUT of the loopback partition (the netfault scenario runs the default 10 s).
TIMEOUT = 3.0


def _through(proxy: StallProxy, url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(
        parts._replace(netloc=f"{parts.username or 'postgres'}@127.0.0.1:{proxy.port}")
    )


def _tcp_target(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if not parts.hostname or parts.hostname.startswith("/"):
        pytest.skip(f"PostgreSQL is on a unix socket here ({url}): no TCP link to stall")
    return parts.hostname, parts.port or 5432


async def test_postgresql_out_of_reach_costs_one_timeout_then_503_at_once_and_heals(clean_db):
    """Partitioned (a stalled link: no RST, no answer), the first call waits out
    DB_COMMAND_TIMEOUT once (not twice: no cancel round trip to a server out of reach),
    the ones after it are refused at once, readiness and metrics say so, sockets carry on,
    and the pool serves again when the link does, with no restart."""
    async with stall_proxy(_tcp_target(clean_db["database_url"])) as proxy:
        async with running_gateway(
            database_url=_through(proxy, clean_db["database_url"]),
            database_schema=clean_db["database_schema"],
            db_command_timeout=TIMEOUT,
            db_connect_timeout=TIMEOUT,
            db_probe_timeout=1.0,
        ) as gw:
            api = ApiClient(gw.port, token_for(gw, extra={"role": "admin"}))
            http = AsyncHTTPClient(force_instance=True)
            try:
                assert (await api.call("POST", "/api/projects", PROJECT))[0] == 201
                async with ws_client(gw.port, token_for(gw)) as c:
                    proxy.stall()
                    started = time.monotonic()
                    status, headers, body = await api.call("GET", "/api/projects")
                    first = time.monotonic() - started
                    assert status == 503 and body["error"]["code"] == "unavailable"
                    assert headers["Retry-After"]
                    # Once the timeout, not twice (6 s before): a generous margin for load.
                    assert first < TIMEOUT * 1.5, first
                    for _ in range(3):
                        started = time.monotonic()
                        status, headers, body = await api.call("GET", "/api/projects")
                        assert status == 503 and headers["Retry-After"]
                        assert time.monotonic() - started < TIMEOUT / 4  # refused at once
                    ready = await fetch(http, http_url(gw, "/readyz"))
                    assert ready.code == 503 and json.loads(ready.body)["database"] is False
                    scraped = await fetch_metrics(gw)
                    assert "gateway_db_breaker_open 1.0" in scraped
                    assert "gateway_db_refused_total 3.0" in scraped
                    assert (await c.request("sub", ch="room:1"))["ok"]  # sockets go on
                    assert (await c.request("pub", ch="room:1", data=1))["ok"]
                    assert (await c.next_push())["data"] == 1
                    proxy.flow()
                    status = 0
                    async with asyncio.timeout(15):
                        while status != 200:
                            await asyncio.sleep(0.2)
                            status, _, body = await api.call("GET", "/api/projects")
                    assert len(body["items"]) == 1
                    await asyncio.sleep(1.0)  # readiness is checked at most once a second
                    assert (await fetch(http, http_url(gw, "/readyz"))).code == 200
                    scraped = await fetch_metrics(gw)
                    assert "gateway_db_breaker_open 0.0" in scraped
            finally:
                api.close()
                http.close()


async def test_a_query_past_its_timeout_is_ended_on_the_server_and_the_pool_goes_on(
    database_url, core_schema
):
    """The connection of a timed-out query is dropped at once, yet PostgreSQL still gets the
    CancelRequest: the query does not run on, holding its locks. A healthy server that was
    slow once is served again as soon as the probe reaches it."""
    settings = Settings(
        database_url=database_url, database_schema=core_schema, db_command_timeout=0.5
    )
    db = await Database.open(settings)
    marker = f"slow-{time.monotonic_ns()}"
    try:
        with pytest.raises(TimeoutError):
            await db.pool.fetchval(f"select pg_sleep(60), '{marker}'")
        db.failed(TimeoutError())
        with pytest.raises(Unavailable):
            db.check()
        await until(lambda: db.reachable, 10)

        async def query_ended() -> bool:
            running = "select count(*) from pg_stat_activity where query like $1 and pid <> pg_backend_pid()"
            return await db.pool.fetchval(running, f"%{marker}%") == 0

        await until(query_ended, 10, 0.05)
        assert await db.pool.fetchval("select 1") == 1
    finally:
        await db.close()


@pytest.mark.parametrize(
    ("exc", "outage"),
    [
        (TimeoutError(), True),
        (ConnectionRefusedError(), True),
        (asyncpg.ConnectionDoesNotExistError("connection was closed in the middle"), True),
        (asyncpg.InterfaceError("connection is closed"), True),
        (asyncpg.InterfaceError("another operation is in progress"), False),
        (asyncpg.UniqueViolationError("duplicate"), False),
        (ValueError("a bug"), False),
    ],
)
def test_only_failures_that_say_the_database_is_out_of_reach_open_its_breaker(exc, outage):
    assert is_outage(exc) is outage
