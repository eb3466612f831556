"""The gateway's own HTTP endpoints: publish, health, readiness, metrics.

Their errors are the one `ApiError` (core/infra/errors.py) with the one
body, and `core.errormap.write_error` answers any exception they raise: 500
``internal`` with no internals in the body (they go to the log).
"""

from __future__ import annotations

import logging
import time
from http import HTTPStatus
from types import TracebackType
from typing import Any

import msgspec
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from core.errormap import JsonErrors
from core.idempotency import checked_key
from core.infra.broker import BrokerUnavailable
from core.infra.errors import ApiError, ErrorDetail, TooManyRequests, Unavailable
from core.infra.history import call_of
from core.infra.identity import AuthError, Identity, principal, token_from_header
from core.infra.metrics import METRICS_CHALLENGE, METRICS_REFUSED, scrape_allowed
from core.infra.metricsmerge import scrape_view
from core.infra.ratelimit import over_limit
from core.infra.sharedcheck import SharedCheck
from core.service import Core
from gateway.context import Context
from gateway.hooks.answers import Answer
from gateway.hooks.client import HookFailed
from gateway.hooks.service import Hooks
from gateway.upstream import UpstreamCore
from proto import RESERVED_PREFIX, InvalidData
from proto.frames import Channel
from proto.publication import check_json

__all__ = [
    "HealthHandler",
    "JsonHandler",
    "MetricsHandler",
    "PublishHandler",
    "ReadyHandler",
    "readiness",
]

log = logging.getLogger("gateway.endpoints")

ExcInfo = tuple[type[BaseException], BaseException, TracebackType] | None
#: ``/readyz``'s status and body, checked at most once a second (`readiness`).
Readiness = SharedCheck[tuple[int, dict[str, Any]]]


