"""Per-connection protocol state, with no I/O.

A `Connection` takes the raw frames a client sent and returns either a
validated command for the session to execute or a `ProtocolError` to send
back as an error reply. It owns the connection's subscription set and its
lifecycle state; everything here runs without an event loop.

Lifecycle (the legal transitions are the table `TRANSITIONS`):

* ``OPEN``: after a successful, authenticated handshake. All commands run.
* ``DRAINING``: the server is going away (SIGTERM) and has asked the client
  to reconnect elsewhere. New subscriptions are refused with the temporary
  ``CLOSING`` error; publishes, calls, unsubscribes and pings still run so
  that a client can finish what it was doing.
* ``CLOSED``: terminal. Every command is refused; nothing is sent.

Any other transition is a bug in the caller and raises `StateError`.
"""

from __future__ import annotations

import enum
from collections.abc import Container
from typing import Final

from proto.codec import Codec, ProtocolError
from proto.codes import ErrorCode
from proto.frames import (
    Call,
    Command,
    History,
    Ping,
    PresenceQuery,
    PresenceStats,
    Pub,
    Refresh,
    Rpc,
    Sub,
    Unsub,
)
from proto.grants import Grants

__all__ = ["ADMIN_CHANNEL", "RESERVED_PREFIX", "TRANSITIONS", "Connection", "State", "StateError"]

#: Channel names the system keeps for itself (``__control``): no client may
#: subscribe or publish there, whatever its grants say, but for the system
#: channels its grants name (`Grants.system`).
RESERVED_PREFIX: Final = "__"
#: The admin console's channel: each gateway's live figures, once a second
#: while someone watches. Only admins subscribe; nobody publishes.
ADMIN_CHANNEL: Final = "__admin"


class State(enum.Enum):
    OPEN = "open"
    DRAINING = "draining"
    CLOSED = "closed"


TRANSITIONS: Final[dict[State, frozenset[State]]] = {
    State.OPEN: frozenset({State.DRAINING, State.CLOSED}),
    State.DRAINING: frozenset({State.CLOSED}),
    State.CLOSED: frozenset(),
}


class StateError(RuntimeError):
    """An illegal lifecycle transition was requested."""


class Connection:
    __slots__ = (
        "codec",
        "grants",
        "max_publish_bytes",
        "max_subscriptions",
        "state",
        "subscriptions",
    )

    def __init__(
        self,
        codec: Codec,
        grants: Grants,
        *,
        max_subscriptions: int = 128,
        max_publish_bytes: int = 65536,
    ) -> None:
        self.codec = codec
        self.grants = grants
        self.max_subscriptions = max_subscriptions
        self.max_publish_bytes = max_publish_bytes
        self.state = State.OPEN
        self.subscriptions: set[str] = set()

    # -- lifecycle ---------------------------------------------------------

    def transition(self, new: State) -> None:
        if new not in TRANSITIONS[self.state]:
            raise StateError(f"illegal transition {self.state.value} -> {new.value}")
        self.state = new

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    # -- input -------------------------------------------------------------

    def receive(self, data: bytes | str) -> Command:
        """Decode one client frame and check it against this connection.

        Raises `ProtocolError` (to be sent with `error`) when the frame
        cannot run; the connection stays usable either way.
        """
        cmd = self.codec.decode(data)
        if self.state is State.CLOSED:
            raise ProtocolError(ErrorCode.CLOSING, cmd.id)
        if isinstance(cmd, Sub):
            self._check_sub(cmd)
        elif isinstance(cmd, Unsub):
            if cmd.ch not in self.subscriptions:
                raise ProtocolError(ErrorCode.NOT_SUBSCRIBED, cmd.id, cmd.ch)
        elif isinstance(cmd, History | PresenceQuery | PresenceStats):
            # A channel held is readable: one the server subscribed the connection to
            # (a connect hook's, the server API's) needs no grant, for its history
            # is how a client back from a reconnect reads what it missed there.
            if cmd.ch not in self.subscriptions and not self.may_read(cmd.ch):
                raise ProtocolError(ErrorCode.PERMISSION_DENIED, cmd.id, cmd.ch)
        elif isinstance(cmd, Pub):
            if cmd.ch.startswith(RESERVED_PREFIX) or not self.grants.can_publish(cmd.ch):
                raise ProtocolError(ErrorCode.PERMISSION_DENIED, cmd.id, cmd.ch)
            self._check_size(cmd.id, cmd.data)
        elif isinstance(cmd, Call):
            # The backend decides who may call what; the size bound is the gateway's.
            self._check_size(cmd.id, cmd.data)
        else:
            # rpc: the REST core authorizes the call as this identity;
            # refresh: the session verifies the new token.
            assert isinstance(cmd, Ping | Rpc | Refresh)
        return cmd

    def may_read(self, ch: str) -> bool:
        """Whether this connection may subscribe to ``ch`` (and read its history, presence)."""
        if ch.startswith(RESERVED_PREFIX):
            return ch in self.grants.system
        return self.grants.can_subscribe(ch)

    def _check_size(self, id: int, data: bytes) -> None:
        if len(data) > self.max_publish_bytes:
            raise ProtocolError(
                ErrorCode.PAYLOAD_TOO_LARGE, id, f"limit is {self.max_publish_bytes} bytes"
            )

    def _check_sub(self, cmd: Sub) -> None:
        if self.state is State.DRAINING:
            raise ProtocolError(ErrorCode.CLOSING, cmd.id)
        if cmd.ch in self.subscriptions:  # the client's, or one the server made (no grant)
            raise ProtocolError(ErrorCode.ALREADY_SUBSCRIBED, cmd.id, cmd.ch)
        if not self.may_read(cmd.ch):
            raise ProtocolError(ErrorCode.PERMISSION_DENIED, cmd.id, cmd.ch)
        if len(self.subscriptions) >= self.max_subscriptions:
            raise ProtocolError(
                ErrorCode.LIMIT_EXCEEDED, cmd.id, f"at most {self.max_subscriptions} subscriptions"
            )
        if cmd.data:  # for a subscribe hook's backend, bounded as a publication is
            self._check_size(cmd.id, cmd.data)

    # -- bookkeeping after the session executed a command ------------------

    def subscribed(self, ch: str) -> None:
        self.subscriptions.add(ch)

    def unsubscribed(self, ch: str) -> None:
        self.subscriptions.discard(ch)

    def regrant(self, grants: Grants, keep: Container[str] = ()) -> list[str]:
        """Take new grants; returns the subscriptions they no longer allow (now dropped).

        Channels in ``keep`` (the server subscribed the connection there itself) stay;
        the others are asked as a ``sub`` is (`may_read`: a system channel such as the
        admin console's by the grants' ``system`` ones, not by their patterns).
        """
        self.grants = grants
        lost = sorted(ch for ch in self.subscriptions if not self.may_read(ch) and ch not in keep)
        self.subscriptions.difference_update(lost)
        return lost

    # -- output ------------------------------------------------------------

    def ok(self, cmd: Command) -> bytes:
        return self.codec.ok(cmd.id)

    def error(self, exc: ProtocolError) -> bytes:
        return self.codec.error_for(exc)

    def error_reply(self, cmd: Command, code: ErrorCode, detail: str | None = None) -> bytes:
        return self.codec.error(cmd.id, code, detail)
