"""State that one party could make a process, Redis or PostgreSQL keep, without bound.

Found by the growth review of the fifteenth session (2026-12-03), each test
failed before its fix:

* header names were remembered whatever their length: 1,000 requests from a
  client with no token, each with one made-up 60 KB name, left ~90 MB in the
  process for good and ~120 MB more until other names pushed them out;
* the memory broker (one process, no ``REDIS_URL``: ``make run``) forgot an
  expired history only when its channel was used again, so every project
  ever written kept its ``projects:<id>`` history for the process's life;
* one account could create projects without end (2,382 in a minute, 53 MB of
  table and 246 MB of Redis history from one ordinary account), and every
  user's ``GET /api/projects`` pages through them.
"""

from __future__ import annotations

import asyncio
import gc
import tracemalloc
from typing import Any

import asyncpg

from core.infra.broker import MemoryBroker
from core.infra.rate import Rate
from tests.harness import ApiClient, running_gateway
from tests.servers import UNIT
from tests.test_authz import new_person

#: A header name no client needs, distinct per request.
NAME_BYTES = 20_000


def _head(path: str, i: int, extra: bytes = b"") -> bytes:
    name = b"X-%06d-" % i + b"a" * (NAME_BYTES - 9)
    return b"GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\n%s%s: 1\r\n\r\n" % (path.encode(), extra, name)


async def _answer(reader: asyncio.StreamReader) -> int:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5 * UNIT)
    length = next(
        (int(line.split(b":")[1]) for line in head.split(b"\r\n")
         if line.lower().startswith(b"content-length:")),
        0,
    )  # fmt: skip
    await asyncio.wait_for(reader.readexactly(length), 5 * UNIT)
    return int(head.split(b" ", 2)[1])


async def test_long_header_names_from_a_client_with_no_token_are_not_kept() -> None:
    upgrade = (
        b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    )
    async with running_gateway() as gw:
        tracemalloc.start()
        try:
            gc.collect()
            before = tracemalloc.get_traced_memory()[0]
            # Tornado's path, on one kept-alive connection
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            statuses = []
            for i in range(300):
                writer.write(_head("/healthz", i))
                statuses.append(await _answer(reader))
            writer.close()
            # the listener's own parser: a handshake whole at its accept
            for i in range(300, 600):
                reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
                writer.write(_head("/ws", i, upgrade))
                statuses.append(await _answer(reader))
                writer.close()
            await asyncio.sleep(0.1 * UNIT)
            gc.collect()
            kept = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
    assert statuses == [200] * 300 + [401] * 300
    # 600 names of 20 KB were sent (12 MB); before, ~24 MB of them were kept
    assert kept < 3_000_000, f"{kept:,} bytes kept after 600 requests"


async def test_the_memory_broker_forgets_expired_histories_nobody_uses_again() -> None:
    broker = MemoryBroker()
    await broker.start(lambda ch, data, position: None)
    ttl = 0.2 * UNIT
    tracemalloc.start()
    try:
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        for i in range(1000):  # a project's channel each, written once (50 MB)
            data = b'"%d%s"' % (i, b"x" * 50_000)
            await broker.publish_history(f"projects:{i}", data, 100, ttl)
        await asyncio.sleep(2 * ttl)
        await broker.publish_history("projects:next", b"1", 100, ttl)
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
        await broker.close()
    assert await broker.history("projects:0", 0, 100) == ([], None)
    # before, all 50 MB stayed until each channel was used again
    assert kept < 1_000_000, f"{kept:,} bytes kept after the histories expired"


def _project(email: str) -> dict[str, Any]:
    return {"name": "Mine", "owner_email": email, "budget": 1, "starts_on": "2026-01-01"}


async def test_a_user_owns_at_most_max_projects_per_user_and_no_one_else_pays_for_it(
    clean_db: dict[str, str],
) -> None:
    async with running_gateway(**clean_db, max_projects_per_user=3, rate_login_ip=None) as gw:
        ada, bob = await new_person(gw, clean_db), await new_person(gw, clean_db)
        admin = await new_person(gw, clean_db, "admin")
        as_ada, as_bob, as_admin = (ApiClient(gw.port, p.token) for p in (ada, bob, admin))
        try:
            created = []
            for _ in range(4):
                status, _, body = await as_ada.call("POST", "/api/projects", _project(ada.email))
                created.append((status, body.get("id") or body["error"]["code"]))
            assert [s for s, _ in created] == [201, 201, 201, 409], created
            assert created[3][1] == "limit_reached"
            # another user, and an admin creating for Ada, are not held back by her projects
            status, _, _ = await as_bob.call("POST", "/api/projects", _project(bob.email))
            assert status == 201
            status, _, _ = await as_admin.call("POST", "/api/projects", _project(ada.email))
            assert status == 201
            # Ada owns 4 now: deleting one leaves her at the limit, deleting two under it
            for _, id in created[:2]:
                status, _, _ = await as_ada.call("DELETE", f"/api/projects/{id}")
                assert status == 204
            status, _, body = await as_ada.call("POST", "/api/projects", _project(ada.email))
            assert status == 201, body
            status, _, body = await as_ada.call("POST", "/api/projects", _project(ada.email))
            assert (status, body["error"]["code"]) == (409, "limit_reached")
        finally:
            for api in (as_ada, as_bob, as_admin):
                api.close()


