"""Change events survive the broker and the writer: the transactional outbox and its relay.

Real PostgreSQL and Redis; a throwaway Redis where one goes down.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import asyncpg

from core.db import Database
from core.events import Events
from core.infra.backoff import Backoff
from core.infra.broker import RedisBroker
from core.infra.history import HistoryPolicy, HistoryPublisher
from core.infra.mint import mint_token
from core.infra.settings import Settings
from core.outbox import Outbox
from core.relay import Relay
from core.server import CoreServer
from core.service import Core
from tests.harness import ApiClient, running_gateway, unique_prefix, until, ws_client
from tests.servers import UNIT
from tests.test_core_rest import PROJECT, project

SECRET = "outbox-secret-" + "0123456789abcdef" * 4
#: Long enough for a Redis that restarts and a broker that reconnects with backoff.
SLOW = 20 * UNIT


def settings_for(db: dict[str, str], redis_url: str | None, prefix: str, **kw: Any) -> Settings:
    return Settings(
        jwt_secret=SECRET, host="127.0.0.1", port=0, redis_url=redis_url, redis_prefix=prefix,
        rate_rest=None, history_size=1000, password_time_cost=1, password_memory_kib=8192,
        **db, **kw,
    )  # fmt: skip


def quick(core: Core | Any) -> Core:
    """``core`` with a relay that waits 0.2 s for writers and retries soon (not 2 s, 30 s)."""
    assert isinstance(core, Core) and core.relay is not None
    core.relay.grace, core.relay.every = 0.2, 0.05
    core.relay.backoff = Backoff(base=0.05, cap=0.2)
    return core


@contextlib.asynccontextmanager
async def core_server(settings: Settings) -> AsyncIterator[tuple[CoreServer, ApiClient]]:
    """``python -m core``: the standalone core and an admin calling it over HTTP."""
    server = await CoreServer.start(settings)
    admin = mint_token(settings, "admin", [], extra={"role": "admin"})
    api = ApiClient(server.port, admin)
    try:
        yield server, api
    finally:
        api.close()
        await server.close()


@contextlib.asynccontextmanager
async def writing(
    db: dict[str, str], redis_url: str
) -> AsyncIterator[tuple[Core, ApiClient, RedisBroker]]:
    """A `core_server` with a `quick` relay on ``redis_url``, and a reader of its histories."""
    prefix = unique_prefix()
    reader = RedisBroker(redis_url, prefix)
    try:
        async with core_server(settings_for(db, redis_url, prefix)) as (server, api):
            yield quick(server.core), api, reader
    finally:
        await reader.close()


async def rows(pool: asyncpg.Pool) -> int:
    count: int = await pool.fetchval("select count(*) from outbox")
    return count


async def history(reader: RedisBroker, ch: str) -> list[tuple[int, dict[str, Any]]]:
    entries, _ = await reader.history(ch, 0, 10_000)
    return [(offset, json.loads(data)) for offset, data in entries]


async def test_an_event_written_while_redis_is_down_is_published_when_it_is_back(
    clean_db, throwaway_redis
):
    prefix = unique_prefix()
    settings = settings_for(clean_db, throwaway_redis.url, prefix)
    reader = RedisBroker(throwaway_redis.url, prefix)
    async with core_server(settings) as (server, api):
        core = quick(server.core)
        status, _, p = await api.call("POST", "/api/projects", PROJECT)
        assert status == 201
        await until(lambda: _empty(core.db.pool), SLOW)  # its writer published and deleted it
        throwaway_redis.kill()
        status, _, updated = await api.call("PATCH", f"/api/projects/{p['id']}", {"name": "B"})
        assert status == 200 and updated["version"] == 2  # the write does not fail
        await asyncio.sleep(0.5)  # past the grace: the relay tried, and leaves the row
        assert await rows(core.db.pool) == 1
        throwaway_redis.start()  # empty: it kept nothing
        want = {"type": "updated", "id": p["id"], "version": 2, "data": updated}

        async def arrived() -> bool:
            try:
                found = await history(reader, f"projects:{p['id']}")
            except Exception:  # the reader's link is still coming back
                return False
            return [event for _, event in found] == [want]

        await until(arrived, SLOW)  # nothing asked by any client
        assert [e for _, e in await history(reader, "projects")] == [want]
        await until(lambda: _empty(core.db.pool), SLOW)
        assert core.relay is not None and core.relay.relayed == 1
    await reader.close()


async def _empty(pool: asyncpg.Pool) -> bool:
    return await rows(pool) == 0


async def test_a_socket_gets_an_event_written_while_redis_was_down_in_embedded_mode(
    clean_db, throwaway_redis
):
    """The gateway hosting the core: its node publishes, its relay too."""
    prefix = unique_prefix()
    async with running_gateway(
        RedisBroker(throwaway_redis.url, prefix), jwt_secret=SECRET, **clean_db
    ) as gw:
        core = quick(gw.ctx.core)
        api = ApiClient(gw.port, mint_token(gw.settings, "admin", [], extra={"role": "admin"}))
        token = mint_token(gw.settings, "watcher", ["projects"])
        try:
            async with ws_client(gw.port, token) as c:
                assert (await c.request("sub", ch="projects"))["ok"]
                _, _, p = await api.call("POST", "/api/projects", PROJECT)
                assert (await c.next_push())["data"]["type"] == "created"
                throwaway_redis.kill()
                status, _, updated = await api.call(
                    "PATCH", f"/api/projects/{p['id']}", {"name": "renamed"}
                )
                assert status == 200
                await asyncio.sleep(0.5)
                throwaway_redis.start()
                # As a client does: live pushes, and after a gap (the link to Redis was
                # lost) the channel's history, which holds what a relay published before.
                got = None
                async with asyncio.timeout(SLOW):
                    while got is None:
                        frame = await c.recv(timeout=SLOW)
                        if frame.get("op") == "msg":
                            got = frame["data"]
                        elif frame.get("op") == "gap":
                            page = await c.request("history", ch="projects", since=0)
                            kept = [p["data"] for p in page.get("publications", ())]
                            kept += [f["data"] for f in c.pushes if f.get("op") == "msg"]
                            got = kept[-1] if kept else None
            assert got == {"type": "updated", "id": p["id"], "version": 2, "data": updated}
            await until(lambda: _empty(core.db.pool), SLOW)
        finally:
            api.close()


async def test_a_dead_writer_s_row_is_published_by_another_process_s_relay(clean_db, redis_url):
    prefix = unique_prefix()
    settings = settings_for(clean_db, redis_url, prefix)
    event = b'{"type":"deleted","id":99,"version":4,"data":null}'
    db = await Database.open(settings)  # the writer, which dies before publishing
    try:
        await db.pool.execute(
            "insert into outbox (channels, payload) values ($1, $2)",
            ["projects", "projects:99"],
            event,
        )
    finally:
        await db.close()
    got: list[tuple[str, bytes]] = []
    listener = RedisBroker(redis_url, prefix)
    await listener.start(lambda ch, data, position: got.append((ch, data)))
    try:
        await listener.subscribe("projects")
        async with core_server(settings) as (server, _):
            core = quick(server.core)
            await until(lambda: ("projects", event) in got, SLOW)  # a subscriber sees it
            await until(lambda: _empty(core.db.pool), SLOW)
            entries, _ = await listener.history("projects:99", 0, 10)
            assert [data for _, data in entries] == [event]
            assert core.relay is not None and core.relay.relayed == 1
            assert core.relay.pending == 0
    finally:
        await listener.close()


async def test_many_writes_leave_an_empty_outbox_and_each_event_once_in_history(
    clean_db, redis_url
):
    async with writing(clean_db, redis_url) as (core, api, reader):
        assert core.outbox is not None and core.relay is not None
        # The relay leaves the writers their rows for as long as a loaded machine may take
        # to publish and delete them (a `quick` 0.2 s is shorter than 200 writes at once).
        core.relay.grace = SLOW
        created = await asyncio.gather(
            *(api.call("POST", "/api/projects", project(name=f"p{i}")) for i in range(200))
        )
        ids = [p["id"] for status, _, p in created if status == 201]
        assert len(ids) == 200
        patched = await asyncio.gather(
            *(api.call("PATCH", f"/api/projects/{id}", {"status": "active"}) for id in ids[:50])
        )
        assert all(status == 200 for status, _, _ in patched)
        await until(lambda: _empty(core.db.pool), SLOW)
        assert core.outbox.deleted == 250 and core.outbox.dropped == 0
        assert core.outbox.flushes <= 250 / 4, core.outbox.flushes  # deletes go in batches
        assert core.relay.relayed == 0  # the writers published every event themselves
        found = await history(reader, "projects")
    offsets = [offset for offset, _ in found]
    assert offsets == list(range(1, 251))
    events = [(e["type"], e["id"], e["version"]) for _, e in found]
    assert sorted(events) == sorted(
        [("created", id, 1) for id in ids] + [("updated", id, 2) for id in ids[:50]]
    )


async def test_a_row_published_by_its_writer_and_again_by_a_relay_is_in_history_once(
    clean_db, redis_url
):
    """The writer published, and its delete had not gone when a relay took the row."""
    async with writing(clean_db, redis_url) as (core, api, reader):
        assert core.outbox is not None and core.relay is not None
        core.outbox.tick = core.outbox.batch = 10_000  # its deletes never go
        for i in range(3):
            status, _, _ = await api.call("POST", "/api/projects", project(name=f"p{i}"))
            assert status == 201
        await until(lambda: _empty(core.db.pool), SLOW)  # deleted by the relay
        assert core.relay.relayed == 3  # each published twice, by the writer and the relay
        found = await history(reader, "projects")
    assert [offset for offset, _ in found] == [1, 2, 3]
    assert [e["data"]["name"] for _, e in found] == ["p0", "p1", "p2"]


async def test_a_core_without_a_broker_writes_no_outbox_rows(clean_db):
    settings = settings_for(clean_db, None, unique_prefix())
    async with core_server(settings) as (server, api):
        assert server.core.relay is None and not server.core.events.queues
        status, _, p = await api.call("POST", "/api/projects", PROJECT)
        assert status == 201
        assert (await api.call("DELETE", f"/api/projects/{p['id']}"))[0] == 204
        assert await rows(server.core.db.pool) == 0


async def test_the_relay_claims_at_most_its_batch_a_round(clean_db, redis_url):
    prefix = unique_prefix()
    settings = settings_for(clean_db, redis_url, prefix)
    broker = RedisBroker(redis_url, prefix)
    db = await Database.open(settings)
    try:
        await db.pool.execute(
            "insert into outbox (channels, payload, created_at)"
            " select array['room:' || i], convert_to('{\"n\":' || i || '}', 'UTF8'),"
            " now() - interval '1 minute' from generate_series(1, 25) i"
        )
        events = Events(HistoryPublisher(broker, HistoryPolicy((), 10, 60)))
        relay = Relay(db.pool, events, batch=10)
        assert await relay.round() == (10, 10)
        assert await rows(db.pool) == 15 and relay.pending == 15
        assert await relay.round() == (10, 10)
        assert await relay.round() == (5, 5)
        assert await rows(db.pool) == 0 and relay.relayed == 25
    finally:
        await db.close()
        await broker.close()


async def queued(pool: asyncpg.Pool, count: int) -> list[int]:
    """The ids of ``count`` new outbox rows, as writers leave them."""
    return [
        r[0]
        for r in await pool.fetch(
            "insert into outbox (channels, payload)"
            " select array['room:1'], '{}'::bytea from generate_series(1, $1) returning id",
            count,
        )
    ]


async def test_the_writer_s_delete_buffer_is_bounded(clean_db):
    settings = settings_for(clean_db, None, unique_prefix())
    db = await Database.open(settings)
    try:
        ids = await queued(db.pool, 10)
        outbox = Outbox(db.pool, tick=60.0, batch=100, limit=4)
        for id in ids:
            outbox.published(id)
        assert len(outbox) == 4 and outbox.dropped == 6
        await outbox.close()  # deletes what it holds; the relay publishes the others again
        assert outbox.deleted == 4 and await rows(db.pool) == 6
    finally:
        await db.close()


class _KillsTheRelay(HistoryPublisher):
    """Terminates the relay's database connection (``pid``) after ``after`` publications."""

    def __init__(self, broker: RedisBroker, killer: asyncpg.Pool, after: int) -> None:
        super().__init__(broker, HistoryPolicy(("projects",), 1000, 60))
        self.killer, self.after, self.pid = killer, after, 0

    async def publish_each(self, channels: Any, data: bytes, *, call: str | None = None) -> Any:
        outcome = await super().publish_each(channels, data, call=call)
        self.after -= 1
        if self.after == 0:
            await self.killer.execute("select pg_terminate_backend($1)", self.pid)
        return outcome


