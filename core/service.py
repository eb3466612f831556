"""The REST core: one route table, one `dispatch`, served by every transport.

`Core.dispatch` takes a `Request` whose caller the transport already
authenticated (or None) and always returns a `Response`: routing, the
route's access rule (core/access.py), its body limit, body and query validation,
idempotency and the error mapping happen here once, so HTTP, ``rpc``
frames and Lambda answer alike.
"""

from __future__ import annotations

import asyncio
import logging
import time
import typing
from collections.abc import Awaitable, Callable, MutableMapping

import asyncpg

from core.access import Access, check
from core.accounts import Accounts, Revoker
from core.apikeys import ApiKeys
from core.db import Database
from core.errormap import from_exception
from core.events import Events
from core.idempotency import IdempotencyStore
from core.infra.broker.base import Broker, Publisher
from core.infra.control import ControlMessage
from core.infra.errors import ApiError, PayloadTooLarge, TooManyRequests
from core.infra.identity import Identity, principal
from core.infra.rate import Rate
from core.infra.ratelimit import MemoryRateLimiter, RateLimiter, over_limit
from core.infra.revocation import Revocations
from core.infra.settings import Settings
from core.outbox import Outbox
from core.passwords import Passwords
from core.projects import Projects
from core.relay import Relay
from core.request import Request, Response, rest_cost
from core.routing import Route, Router
from core.tokens import Issuer
from core.users import Users
from core.validation import decode_body, parse_form, parse_query

__all__ = ["Core", "CoreUnavailable", "api_routes", "offline_routes"]

log = logging.getLogger("core")

_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def api_routes(
    pool: asyncpg.Pool,
    events: Events,
    accounts: Accounts,
    keys: ApiKeys,
    revoker: Revoker,
    max_projects_per_user: int = 0,
    limiter: RateLimiter | None = None,
    rate_rest: Rate | None = None,
) -> tuple[Route, ...]:
    """The core's route table."""
    return (
        *accounts.routes(),
        *keys.routes(),
        *Projects(pool, events, max_projects_per_user).routes(),
        *Users(pool, events, revoker, limiter, rate_rest).routes(),
    )


class _NoRevoker:
    async def revoke(self, sids: list[str]) -> None:
        return None


def offline_routes() -> tuple[tuple[Route, ...], Router]:
    """The real route table with no database behind it: no handler of it may run.

    For a gateway whose core is elsewhere (or absent): its documents, and the
    body policy that judges requests at their headers (core/bodylimits.py).
    """
    settings = Settings()
    pool = typing.cast(asyncpg.Pool, None)
    accounts = Accounts(
        pool, settings, Passwords(settings), Issuer(settings), _NoRevoker(), MemoryRateLimiter()
    )
    keys = ApiKeys(pool, {}, None)
    routes = api_routes(pool, Events(None), accounts, keys, _NoRevoker())
    return routes, Router(routes)


class CoreUnavailable:
    """Stands in for the core where no database is configured: every call is 503.

    Its route table is the real one (for the documents); no handler runs.
    """

    def __init__(self, reason: str) -> None:
        self.reason = reason
        self.routes, self.router = offline_routes()

    async def dispatch(self, req: Request) -> Response:
        err = ApiError(503, "unavailable", self.reason, headers={"Retry-After": "5"})
        return Response.error(err)

    async def close(self) -> None:
        return None


