"""Connection events with real gateway processes: a SIGKILLed node's connections reported by
a survivor, a consumer group that loses nothing while it is down, and the signed webhook."""

from __future__ import annotations

import asyncio
import json
import signal
import urllib.request
from typing import Any

import pytest
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families

from core.infra.mint import mint_token
from core.infra.settings import Settings
from tests.harness import SECRET, unique_prefix, until, ws_client
from tests.servers import UNIT
from tests.test_events import SECRET as HOOK_SECRET
from tests.test_events import backend_server, decoded, verify
from tests.test_processes import _read, processes  # noqa: F401  (fixture)
from tests.test_sse import sse

GROUP = "backend"
#: What the gateways are configured with, for minting their tokens here.
TOKENS = Settings(jwt_secret=SECRET)


class Consumer:
    """A backend reading the stream with a consumer group, acknowledging what it read."""

    def __init__(self, redis: aioredis.Redis, stream: str) -> None:
        self.redis = redis
        self.stream = stream
        self.read: list[tuple[bytes, dict[str, Any]]] = []

    async def create(self) -> None:
        await self.redis.xgroup_create(self.stream, GROUP, id="0", mkstream=True)

    async def poll(self) -> list[dict[str, Any]]:
        """XREADGROUP what is new for the group, XACK it; everything read so far."""
        found = await self.redis.xreadgroup(GROUP, "worker-1", {self.stream: ">"}, count=100)
        for _, entries in found:
            ids = [id for id, _ in entries]
            events = decoded([fields[b"event"] for _, fields in entries])
            self.read += zip(ids, events, strict=True)
            await self.redis.xack(self.stream, GROUP, *ids)
        return [event for _, event in self.read]

    async def until(self, check: Any, timeout: float = 20 * UNIT) -> list[dict[str, Any]]:
        async def holds() -> bool:
            return bool(check(await self.poll()))

        await until(holds, timeout=timeout, step=0.1)
        return [event for _, event in self.read]


@pytest.fixture
def env(redis_url: str, database_url: str, core_schema: str) -> dict[str, str]:
    """Gateways with connection events on a Redis prefix of their own (and the test
    database, so that no embedded PostgreSQL starts)."""
    return {
        "REDIS_URL": redis_url,
        "REDIS_PREFIX": unique_prefix(),
        "JWT_SECRET": SECRET,
        "DATABASE_URL": database_url,
        "DATABASE_SCHEMA": core_schema,
        "EVENTS_STREAM": "true",
    }


def life(events: list[dict[str, Any]], user: str) -> list[tuple[Any, ...]]:
    rows: list[tuple[Any, ...]] = []
    for e in events:
        if e["user"] != user:
            continue
        if e["type"] == "disconnect":
            rows.append(("disconnect", e["code"], e["reason"]))
        else:
            rows.append((e["type"], e.get("channel", e["transport"])))
    return rows


