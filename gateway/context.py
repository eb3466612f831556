"""The collaborators every handler receives through ``initialize(ctx=...)``."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from core.infra.metrics import Metrics
from core.infra.ratelimit import RateLimiter
from core.infra.runtime import connection_limit
from core.infra.settings import Settings
from core.infra.verify import Verifier
from core.service import Core, CoreUnavailable
from gateway.hooks.service import Hooks
from gateway.node import Node
from gateway.session import Session
from gateway.transport.pollsessions import LongPollSessions
from gateway.transport.wsconn import Coalescer
from gateway.upstream import UpstreamCore

__all__ = ["Context", "Status"]


@dataclasses.dataclass(slots=True)
class Status:
    """What changes over a gateway's life: set once it starts draining."""

    draining: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class Context:
    settings: Settings
    node: Node
    verifier: Verifier
    metrics: Metrics
    core: Core | UpstreamCore | CoreUnavailable
    limiter: RateLimiter
    status: Status = dataclasses.field(default_factory=Status)
    longpoll: LongPollSessions = dataclasses.field(default_factory=LongPollSessions)
    coalescer: Coalescer = dataclasses.field(default_factory=Coalescer)
    #: The application's backends in the loop (None: no hook configured).
    hooks: Hooks | None = None
    #: What sessions are made with: `Session`, or with hooks `gateway.hooks.HookedSession`.
    new_session: Callable[..., Session] = Session

    @property
    def max_connections(self) -> int:
        """Connections this process takes before refusing more (``MAX_CONNECTIONS``)."""
        return connection_limit(self.settings.max_connections)
