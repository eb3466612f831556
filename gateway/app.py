"""Wiring: `make_app` builds a running gateway from Settings and closes it.

Everything stateful (metrics registry, hub, broker, node, verifier) is made
here and passed to handlers through ``initialize(ctx=...)``; nothing is
created at import time, so tests run several gateways in one process.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tornado.web
from prometheus_client import CollectorRegistry
from tornado.ioloop import PeriodicCallback
from tornado.netutil import bind_sockets
from tornado.routing import AnyMatches, PathMatches, Rule, RuleRouter

from core import __version__
from core.bodylimits import RouteLimits
from core.docs import doc_routes, jwks_route
from core.errormap import NotFoundHandler
from core.fastrest import FastRest
from core.http import CoreHTTP, api_router
from core.infra.broker import Broker, make_broker
from core.infra.clientip import TrustedProxies
from core.infra.control import ControlMessage
from core.infra.history import HistoryPolicy
from core.infra.identity import Identity
from core.infra.keyring import KeyRing
from core.infra.keys import ensure_key_material
from core.infra.listener import Listener
from core.infra.logs import log_request
from core.infra.metrics import Metrics, warn_open_metrics
from core.infra.ratelimit import RateLimiter, make_limiter
from core.infra.revocation import Revocations
from core.infra.runtime import LISTEN_BACKLOG
from core.infra.settings import Settings
from core.infra.verify import Verifier
from core.routing import Route
from core.service import Core, CoreUnavailable
from core.tokens import Issuer
from gateway.asyncapi import asyncapi_route
from gateway.context import Context
from gateway.demo import browser_routes
from gateway.endpoints import (
    HealthHandler,
    MetricsHandler,
    PublishHandler,
    ReadyHandler,
    readiness,
)
from gateway.events import EventRecorder, Webhook
from gateway.hooks.service import Hooks
from gateway.hooks.session import session_factory
from gateway.hub import Hub
from gateway.keymirror import KeyMirror
from gateway.node import Node
from gateway.passthrough import ForwardConnection
from gateway.router import FirstRoute, is_core_path
from gateway.serverapi.dispatch import ServerAPI, ServerBodyPolicy
from gateway.serverapi.operations import Operations
from gateway.serverapi.routes import ServerRoutes
from gateway.transport.inflation import BURST_FRAMES, InflateLimits
from gateway.transport.longpoll import LongPollHandler
from gateway.transport.polls import PollMatches, PollServer
from gateway.transport.pollsessions import LongPollSessions
from gateway.transport.sse import SSEHandler
from gateway.transport.websocket import WebSocketServer
from gateway.transport.wsconn import Coalescer
from gateway.upstream import UpstreamCore
from proto import CloseCode
from proto.deflate import Compressor

__all__ = ["Gateway", "make_app"]

log = logging.getLogger("gateway")


class Gateway:
    """A gateway's application and everything it owns."""

    #: Seconds between sweeps (token expiry, liveness): one timer per process.
    SWEEP = 1.0

    def __init__(
        self,
        settings: Settings,
        ctx: Context,
        app: tornado.web.Application,
        server_api: ServerAPI,
    ) -> None:
        self.settings = settings
        self.ctx = ctx
        self.app = app
        self.server_api = server_api
        self.server: Listener | None = None
        self.api: CoreHTTP | None = None
        self.server_http: CoreHTTP | None = None
        self.port: int | None = None
        self._sweeper = PeriodicCallback(self._sweep, self.SWEEP * 1000)
        self._sweeper.start()

    @property
    def hub(self) -> Hub:
        return self.ctx.node.hub

    def _sweep(self) -> None:
        n = self.hub.close_expired(time.time())
        if n:
            log.info("closed %d connections whose token expired", n)
        s = self.settings
        now = time.monotonic()
        self.ctx.longpoll.expire(now, s.longpoll_idle)
        self.ctx.node.presence.tick(now)
        self.ctx.node.tick(now)
        if self.ctx.ops is not None:
            self.ctx.ops.tick(now)
        if s.ping_interval > 0:
            self.hub.heartbeat(time.monotonic(), s.ping_interval, s.pong_timeout, self.SWEEP)

    async def _close_paced(self, code: CloseCode, seconds: float, tick: float = 0.05) -> None:
        members = list(self.hub.connections)
        if not members:
            return
        per_tick = max(1, math.ceil(len(members) * tick / seconds)) if seconds > 0 else len(members)
        log.info("draining %d connections over %.1fs", len(members), seconds)
        for start in range(0, len(members), per_tick):
            if start:
                await asyncio.sleep(tick)
            for member in members[start : start + per_tick]:
                member.close(code)

    def listen(
        self,
        port: int | None = None,
        host: str | None = None,
        sockets: list[socket.socket] | None = None,
    ) -> int:
        """Start serving; returns the bound port (useful with port 0).

        ``sockets`` are listening sockets bound by the caller (a worker
        process, core/infra/workers.py); without them, bind ``host:port``.
        """
        if sockets is None:
            sockets = bind_sockets(
                self.settings.port if port is None else port,
                self.settings.host if host is None else host,
                backlog=LISTEN_BACKLOG,
            )
        s, ctx = self.settings, self.ctx
        api = self.api = CoreHTTP(ctx.core, ctx.verifier, s.max_body_bytes, s.cors_origins)
        server_api = self.server_api
        self.server_http = CoreHTTP(server_api, ctx.verifier, server_api.max_body, s.cors_origins)
        polls = PollServer(ctx)
        websockets = WebSocketServer(ctx)
        sockets_first = RuleRouter([
            Rule(PathMatches(r"/ws"), websockets),
            Rule(PollMatches(), polls),
            Rule(PathMatches(r"/api/server/.*"), self.server_http),
            Rule(AnyMatches(), api_router(api, self.app)),
        ])  # fmt: skip
        limits = RouteLimits(
            s,
            ctx.verifier,
            ctx.core.router,
            self.app,
            {
                PublishHandler: (s.max_publish_bytes + 1024, True, False),
                # With hooks, a long-poll session may hold a secret of its own rather
                # than a token (admitted by its cookies): the handler checks either.
                LongPollHandler: (s.max_body_bytes, True if ctx.hooks is None else None, True),
            },
        )
        policy = ServerBodyPolicy(server_api, ctx.verifier, limits)
        proxies = TrustedProxies(s.trusted_proxies, s.forwarded_header)
        # Kept-alive REST connections are then served off Tornado (the core here or behind CORE_URL).
        # Behind CORE_URL, their requests are forwarded with callbacks, not a task each.
        forward = ForwardConnection if isinstance(ctx.core, UpstreamCore) else None
        fast = FastRest(api, s.max_body_bytes, is_core_path, forward)
        routes = FirstRoute(fast, sockets_first)  # /api/ first, unparsed
        self.server = Listener(routes, s, ctx.metrics, policy, proxies,
                               fast={"/ws": websockets.accept})  # fmt: skip
        fast.listener = self.server
        server = self.server
        ctx.metrics.adopted_connections.set_function(lambda: server.adopted)
        polls.listener = self.server  # kept-alive polls are then served off Tornado
        self.server.add_sockets(sockets)
        self.port = sockets[0].getsockname()[1]
        return self.port

    async def close(self, code: CloseCode = CloseCode.SHUTDOWN) -> None:
        """Drain, then release everything, within SHUTDOWN_TIMEOUT.

        Readiness turns red and new sockets are refused (503) at once, while
        the listener stays open so probes see it. Sockets are closed with
        ``code`` evenly over DRAIN_SECONDS, so that their clients do not all
        reconnect elsewhere in the same instant; REST requests being answered
        are finished; then the listener and the rest close.
        """
        deadline = time.monotonic() + self.settings.shutdown_timeout
        self.ctx.status.draining = True
        self.hub.drain()  # sockets waiting for their turn take no new subscriptions
        self._sweeper.stop()
        await self._close_paced(
            code, min(self.settings.drain_seconds, self.settings.shutdown_timeout)
        )
        # Sockets leave the hub once their close handshake ends (or after
        # Tornado's 5 s close timeout for peers that never answer).
        try:
            async with asyncio.timeout_at(_loop_time(deadline)):
                await self.hub.wait_idle()
                for http in (self.api, self.server_http):
                    if http is not None:
                        await http.wait_idle()
        except TimeoutError:
            log.warning("%d connections still open at shutdown", self.hub.connection_count())
        if self.server is not None:
            self.server.stop()
            await self.server.close_all_connections()
        await self.ctx.core.close()
        if self.ctx.ops is not None:
            await self.ctx.ops.close()
        if self.ctx.hooks is not None:
            await self.ctx.hooks.close()
        await self.ctx.node.close()
        await self.ctx.limiter.close()


