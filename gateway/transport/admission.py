"""Admission of a long-lived connection, whatever its transport: before any upgrade or stream.

Refused while draining (503), over ``RATE_CONNECT_IP`` (429), without a
valid token (401), or for a user the server API blocked (403 ``blocked``,
gateway/serverapi/blocks.py), each with the JSON error body; otherwise the
identity. With a connect hook (gateway/hooks/connect.py), a new connection
without any token goes on to the hook (`admit_request` answers None), and
every new connection is then admitted by the hook (`admit_hooked`), and
refused as blocked by the identity it gives.
"""

from __future__ import annotations

import logging
import math
import time

import tornado.web
from tornado.httputil import HTTPHeaders

from core.infra.clientip import limit_key
from core.infra.errors import ApiError, TooManyRequests
from core.infra.identity import AuthError, Identity, principal, token_from_header
from core.infra.ratelimit import over_limit
from core.infra.throttled import ThrottledLog
from gateway.context import Context
from gateway.hooks.connect import admit as hook_admit
from gateway.hooks.connect import new_client_id
from gateway.transport.origins import may_connect_without_token
from proto import JSON_CODEC

__all__ = [
    "admit",
    "admit_hooked",
    "admit_hooked_request",
    "admit_now",
    "admit_request",
    "admits_at_once",
    "hooked_admission",
    "refuse_crowded",
    "refuse_foreign_page",
    "refuse_full",
]

log = logging.getLogger("gateway.admission")
_log_crowded = ThrottledLog(log, 10.0)


async def admit(
    handler: tornado.web.RequestHandler, ctx: Context, *, new_connection: bool = True
) -> Identity | None:
    """The caller's identity, or an `ApiError` to answer the request with.

    None: a new connection without a token, for the connect hook to admit.

    ``new_connection``: counts against ``RATE_CONNECT_IP`` (a long-poll's later
    requests belong to a connection already admitted).
    """
    request = handler.request
    query_token = handler.get_query_argument("token", None)
    return await admit_request(ctx, request.remote_ip or "", request.headers, query_token,
                               new_connection=new_connection)  # fmt: skip


async def admit_hooked_request(
    handler: tornado.web.RequestHandler, ctx: Context, identity: Identity | None, transport: str
) -> Identity:
    """`admit_hooked` for a JSON transport served by a RequestHandler (SSE, long-poll)."""
    request = handler.request
    return await admit_hooked(
        ctx,
        identity,
        transport=transport,
        protocol=JSON_CODEC.name,
        remote_ip=request.remote_ip or "",
        headers=request.headers,
    )


async def admit_request(
    ctx: Context,
    remote_ip: str,
    headers: HTTPHeaders,
    query_token: str | None,
    *,
    new_connection: bool = True,
) -> Identity | None:
    """`admit` from the request's parts, for delegates without a RequestHandler."""
    _refuse_draining(ctx)
    rate = ctx.settings.rate_connect_ip if new_connection else None
    wait = await over_limit(ctx.limiter, f"connect-ip:{limit_key(remote_ip)}", rate)
    if wait is not None:
        ctx.metrics.handshake_failures.labels("rate_limited").inc()
        raise TooManyRequests(wait, "new connections")
    return _admit_token(ctx, remote_ip, headers, query_token, new_connection)


def admits_at_once(ctx: Context) -> bool:
    """Whether a new connection is admitted without waiting: no connect limit, no connect hook."""
    return ctx.settings.rate_connect_ip is None and not hooked_admission(ctx)


def admit_now(
    ctx: Context, remote_ip: str, headers: HTTPHeaders, query_token: str | None
) -> Identity:
    """`admit_request` for a new connection when `admits_at_once`: the same checks, no await."""
    assert admits_at_once(ctx)
    _refuse_draining(ctx)
    identity = _admit_token(ctx, remote_ip, headers, query_token, True)
    assert identity is not None  # without a connect hook, a token is required
    return identity


def refuse_full(ctx: Context) -> None:
    """503 ``unavailable`` once the process holds ``MAX_CONNECTIONS`` sockets and event streams.

    Long-poll sessions are members of the hub too, but have their own
    ``MAX_LONGPOLL_SESSIONS``. Sockets that left the hub but not yet their
    TCP connection (shed slow consumers reading their backlog) still count. Checked after the token and before any
    connect hook, by every transport alike (`capacity` failures, a log line
    every 10 s at most).
    """
    limit = ctx.max_connections
    held = ctx.node.hub.connection_count() - ctx.longpoll.open_count + len(ctx.coalescer.departed)
    if held >= limit:
        ctx.metrics.handshake_failures.labels("capacity").inc()
        _log_full(limit)
        raise ApiError(503, "unavailable", f"this process holds its limit of {limit} connections",
                       headers={"Retry-After": "1"})  # fmt: skip


