"""bench/pgfunctions.py runs end to end, so that it cannot rot (no figure is checked)."""

from __future__ import annotations

import subprocess
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
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for statement in ("GET /api/projects/{id}", "GET /api/users/{id}", "POST /api/projects"):
        assert f"{statement}" in done.stdout
    assert done.stdout.count("immutable ") == 4 and done.stdout.count("stable ") == 4
    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval("select to_regnamespace($1)", schema) is None
    finally:
        await conn.close()
