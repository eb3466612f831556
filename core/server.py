"""``python -m core``: the REST core alone, to scale it apart from the socket tier.

It serves the same route table as the gateway's ``/api/``, the documents,
``/healthz`` and ``/readyz``, and publishes change events through the broker
configured by ``REDIS_URL`` (none without it: events need Redis to reach
gateways in other processes).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import tornado.web
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

from core import __version__
from core.app import Core
from core.docs import doc_routes, jwks_route
from core.http import CoreHTTP, api_router
from gateway.app import make_limiter
from gateway.auth import Identity, Verifier, ensure_key_material
from gateway.broker import CONTROL, Broker, Position, RedisBroker
from gateway.logs import log_request
from gateway.revocation import Revocations
from gateway.settings import Settings

__all__ = ["CoreServer"]

log = logging.getLogger("core")


class _Health(tornado.web.RequestHandler):
    def initialize(self, core: Core | None = None) -> None:
        self.core = core

    async def get(self) -> None:
        ok = True if self.core is None else await self.core.db.healthy()
        self.set_status(200 if ok else 503)
        self.set_header("Content-Type", "application/json")
        self.finish(b'{"status":"ok"}' if ok else b'{"status":"unavailable","database":false}')


class CoreServer:
    """A started core with its HTTP server; `close` releases everything."""

    def __init__(
        self, core: Core, broker: Broker | None, server: HTTPServer, api: CoreHTTP, port: int
    ) -> None:
        self.core = core
        self.api = api
        self.broker = broker
        self.server = server
        self.port = port

    @classmethod
    async def start(cls, settings: Settings) -> CoreServer:
        settings = ensure_key_material(settings)
        broker: Broker | None = None
        revocations = Revocations(settings.access_token_ttl + settings.jwt_leeway)
        api_keys: dict[bytes, Identity] = {}
        control: list[Core] = []
        if settings.redis_url:
            broker = RedisBroker(settings.redis_url, settings.redis_prefix)
            revocations.publisher = broker

            def on_publication(ch: str, data: bytes, position: Position | None) -> None:
                if ch == CONTROL and control:  # the only channel a core listens to
                    control[0].on_control(data)

            await broker.start(on_publication)
        limiter = make_limiter(settings)
        core = await Core.open(settings, broker, revocations, api_keys, limiter)
        control.append(core)
        handlers: list[Any] = [
            (r"/healthz", _Health),
            (r"/readyz", _Health, {"core": core}),
            *doc_routes(core.routes, "tornado-gateway REST core", __version__),
            jwks_route(core.accounts.issuer.jwks()),
        ]
        app = tornado.web.Application(handlers, log_function=log_request)
        verifier = Verifier(settings, revocations, api_keys)
        api = CoreHTTP(core, verifier, settings.max_body_bytes, settings.cors_origins)
        server = HTTPServer(api_router(api, app), max_body_size=4 * settings.max_body_bytes)
        sockets = bind_sockets(settings.port, settings.host)
        server.add_sockets(sockets)
        port: int = sockets[0].getsockname()[1]
        return cls(core, broker, server, api, port)

    async def close(self) -> None:
        """Stop accepting, finish the requests being answered, release everything."""
        self.server.stop()
        try:
            await asyncio.wait_for(self.api.wait_idle(), self.core.settings.shutdown_timeout)
        except TimeoutError:
            log.warning("requests still running at shutdown")
        await self.server.close_all_connections()
        await self.core.close()
        await self.core.limiter.close()
        if self.broker is not None:
            await self.broker.close()