_last_full_log = 0.0


def _log_full(limit: int) -> None:
    """Log a full process at most every 10 s."""
    global _last_full_log
    now = time.monotonic()
    if now - _last_full_log > 10:
        _last_full_log = now
        log.warning(
            "refusing new connections: this process holds its limit of %d connections", limit
        )


def _refuse_draining(ctx: Context) -> None:
    if ctx.status.draining:
        raise ApiError(
            503, "draining", "this gateway is shutting down", headers={"Retry-After": "1"}
        )


def _admit_token(
    ctx: Context,
    remote_ip: str,
    headers: HTTPHeaders,
    query_token: str | None,
    new_connection: bool,
) -> Identity | None:
    """The token's identity (None: none, for the connect hook), once the connection may come."""
    token = token_from_header(headers.get("Authorization"))
    if token is None:
        token = query_token
    if not token and new_connection and hooked_admission(ctx):
        return None  # the connect hook may admit it (by its cookies, say)
    try:
        identity = ctx.verifier.verify(token or "")
    except AuthError as exc:
        ctx.metrics.handshake_failures.labels(exc.reason).inc()
        log.info("connection refused from %s: %s", remote_ip, exc.reason)
        raise ApiError(401, "unauthorized", exc.message) from None
    refuse_blocked(ctx, identity)
    return refuse_crowded(ctx, identity) if new_connection else identity


def refuse_crowded(ctx: Context, identity: Identity) -> Identity:
    """``identity``, unless its user holds ``MAX_CONNECTIONS_PER_USER`` here: 429 then.

    Counted by principal (an outside identity provider's ``sub`` is not a
    user's of this deployment), over sockets, event streams and long-poll
    sessions, at admission (handshakes under way are not counted yet).
    """
    limit = ctx.settings.max_connections_per_user
    if not limit or ctx.node.hub.user_count(principal(identity)) < limit:
        return identity
    ctx.metrics.handshake_failures.labels("per_user").inc()
    _log_crowded.log(logging.INFO, "connection of %s refused: %d connections held",
                     identity.sub, limit)  # fmt: skip
    raise TooManyRequests(5.0, f"connections of this user here (at most {limit})")


def refuse_blocked(ctx: Context, identity: Identity) -> Identity:
    """``identity``, unless the server API blocked its user: 403 ``blocked`` then."""
    until = ctx.ops.blocks.refuses(identity.sub, time.time()) if ctx.ops is not None else None
    if until is None:
        return identity
    ctx.metrics.handshake_failures.labels("blocked").inc()
    log.info("connection of %s refused: blocked", identity.sub, extra={"user": identity.sub})
    retry = str(max(1, math.ceil(until - time.time())))
    raise ApiError(
        403,
        "blocked",
        "this user's connections are refused for now",
        headers={"Retry-After": retry},
    )


def refuse_foreign_page(ctx: Context, headers: HTTPHeaders) -> None:
    """403 for a request without a token from a page the browser would let act as its user
    by its cookies alone (gateway/transport/origins.py), before the connect hook is asked."""
    origin = headers.get("Origin")
    if may_connect_without_token(origin, headers.get("Host"), ctx.settings.allowed_origins):
        return
    ctx.metrics.handshake_failures.labels("origin").inc()
    shown = (origin or "")[:100]
    log.info("connection without a token refused from origin %r", shown)
    raise ApiError(403, "forbidden",
                   f"origin {shown} may not connect without a token (ALLOWED_ORIGINS)",
                   headers={"Vary": "Origin"})  # fmt: skip


def hooked_admission(ctx: Context) -> bool:
    """Whether new connections go through the connect hook."""
    return ctx.hooks is not None and ctx.hooks.connect is not None


async def admit_hooked(
    ctx: Context,
    identity: Identity | None,
    *,
    transport: str,
    protocol: str,
    remote_ip: str,
    headers: HTTPHeaders,
) -> Identity:
    """The identity the connect hook admits a new connection as (`ApiError` if refused).

    Raises `gateway.hooks.connect.Disconnected` when the hook ends the connection at once.
    """
    assert ctx.hooks is not None
    if identity is None:
        refuse_foreign_page(ctx, headers)
    admitted = await hook_admit(
        ctx.hooks,
        identity,
        client=new_client_id(),
        transport=transport,
        protocol=protocol,
        remote_ip=remote_ip,
        headers=headers,
        metrics=ctx.metrics,
    )
    return refuse_crowded(ctx, refuse_blocked(ctx, admitted))
