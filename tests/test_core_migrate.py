"""Migrations: applied once each, in order, even by replicas starting together; an
applied migration whose file was edited is refused, by `migrate` and by the start-up check."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import subprocess
import sys
import uuid
from pathlib import Path

import asyncpg
import msgspec
import pytest

import core.migrate
from core.db import check_schema
from core.migrate import Migration, SchemaError, inspect, migrate, migrations
from core.schemas import Project


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


# -- checksums ---------------------------------------------------------------------


def shipping(monkeypatch: pytest.MonkeyPatch, shipped: list[Migration]) -> None:
    """Make the package ship ``shipped`` (an older release, or edited files)."""
    monkeypatch.setattr(core.migrate, "migrations", lambda: list(shipped))


def edited(m: Migration) -> Migration:
    return m._replace(sql=m.sql + "\n-- edited after it was applied\n")


async def recorded(conn: asyncpg.Connection, schema: str) -> dict[int, str | None]:
    rows = await conn.fetch(f'select version, checksum from "{schema}".schema_migrations')
    return {r["version"]: r["checksum"] for r in rows}


async def test_each_migration_is_recorded_with_the_sha256_of_its_file(database_url, fresh_schema):
    conn = await asyncpg.connect(database_url)
    try:
        await migrate(conn, fresh_schema)
        checksums = await recorded(conn, fresh_schema)
    finally:
        await conn.close()
    folder = Path(core.migrate.__file__).parent / "migrations"
    files = {int(p.name[:4]): p for p in folder.glob("[0-9][0-9][0-9][0-9]_*.sql")}
    assert checksums == {
        v: hashlib.sha256(p.read_text("utf-8").encode()).hexdigest() for v, p in files.items()
    }


async def test_an_edited_migration_is_refused_and_nothing_is_applied(
    database_url, fresh_schema, monkeypatch
):
    *older, last = migrations()
    conn = await asyncpg.connect(database_url)
    try:
        shipping(monkeypatch, older)  # the previous release migrated the schema
        assert await migrate(conn, fresh_schema) == older
        before = await recorded(conn, fresh_schema)
        shipping(monkeypatch, [older[0], edited(older[1]), *older[2:], last])
        with pytest.raises(SchemaError) as refused:
            await migrate(conn, fresh_schema)
        after = await recorded(conn, fresh_schema)
        state = await inspect(conn, fresh_schema)  # what the start-up check sees
        with pytest.raises(SchemaError, match=older[1].label):
            await check_schema(conn, fresh_schema)
    finally:
        await conn.close()
    assert older[1].label in str(refused.value) and "checksum" in str(refused.value)
    assert last.label not in str(refused.value)
    assert after == before and last.version not in after  # the pending one was not applied
    assert not state.ok and state.edited == (edited(older[1]),)
    assert state.missing == (last,)


async def test_rows_from_before_checksums_are_trusted_then_recorded(database_url, fresh_schema):
    """A schema migrated before this change has no checksum column: it serves, and the
    next `migrate` records the files' checksums (trust on first check)."""
    conn = await asyncpg.connect(database_url)
    try:
        await migrate(conn, fresh_schema)
        await conn.execute(f'alter table "{fresh_schema}".schema_migrations drop column checksum')
        state = await inspect(conn, fresh_schema)
        await check_schema(conn, fresh_schema)  # starts: nothing missing, nothing known edited
        assert await migrate(conn, fresh_schema) == []
        checksums = await recorded(conn, fresh_schema)
        again = await inspect(conn, fresh_schema)
    finally:
        await conn.close()
    assert state.ok and state.unrecorded == tuple(migrations())
    assert checksums == {m.version: m.checksum for m in migrations()}
    assert again.ok and again.unrecorded == ()


async def test_a_schema_with_newer_migrations_is_usable(database_url, fresh_schema):
    """A release rolled back after migrating: the older code still serves (expand/contract)."""
    conn = await asyncpg.connect(database_url)
    try:
        await migrate(conn, fresh_schema)
        await conn.execute(
            f'insert into "{fresh_schema}".schema_migrations (version, name, checksum)'
            " values (9999, 'from_a_newer_release', 'abc')"
        )
        state = await inspect(conn, fresh_schema)
        await check_schema(conn, fresh_schema)
        assert await migrate(conn, fresh_schema) == []
    finally:
        await conn.close()
    assert state.ok and state.newer == ("9999_from_a_newer_release",)