def _loop_time(monotonic_deadline: float) -> float:
    """A time.monotonic() deadline on the running loop's clock."""
    return asyncio.get_running_loop().time() + (monotonic_deadline - time.monotonic())


def routes(ctx: Context, server_routes: tuple[Route, ...] = ()) -> list[Any]:
    kw = {"ctx": ctx}
    return [
        (r"/sse", SSEHandler, kw),
        (r"/lp", LongPollHandler, kw),
        (r"/lp/([A-Za-z0-9_-]{1,64})", LongPollHandler, kw),
        (r"/api/publish", PublishHandler, kw),
        (r"/healthz", HealthHandler, kw),
        (r"/readyz", ReadyHandler, {**kw, "check": readiness(ctx)}),
        (r"/metrics", MetricsHandler, kw),
        *doc_routes((*ctx.core.routes, *server_routes), "tornado-gateway", __version__),
        asyncapi_route(__version__, f"{ctx.settings.host}:{ctx.settings.port}"),
        jwks_route(_published_keys(ctx.settings)),
        *browser_routes(),
    ]


def _published_keys(settings: Settings) -> dict[str, object]:
    """The JWKS this gateway serves: its signing keys' public halves, or JWT_ISSUED_KEYS."""
    if settings.jwt_signing_keys or not settings.jwt_issued_keys:
        return Issuer(settings).jwks()
    published: dict[str, object] = json.loads(Path(settings.jwt_issued_keys).read_text())
    return published