async def test_large_writes_spend_the_rest_allowance_by_their_size(
    clean_db: dict[str, str],
) -> None:
    async with running_gateway(**clean_db, rate_rest=Rate(40, 60.0), rate_login_ip=None) as gw:
        ada = await new_person(gw, clean_db)
        as_ada = ApiClient(gw.port, ada.token)
        try:
            # 30 KB of JSON (each control character is 6 bytes escaped): 4 requests' worth
            big = {**_project(ada.email), "description": "\x01" * 5000}
            statuses = []
            for _ in range(12):
                status, _, _ = await as_ada.call("POST", "/api/projects", big)
                statuses.append(status)
        finally:
            as_ada.close()
    # before, all 12 were written (and 4 times as many such bytes a minute reached
    # the table, the outbox and every history channel of them)
    assert statuses == [201] * 10 + [429] * 2


async def _owning(projects: int, gw: Any, clean_db: dict[str, str]) -> tuple[Any, ApiClient]:
    """A new user owning ``projects`` projects (written straight to the table), and her client."""
    ada = await new_person(gw, clean_db)
    conn = await asyncpg.connect(clean_db["database_url"])
    try:
        await conn.execute(
            f"""insert into "{clean_db["database_schema"]}".projects
                (name, owner_email, budget, starts_on)
            select 'p' || g, $1, 1, '2026-01-01' from generate_series(1, $2::int) g""",
            ada.email,
            projects,
        )
    finally:
        await conn.close()
    return ada, ApiClient(gw.port, ada.token)


async def test_an_e_mail_change_spends_one_request_per_project_it_moves(
    clean_db: dict[str, str],
) -> None:
    # One PATCH of one's own address moved every project of the account (up to
    # MAX_PROJECTS_PER_USER), each with its change events to every subscriber of
    # `projects`: 10 such requests pushed 10,000 events (54 MB) to each of them.
    async with running_gateway(**clean_db, rate_rest=Rate(40, 60.0), rate_login_ip=None) as gw:
        ada, as_ada = await _owning(30, gw, clean_db)
        try:
            path = f"/api/users/{ada.id}"
            status, _, _ = await as_ada.call("PATCH", path, {"email": "ada.1@example.com"})
            assert status == 200
            status, _, body = await as_ada.call("PATCH", path, {"email": "ada.2@example.com"})
            assert (status, body["error"]["code"]) == (429, "rate_limited")
            # A change that moves nothing costs one request, as before.
            status, _, _ = await as_ada.call("PATCH", path, {"display_name": "Ada"})
            assert status == 200
            _, _, me = await as_ada.call("GET", path)
            assert me["email"] == "ada.1@example.com"
            _, _, page = await as_ada.call("GET", "/api/projects?limit=100")
            assert {p["owner_email"] for p in page["items"]} == {"ada.1@example.com"}
        finally:
            as_ada.close()


async def test_an_e_mail_change_moving_a_whole_allowance_of_projects_goes_through(
    clean_db: dict[str, str],
) -> None:
    # The request counts itself against RATE_REST first, then its moves: a change moving
    # as many projects as RATE_REST allows (10 of 10 here) was refused for ever, each
    # retry after its Retry-After refused again (an account an admin gave 1,200 projects
    # under the default RATE_REST could never change its address). Now the moves count
    # the rest of the allowance at most, and the wait said is enough.
    async with running_gateway(**clean_db, rate_rest=Rate(10, 2.0), rate_login_ip=None) as gw:
        ada, as_ada = await _owning(10, gw, clean_db)
        try:
            path = f"/api/users/{ada.id}"
            statuses = []
            for _ in range(3):
                status, headers, _ = await as_ada.call(
                    "PATCH", path, {"email": "ada.1@example.com"}
                )
                statuses.append(status)
                if status != 429:
                    break
                await asyncio.sleep(float(headers["Retry-After"]))
            assert statuses[-1] == 200, statuses  # before: [429, 429, 429], and on
        finally:
            as_ada.close()
