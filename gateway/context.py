"""The collaborators every handler receives through ``initialize(ctx=...)``."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from core.infra.identity import Identity
from core.infra.metrics import Metrics
from core.infra.ratelimit import RateLimiter
from core.infra.runtime import connection_limit
from core.infra.settings import Settings
from core.infra.verify import Verifier
from core.service import Core, CoreUnavailable
from gateway.hooks.service import Hooks
from gateway.node import Node
from gateway.serverapi.operations import Operations
from gateway.session import Dispatch, Session, Transport, Verify
from gateway.transport.inflation import InflateLimits
from gateway.transport.pollsessions import LongPollSessions
from gateway.transport.wsconn import Coalescer
from gateway.upstream import UpstreamCore
from proto import Codec, Connection
from proto.deflate import Compressor

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
    #: The server API's reach (registry, fleet, agent, block list), set by make_app.
    ops: Operations | None = None
    #: The application's backends in the loop (None: no hook configured).
    hooks: Hooks | None = None
    #: The process's permessage-deflate compressor (None: ``COMPRESSION=off``).
    compressor: Compressor | None = None
    #: What one compressing socket may have the process inflate (None: no limit).
    inflate: InflateLimits | None = None
    #: What sessions are made with: `Session`, or with hooks `gateway.hooks.HookedSession`.
    new_session: Callable[..., Session] = Session
    # Bound once: `core.dispatch` and `verifier.verify` make a new method
    # object at each access, which each session would hold (two more objects
    # per socket for every full collection to walk).
    _dispatch: Dispatch = dataclasses.field(init=False, repr=False, compare=False)
    _verify: Verify = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_dispatch", self.core.dispatch)
        object.__setattr__(self, "_verify", self.verifier.verify)

    def open_session(
        self, transport: Transport, codec: Codec, identity: Identity, remote_ip: str
    ) -> Session:
        """A session for a client that sends commands (socket, long-poll), with its limits."""
        s = self.settings
        conn = Connection(
            codec,
            identity.grants,
            max_subscriptions=s.max_subscriptions,
            max_publish_bytes=s.max_publish_bytes,
        )
        return self.new_session(
            transport,
            conn,
            identity,
            self.node,
            self.metrics,
            self._dispatch,
            self._verify,
            commands=s.rate_socket_commands,
            publishes=s.rate_socket_publish,
            remote_ip=remote_ip,
        )

    @property
    def max_connections(self) -> int:
        """Connections this process takes before refusing more (``MAX_CONNECTIONS``)."""
        return connection_limit(self.settings.max_connections)
