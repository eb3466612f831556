"""``python -m gateway``: run the gateway, or ``token`` to mint a token."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from core.db import prepare_schema
from core.infra.keys import SigningKeys, ensure_key_material, generate_jwk, write_key_file
from core.infra.logs import configure_logging
from core.infra.mint import mint_token
from core.infra.runtime import raise_file_limit, run, wait_for_stop_signal
from core.infra.settings import Settings, SettingsError
from core.infra.startup import check_keys, check_listen
from core.infra.workers import Worker, supervise, worker_count
from core.migrate import SchemaError
from gateway.app import make_app
from gateway.embedded import EmbeddedPostgres

__all__ = ["main"]

log = logging.getLogger("gateway")


def _embedded_database(settings: Settings) -> tuple[Settings, EmbeddedPostgres | None]:
    """Settings with a database: the configured one, or an embedded PostgreSQL.

    None with ``CORE_URL``: the core, and its database, are elsewhere.
    """
    if settings.database_url or settings.core_url:
        return settings, None
    embedded = EmbeddedPostgres(settings.data_dir)
    try:
        url = embedded.start()
    except ImportError:
        log.warning(
            "DATABASE_URL not set and pgserver not installed: the REST core answers 503 "
            "(pip install 'tornado-gateway[embedded]' or set DATABASE_URL)"
        )
        return settings, None
    # The process owns this database: it migrates it, whatever MIGRATE_ON_START says.
    embedded_settings = settings.replace(
        database_url=url, database_schema="public", migrate_on_start=True
    )
    return embedded_settings, embedded


async def serve(settings: Settings) -> None:
    """One gateway process (WORKERS=1)."""
    settings, embedded = await asyncio.to_thread(_embedded_database, settings)
    try:
        await _serve(settings)
    finally:
        if embedded is not None:
            await asyncio.to_thread(embedded.stop)


def serve_workers(settings: Settings, count: int) -> int:
    """``count`` gateway processes on one port (core/infra/workers.py); the exit status."""
    settings, embedded = _embedded_database(settings)
    try:
        if settings.database_url and not settings.core_url:
            # Once here, before the workers (each checks again, cheaply): a
            # schema that is not ready stops the start with one line, rather
            # than with every worker dying and being restarted.
            try:
                asyncio.run(prepare_schema(settings))
            except SchemaError:
                raise
            except Exception as exc:  # unreachable now: the workers retry as they would
                log.warning("could not check the schema before starting workers: %s", exc)
        # Made once here: workers generating a secret each would disagree.
        return supervise(ensure_key_material(settings), count, _serve)
    finally:
        if embedded is not None:
            embedded.stop()


async def _serve(settings: Settings, worker: Worker | None = None) -> None:
    gateway = await make_app(settings, registry=None if worker is None else worker.registry)
    # What start-up made lives as long as the process: out of the collector's
    # way. Then its thresholds (GC_THRESHOLD): each full collection walks
    # every session's objects, so with many of them, fewer collections.
    gc.collect()
    gc.freeze()
    gc.set_threshold(*settings.gc_threshold)
    port = gateway.listen(sockets=None if worker is None else worker.sockets())
    limit = raise_file_limit()
    log.info(
        "gateway listening on http://%s:%d (WebSocket at /ws); open-file limit %d",
        settings.host,
        port,
        limit,
    )
    with contextlib.nullcontext() if worker is None else worker.sharing_metrics():
        await wait_for_stop_signal()
        log.info("shutting down")
        await gateway.close()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gateway",
        description="Real-time WebSocket gateway. Configured by environment variables:",
        epilog="Environment:\n" + Settings.describe(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _workers_flag(parser, None)
    sub = parser.add_subparsers(dest="command")
    # SUPPRESS: `--workers N run` keeps N rather than the subcommand's default.
    _workers_flag(sub.add_parser("run", help="run the gateway (the default)"), argparse.SUPPRESS)
    token = sub.add_parser("token", help="mint a token for the running configuration")
    token.add_argument("--sub", required=True, help="subject (user id)")
    token.add_argument(
        "--channels",
        action="append",
        default=[],
        help="channel pattern (repeatable, or comma list)",
    )
    token.add_argument("--pub", choices=["yes", "no"], help="client publishing allowed (claim pub)")
    token.add_argument("--ttl", type=float, default=3600.0, help="seconds until exp (default 3600)")
    token.add_argument(
        "--role", choices=["user", "admin"], help="claim role (admin: writes any project)"
    )
    keygen = sub.add_parser("keygen", help="make a signing key (JWKS) for JWT_SIGNING_KEYS")
    keygen.add_argument("--alg", default="ES256", choices=["ES256", "ES384", "RS256", "EdDSA"])
    keygen.add_argument("--kid", help="key id (default: date and random)")
    keygen.add_argument(
        "--add-to", metavar="FILE", help="put the new key first in this JWKS file (rotation)"
    )
    keygen.add_argument(
        "--public-of",
        metavar="FILE",
        help="make no key: print the public JWKS of this signing key file (JWT_ISSUED_KEYS)",
    )
    return parser


def _count(raw: str) -> int:
    if not raw.isdigit():
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {raw!r}")
    return int(raw)


def _workers_flag(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument(
        "--workers",
        type=_count,
        default=default,
        metavar="N",
        help="gateway processes sharing the port (overrides WORKERS; 0: one per core; "
        "one without REDIS_URL)",
    )


def _keygen(args: argparse.Namespace) -> int:
    if args.public_of:
        try:
            public = SigningKeys.load(args.public_of).jwks()
        except (OSError, ValueError, KeyError) as exc:
            print(f"cannot read {args.public_of}: {exc}", file=sys.stderr)
            return 2
        print(json.dumps(public, indent=2))
        return 0
    jwk = generate_jwk(args.alg, args.kid)
    if not args.add_to:
        print(json.dumps({"keys": [jwk]}, indent=2))
        return 0
    path = Path(args.add_to)
    keys = json.loads(path.read_text())["keys"] if path.exists() else []
    write_key_file(path, [jwk, *keys])  # 0600 from the first byte
    print(f"{path}: {jwk['kid']} ({args.alg}) now signs; {len(keys)} older key(s) kept")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = Settings.from_env()
        if args.command != "keygen":
            check_keys(settings)
        if args.command in (None, "run"):
            check_listen(settings)
    except SettingsError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    if args.command == "keygen":
        return _keygen(args)
    if args.command == "token":
        logging.getLogger("core.infra.keys").setLevel(logging.ERROR)
        settings = ensure_key_material(settings)
        channels = [c.strip() for arg in args.channels for c in arg.split(",") if c.strip()]
        pub = None if args.pub is None else args.pub == "yes"
        try:
            extra = None if args.role is None else {"role": args.role}
            print(mint_token(settings, args.sub, channels, pub=pub, ttl=args.ttl, extra=extra))
        except ValueError as exc:
            print(f"cannot mint: {exc}", file=sys.stderr)
            return 2
        return 0
    if args.workers is not None:
        settings = settings.replace(workers=args.workers)
    count, why = worker_count(settings)
    if why:
        log.info("%s", why)
    try:
        if count > 1:
            return serve_workers(settings, count)
        run(serve(settings))
    except SchemaError as exc:
        log.error("not starting: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
