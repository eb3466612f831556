"""Cold start of the core on Lambda, measured locally: import, first and warm invocation.

Each run is a fresh Python process (as a new Lambda container is) that:

1. imports ``core.lambda_handler`` (tornado, asyncpg, msgspec, jwt, the core);
2. answers a first function-URL event ``GET /api/projects?limit=20`` with a
   bearer token: reading the settings, opening the asyncpg pool, checking
   the schema's migrations (one query: ``MIGRATE_ON_START`` off, the default),
   loading revocations and API keys, then the query;
3. answers the same event again, warm (the pool and loop reused).

The schema is migrated (``core.migrate.migrate``, what ``python -m core
migrate`` runs) and seeded with 20 projects beforehand, so every run
finds it as a deployed function would; ``REDIS_URL`` is left out (no broker). The table shows medians over the
runs with the range. It is measured on this machine against its PostgreSQL,
not on AWS: Lambda adds its own init (runtime start, code download, VPC
attachment) and its CPU share depends on the function's memory size.

Rerun (from the repository root; PostgreSQL at DATABASE_URL, default
postgresql://127.0.0.1:5432/test)::

    .venv/bin/python -m bench.lambda_cold --runs 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg

ROOT = Path(__file__).resolve().parent.parent
JWT_SECRET = "bench-lambda-fixed-secret-0123456789abcdef"

#: Runs in the fresh process: nothing is imported before the clock starts.
CHILD = """
import time
started = time.time()
t0 = time.perf_counter()
import core.lambda_handler as lh
t1 = time.perf_counter()
import json, sys
event = json.loads(sys.argv[1])
first = lh.handler(event, None)
t2 = time.perf_counter()
second = lh.handler(event, None)
t3 = time.perf_counter()
lh.shutdown()
print(json.dumps({
    "started": started,
    "import": t1 - t0,
    "first": t2 - t1,
    "warm": t3 - t2,
    "statuses": [first["statusCode"], second["statusCode"]],
    "items": len(json.loads(second["body"])["items"]),
}))
"""

ROWS = (
    ("python start", "start"),
    ("import core.lambda_handler", "import"),
    ("first invocation (open pool + GET)", "first"),
    ("second invocation (warm GET)", "warm"),
    ("cold total (import + first)", "cold"),
)


def event(token: str) -> dict[str, Any]:
    """A function URL event (payload 2.0) for ``GET /api/projects?limit=20``."""
    return {
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": "/api/projects",
        "rawQueryString": "limit=20",
        "headers": {"authorization": f"Bearer {token}", "accept": "application/json"},
        "queryStringParameters": {"limit": "20"},
        "requestContext": {
            "http": {"method": "GET", "path": "/api/projects", "sourceIp": "198.51.100.23"},
            "stage": "$default",
        },
        "isBase64Encoded": False,
    }


async def _migrate(url: str, schema: str) -> None:
    from core.migrate import migrate

    conn = await asyncpg.connect(url)
    try:
        await migrate(conn, schema)
    finally:
        await conn.close()


def prepare(env: dict[str, str], token: str) -> None:
    """Migrate the schema (the deploy step), then seed it through the handler itself."""
    from core import lambda_handler

    asyncio.run(_migrate(env["DATABASE_URL"], env["DATABASE_SCHEMA"]))
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        for i in range(20):
            body = {
                "name": f"p{i}",
                "owner_email": "ada@example.com",
                "budget": 100 + i,
                "starts_on": "2026-01-01",
            }
            post = event(token) | {"body": json.dumps(body), "rawQueryString": ""}
            post["requestContext"] = {"http": {"method": "POST"}, "stage": "$default"}
            reply = lambda_handler.handler(post, None)
            if reply["statusCode"] != 201:
                raise SystemExit(f"seeding failed: {reply}")
        lambda_handler.shutdown()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def fresh_schema(database_url: str) -> tuple[dict[str, str], str]:
    """The settings of a new schema (not made yet) with no broker, and an admin's token."""
    env = {
        "DATABASE_URL": database_url,
        "DATABASE_SCHEMA": f"bench_lambda_{uuid.uuid4().hex[:8]}",
        "JWT_SECRET": JWT_SECRET,
        "MIGRATE_ON_START": "false",  # the default: a cold start checks, the deploy migrated
    }
    os.environ.pop("REDIS_URL", None)  # the database alone: no broker, the memory limiter
    from core.infra.mint import mint_token
    from core.infra.settings import Settings

    token = mint_token(Settings(jwt_secret=JWT_SECRET), "bench", [], extra={"role": "admin"})
    return env, token


def one_run(env: dict[str, str], token: str) -> dict[str, float]:
    spawned = time.time()
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(event(token))],
        cwd=ROOT,
        env={**os.environ, **env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    if proc.returncode != 0:
        raise SystemExit(f"run failed:\n{proc.stderr}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    if out["statuses"] != [200, 200] or out["items"] != 20:
        raise SystemExit(f"unexpected answers: {out}")
    return {
        "start": out["started"] - spawned,
        "import": out["import"],
        "first": out["first"],
        "warm": out["warm"],
        "cold": out["import"] + out["first"],
    }


def table(runs: list[dict[str, float]]) -> str:
    lines = [
        f"core.lambda_handler cold start: {len(runs)} fresh processes, "
        f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]} (ms)",
        f"{'phase':<36} {'median':>8} {'min':>8} {'max':>8}",
    ]
    for label, key in ROWS:
        values = [1000.0 * r[key] for r in runs]
        lines.append(
            f"{label:<36} {statistics.median(values):8.1f} {min(values):8.1f} {max(values):8.1f}"
        )
    return "\n".join(lines)


async def _execute(url: str, sql: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def arguments(doc: str | None) -> argparse.ArgumentParser:
    """A bench's command line: its docstring, and where PostgreSQL is."""
    parser = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--database-url",
        default=os.environ.get("DATABASE_URL") or "postgresql://127.0.0.1:5432/test",
    )
    return parser


def main() -> int:
    parser = arguments(__doc__)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    env, token = fresh_schema(args.database_url)
    schema = env["DATABASE_SCHEMA"]
    try:
        prepare(env, token)
        runs = []
        for i in range(args.runs):
            runs.append(one_run(env, token))
            print(f"run {i + 1}: {runs[-1]}", file=sys.stderr)
    finally:
        asyncio.run(_execute(args.database_url, f'drop schema if exists "{schema}" cascade'))
    print(table(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
