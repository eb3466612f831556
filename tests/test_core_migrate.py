"""Migrations: applied once each, in order, even by replicas starting together."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid

import asyncpg
import pytest

from core.migrate import migrate, migrations


@pytest.fixture
async def fresh_schema(database_url):
    schema = f"mig_{uuid.uuid4().hex[:10]}"
    yield schema
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(f'drop schema if exists "{schema}" cascade')
    finally:
        await conn.close()


async def test_applying_twice_is_a_no_op(database_url, fresh_schema):
    conn = await asyncpg.connect(database_url)
    try:
        first = await migrate(conn, fresh_schema)
        second = await migrate(conn, fresh_schema)
        recorded = await conn.fetch(
            f'select version from "{fresh_schema}".schema_migrations order by version'
        )
    finally:
        await conn.close()
    assert [m.version for m in first] == [m.version for m in migrations()] and first
    assert second == []
    assert [r["version"] for r in recorded] == [m.version for m in migrations()]


async def test_replicas_starting_together_apply_each_migration_once(database_url, fresh_schema):
    conns = [await asyncpg.connect(database_url) for _ in range(4)]
    try:
        results = await asyncio.gather(*(migrate(c, fresh_schema) for c in conns))
    finally:
        for c in conns:
            await c.close()
    applied = [m.version for r in results for m in r]
    assert sorted(applied) == [m.version for m in migrations()]  # once each, by one replica


def test_migrate_command(database_url, fresh_schema):
    env = {"DATABASE_URL": database_url, "DATABASE_SCHEMA": fresh_schema, "PATH": "/usr/bin:/bin"}
    run = [sys.executable, "-m", "core", "migrate"]
    first = subprocess.run(run, env=env, capture_output=True, text=True, timeout=60)
    again = subprocess.run(run, env=env, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0 and "applied 0001_users_projects" in first.stdout, first.stderr
    assert again.returncode == 0 and "none (up to date)" in again.stdout


def test_migrate_command_without_database_is_a_clear_error():
    out = subprocess.run(
        [sys.executable, "-m", "core", "migrate"],
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "DATABASE_URL" in out.stderr and "Traceback" not in out.stderr