async def open_core(
    settings: Settings,
    node: Node,
    revocations: Revocations,
    api_keys: dict[bytes, Identity],
    limiter: RateLimiter,
    metrics: Metrics,
) -> Core | UpstreamCore | CoreUnavailable:
    """The REST core: elsewhere (CORE_URL), or here on DATABASE_URL, publishing through the node."""

    def close_key(sub: str) -> None:
        node.hub.close_subject(sub, CloseCode.KEY_REVOKED)

    if settings.core_url:
        if settings.database_url:
            log.warning("CORE_URL is set: DATABASE_URL is not used by the gateway (remove it)")
        keys = KeyRing(api_keys, settings.core_channels, close_key)
        mirror = KeyMirror(node.broker, keys, revocations)
        return await UpstreamCore(settings, metrics, revocations, mirror).open()
    if not settings.database_url:
        return CoreUnavailable("the REST core has no database (set DATABASE_URL or CORE_URL)")
    return await Core.open(
        settings, node, revocations, api_keys, limiter, close_key, store=node.broker
    )


def event_recorder(settings: Settings, node: Node, metrics: Metrics) -> EventRecorder | None:
    """The connection events' recorder (and webhook) with EVENTS_STREAM; None without."""
    if not settings.events_stream:
        return None
    webhook = None
    if settings.events_webhook_url and settings.hook_secret:
        webhook = Webhook(
            settings.events_webhook_url,
            settings.hook_secret,
            metrics,
            batch=settings.events_webhook_batch,
            queue=settings.events_webhook_queue,
            retries=settings.events_webhook_retries,
            timeout=settings.events_webhook_timeout,
        )
    return EventRecorder(
        node.broker,
        metrics,
        lambda: node.hub.connections,
        ttl=settings.presence_ttl,
        maxlen=settings.events_maxlen,
        buffer=settings.events_buffer,
        webhook=webhook,
    )


