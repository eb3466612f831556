"""Migrations as a deploy step: what a starting process does with its schema.

With ``MIGRATE_ON_START`` off (the default) a real ``python -m gateway`` or
``python -m core`` refuses a schema that lacks a shipped migration or holds
an edited one, with one log line naming them and ``python -m core migrate``;
it starts on a migrated schema, and on one a newer release migrated further.
With it on, the process migrates. A Lambda cold start follows the same
setting, answering 503 (retried) until the schema is migrated.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from core import lambda_handler
from core.migrate import migrate, migrations
from tests.harness import SECRET, ApiClient
from tests.servers import UNIT
from tests.test_lambda import invoke, make_event
from tests.test_processes import ROOT, GatewayProcess, mint

MIGRATE = [sys.executable, "-m", "core", "migrate"]


@pytest.fixture
async def schema(database_url: str) -> AsyncIterator[str]:
    """A schema name of this test's own, dropped afterwards (it does not exist yet)."""
    name = f"mos_{uuid.uuid4().hex[:10]}"
    yield name
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(f'drop schema if exists "{name}" cascade')
    finally:
        await conn.close()


async def execute(database_url: str, sql: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def migrated(database_url: str, schema: str) -> list[int]:
    conn = await asyncpg.connect(database_url)
    try:
        await migrate(conn, schema)  # the deploy step, as `python -m core migrate` runs it
        rows = await conn.fetch(f'select version from "{schema}".schema_migrations')
    finally:
        await conn.close()
    return sorted(r["version"] for r in rows)


async def applied(database_url: str, schema: str) -> list[int]:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            f'select version from "{schema}".schema_migrations'
            if await conn.fetchval("select to_regclass($1)", f'"{schema}".schema_migrations')
            else "select 1 as version where false"
        )
    finally:
        await conn.close()
    return sorted(r["version"] for r in rows)


def env_for(database_url: str, schema: str, **extra: str) -> dict[str, str]:
    return {
        "DATABASE_URL": database_url,
        "DATABASE_SCHEMA": schema,
        "JWT_SECRET": SECRET,
        "MIGRATE_ON_START": "false",
        **extra,
    }


def refused(tmp_path, data_dir, module: str, **env: str) -> str:
    """Run a process that must refuse to start; its output."""
    gp = GatewayProcess(tmp_path, data_dir, module, **env)
    out = subprocess.run(
        [sys.executable, "-m", module],
        cwd=ROOT,
        env=gp.env,
        capture_output=True,
        text=True,
        timeout=30 * UNIT,
    )
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    assert "gateway listening" not in out.stderr and "REST core listening" not in out.stderr
    return out.stderr


@pytest.mark.parametrize(("module", "workers"), [("gateway", "1"), ("gateway", "2"), ("core", "1")])
async def test_off_and_unmigrated_the_process_refuses_naming_the_migrations_and_command(
    tmp_path, data_dir, database_url, schema, redis_url, module, workers
):
    env = env_for(database_url, schema, WORKERS=workers, LOG_FORMAT="text")
    if workers != "1":  # several workers need Redis; the master checks before forking
        env |= {"REDIS_URL": redis_url}
    log = await asyncio.to_thread(refused, tmp_path, data_dir, module, **env)
    (line,) = [line for line in log.splitlines() if "not starting" in line]
    assert "ERROR" in line and schema in line
    assert all(m.label in line for m in migrations()), line
    assert "python -m core migrate" in line and "MIGRATE_ON_START" in line
    assert await applied(database_url, schema) == []  # and it changed nothing


async def test_off_and_an_edited_migration_the_process_refuses(
    tmp_path, data_dir, database_url, schema
):
    await migrated(database_url, schema)
    await execute(
        database_url,
        f"update \"{schema}\".schema_migrations set checksum = '{'0' * 64}' where version = 2",
    )
    log = await asyncio.to_thread(
        refused, tmp_path, data_dir, "gateway", **env_for(database_url, schema)
    )
    (line,) = [line for line in log.splitlines() if "not starting" in line]
    assert migrations()[1].label in line and "checksum" in line
    assert migrations()[0].label not in line


