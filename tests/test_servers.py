"""The server fixtures themselves, fallback path included.

CI always has Redis and PostgreSQL, so without these tests the throwaway path
would never run until the day someone needs it.
"""

from __future__ import annotations

import socket
import time
import uuid
from pathlib import Path

import asyncpg
import pytest
import redis
import redis.asyncio as aioredis

from tests.servers import (
    UNIT,
    ThrowawayRedis,
    ensure_postgres,
    ensure_redis,
    postgres_answers,
    redis_answers,
    server_report,
)

UNREACHABLE_REDIS = "redis://127.0.0.1:1/0"
UNREACHABLE_POSTGRES = "postgresql://127.0.0.1:1/test"


def test_unreachable_urls_do_not_answer() -> None:
    assert not redis_answers(UNREACHABLE_REDIS)
    assert not postgres_answers(UNREACHABLE_POSTGRES)


def test_probes_give_up_on_a_server_that_never_replies() -> None:
    with socket.socket() as silent:  # accepts connections (backlog), never says a word
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        started = time.monotonic()
        assert not redis_answers(f"redis://127.0.0.1:{port}/0", timeout=0.2)
        assert not postgres_answers(f"postgresql://127.0.0.1:{port}/test", timeout=0.2)
        assert time.monotonic() - started < 2.0


def test_report_says_when_a_throwaway_server_will_start() -> None:
    lines = server_report(UNREACHABLE_REDIS, UNREACHABLE_POSTGRES)
    assert len(lines) == 2
    assert all("does not answer" in line and "throwaway" in line for line in lines)


def test_ensure_redis_falls_back_to_a_throwaway_server(tmp_path: Path) -> None:
    url, server = ensure_redis(UNREACHABLE_REDIS, tmp_path)
    assert server is not None
    try:
        assert url == server.url != UNREACHABLE_REDIS
        assert ensure_redis(url, tmp_path / "unused") == (url, None)
        with redis.Redis.from_url(url) as client:
            pubsub = client.pubsub()
            try:
                pubsub.subscribe("servers-test")
                confirmation = pubsub.get_message(timeout=2 * UNIT)
                assert confirmation is not None and confirmation["type"] == "subscribe"
                assert client.publish("servers-test", b"hello") == 1
                message = pubsub.get_message(timeout=2 * UNIT)
                assert message is not None and message["data"] == b"hello"
            finally:
                pubsub.close()
    finally:
        server.stop()
    assert not redis_answers(url)


def test_restart_keeps_the_port_and_kill_stops_answering(tmp_path: Path) -> None:
    with ThrowawayRedis(tmp_path) as server:
        port = server.port
        with redis.Redis.from_url(server.url) as client:
            client.set("marker", b"1")
        server.restart()
        assert server.port == port
        assert server.url == f"redis://127.0.0.1:{port}/0"
        with redis.Redis.from_url(server.url) as client:
            # --save "": a fresh process comes back empty, so this proves a real restart.
            assert client.get("marker") is None
        server.kill()
        assert not server.running
        assert not redis_answers(server.url)
        server.start()
        assert redis_answers(server.url)
    assert not redis_answers(server.url)


def test_start_fails_loudly_with_the_log_when_the_port_is_taken(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        server = ThrowawayRedis(tmp_path, port=holder.getsockname()[1])
        with pytest.raises(RuntimeError, match=r"(?i)address already in use"):
            server.start()
    assert not server.running


async def test_ensure_postgres_falls_back_to_pgserver(tmp_path: Path) -> None:
    # Called with this test's event loop running, as a fixture in async code would be.
    url, server = ensure_postgres(UNREACHABLE_POSTGRES, tmp_path)
    assert server is not None
    try:
        assert url == server.url != UNREACHABLE_POSTGRES
        assert ensure_postgres(url, tmp_path / "unused") == (url, None)
        conn = await asyncpg.connect(url, timeout=5 * UNIT)
        try:
            assert await conn.fetchval("select 1") == 1
            assert await conn.fetchval("select current_database()") == "test"
        finally:
            await conn.close()
    finally:
        server.stop()
    assert not postgres_answers(url)


async def test_fixture_servers_answer(redis_url: str, database_url: str) -> None:
    key = f"servers-test:{uuid.uuid4().hex}"
    client = aioredis.Redis.from_url(redis_url)
    try:
        await client.set(key, b"round trip", ex=60)
        assert await client.get(key) == b"round trip"
        await client.delete(key)
    finally:
        await client.aclose()

    conn = await asyncpg.connect(database_url, timeout=5 * UNIT)
    try:
        assert await conn.fetchval("select $1::int + 1", 41) == 42
    finally:
        await conn.close()