async def test_a_relay_whose_connection_is_killed_mid_round_publishes_nothing_twice(
    clean_db, redis_url
):
    """It publishes again only what it published since its last commit: no more than a
    history channel's last 8 call ids (one transaction a round: all 50 were twice)."""
    prefix = unique_prefix()
    settings = settings_for(clean_db, redis_url, prefix)
    broker, reader = RedisBroker(redis_url, prefix), RedisBroker(redis_url, prefix)
    db = await Database.open(settings)
    relays = await asyncpg.create_pool(
        clean_db["database_url"], min_size=1, max_size=1,
        server_settings={"search_path": clean_db["database_schema"]},
    )  # fmt: skip
    try:
        await db.pool.execute(
            "insert into outbox (channels, payload, created_at)"
            " select array['projects'], convert_to('{\"n\":' || i || '}', 'UTF8'),"
            " now() - interval '1 minute' from generate_series(1, 50) i"
        )
        publisher = _KillsTheRelay(broker, db.pool, after=30)
        async with relays.acquire() as conn:
            publisher.pid = conn.get_server_pid()  # the pool's one connection: the relay's
        relay = Relay(relays, Events(publisher))
        try:
            await relay.round()
        except (asyncpg.InterfaceError, asyncpg.PostgresError, OSError):
            pass  # the connection went mid-round
        while (await relay.round())[0]:
            pass
        assert await rows(db.pool) == 0
        found = await history(reader, "projects")
    finally:
        await relays.close()
        await db.close()
        await broker.close()
        await reader.close()
    assert [event["n"] for _, event in found] == list(range(1, 51))


class _LostMidOperation:
    """A real pool whose first delete fails as asyncpg fails on a connection the database's
    loss left mid-operation (seen in tests/test_db_faults.py: ``InternalClientError``)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool, self.failed = pool, False

    async def execute(self, query: str, *args: Any) -> str:
        if not self.failed:
            self.failed = True
            raise asyncpg.InternalClientError("cannot switch to state 11; another operation (2)")
        result: str = await self.pool.execute(query, *args)
        return result


async def test_a_delete_failing_inside_asyncpg_keeps_the_ids_and_never_breaks_close(clean_db):
    settings = settings_for(clean_db, None, unique_prefix())
    db = await Database.open(settings)
    try:
        ids = await queued(db.pool, 3)
        outbox = Outbox(_LostMidOperation(db.pool), tick=0.01)  # type: ignore[arg-type]
        for id in ids:
            outbox.published(id)
        await until(lambda: outbox.flushes >= 1, SLOW)
        await outbox.close()  # the task lived on; what it kept is deleted now
        assert outbox.deleted == 3 and outbox.dropped == 0
        assert await rows(db.pool) == 0
    finally:
        await db.close()
