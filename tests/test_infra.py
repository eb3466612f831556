"""The pieces of the shared layer that exist once: tasks, backoff, control messages, errors."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Mapping

import asyncpg
import pytest
import tornado.web
from tornado.httpclient import AsyncHTTPClient
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

from core.errormap import JsonErrors
from core.infra import control
from core.infra.backoff import Backoff
from core.infra.broker.base import BrokerUnavailable
from core.infra.broker.cluster import RedisClusterBroker
from core.infra.broker.memory import MemoryBroker
from core.infra.broker.redis import RedisBroker
from core.infra.errors import ApiError, TooManyRequests
from core.infra.revocation import REVOKED_KEY, Revocations
from core.infra.tasks import TaskSet
from tests.harness import unique_prefix

# -- background tasks -------------------------------------------------------------------


async def test_a_failing_background_task_is_logged_once_with_its_traceback(caplog):
    tasks = TaskSet(logging.getLogger("test.tasks"))

    async def fails() -> None:
        raise ValueError("boom")

    with caplog.at_level(logging.ERROR, logger="test.tasks"):
        task = tasks.spawn(fails(), "the-failing-one")
        await tasks.wait()
    assert task.done() and len(tasks) == 0
    [record] = [r for r in caplog.records if r.name == "test.tasks"]
    assert "the-failing-one" in record.getMessage()
    assert record.exc_info is not None and isinstance(record.exc_info[1], ValueError)


async def test_tasks_are_kept_until_done_and_cancel_ends_them(caplog):
    tasks = TaskSet(logging.getLogger("test.tasks"))
    started = asyncio.Event()

    async def forever() -> None:
        started.set()
        await asyncio.sleep(3600)

    task = tasks.spawn(forever())
    await started.wait()
    assert len(tasks) == 1
    await tasks.wait(within=0.05)  # gives up after its time, the task still runs
    assert not task.done()
    with caplog.at_level(logging.ERROR, logger="test.tasks"):
        await tasks.cancel()
    assert task.cancelled() and len(tasks) == 0
    assert caplog.records == []  # a cancelled task is not a failure


# -- backoff ------------------------------------------------------------------------------


def test_backoff_is_full_jitter_as_its_docstring_says():
    """Full jitter spreads over [0, window]; equal jitter would never go below half."""
    b = Backoff(base=0.5, cap=30.0)
    rng = random.Random(7)
    delays = [b.delay(4, rand=rng.random) for _ in range(2000)]  # window 8 s
    assert 0.0 <= min(delays) < 0.5 and 7.5 < max(delays) <= 8.0
    assert sum(d < 4.0 for d in delays) > 800  # about half below the window's middle


def test_every_broker_reconnects_with_the_one_backoff():
    for broker in (
        RedisBroker("redis://127.0.0.1:1/0", backoff_initial=0.2, backoff_max=5.0),
        RedisClusterBroker("redis://127.0.0.1:1/0", backoff_initial=0.2, backoff_max=5.0),
    ):
        assert broker._backoff == Backoff(0.2, 5.0)


# -- control channel -------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [b'{"type":"from_a_newer_version","x":1}', b"not json", b'{"type":"sessions_revoked"}', b""],
)
def test_an_unknown_or_malformed_control_message_is_ignored(data):
    assert control.decode(data) is None


async def test_a_revocation_reaches_another_process_through_the_control_channel():
    broker = MemoryBroker()
    here, there = Revocations(60.0, broker), Revocations(60.0)
    received: list[control.ControlMessage] = []

    def on_publication(ch: str, data: bytes, position: object) -> None:
        if ch == control.CONTROL and (message := control.decode(data)) is not None:
            received.append(message)
            there.on_control(message)

    await broker.start(on_publication)
    try:
        await here.revoke(["sid-1", "sid-2"])
        await asyncio.sleep(0)
    finally:
        await broker.close()
    assert received == [control.SessionsRevoked(["sid-1", "sid-2"])]
    assert "sid-1" in there and "sid-2" in there and "sid-3" not in there


async def test_a_process_without_the_database_learns_the_revocations_it_missed(redis_url):
    """A gateway with CORE_URL that started after a logout, or whose broker link was down
    when it was broadcast, used to honour the session's tokens until they expired: it has
    no database to catch up from. It reads the store the revoking process writes."""
    prefix = unique_prefix()
    core_side, gateway_side = RedisBroker(redis_url, prefix), RedisBroker(redis_url, prefix)
    for broker in (core_side, gateway_side):
        await broker.start(lambda ch, data, position: None)
    try:
        here = Revocations(60.0, store=core_side)  # the core, which revokes
        closed: list[str] = []
        # A gateway that heard no broadcast (its own TTL shorter than the core's)
        there = Revocations(0.01, store=gateway_side, on_revoked=closed.append)
        await here.revoke(["sid-1"])
        assert "sid-1" not in there
        assert await there.catch_up() == 1 and "sid-1" in there and closed == ["sid-1"]
        await asyncio.sleep(0.05)  # past the gateway's TTL, not the store's
        assert await there.catch_up() == 0 and "sid-1" in there  # known still, applied once
        assert closed == ["sid-1"]
        # Redis restarted: the store is empty, and the core's sync puts back what the
        # database holds (once; nothing is written while nothing is lost).
        await core_side._pub_client.delete(core_side._expiring_key(REVOKED_KEY))
        later = Revocations(60.0, store=gateway_side)
        assert await later.catch_up() == 0
        assert await here.restore(["sid-1", "sid-2"]) == 2
        assert await here.restore(["sid-1", "sid-2"]) == 0
        assert await later.catch_up() == 2 and "sid-1" in later and "sid-2" in later
    finally:
        await core_side._pub_client.delete(core_side._expiring_key(REVOKED_KEY))
        for broker in (core_side, gateway_side):
            await broker.close()


async def test_a_look_at_recent_revocations_reads_only_those_stored_since(redis_url):
    """The core on Lambda reads, before answering, only the revocations stored since its
    last look: the set's scores (stored time + TTL) grow with the revocation, so a range
    read from the last look returns the new ones alone, also after Redis lost the set
    and the core's sync put it back."""
    prefix = unique_prefix()
    core_side, lambda_side = RedisBroker(redis_url, prefix), RedisBroker(redis_url, prefix)
    for broker in (core_side, lambda_side):
        await broker.start(lambda ch, data, position: None)
    key = core_side._expiring_key(REVOKED_KEY)
    try:
        here = Revocations(60.0, store=core_side)  # the core, which revokes
        there = Revocations(60.0, store=lambda_side)
        await here.revoke(["old"])
        # Stored 11 s before now (TTL 60): read by a first look, not by a look from now on.
        await core_side.expiring_add_many(REVOKED_KEY, {"long-ago": time.time() + 60.0 - 11.0})
        assert await there.catch_up_recent(time.time() - 60.0) == 2  # the first look: all
        first = time.time()
        await here.revoke(["new"])
        assert await there.catch_up_recent(first) == 1 and "new" in there
        read = await lambda_side.expiring_members_from(REVOKED_KEY, first + 60.0 - 10.0)
        assert set(read) == {"old", "new"}  # the overlap, not the whole set
        await lambda_side.expiring_add_many(REVOKED_KEY, {"stale-clock": first + 60.0 - 11.0})
        assert "stale-clock" not in await lambda_side.expiring_members_from(
            REVOKED_KEY, first + 60.0 - 10.0
        )
        # Redis restarted: the set is gone; a revocation made meanwhile reached the
        # database only, and the core's sync puts both back with fresh scores.
        await core_side._pub_client.delete(key)
        second = time.time()
        assert await there.catch_up_recent(second) == 0
        assert await here.restore(["new", "during-restart"]) == 2
        assert await there.catch_up_recent(second) == 1 and "during-restart" in there
    finally:
        await core_side._pub_client.delete(key)
        for broker in (core_side, lambda_side):
            await broker.close()