async def test_an_unmigrated_schema_lacks_every_migration(database_url, fresh_schema):
    conn = await asyncpg.connect(database_url)
    try:
        state = await inspect(conn, fresh_schema)  # the schema does not even exist
        with pytest.raises(SchemaError) as refused:
            await check_schema(conn, fresh_schema)
    finally:
        await conn.close()
    assert state.missing == tuple(migrations()) and not state.ok
    message = str(refused.value)
    assert all(m.label in message for m in migrations())
    assert "python -m core migrate" in message and fresh_schema in message


def test_migrate_command_refuses_an_edited_migration(database_url, fresh_schema):
    env = {"DATABASE_URL": database_url, "DATABASE_SCHEMA": fresh_schema, "PATH": "/usr/bin:/bin"}
    run = [sys.executable, "-m", "core", "migrate"]
    assert subprocess.run(run, env=env, capture_output=True, timeout=60).returncode == 0

    async def tamper() -> None:
        conn = await asyncpg.connect(database_url)
        try:
            await conn.execute(
                f'update "{fresh_schema}".schema_migrations set checksum = $1 where version = 1',
                "0" * 64,
            )
        finally:
            await conn.close()

    asyncio.run(tamper())
    out = subprocess.run(run, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "refused" in out.stderr and "0001_users_projects" in out.stderr


# -- repairs -----------------------------------------------------------------------------


async def test_infinite_project_dates_get_back_the_dates_they_were_sent(
    database_url, fresh_schema, monkeypatch
):
    """PUT and PATCH wrote 0001-01-01 and 9999-12-31 as asyncpg does: -infinity and infinity."""
    older = [m for m in migrations() if m.label < "0006"]
    conn = await asyncpg.connect(database_url)
    try:
        shipping(monkeypatch, older)
        await migrate(conn, fresh_schema)
        await conn.execute(f'set search_path to "{fresh_schema}"')
        insert = (
            "insert into projects (name, owner_email, budget, starts_on, ends_on) "
            "values ($1, 'ada@example.com', 0, $2, $3)"
        )
        await conn.execute(insert, "written by PUT", dt.date.min, dt.date.max)
        await conn.execute(insert, "untouched", dt.date(2026, 1, 1), None)
        monkeypatch.undo()
        await migrate(conn, fresh_schema)
        rows = await conn.fetch("select project_json(p)::text from projects p order by id")
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute(insert, "again", dt.date(2026, 1, 1), dt.date.max)
    finally:
        await conn.close()
    repaired, untouched = (msgspec.json.decode(r[0], type=Project) for r in rows)
    assert (repaired.starts_on, repaired.ends_on, repaired.version) == (
        dt.date.min, dt.date.max, 2
    )  # fmt: skip
    assert (untouched.starts_on, untouched.ends_on, untouched.version) == (
        dt.date(2026, 1, 1), None, 1
    )  # fmt: skip


async def test_the_json_functions_are_inlined_into_the_statements_that_call_them(
    database_url, fresh_schema
):
    """Declared no less volatile than their bodies (0008): no call of their own per row."""
    conn = await asyncpg.connect(database_url, server_settings={"search_path": fresh_schema})
    try:
        await migrate(conn, fresh_schema)
        plans = {
            name: "\n".join(
                row[0] for row in await conn.fetch(f"explain (verbose, costs off) {sql}")
            )
            for name, sql in {
                "project_json": "select project_json(p)::text from projects p where id = 1",
                "user_json": "select user_json(u)::text from users u where id = 1",
                "change_event": "select change_event('created', 1, 1, '{}')",
                "outbox_call": "select outbox_call(1, now())",
            }.items()
        }
    finally:
        await conn.close()
    for name, plan in plans.items():
        assert f"{name}(" not in plan, plan  # its body is in the plan, not a call
    assert "row_to_json(p.*)" in plans["project_json"]
