"""bench/pgfunctions.py runs end to end, so that it cannot rot (no figure is checked)."""

from __future__ import annotations

import asyncio
import sys
import uuid
from pathlib import Path

import asyncpg

ROOT = Path(__file__).resolve().parent.parent


async def test_the_functions_bench_times_each_statement_both_ways_and_drops_its_schema(
    database_url,
):
    schema = f"bench_fn_{uuid.uuid4().hex[:8]}"
    argv = [sys.executable, "-m", "bench.pgfunctions", "--database-url", database_url]
    argv += ["--schema", schema, "--rounds", "1", "--calls", "20"]
    proc = await asyncio.create_subprocess_exec(
        *argv, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(120):
        out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    stdout = out.decode()
    for statement in ("GET /api/projects/{id}", "GET /api/users/{id}", "POST /api/projects"):
        assert statement in stdout
    assert stdout.count("immutable ") == 4 and stdout.count("stable ") == 4
    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval("select to_regnamespace($1)", schema) is None
    finally:
        await conn.close()