async def test_off_and_migrated_the_process_starts_and_serves(
    tmp_path, data_dir, database_url, schema
):
    deploy = await asyncio.to_thread(
        subprocess.run,
        MIGRATE,
        env=env_for(database_url, schema, PATH="/usr/bin:/bin"),
        capture_output=True,
        text=True,
        timeout=60 * UNIT,
    )
    assert deploy.returncode == 0, deploy.stderr
    gp = GatewayProcess(tmp_path, data_dir, "gateway", **env_for(database_url, schema))
    await asyncio.to_thread(gp.start)
    try:
        api = ApiClient(gp.port, mint(data_dir, "--role", "admin"))
        try:
            status, _, body = await api.call("GET", "/api/projects")
        finally:
            api.close()
        assert status == 200 and body["items"] == []
    finally:
        assert gp.stop() == 0
    assert "not starting" not in gp.output() and "applying migration" not in gp.output()


@pytest.mark.parametrize("module", ["gateway", "core"])
async def test_on_the_process_migrates_at_start(tmp_path, data_dir, database_url, schema, module):
    env = env_for(database_url, schema, MIGRATE_ON_START="true")
    gp = GatewayProcess(tmp_path, data_dir, module, **env).start()
    try:
        assert await applied(database_url, schema) == [m.version for m in migrations()]
    finally:
        gp.stop()
    assert f"applying migration {migrations()[-1].label}" in gp.output()


async def test_a_database_a_newer_release_migrated_still_starts(
    tmp_path, data_dir, database_url, schema
):
    """Expand/contract: a rolled-back release serves from the schema the newer one left."""
    await migrated(database_url, schema)
    await execute(
        database_url,
        f'insert into "{schema}".schema_migrations (version, name, checksum)'
        " values (9999, 'added_by_a_newer_release', 'abc')",
    )
    env = env_for(database_url, schema, LOG_FORMAT="text")
    gp = GatewayProcess(tmp_path, data_dir, "gateway", **env).start()
    assert gp.stop() == 0
    (line,) = [line for line in gp.output().splitlines() if "9999_added_by_a_newer_release" in line]
    assert "INFO" in line and "does not ship" in line


# -- Lambda ---------------------------------------------------------------------------
# The handler runs its own loop (as on Lambda): these tests are not coroutines.


@pytest.fixture
def lambda_env(monkeypatch, database_url, schema) -> dict[str, str]:
    values = env_for(database_url, schema)
    monkeypatch.delenv("REDIS_URL", raising=False)
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    lambda_handler.shutdown()  # a cold start
    yield values
    lambda_handler.shutdown()


def get_projects() -> int:
    from core.infra.mint import mint_token
    from core.infra.settings import Settings

    token = mint_token(Settings(jwt_secret=SECRET), "alice", [], extra={"role": "admin"})
    event = make_event(
        "http_api_v2", "GET", "/api/projects", headers={"Authorization": f"Bearer {token}"}
    )
    return int(invoke(event)["statusCode"])


def test_lambda_off_answers_503_until_migrated(lambda_env, database_url, schema, caplog):
    with caplog.at_level(logging.ERROR, logger="core.lambda"):
        assert get_projects() == 503
    assert any(
        "python -m core migrate" in r.getMessage() and migrations()[0].label in r.getMessage()
        for r in caplog.records
    )
    assert asyncio.run(applied(database_url, schema)) == []
    asyncio.run(migrated(database_url, schema))  # the deploy step runs
    assert get_projects() == 200  # the next invocation opens the core


def test_lambda_on_migrates_at_cold_start(lambda_env, monkeypatch, database_url, schema):
    monkeypatch.setenv("MIGRATE_ON_START", "true")
    assert get_projects() == 200
    assert asyncio.run(applied(database_url, schema)) == [m.version for m in migrations()]
