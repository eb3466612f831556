"""Lists asked for at once share their query, and never miss a write answered before them."""

from __future__ import annotations

import asyncio
import json

import pytest

from core.events import Events
from core.projects import Projects
from core.request import Request
from core.schemas import ProjectQuery
from core.validation import parse_query
from tests.test_core_batch import pool, row  # noqa: F401 (pool: the fixture used here)


@pytest.fixture
def projects(pool):  # noqa: F811
    return Projects(pool, Events(None))


def listing(query: str) -> Request:
    req = Request("GET", "/api/projects", query=None, query_string=query)
    req.args = parse_query(
        ProjectQuery, {k: [v] for k, v in (p.split("=") for p in query.split("&"))}
    )
    return req


async def names(projects: Projects, query: str) -> list[str]:
    resp = await projects.list(listing(query))
    return [p["name"] for p in json.loads(resp.body)["items"]]


async def test_concurrent_lists_share_queries_and_each_gets_its_page(projects):
    for i in range(6):
        await projects._creations.submit(row(f"p{i}"))
    queries = ["limit=2", "limit=3&status=draft", "limit=2"] * 20
    pages = await asyncio.gather(*(names(projects, q) for q in queries))
    assert pages[0] == ["p0", "p1"] and pages[1] == ["p0", "p1", "p2"]
    assert pages == [pages[0], pages[1], pages[0]] * 20
    assert projects._pages.round_trips < len(queries)


async def test_a_list_made_after_a_write_was_answered_sees_it(projects):
    async def write_then_list(i: int) -> list[str]:
        await projects._creations.submit(row(f"w{i}"))
        return await names(projects, "limit=100")

    async def lists() -> None:
        for _ in range(20):
            await names(projects, "limit=100")

    done = await asyncio.gather(
        *(write_then_list(i) for i in range(30)), *(lists() for _ in range(4))
    )
    for i, page in enumerate(done[:30]):
        assert f"w{i}" in page