async def test_a_store_out_of_reach_loses_no_revocation_already_known():
    class Down:
        async def expiring_add_many(self, key: str, members: Mapping[str, float]) -> None:
            raise BrokerUnavailable("down")

        async def expiring_members(self, key: str, now: float) -> dict[str, float]:
            raise BrokerUnavailable("down")

        async def expiring_members_from(self, key: str, until: float) -> dict[str, float]:
            raise BrokerUnavailable("down")

    revocations = Revocations(60.0, store=Down())
    await revocations.revoke(["sid-1"])  # applied here all the same, and logged
    assert "sid-1" in revocations
    assert await revocations.catch_up() == 0 and "sid-1" in revocations
    assert await revocations.restore(["sid-1"]) == 0
    assert await revocations.catch_up_recent(0.0) is None and "sid-1" in revocations


# -- the one error type and mapping ------------------------------------------------------


class _Raises(JsonErrors):
    def get(self, what: str) -> None:
        if what == "limited":
            raise TooManyRequests(2.5)
        if what == "conflict":
            raise asyncpg.UniqueViolationError("duplicate key value violates users_email_key")
        if what == "bug":
            raise RuntimeError("secret internals")
        raise ApiError(418, "teapot", "short and stout", headers={"X-Why": "because"})


@pytest.fixture
async def raising_server():
    sockets = bind_sockets(0, "127.0.0.1")
    server = HTTPServer(tornado.web.Application([(r"/(\w+)", _Raises)]))
    server.add_sockets(sockets)
    yield f"http://127.0.0.1:{sockets[0].getsockname()[1]}"
    server.stop()


@pytest.mark.parametrize(
    ("what", "status", "code", "header"),
    [
        ("limited", 429, "rate_limited", ("Retry-After", "3")),
        ("conflict", 409, "conflict", None),
        ("bug", 500, "internal", None),
        ("teapot", 418, "teapot", ("X-Why", "because")),
    ],
)
async def test_a_tornado_handler_answers_any_exception_with_the_one_body(
    raising_server, caplog, what, status, code, header
):
    with caplog.at_level(logging.INFO):
        response = await AsyncHTTPClient().fetch(f"{raising_server}/{what}", raise_error=False)
    assert response.code == status
    assert response.headers["Content-Type"] == "application/json"
    body = tornado.escape.json_decode(response.body)
    assert body["error"]["status"] == status and body["error"]["code"] == code
    assert (
        "secret" not in response.body.decode() and "users_email_key" not in body["error"]["message"]
    )
    if header is not None:
        assert response.headers[header[0]] == header[1]
    errors = [
        r for r in caplog.records if r.levelno >= logging.ERROR and r.name != "tornado.access"
    ]
    if what == "bug":  # logged once, with the traceback, by the one mapping
        [record] = errors
        assert record.name == "core.errormap" and record.exc_info is not None
    else:
        assert errors == []