class JsonHandler(JsonErrors):
    ctx: Context

    def initialize(self, ctx: Context) -> None:
        self.ctx = ctx

    def write_json(self, obj: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(msgspec.json.encode(obj))

    def authenticate(self) -> Identity:
        """The caller's identity from ``Authorization: Bearer``, or 401."""
        token = token_from_header(self.request.headers.get("Authorization"))
        try:
            return self.ctx.verifier.verify(token or "")
        except AuthError as exc:
            self.ctx.metrics.handshake_failures.labels(exc.reason).inc()
            raise ApiError(401, "unauthorized", exc.message) from None


class PublishRequest(msgspec.Struct, forbid_unknown_fields=True):
    ch: Channel
    data: msgspec.Raw


_publish_decoder = msgspec.json.Decoder(PublishRequest)


class PublishHandler(JsonHandler):
    """``POST /api/publish {"ch": ..., "data": ...}`` for backend services."""

    async def post(self) -> None:
        identity = self.authenticate()
        wait = await over_limit(
            self.ctx.limiter, f"rest:{principal(identity)}", self.ctx.settings.rate_rest
        )
        if wait is not None:
            raise TooManyRequests(wait)
        limit = self.ctx.settings.max_publish_bytes
        if len(self.request.body) > limit + 1024:
            raise ApiError(413, "payload_too_large", f"body over {limit + 1024} bytes")
        try:
            req = _publish_decoder.decode(self.request.body)
        except msgspec.ValidationError as exc:
            raise ApiError(
                422,
                "validation_error",
                "invalid request body",
                details=[ErrorDetail(_path_of(str(exc)), str(exc))],
            ) from None
        except msgspec.DecodeError as exc:
            raise ApiError(400, "malformed_json", str(exc)) from None
        except RecursionError:  # data nested beyond what the decoder follows
            raise ApiError(400, "malformed_json", "request body is nested too deeply") from None
        if req.ch.startswith(RESERVED_PREFIX) or not identity.grants.can_publish(req.ch):
            raise ApiError(403, "forbidden", f"token does not allow publishing on {req.ch}")
        if len(req.data) > limit:
            raise ApiError(413, "payload_too_large", f"data over {limit} bytes")
        key = self.request.headers.get("Idempotency-Key")
        call = (
            None if key is None else call_of(principal(identity), checked_key(key), bytes(req.data))
        )
        try:
            data, history = check_json(bytes(req.data), limit), True
            hooks = self.ctx.hooks
            if (
                hooks is not None
                and hooks.publish is not None
                and identity.role != "service"  # an API key is a backend's: not asked
                and hooks.publish_channels.applies(req.ch)
            ):
                data, history = await _hooked(hooks, identity, req.ch, data, self.ctx)
            await self.ctx.node.publish(req.ch, data, checked=True, history=history, call=call)
        except InvalidData as exc:
            raise ApiError(
                422,
                "validation_error",
                "data cannot be published",
                details=[ErrorDetail("$.data", exc.reason)],
            ) from None
        except BrokerUnavailable as exc:
            log.warning("publish on %s failed: %s", req.ch, exc)
            raise Unavailable("broker unavailable, retry later") from None
        self.write_json({"ok": True})


#: The statuses a publish hook's refusal keeps (its other codes answer 403).
_CLIENT_ERRORS = frozenset(s.value for s in HTTPStatus if 400 <= s.value < 500)


async def _hooked(
    hooks: Hooks, identity: Identity, ch: str, data: bytes, ctx: Context
) -> tuple[bytes, bool]:
    """A client's publication over HTTP goes through the publish hook as its ``pub`` would."""
    max_bytes = ctx.node.max_publication_bytes
    try:
        decided = await hooks.decide_publish("", identity.sub, ch, data, max_bytes)
    except HookFailed:
        raise Unavailable("the publish hook did not answer, retry later") from None
    if not isinstance(decided, Answer):
        return decided
    error = decided.error
    message = error.text if error is not None else "refused by the application"
    if error is not None and error.code in _CLIENT_ERRORS:
        raise ApiError(error.code, "refused", message)
    raise ApiError(403, "forbidden", message)


def _path_of(message: str) -> str:
    """msgspec says ``... - at `$.ch```; keep the JSON path, or ``$``."""
    _, sep, rest = message.rpartition(" - at `")
    return rest.rstrip("`") if sep else "$"


class HealthHandler(JsonHandler):
    """Liveness: the event loop answers."""

    def get(self) -> None:
        self.write_json({"status": "ok"})


class ReadyHandler(JsonHandler):
    """Readiness: not draining, the broker link up, PostgreSQL answering within 1 s.

    ``database`` is null when the REST core has no database here (none
    configured, or the core is elsewhere: ``CORE_URL``). A core elsewhere is
    shown under ``core`` (reachable, and its breaker's state) but does not
    make the gateway unready: its sockets work without it. Nor do hooks'
    backends (``hooks``: each one's breaker and last error): connections that
    need no hook are served whatever they do.

    Anyone may ask, so the checks are shared (`readiness`): draining is
    answered at once, the rest is at most a second old.
    """

    def initialize(self, ctx: Context, check: Readiness) -> None:  # type: ignore[override]
        super().initialize(ctx)
        self.check = check

    async def get(self) -> None:
        if self.ctx.status.draining:
            self.write_json({"status": "draining"}, 503)
            return
        status, body = await self.check()
        authorization = self.request.headers.get("Authorization")
        if not scrape_allowed(self.ctx.settings.metrics_token, authorization):
            body = _states_only(body)
        self.write_json(body, status)


#: What anyone may read of ``/readyz``'s ``core`` and of each of its ``hooks``: their state.
#: Where they are (internal URLs), their load and their last error (an internal address,
#: often) only with ``METRICS_TOKEN`` when one is set, as ``/metrics``.
_STATES = ("reachable", "breaker")


def _states_only(body: dict[str, Any]) -> dict[str, Any]:
    out = dict(body)
    if "core" in out:
        out["core"] = {k: v for k, v in out["core"].items() if k in _STATES}
    if "hooks" in out:
        out["hooks"] = {
            name: {k: v for k, v in hook.items() if k in _STATES}
            for name, hook in out["hooks"].items()
        }
    return out


def readiness(ctx: Context) -> Readiness:
    """The status and body of ``/readyz`` once not draining, checked at most once a second."""

    async def check() -> tuple[int, dict[str, Any]]:
        broker = await ctx.node.broker.healthy()
        core = ctx.core
        database = await core.db.healthy() if isinstance(core, Core) else None
        ok = broker and database is not False
        body: dict[str, Any] = {
            "status": "ok" if ok else "unavailable",
            "broker": broker,
            "database": database,
        }
        if isinstance(core, UpstreamCore):
            body["core"] = {"reachable": await core.healthy(), **core.state()}
        if ctx.hooks is not None:
            body["hooks"] = ctx.hooks.state()
        return (200 if ok else 503), body

    return SharedCheck(check)


class MetricsHandler(JsonHandler):
    """Prometheus text; with worker processes, every worker's samples (core/infra/metricsmerge.py).

    With ``METRICS_TOKEN`` set, only for ``Authorization: Bearer <METRICS_TOKEN>``.
    """

    def get(self) -> None:
        authorization = self.request.headers.get("Authorization")
        if not scrape_allowed(self.ctx.settings.metrics_token, authorization):
            raise ApiError(401, "unauthorized", METRICS_REFUSED, headers=METRICS_CHALLENGE)
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(generate_latest(scrape_view(self.ctx.metrics.registry, time.time())))
