"""Write coalescing: one statement for many concurrent creations, each its own answer."""

from __future__ import annotations

import asyncio
import json

import asyncpg
import pytest

from core.batch import Batcher
from core.projects import _CREATE_MANY


@pytest.fixture
async def pool(clean_db):
    p = await asyncpg.create_pool(
        clean_db["database_url"],
        min_size=1,
        max_size=4,
        server_settings={"search_path": clean_db["database_schema"], "timezone": "UTC"},
    )
    yield p
    await p.close()


def row(name: str, budget: float = 10.5) -> bytes:
    return json.dumps(
        {"name": name, "description": "", "owner_email": "a@b.co", "budget": budget,
         "status": "draft", "tags": ["t"], "starts_on": "2026-01-01", "ends_on": None,
         "milestones": [{"title": "m", "due": "2026-02-01", "done": False}]}
    ).encode()  # fmt: skip


async def test_concurrent_rows_share_statements_and_each_gets_its_own_record(pool):
    batcher = Batcher(pool, _CREATE_MANY, max_batch=20, max_inflight=1)
    names = [f"p{i}" for i in range(50)]
    records = await asyncio.gather(*(batcher.submit(row(n)) for n in names))
    assert [json.loads(r["body"])["name"] for r in records] == names
    assert len({r["id"] for r in records}) == 50
    # The first left at once, alone; the 49 that came meanwhile went 20 + 20 + 9.
    assert batcher.statements == 4
    stored = await pool.fetch("select name, tags, milestones::text from projects order by id")
    assert [r["name"] for r in stored] == names
    assert stored[0]["tags"] == ["t"] and json.loads(stored[0]["milestones"])[0]["title"] == "m"


async def test_a_lone_row_is_sent_at_once(pool):
    batcher = Batcher(pool, _CREATE_MANY)
    record = await asyncio.wait_for(batcher.submit(row("solo")), 5)
    assert json.loads(record["body"])["version"] == 1 and batcher.statements == 1


async def test_a_bad_row_fails_alone_and_the_rest_are_written(pool):
    batcher = Batcher(pool, _CREATE_MANY, max_inflight=1)
    rows = [row("a"), row("b"), row("bad", budget=-1), row("c")]  # -1 breaks a CHECK
    results = await asyncio.gather(*(batcher.submit(r) for r in rows), return_exceptions=True)
    assert isinstance(results[2], asyncpg.CheckViolationError)
    assert [json.loads(r["body"])["name"] for i, r in enumerate(results) if i != 2] == [
        "a",
        "b",
        "c",
    ]
    assert await pool.fetchval("select count(*) from projects") == 3


async def test_a_full_queue_refuses_more(pool):
    from core.infra.errors import Unavailable

    batcher = Batcher(pool, _CREATE_MANY, max_inflight=1, max_queued=3)
    # The first leaves at once (not queued); three wait.
    tasks = [asyncio.ensure_future(batcher.submit(row(f"q{i}"))) for i in range(4)]
    extra = asyncio.ensure_future(batcher.submit(row("over")))
    with pytest.raises(Unavailable):
        await extra
    assert len(await asyncio.gather(*tasks)) == 4