async def metric(port: int, name: str, **labels: str) -> float:
    """One sample of a gateway's /metrics (0 when absent)."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics")
    text = (await asyncio.to_thread(_read, request)).decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


async def test_a_killed_nodes_connections_reach_the_stream_and_a_group_loses_nothing(
    processes,  # noqa: F811
    redis_url,
    env,
):
    prefix = env["REDIS_PREFIX"]
    env["PRESENCE_TTL"] = "5"  # a mark of life lasts 5 s, refreshed every 2 s (ticks of 1 s)
    redis = aioredis.Redis.from_url(redis_url)
    consumer = Consumer(redis, f"{prefix}events")
    await consumer.create()
    a, b = processes.together(2, **env)
    users = ("u1", "u2", "u3", "u4")
    token = {user: mint_token(TOKENS, user, ["room:*"]) for user in users}
    try:
        async with ws_client(a.port, token["u1"]) as c1:
            assert (await c1.request("sub", ch="room:1"))["ok"]
            assert (await c1.request("unsub", ch="room:1"))["ok"]
        async with (
            ws_client(b.port, token["u2"]) as c2,
            ws_client(a.port, token["u3"]) as c3,
            sse(a.port, token["u4"], ["room:4"]) as s4,
        ):
            assert (await c2.request("sub", ch="room:2"))["ok"]
            assert (await c3.request("sub", ch="room:3"))["ok"]
            await s4.next_of("reply")
            before = await consumer.until(
                lambda es: [len(life(es, u)) for u in users] == [4, 2, 2, 2]
            )
            # The backend goes down; meanwhile a node dies and a socket closes.
            a.stop(signal.SIGKILL)
            await until(lambda: lost_by(b), timeout=15 * UNIT, step=0.2)
        # The backend is back: it reads on from where it was.
        events = await consumer.until(lambda es: len(life(es, "u2")) == 3)
    finally:
        await redis.aclose()
    assert life(events, "u1") == [
        ("connect", "websocket"),
        ("subscribe", "room:1"),
        ("unsubscribe", "room:1"),
        ("disconnect", 1000, "normal closure"),
    ]
    assert life(events, "u2") == [
        ("connect", "websocket"),
        ("subscribe", "room:2"),
        ("disconnect", 1000, "normal closure"),
    ]
    for user, transport, ch in (("u3", "websocket", "room:3"), ("u4", "sse", "room:4")):
        assert life(events, user) == [
            ("connect", transport),
            ("subscribe", ch),
            ("disconnect", 1006, "node_lost"),  # reported by b, in a's name
        ]
    nodes = {e["user"]: e["node"] for e in events if e["type"] == "connect"}
    assert nodes["u1"] == nodes["u3"] == nodes["u4"] != nodes["u2"]
    lost = [e for e in events if e["type"] == "disconnect" and e["reason"] == "node_lost"]
    assert {e["node"] for e in lost} == {nodes["u3"]}
    # Every connect has one disconnect; the group read the whole stream, once, and acked it.
    connects = sorted(e["client"] for e in events if e["type"] == "connect")
    assert connects == sorted(e["client"] for e in events if e["type"] == "disconnect")
    assert len(set(connects)) == 4 and len(before) < len(events)
    redis = aioredis.Redis.from_url(redis_url)
    try:
        entries = await redis.xrange(f"{prefix}events")
        pending = await redis.xpending(f"{prefix}events", GROUP)
        await redis.delete(f"{prefix}events")
    finally:
        await redis.aclose()
    assert [id for id, _ in entries] == [id for id, _ in consumer.read]
    assert pending["pending"] == 0


async def test_the_webhook_gets_signed_batches_retried_and_its_queue_is_bounded(
    processes,  # noqa: F811
    redis_url,
    env,
):
    prefix = env["REDIS_PREFIX"]
    async with backend_server(failures=2) as (backend, url):
        env.update(EVENTS_WEBHOOK_URL=url, HOOK_SECRET=HOOK_SECRET)
        env.update(EVENTS_WEBHOOK_BATCH="2", EVENTS_WEBHOOK_QUEUE="4", EVENTS_WEBHOOK_RETRIES="2")
        gw = processes(**env)
        token = mint_token(TOKENS, "hooked", ["room:*"])
        async with ws_client(gw.port, token) as c:
            for ch in ("room:1", "room:2", "room:3"):
                assert (await c.request("sub", ch=ch))["ok"]
            await until(lambda: len(delivered(backend)) >= 4, timeout=10 * UNIT)
            assert [e["type"] for e in delivered(backend)[:4]] == ["connect"] + ["subscribe"] * 3
            # The backend fails for good: the gateway's queue stays bounded, the rest is dropped.
            backend.failures = 10**6
            for i in range(12):
                assert (await c.request("sub", ch=f"room:flood-{i}"))["ok"]
            await until(lambda: dropped(gw), timeout=10 * UNIT, step=0.1)
            assert await metric(gw.port, "gateway_events_queued", target="webhook") <= 4
            failed = await metric(
                gw.port, "gateway_events_webhook_failures_total", kind="status_5xx"
            )
            assert failed >= 2
    assert backend.posts and all(verify(headers, body) for headers, body in backend.posts)
    first_three = [body for _, body in backend.posts[:3]]
    assert first_three[0] == first_three[1] == first_three[2]  # failed twice, sent again
    assert all(len(json.loads(body)["events"]) <= 2 for _, body in backend.posts)
    # The stream, the durable copy, has every event the webhook lost.
    redis = aioredis.Redis.from_url(redis_url)
    try:
        stream = decoded([f[b"event"] for _, f in await redis.xrange(f"{prefix}events")])
        await redis.delete(f"{prefix}events")
    finally:
        await redis.aclose()
    assert sum(1 for e in stream if e.get("channel", "").startswith("room:flood-")) == 12


async def lost_by(gw: Any) -> bool:
    return await metric(gw.port, "gateway_events_nodes_lost_total") == 1


async def dropped(gw: Any) -> bool:
    return await metric(gw.port, "gateway_events_dropped_total", target="webhook") > 0


def delivered(backend: Any) -> list[dict[str, Any]]:
    return [event for batch in backend.accepted for event in batch["events"]]
