"""PostgreSQL's own insert rate on this machine, with no HTTP server: the floor under POST.

Runs ``pgbench`` (64 clients, one thread, pinned to CPU 0 as wrk is in
bench/rest.py; PostgreSQL unpinned) against the bench schema with
bench/rest.py's POST body, three ways:

* ``single``: the peers' statement, one ``insert ... returning`` per row;
* ``ours x1``: the core's coalesced statement (core/projects.py
  ``_CREATE_MANY``) carrying one row, as a lone request sends it;
* ``ours xN``: the same carrying ``--batch`` rows, as under load.

Each prints transactions/s and rows/s: a server that inserts one row per
statement cannot answer more POSTs per second than ``single`` shows.

Rerun (about 40 s; needs ``pgbench``)::

    .venv/bin/python -m bench.pginsert --duration 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.rest import (
    POST_BODY,
    ROOT,
    SEED_ROWS,
    WRK_CPU,
    add_database_arguments,
    base_env,
    create_schema,
    pinned,
    reseed,
    seed_records,
)
from core.projects import _COLUMNS, _CREATE_MANY

_RETURNING = (
    "id, name, description, owner_email, budget, status, tags, starts_on, ends_on,"
    " milestones, created_at, updated_at, version"
)


def literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def single_insert() -> str:
    b = POST_BODY
    tags = "array[" + ",".join(literal(t) for t in b["tags"]) + "]::text[]"
    values = [literal(b["name"]), literal(b["description"]), literal(b["owner_email"]),
              str(b["budget"]), literal(b["status"]), tags, literal(b["starts_on"]),
              literal(b["ends_on"]), literal(json.dumps(b["milestones"])) + "::jsonb"]  # fmt: skip
    return f"insert into projects ({_COLUMNS}) values ({', '.join(values)}) returning {_RETURNING};"


def batched_insert(rows: int) -> str:
    payload = json.dumps([POST_BODY] * rows)
    statement = _CREATE_MANY.replace("$1::json", literal(payload) + "::json")
    return " ".join(statement.split()) + ";"


def pgbench(url: str, schema: str, script: Path, clients: int, duration: int) -> float:
    argv = ["pgbench", "-n", "-c", str(clients), "-j", "1", "-T", str(duration)]
    argv += ["-f", str(script), url]
    env = os.environ | {"PGOPTIONS": f"-c search_path={schema}"}
    out = subprocess.run(
        pinned(WRK_CPU, argv), capture_output=True, text=True, check=True, env=env
    ).stdout
    tps = re.search(r"^tps = ([\d.]+)", out, re.MULTILINE)
    if tps is None:
        raise RuntimeError(f"unexpected pgbench output:\n{out}")
    return float(tps[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pginsert", description=__doc__)
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16, help="rows per statement for 'ours xN'")
    add_database_arguments(parser, "bench_rest")
    args = parser.parse_args(argv)
    env = base_env(args.database_url, args.schema)
    asyncio.run(create_schema(args.database_url, args.schema, False))
    subprocess.run([sys.executable, "-m", "core", "migrate"], cwd=ROOT, env=env, check=True)
    records = seed_records(SEED_ROWS)
    scripts = {
        "single": (single_insert(), 1),
        "ours x1": (batched_insert(1), 1),
        f"ours x{args.batch}": (batched_insert(args.batch), args.batch),
    }
    print("| statement | clients | transactions/s | rows/s |\n| --- | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory(prefix="bench-pginsert-") as tmp:
        for name, (sql, rows) in scripts.items():
            asyncio.run(reseed(args.database_url, args.schema, records))
            script = Path(tmp) / "insert.sql"
            script.write_text(sql + "\n")
            tps = pgbench(args.database_url, args.schema, script, args.clients, args.duration)
            print(f"| {name} | {args.clients} | {tps:,.0f} | {tps * rows:,.0f} |", flush=True)
    print(f"\nload average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
