"""What one filtered page of projects costs PostgreSQL: the whole board before, a window now.

``GET /api/projects?tag=<t>`` (or ``?status=``) ran `core.projects._LIST`, which
walks the projects by id until it has a page: a tag that nobody uses walked
them all. A filtered page now runs `core.projects._LIST_FILTERED`, which
examines at most `core.projects.SCAN` projects past the cursor. This seeds
``--projects`` projects (50 tags, a status each) in a schema of its own,
runs both statements on one asyncpg connection, prepared as the pool
prepares them (so PostgreSQL may switch to a generic plan after five), for a
tag nobody uses, a tag one project in 50 has, and a status, and prints the
median of ``--calls`` round trips of each. The schema is dropped at the end.

Rerun (about 40 s with the defaults)::

    .venv/bin/python -m bench.filtered_lists
"""

from __future__ import annotations

import argparse
import asyncio

import asyncpg

from bench.pgfunctions import timed
from bench.rest import add_database_arguments, quote_ident
from core.migrate import migrate
from core.projects import _LIST, _LIST_FILTERED, SCAN

_SEED = """
insert into projects (name, description, owner_email, budget, status, tags, starts_on)
select 'p' || g, repeat('d', 200), 'o' || (g % 1000) || '@example.com', 1,
       (array['draft', 'active', 'done'])[1 + g % 3], array['t' || (g % 50)], '2026-01-01'
from generate_series(1, $1) g
"""


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_database_arguments(parser, "bench_filtered_lists")
    parser.add_argument("--projects", type=int, default=300_000)
    parser.add_argument("--calls", type=int, default=30)
    args = parser.parse_args()
    conn = await asyncpg.connect(args.database_url, server_settings={"timezone": "UTC"})
    schema = quote_ident(args.schema)
    try:
        await conn.execute(f"drop schema if exists {schema} cascade")
        await migrate(conn, args.schema)
        await conn.execute(f"set search_path to {schema}")
        await conn.execute(_SEED, args.projects)
        await conn.execute("vacuum analyze projects")
        print(f"{args.projects} projects; a filtered page examines at most {SCAN}")
        for query, status, tag in (
            ("?tag=nobody&limit=100", None, "nobody"),
            ("?tag=t7&limit=100", None, "t7"),
            ("?status=done&limit=100", "done", None),
        ):
            before = await timed(conn, _LIST, (0, status, tag, 100), args.calls, write=False)
            window = (0, status, tag, 100, SCAN)
            after = await timed(conn, _LIST_FILTERED, window, args.calls, write=False)
            print(
                f"GET /api/projects{query}: whole board {before / 1000:.1f} ms, "
                f"window {after / 1000:.1f} ms"
            )
    finally:
        await conn.execute(f"drop schema if exists {schema} cascade")
        await conn.close()


if __name__ == "__main__":
    asyncio.run(main())
