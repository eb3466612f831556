"""Numbered SQL migrations (``core/migrations/NNNN_name.sql``), applied once each.

`migrate` runs every file not yet recorded in ``schema_migrations``, in
order, in one transaction holding an advisory lock, so concurrent starts
(several replicas) apply each migration exactly once and applying twice is
a no-op.
"""

from __future__ import annotations

import logging
import re
from importlib import resources
from typing import NamedTuple

import asyncpg

__all__ = ["Migration", "migrate", "migrations"]

log = logging.getLogger("core.migrate")

_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql\Z")


class Migration(NamedTuple):
    version: int
    name: str
    sql: str


def migrations() -> list[Migration]:
    """Every migration shipped with the package, by version."""
    found = []
    for entry in resources.files("core.migrations").iterdir():
        m = _NAME.match(entry.name)
        if m:
            found.append(Migration(int(m.group(1)), m.group(2), entry.read_text("utf-8")))
    found.sort()
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"duplicate migration versions in {versions}")
    return found


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


async def migrate(conn: asyncpg.Connection, schema: str) -> list[Migration]:
    """Apply pending migrations in ``schema`` (created if missing); return those applied."""
    async with conn.transaction():
        await conn.execute("select pg_advisory_xact_lock(hashtext($1))", f"core.migrate:{schema}")
        await conn.execute(f"create schema if not exists {_quote(schema)}")
        await conn.execute(f"set local search_path to {_quote(schema)}")
        await conn.execute(
            "create table if not exists schema_migrations ("
            " version integer primary key, name text not null,"
            " applied_at timestamptz not null default now())"
        )
        done = {r["version"] for r in await conn.fetch("select version from schema_migrations")}
        applied = []
        for m in migrations():
            if m.version in done:
                continue
            log.info("applying migration %04d_%s to schema %s", m.version, m.name, schema)
            await conn.execute(m.sql)
            await conn.execute(
                "insert into schema_migrations (version, name) values ($1, $2)", m.version, m.name
            )
            applied.append(m)
    return applied
