"""``python -m core``: the REST core alone, to scale it apart from the socket tier.

It serves the same route table as the gateway's ``/api/``, the documents,
``/healthz`` and ``/readyz``, and publishes change events through the broker
configured by ``REDIS_URL`` (none without it: events need Redis to reach
gateways in other processes).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import Any

import tornado.web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from tornado.netutil import bind_sockets

from core import __version__
from core.bodylimits import RouteLimits
from core.docs import doc_routes, jwks_route
from core.errormap import JsonErrors, NotFoundHandler
from core.fastrest import FastRest
from core.http import CoreHTTP, api_router
from core.infra.broker import CONTROL, Broker, Position, make_broker
from core.infra.clientip import TrustedProxies
from core.infra.control import decode as decode_control
from core.infra.errors import ApiError
from core.infra.history import HistoryPolicy, HistoryPublisher
from core.infra.identity import Identity
from core.infra.keys import ensure_key_material
from core.infra.listener import Listener
from core.infra.logs import log_request
from core.infra.metrics import (
    METRICS_CHALLENGE,
    METRICS_REFUSED,
    Metrics,
    scrape_allowed,
    warn_open_metrics,
)
from core.infra.metricsmerge import scrape_view
from core.infra.ratelimit import make_limiter
from core.infra.revocation import Revocations
from core.infra.settings import Settings
from core.infra.sharedcheck import SharedCheck
from core.infra.verify import Verifier
from core.service import Core

__all__ = ["CoreServer", "StandaloneCore"]

log = logging.getLogger("core")


class _Health(JsonErrors):
    """``/healthz`` (no check), ``/readyz`` (PostgreSQL, asked at most once a second)."""

    def initialize(self, check: SharedCheck[bool] | None = None) -> None:
        self.check = check

    async def get(self) -> None:
        ok = True if self.check is None else await self.check()
        self.set_status(200 if ok else 503)
        self.set_header("Content-Type", "application/json")
        self.finish(b'{"status":"ok"}' if ok else b'{"status":"unavailable","database":false}')


class _Metrics(JsonErrors):
    """The core's own Prometheus metrics: REST durations, the pool, the process.

    With worker processes (``WORKERS``), every worker's samples, labelled by
    worker (core/infra/metricsmerge.py), whichever worker answers.
    """

    def initialize(self, registry: CollectorRegistry, token: str | None) -> None:
        self.registry = registry
        self.token = token

    def get(self) -> None:
        if not scrape_allowed(self.token, self.request.headers.get("Authorization")):
            raise ApiError(401, "unauthorized", METRICS_REFUSED, headers=METRICS_CHALLENGE)
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(generate_latest(scrape_view(self.registry, time.time())))


class StandaloneCore:
    """The core opened without the gateway, with what serving it over HTTP needs.

    Outside the gateway there is no node: with ``REDIS_URL`` a Redis broker
    carries change events and revocations to the gateways and takes the
    control channel in; without it events stay local. The limiter is Redis's
    or this process's own (`make_limiter`), and `api` is the HTTP delegate
    (bearer-token auth, CORS, 413) the standalone server and the Lambda
    handler both drive. Key material must already be configured.
    """

    def __init__(self, core: Core, broker: Broker | None, api: CoreHTTP) -> None:
        self.core = core
        self.broker = broker
        self.api = api

    @classmethod
    async def open(cls, settings: Settings) -> StandaloneCore:
        broker: Broker | None = None
        revocations = Revocations(settings.access_token_ttl + settings.jwt_leeway)
        api_keys: dict[bytes, Identity] = {}
        verifier = Verifier(settings, revocations, api_keys)
        control: list[Core] = []
        if settings.redis_url:
            broker = make_broker(settings)  # a Redis Cluster too, with REDIS_CLUSTER
            revocations.publisher = broker
            revocations.store = broker  # read by gateways with CORE_URL

            def on_publication(ch: str, data: bytes, position: Position | None) -> None:
                if ch == CONTROL and control:  # the only channel a core listens to
                    message = decode_control(data)
                    if message is not None:
                        control[0].on_control(message)

            await broker.start(on_publication)
        limiter = make_limiter(settings, broker)
        try:
            publisher = None if broker is None else HistoryPublisher(broker, HistoryPolicy(
                settings.history_channels, settings.history_size, settings.history_ttl))  # fmt: skip
            core = await Core.open(
                settings, publisher, revocations, api_keys, limiter, store=broker
            )
        except BaseException:
            await limiter.close()
            if broker is not None:
                await broker.close()
            raise
        control.append(core)
        api = CoreHTTP(core, verifier, settings.max_body_bytes, settings.cors_origins)
        return cls(core, broker, api)

    async def close(self) -> None:
        await self.core.close()
        await self.core.limiter.close()
        if self.broker is not None:
            await self.broker.close()


class CoreServer:
    """A started core with its HTTP server; `close` releases everything."""

    def __init__(self, stack: StandaloneCore, server: Listener, port: int) -> None:
        self.stack = stack
        self.core = stack.core
        self.api = stack.api
        self.broker = stack.broker
        self.server = server
        self.port = port

    @classmethod
    async def start(
        cls,
        settings: Settings,
        sockets: list[socket.socket] | None = None,
        registry: CollectorRegistry | None = None,
    ) -> CoreServer:
        """Serve on ``sockets`` (a worker's, core/infra/workers.py), else on ``host:port``."""
        settings = ensure_key_material(settings)
        stack = await StandaloneCore.open(settings)
        core = stack.core
        metrics = Metrics(registry)
        scrape_token = settings.metrics_token
        warn_open_metrics(scrape_token)
        core.observe = metrics.rest_request
        metrics.watch_pool(core.db.pool, core.db.breaker)
        core.db.on_refused = metrics.db_refused.inc
        if core.relay is not None:
            metrics.outbox_pending.set_function(core.relay.count)
            core.relay.on_relayed = metrics.outbox_relayed.inc
        handlers: list[Any] = [
            (r"/healthz", _Health),
            (r"/readyz", _Health, {"check": SharedCheck(core.db.healthy)}),
            (r"/metrics", _Metrics, {"registry": metrics.registry, "token": scrape_token}),
            *doc_routes(core.routes, "tornado-gateway REST core", __version__),
            jwks_route(core.accounts.issuer.jwks()),
        ]
        app = tornado.web.Application(
            handlers, default_handler_class=NotFoundHandler, log_function=log_request
        )
        # The gateway's listener: header timeout, pending cap, body limits, trusted proxies.
        policy = RouteLimits(settings, stack.api.verifier, core.router, app)
        proxies = TrustedProxies(settings.trusted_proxies, settings.forwarded_header)
        # Kept-alive /api/ connections are served off Tornado after their first request.
        fast = FastRest(stack.api, settings.max_body_bytes)
        server = Listener(api_router(fast, app), settings, metrics, policy, proxies)
        fast.listener = server
        metrics.adopted_connections.set_function(lambda: server.adopted)
        if sockets is None:
            sockets = bind_sockets(settings.port, settings.host)
        server.add_sockets(sockets)
        port: int = sockets[0].getsockname()[1]
        return cls(stack, server, port)

    async def close(self) -> None:
        """Stop accepting, finish the requests being answered, release everything."""
        self.server.stop()
        try:
            await asyncio.wait_for(self.api.wait_idle(), self.core.settings.shutdown_timeout)
        except TimeoutError:
            log.warning("requests still running at shutdown")
        await self.server.close_all_connections()
        await self.stack.close()
