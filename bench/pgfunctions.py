"""What inlining the JSON functions saves PostgreSQL: the core's statements, functions
declared immutable (migrations 0001-0007) against stable (0008), alternating rounds.

A one-expression SQL function is inlined into its caller only when it is
declared no less volatile than its body (core/migrations/0008_inline_json_functions.sql).
This runs the core's own statements (core/projects.py, core/users.py,
core/outbox.py) on one asyncpg connection, prepared as the pool prepares
them, ``--calls`` times a round, each kind of round alternating with the
functions declared immutable (as before 0008) and stable (as after), and prints
the median round trip of each statement over the rounds. Writes run in a
transaction that is rolled back, so the commit's flush (the same either way)
is left out; the schema is dropped at the end.

Rerun (about 20 s)::

    .venv/bin/python -m bench.pgfunctions
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from typing import Any

import asyncpg

from bench.rest import POST_BODY, add_database_arguments, quote_ident
from core.migrate import migrate
from core.outbox import with_events
from core.projects import _CREATE_MANY, _GET, _LIST
from core.users import _GET as _GET_USER

_FUNCTIONS = (
    "project_json(projects)",
    "user_json(users)",
    "change_event(text, bigint, integer, text)",
    "outbox_call(bigint, timestamptz)",
)
_SEED = """
insert into projects (name, description, owner_email, budget, status, tags, starts_on, milestones)
select 'project ' || i, repeat('plan the work ', 12), 'owner@example.org', 1000.50, 'active',
       array['ops', 'q3'], date '2026-01-01', '[{"title": "start", "due_on": "2026-02-01"}]'
from generate_series(1, 200) i;
insert into users (email, display_name) select 'user' || i || '@example.org', 'User ' || i
from generate_series(1, 10) i;
"""


async def timed(conn: asyncpg.Connection, sql: str, args: tuple[Any, ...], calls: int,
                *, write: bool) -> float:  # fmt: skip
    """The median round trip of ``sql`` in microseconds, over ``calls`` runs."""
    statement = await conn.prepare(sql)
    times = []
    for _ in range(calls):
        transaction = conn.transaction() if write else None
        if transaction is not None:
            await transaction.start()
        start = time.perf_counter()
        await statement.fetch(*args)
        times.append(time.perf_counter() - start)
        if transaction is not None:
            await transaction.rollback()
    return statistics.median(times) * 1e6


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_database_arguments(parser, "bench_pgfunctions")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--calls", type=int, default=500)
    args = parser.parse_args()
    statements: dict[str, tuple[str, tuple[Any, ...], bool]] = {
        "GET /api/projects/{id}": (_GET, (7,), False),
        "GET /api/projects?limit=20": (_LIST, (0, None, None, 20), False),
        "GET /api/users/{id}": (_GET_USER, (3,), False),
        "POST /api/projects (with its outbox row)": (
            with_events(_CREATE_MANY, "projects", "created", queue=True),
            (json.dumps([POST_BODY]),),
            True,
        ),
    }
    conn = await asyncpg.connect(args.database_url, server_settings={"timezone": "UTC"})
    schema = quote_ident(args.schema)
    try:
        await conn.execute(f"drop schema if exists {schema} cascade")
        await migrate(conn, args.schema)
        await conn.execute(f"set search_path to {schema}")
        await conn.execute(_SEED)
        figures: dict[tuple[str, str], list[float]] = {}
        for _ in range(args.rounds):
            for volatility in ("immutable", "stable"):
                for function in _FUNCTIONS:
                    await conn.execute(f"alter function {function} {volatility}")
                for name, (sql, values, write) in statements.items():
                    spent = await timed(conn, sql, values, args.calls, write=write)
                    figures.setdefault((name, volatility), []).append(spent)
        for name in statements:
            before = statistics.median(figures[name, "immutable"])
            after = statistics.median(figures[name, "stable"])
            print(f"{name}: immutable {before:.0f} us, stable {after:.0f} us "
                  f"({after - before:+.0f} us, {after / before - 1:+.0%}); rounds "
                  + " ".join(f"{a:.0f}/{b:.0f}" for a, b in zip(
                      figures[name, "immutable"], figures[name, "stable"], strict=True)))  # fmt: skip
    finally:
        await conn.execute(f"drop schema if exists {schema} cascade")
        await conn.close()


if __name__ == "__main__":
    asyncio.run(main())
