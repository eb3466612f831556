"""Numbered SQL migrations (``core/migrations/NNNN_name.sql``), applied once each.

`migrate` runs every file not yet recorded in ``schema_migrations``, in
order, in one transaction holding an advisory lock, so concurrent runs
(several replicas, init containers) apply each migration exactly once and
applying twice is a no-op. It is a deploy step (``python -m core migrate``);
a process applies migrations at start-up only with ``MIGRATE_ON_START``.

Each applied migration is recorded with the sha256 of its SQL. A file edited
after it was applied is refused, by `migrate` (nothing is applied) and by the
start-up check `inspect` alike: a change to a schema is a new migration.
Rows recorded before checksums existed (``checksum`` null) are trusted and
get the file's checksum at the next `migrate` (trust on first check).

A database may hold migrations this code does not ship, applied by a newer
release that was rolled back; that is allowed (migrations expand, and only
a later release contracts), and `inspect` reports them as `SchemaState.newer`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
from importlib import resources
from typing import NamedTuple

import asyncpg
from asyncpg.pool import PoolConnectionProxy

__all__ = [
    "MIGRATE_COMMAND",
    "Conn",
    "Migration",
    "SchemaError",
    "SchemaState",
    "checksum",
    "inspect",
    "migrate",
    "migrations",
]

log = logging.getLogger("core.migrate")

_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql\Z")

#: What an operator runs to apply the migrations (named in every refusal).
MIGRATE_COMMAND = "python -m core migrate"


#: A connection of its own, or one acquired from a pool.
Conn = asyncpg.Connection | PoolConnectionProxy


class SchemaError(RuntimeError):
    """The schema cannot be used by this code: migrations missing, or edited after applying."""


def checksum(sql: str) -> str:
    """The sha256 (hex) of a migration's SQL as UTF-8."""
    return hashlib.sha256(sql.encode("utf-8")).hexdigest()


class Migration(NamedTuple):
    version: int
    name: str
    sql: str

    @property
    def label(self) -> str:
        """``0001_users_projects``: the file's name without ``.sql``."""
        return f"{self.version:04d}_{self.name}"

    @property
    def checksum(self) -> str:
        return checksum(self.sql)


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


@dataclasses.dataclass(frozen=True, slots=True)
class SchemaState:
    """How a schema's ``schema_migrations`` compares with the shipped migrations."""

    schema: str
    #: shipped and not applied
    missing: tuple[Migration, ...] = ()
    #: applied with another checksum: the file changed since
    edited: tuple[Migration, ...] = ()
    #: applied before checksums were recorded (trusted; `migrate` records them)
    unrecorded: tuple[Migration, ...] = ()
    #: applied and not shipped (``0005_name``): a newer release's, rolled back
    newer: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """Whether this code may serve from the schema."""
        return not self.missing and not self.edited

    def problem(self) -> str:
        """What is wrong and what to do, in one line ('' when `ok`)."""
        parts = []
        if self.missing:
            names = ", ".join(m.label for m in self.missing)
            parts.append(
                f"schema {self.schema} lacks migration(s) {names}: run `{MIGRATE_COMMAND}` "
                "(a deploy step) or set MIGRATE_ON_START=true"
            )
        if self.edited:
            parts.append(_edited(self.schema, self.edited))
        return "; ".join(parts)


def _edited(schema: str, edited: tuple[Migration, ...]) -> str:
    names = ", ".join(m.label for m in edited)
    return (
        f"migration(s) {names} changed since applied to schema {schema} (checksum differs): "
        "restore the file(s) as applied; a change to the schema is a new migration"
    )


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def _compare(schema: str, rows: list[asyncpg.Record]) -> SchemaState:
    shipped = {m.version: m for m in migrations()}
    applied = {r["version"]: r for r in rows}
    missing = tuple(m for v, m in shipped.items() if v not in applied)
    edited, unrecorded = [], []
    for version, row in applied.items():
        m = shipped.get(version)
        if m is None:
            continue
        recorded = row.get("checksum")
        if recorded is None:
            unrecorded.append(m)
        elif recorded != m.checksum:
            edited.append(m)
    newer = tuple(f"{v:04d}_{applied[v]['name']}" for v in sorted(applied) if v not in shipped)
    return SchemaState(schema, missing, tuple(edited), tuple(unrecorded), newer)


async def inspect(conn: Conn, schema: str) -> SchemaState:
    """The schema's state against the shipped migrations: one query, nothing changed.

    A schema (or ``schema_migrations``) that does not exist lacks every
    migration. ``select *`` reads tables from before the ``checksum`` column.
    """
    try:
        rows = await conn.fetch(f"select * from {_quote(schema)}.schema_migrations")
    except asyncpg.UndefinedTableError:
        rows = []
    return _compare(schema, rows)


async def migrate(conn: Conn, schema: str) -> list[Migration]:
    """Apply pending migrations in ``schema`` (created if missing); return those applied.

    Raises `SchemaError`, having changed nothing, when an applied migration's
    file was edited since.
    """
    async with conn.transaction():
        await conn.execute("select pg_advisory_xact_lock(hashtext($1))", f"core.migrate:{schema}")
        await conn.execute(f"create schema if not exists {_quote(schema)}")
        await conn.execute(f"set local search_path to {_quote(schema)}")
        await conn.execute(
            "create table if not exists schema_migrations ("
            " version integer primary key, name text not null,"
            " applied_at timestamptz not null default now(), checksum text)"
        )
        # Tables from before checksums: add the column only then (ALTER locks
        # out the start-up checks of other processes until this commits).
        columns = (await conn.prepare("select * from schema_migrations")).get_attributes()
        if "checksum" not in {c.name for c in columns}:
            await conn.execute("alter table schema_migrations add column checksum text")
        state = _compare(schema, await conn.fetch("select * from schema_migrations"))
        if state.edited:
            raise SchemaError(_edited(schema, state.edited))
        for m in state.unrecorded:
            await conn.execute(
                "update schema_migrations set checksum = $2 where version = $1",
                m.version,
                m.checksum,
            )
        if state.unrecorded:
            names = ", ".join(m.label for m in state.unrecorded)
            log.info("recorded checksums of migration(s) %s in schema %s", names, schema)
        for m in state.missing:
            log.info("applying migration %s to schema %s", m.label, schema)
            await conn.execute(m.sql)
            await conn.execute(
                "insert into schema_migrations (version, name, checksum) values ($1, $2, $3)",
                m.version,
                m.name,
                m.checksum,
            )
    if state.newer:
        log.info(
            "schema %s also holds migration(s) %s that this release does not ship "
            "(a newer release's, kept)",
            schema,
            ", ".join(state.newer),
        )
    return list(state.missing)
