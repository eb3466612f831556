"""The collaborators every handler receives through ``initialize(ctx=...)``."""

from __future__ import annotations

import dataclasses

from core.app import Core, CoreUnavailable
from gateway.auth import Verifier
from gateway.metrics import Metrics
from gateway.node import Node
from gateway.polling import LongPollSessions
from gateway.ratelimit import RateLimiter
from gateway.settings import Settings

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
    core: Core | CoreUnavailable
    limiter: RateLimiter
    status: Status = dataclasses.field(default_factory=Status)
    longpoll: LongPollSessions = dataclasses.field(default_factory=LongPollSessions)
