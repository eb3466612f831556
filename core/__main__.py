"""``python -m core``: serve the REST core alone, or ``migrate`` its schema.

``serve`` runs ``WORKERS`` processes on one port as the gateway does
(``--workers N`` overrides it; core/infra/workers.py): each a whole core
with its own database pool, so a pod holds up to ``WORKERS x DB_POOL_MAX``
connections.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
from collections.abc import Sequence

import asyncpg

from core.infra.keys import ensure_key_material
from core.infra.logs import configure_logging
from core.infra.runtime import run, wait_for_stop_signal
from core.infra.settings import Settings, SettingsError
from core.infra.startup import check_keys, check_listen
from core.infra.workers import Worker, supervise, worker_count
from core.migrate import SchemaError, migrate
from core.server import CoreServer

__all__ = ["main"]

log = logging.getLogger("core")


async def _serve(settings: Settings, worker: Worker | None = None) -> None:
    if worker is None:
        server = await CoreServer.start(settings)
    else:
        server = await CoreServer.start(settings, worker.sockets(), worker.registry)
    log.info("REST core listening on http://%s:%d (docs at /docs)", settings.host, server.port)
    with contextlib.nullcontext() if worker is None else worker.sharing_metrics():
        await wait_for_stop_signal()
        log.info("shutting down")
        await server.close()


def _serve_workers(settings: Settings) -> int:
    count, why = worker_count(settings)
    if why:
        log.info("%s", why)
    if count == 1:
        run(_serve(settings))
        return 0
    # Made once here: workers generating a secret each would disagree.
    return supervise(ensure_key_material(settings), count, _serve)


async def _migrate(settings: Settings) -> None:
    assert settings.database_url
    conn = await asyncpg.connect(settings.database_url, timeout=settings.db_connect_timeout)
    try:
        applied = await migrate(conn, settings.database_schema)
    finally:
        await conn.close()
    names = ", ".join(f"{m.version:04d}_{m.name}" for m in applied) or "none (up to date)"
    print(f"schema {settings.database_schema}: applied {names}")


async def _promote(settings: Settings, email: str, role: str) -> int:
    assert settings.database_url
    conn = await asyncpg.connect(
        settings.database_url,
        timeout=settings.db_connect_timeout,
        server_settings={"search_path": settings.database_schema},
    )
    try:
        user_id = await conn.fetchval(
            "update accounts a set role = $2, updated_at = now() from users u"
            " where a.user_id = u.id and lower(u.email) = lower($1) returning u.id",
            email,
            role,
        )
    finally:
        await conn.close()
    if user_id is None:
        print(f"no account for {email}", file=sys.stderr)
        return 1
    print(f"{email} (user {user_id}) is now {role}; it takes effect at the next login")
    return 0


def _count(raw: str) -> int:
    if not raw.isdigit():
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {raw!r}")
    return int(raw)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m core",
        description="The REST core alone. Configured by environment variables:",
        epilog="Environment:\n" + Settings.describe(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command")
    parser.add_argument(
        "--workers",
        type=_count,
        metavar="N",
        help="processes sharing the port (overrides WORKERS; 0: one per core; "
        "one without REDIS_URL)",
    )
    sub.add_parser("serve", help="serve the REST API (the default)")
    sub.add_parser("migrate", help="apply pending migrations and exit")
    promote = sub.add_parser("promote", help="give an account a role (the first admin)")
    promote.add_argument("email")
    promote.add_argument("--role", choices=["admin", "user"], default="admin")
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
        if args.command in (None, "serve"):
            check_keys(settings)
            check_listen(settings)
    except SettingsError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    if args.workers is not None:
        settings = settings.replace(workers=args.workers)
    if not settings.database_url:
        print("configuration error: DATABASE_URL is required", file=sys.stderr)
        return 2
    try:
        if args.command == "migrate":
            asyncio.run(_migrate(settings))
        elif args.command == "promote":
            return asyncio.run(_promote(settings, args.email, args.role))
        else:
            return _serve_workers(settings)
    except SchemaError as exc:
        if args.command == "migrate":
            print(f"migrate refused, nothing applied: {exc}", file=sys.stderr)
        else:
            log.error("not starting: %s", exc)
        return 1
    except (OSError, asyncpg.PostgresError) as exc:
        print(f"database error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
