"""The REST core: one route table, one `dispatch`, served by every transport.

`Core.dispatch` takes a `Request` whose caller the transport already
authenticated (or None) and always returns a `Response`: routing, body and
query validation, idempotency and the error mapping happen here once, so
HTTP, ``rpc`` frames and Lambda answer alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import typing

import asyncpg

from core.db import Database
from core.errors import ApiError, from_exception
from core.events import Events, Publisher
from core.idempotency import IdempotencyStore
from core.projects import Projects
from core.request import Request, Response
from core.routing import Route, Router
from core.users import Users
from core.validation import decode_body, parse_query
from gateway.settings import Settings

__all__ = ["Core", "CoreUnavailable", "api_routes"]

log = logging.getLogger("core")

_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def api_routes(pool: asyncpg.Pool, events: Events) -> tuple[Route, ...]:
    """The core's route table."""
    return (*Projects(pool, events).routes(), *Users(pool).routes())


class CoreUnavailable:
    """Stands in for the core where no database is configured: every call is 503.

    Its route table is the real one (for the documents); no handler runs.
    """

    def __init__(self, reason: str) -> None:
        self.reason = reason
        self.routes = api_routes(typing.cast(asyncpg.Pool, None), Events(None))
        self.router = Router(self.routes)

    async def dispatch(self, req: Request) -> Response:
        err = ApiError(503, "unavailable", self.reason, headers={"Retry-After": "5"})
        return Response(err.status, err.body(), err.headers)

    async def close(self) -> None:
        return None


class Core:
    def __init__(self, settings: Settings, db: Database, publisher: Publisher | None) -> None:
        self.settings = settings
        self.db = db
        self.events = Events(publisher)
        self.idempotency = IdempotencyStore(db.pool, settings.idempotency_ttl)
        self.routes = api_routes(db.pool, self.events)
        self.router = Router(self.routes)
        self._purger = asyncio.ensure_future(self._purge_forever())

    @classmethod
    async def open(cls, settings: Settings, publisher: Publisher | None = None) -> Core:
        """Migrate, open the pool and serve; `close` undoes it."""
        return cls(settings, await Database.open(settings), publisher)

    async def close(self) -> None:
        self._purger.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._purger
        await self.db.close()

    async def dispatch(self, req: Request) -> Response:
        try:
            route, req.params = self.router.match(req.method, req.path)
            if route.auth and req.caller is None:
                raise ApiError(401, "unauthorized", "missing token", headers=_BEARER)
            if route.query is not None:
                req.args = parse_query(route.query, req.query)
            if route.body is not None:
                if len(req.body) > self.settings.max_body_bytes:
                    raise ApiError(
                        413, "payload_too_large", f"body over {self.settings.max_body_bytes} bytes"
                    )
                req.data = decode_body(route.body, req.body)
            elif req.body and req.method in _BODY_METHODS:
                raise ApiError(400, "unexpected_body", "this operation takes no body")
            if route.idempotent:
                return await self.idempotency.run(req, route.handler)
            return await route.handler(req)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            err = from_exception(exc, f"{req.method} {req.path}")
            return Response(err.status, err.body(), err.headers)

    async def _purge_forever(self, every: float = 600.0) -> None:
        while True:
            await asyncio.sleep(every)
            try:
                n = await self.idempotency.purge()
            except Exception as exc:
                log.warning("purging expired idempotency keys failed: %s", exc)
            else:
                if n:
                    log.info("purged %d expired idempotency keys", n)


_BEARER = {"WWW-Authenticate": "Bearer"}