class Core:
    #: Seconds between catch-ups on revocations a process may have missed.
    REVOCATION_SYNC = 30.0

    def __init__(
        self,
        settings: Settings,
        db: Database,
        publisher: Publisher | None,
        revocations: Revocations,
        api_keys: MutableMapping[bytes, Identity],
        limiter: RateLimiter,
        on_key_revoked: Callable[[str], object] | None = None,
        store: Broker | None = None,
    ) -> None:
        self.settings = settings
        self.limiter = limiter
        self.db = db
        #: metrics hook: (route operation id, status, seconds) per request
        self.observe: Callable[[str, int, float], None] | None = None
        #: The outbox (core/outbox.py) and its relay (core/relay.py): only with a publisher.
        self.outbox = None if publisher is None else Outbox(db.pool)
        self.events = Events(publisher, self.outbox)
        self.relay = None if publisher is None else Relay(db.pool, self.events)
        self.revocations = revocations
        self.idempotency = IdempotencyStore(db.pool, settings.idempotency_ttl)
        self.accounts = Accounts(
            db.pool, settings, Passwords(settings), Issuer(settings), revocations, limiter
        )
        self.api_keys = ApiKeys(
            db.pool, api_keys, publisher, settings.core_channels, on_key_revoked, store
        )
        self.routes = api_routes(
            db.pool, self.events, self.accounts, self.api_keys, revocations,
            settings.max_projects_per_user, limiter, settings.rate_rest,
        )  # fmt: skip
        self.router = Router(self.routes)
        self._upkeep = [
            asyncio.ensure_future(self._every(600.0, self._purge)),
            asyncio.ensure_future(self._every(self.REVOCATION_SYNC, self.sync)),
        ]
        if self.relay is not None:
            self.relay.start()

    @classmethod
    async def open(
        cls,
        settings: Settings,
        publisher: Publisher | None = None,
        revocations: Revocations | None = None,
        api_keys: MutableMapping[bytes, Identity] | None = None,
        limiter: RateLimiter | None = None,
        on_key_revoked: Callable[[str], object] | None = None,
        store: Broker | None = None,
    ) -> Core:
        """Open the pool, check (or apply) migrations, load revocations and API keys;
        `close` undoes it. A schema not ready raises `core.migrate.SchemaError`.

        ``api_keys`` is the verifier's mapping of active keys, kept current here;
        ``on_key_revoked`` is called with the subject (``apikey:<id>``) of each
        key found revoked, here or on another process, to close its sockets.
        ``store`` (the broker) receives the API-key snapshot and the revoked sessions that
        gateways without a database read (core/infra/keyring.py, core/infra/revocation.py).
        """
        if revocations is None:
            ttl = settings.access_token_ttl + settings.jwt_leeway
            revocations = Revocations(ttl, publisher, store=store)
        keys = api_keys if api_keys is not None else {}
        limits = limiter if limiter is not None else MemoryRateLimiter()
        db = await Database.open(settings)
        core = cls(settings, db, publisher, revocations, keys, limits, on_key_revoked, store)
        try:
            await core.sync()
        except BaseException:
            await core.close()
            raise
        return core

    async def close(self) -> None:
        for task in self._upkeep:
            task.cancel()
        await asyncio.gather(*self._upkeep, return_exceptions=True)
        if self.relay is not None:
            await self.relay.close()
        if self.outbox is not None:
            await self.outbox.close()  # rows published here are not published again
        await self.db.close()

    async def sync(self) -> None:
        """Catch up on what other processes changed: revocations and API keys."""
        await self.sync_revocations()
        await self.api_keys.reload()

    def on_control(self, message: ControlMessage) -> None:
        """A control-channel message from any process (core/infra/control.py)."""
        self.revocations.on_control(message)
        self.api_keys.on_control(message)

    async def sync_revocations(self) -> None:
        """Apply revocations made while this process may have missed their broadcast."""
        self.revocations.purge()
        sids = await self.accounts.recently_revoked(self.revocations.ttl)
        n = self.revocations.apply(sids)
        if n:
            log.info("applied %d session revocation(s) from the database", n)
        restored = await self.revocations.restore(sids)  # for gateways with CORE_URL
        if restored:
            log.info("stored %d session revocation(s) the broker had lost", restored)

    async def dispatch(self, req: Request) -> Response:
        """Answer ``req``; `observe`, when set, gets its route, status and duration."""
        started = time.perf_counter()
        match: list[str] = []
        resp = await self._dispatch(req, match)
        if self.observe is not None:
            self.observe(
                match[0] if match else "unmatched", resp.status, time.perf_counter() - started
            )
        return resp

    async def _dispatch(self, req: Request, match: list[str]) -> Response:
        try:
            route, req.params = self.router.match(req.method, req.path)
            match.append(route.operation_id)
            caller = req.caller
            if route.access is not Access.PUBLIC:
                if caller is None:
                    raise ApiError(401, "unauthorized", "missing token", headers=_BEARER)
                if not getattr(caller, "rest", True):
                    raise ApiError(403, "forbidden", "this API key may not call the REST API")
                assert route.access is not None  # the Router refuses routes without a rule
                check(route.access, caller, req.params)
                wait = await over_limit(
                    self.limiter,
                    f"rest:{principal(caller)}",
                    self.settings.rate_rest,
                    rest_cost(req),
                )
                if wait is not None:
                    raise TooManyRequests(wait)
            if route.query is not None:
                req.args = parse_query(route.query, req.query)
            limit = self.settings.max_body_bytes if route.max_body is None else route.max_body
            if len(req.body) > limit:  # over HTTP the listener refused it unread; rpc, Lambda
                raise PayloadTooLarge(limit)
            if route.body is not None:
                req.data = decode_body(route.body, req.body)
            elif route.form is not None:
                req.data = parse_form(route.form, req.body)
            elif req.body and req.method in _BODY_METHODS:
                raise ApiError(400, "unexpected_body", "this operation takes no body")
            self.db.check()  # every handler needs the database: 503 at once while it is out
            if route.idempotent:
                return await self.idempotency.run(req, route.handler)
            return await route.handler(req)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.db.failed(exc)
            err = from_exception(exc, f"{req.method} {req.path}")
            return Response.error(err)

    async def _purge(self) -> None:
        keys = await self.idempotency.purge()
        sessions = await self.accounts.purge()
        if keys or sessions:
            log.info("purged %d idempotency keys and %d expired or ended sessions", keys, sessions)

    async def _every(self, seconds: float, job: Callable[[], Awaitable[None]]) -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                await job()
            except Exception as exc:
                log.warning("%s failed: %s", job.__name__.strip("_"), exc)


_BEARER = {"WWW-Authenticate": "Bearer"}