async def make_app(
    settings: Settings,
    *,
    broker: Broker | None = None,
    registry: CollectorRegistry | None = None,
) -> Gateway:
    """Build and start a gateway (broker connected); `Gateway.close` undoes it."""
    settings = ensure_key_material(settings)
    metrics = Metrics(registry)
    warn_open_metrics(settings.metrics_token)
    hub = Hub(metrics, notice=settings.token_notice, grace=settings.token_grace)
    history = HistoryPolicy(settings.history_channels, settings.history_size, settings.history_ttl)
    presence = (settings.presence_channels, settings.presence_ttl, settings.presence_pushes)
    node = Node(
        hub,
        broker if broker is not None else make_broker(settings),
        metrics,
        history,
        presence,
        max_publication_bytes=settings.max_publication_bytes,
    )
    node.events = event_recorder(settings, node, metrics)
    revocations = Revocations(
        settings.access_token_ttl + settings.jwt_leeway,
        node,
        on_revoked=hub.close_session,
        store=node.broker,
    )
    node.on_control = revocations.on_control
    hub.revoked = revocations
    api_keys: dict[bytes, Identity] = {}
    verifier = Verifier(settings, revocations, api_keys)
    limiter = make_limiter(settings, node.broker)
    await node.start()
    try:
        core = await open_core(settings, node, revocations, api_keys, limiter, metrics)
    except BaseException:
        await node.close()
        await limiter.close()
        raise
    if not isinstance(core, CoreUnavailable):
        node.on_control = core.on_control

    async def health() -> tuple[bool, bool | None, dict[str, bool]]:
        """Redis answers; PostgreSQL answers (None: no database here); each hook's breaker."""
        database = await core.db.healthy() if isinstance(core, Core) else None
        hooked = {} if hooks is None else hooks.endpoints()
        backends = {name: e.breaker.state == "closed" for name, e in hooked.items()}
        return await node.broker.healthy(), database, backends

    ops = Operations(node, metrics, __version__, health)
    node.on_control = _both(node.on_control, ops.on_control)
    await ops.start()
    hooks = await Hooks.open(settings, metrics)
    ctx = Context(
        settings=settings, node=node, verifier=verifier, metrics=metrics, core=core, limiter=limiter,
        coalescer=Coalescer(metrics.write_lag, settings.send_buffer_total_bytes),
        longpoll=LongPollSessions(settings.max_longpoll_sessions, settings.longpoll_max_per_user),
        ops=ops, hooks=hooks, new_session=session_factory(hooks),
        compressor=_compressor(settings, metrics), inflate=_inflate_limits(settings),
    )  # fmt: skip
    metrics.send_buffered.set_function(lambda: ctx.coalescer.buffered)
    if isinstance(core, Core):
        metrics.watch_pool(core.db.pool, core.db.breaker)
        core.db.on_refused = metrics.db_refused.inc
        core.observe = metrics.rest_request
        if core.relay is not None:
            metrics.outbox_pending.set_function(core.relay.count)
            core.relay.on_relayed = metrics.outbox_relayed.inc
    server_api = ServerAPI(ServerRoutes(ctx, ops).routes(), settings, limiter)
    server_api.observe = metrics.rest_request
    app = tornado.web.Application(
        routes(ctx, server_api.routes),
        default_handler_class=NotFoundHandler,
        log_function=log_request,
    )
    return Gateway(settings, ctx, app, server_api)


def _inflate_limits(settings: Settings) -> InflateLimits | None:
    """``COMPRESSION_INFLATE_RATE``, and `BURST_FRAMES` frames at once (None: off)."""
    rate = settings.compression_inflate_rate
    if not settings.compression or not rate:
        return None
    return InflateLimits.of(rate, BURST_FRAMES * settings.max_frame_bytes)


def _compressor(settings: Settings, metrics: Metrics) -> Compressor | None:
    """The permessage-deflate compressor of ``COMPRESSION=on``, its counts exported."""
    if not settings.compression:
        return None
    compressor = Compressor(settings.compression_level, settings.compression_min_bytes)
    metrics.watch_compression(compressor)
    return compressor


def _both(
    first: Callable[[ControlMessage], None] | None, then: Callable[[ControlMessage], None]
) -> Callable[[ControlMessage], None]:
    """One control-message listener that tells ``first`` (when set), then ``then``."""
    if first is None:
        return then

    def both(message: ControlMessage) -> None:
        first(message)
        then(message)

    return both
