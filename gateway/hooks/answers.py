"""What the gateway asks hook backends, and what it accepts as their answers.

Every request is one JSON object (field names as in docs/hooks.md); every
answer is one JSON object with exactly one of

* ``result``: the hook's own fields (below);
* ``error``: ``{"code": N, "message": "...", "temporary": false}``, a refusal;
* ``disconnect``: ``{"code": 4000-4999, "reason": "..."}``, end the connection.

Anything else (not JSON, another shape, none or several of the three, a field
of the wrong type or out of its bounds) is a *bad answer*: `BadAnswer`, which
the caller treats as a failed call (docs/hooks.md, failure policy).
Unknown fields are ignored, so a backend may send more than is read.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Generic, TypeVar

import msgspec

from core.infra.verify import MAX_INFO_BYTES
from proto.frames import Channel
from proto.publication import InvalidData, check_info

__all__ = [
    "Answer",
    "BadAnswer",
    "CallAnswer",
    "CallRequest",
    "CallResult",
    "ConnectAnswer",
    "ConnectRequest",
    "ConnectResult",
    "Goodbye",
    "PublishAnswer",
    "PublishRequest",
    "PublishResult",
    "RefreshAnswer",
    "RefreshRequest",
    "RefreshResult",
    "Refusal",
    "SubscribeAnswer",
    "SubscribeRequest",
    "SubscribeResult",
    "checked_info",
    "decoder",
]

#: Longest ``message`` of a refusal passed on to a client (longer ones are cut).
MAX_MESSAGE = 256


class BadAnswer(ValueError):
    """A backend's answer that is not one of the documented shapes."""


def checked_info(info: dict[str, Any]) -> bytes:
    """A hook's ``result.info`` as JSON bytes, held to the ``info`` claim's rule
    (`proto.publication.check_info`); `BadAnswer` otherwise."""
    try:
        return check_info(info, MAX_INFO_BYTES)
    except InvalidData as exc:
        raise BadAnswer(f"result.info: {exc.reason}") from None


# -- requests ----------------------------------------------------------------------


class ConnectRequest(msgspec.Struct, frozen=True, omit_defaults=True):
    """Asked before a new connection is admitted. ``user`` is null without a token."""

    client: str
    transport: str
    protocol: str
    user: str | None
    remote_addr: str
    headers: dict[str, str]
    claims: dict[str, Any] | None = None


class _Asked(msgspec.Struct, frozen=True, omit_defaults=True):
    """What every request about an open connection starts with: which one, and whose."""

    client: str
    user: str


class SubscribeRequest(_Asked, frozen=True, omit_defaults=True):
    channel: str
    data: msgspec.Raw = msgspec.Raw()


class PublishRequest(_Asked, frozen=True, omit_defaults=True):
    channel: str
    data: msgspec.Raw


class CallRequest(_Asked, frozen=True, omit_defaults=True):
    method: str
    data: msgspec.Raw = msgspec.Raw()


class RefreshRequest(_Asked, frozen=True, omit_defaults=True):
    transport: str
    expire_at: float | None


# -- answers -------------------------------------------------------------------------


class Refusal(msgspec.Struct, frozen=True):
    """``error``: refused. ``code`` 400-1999 reaches the client as it is; any other as 103."""

    code: int
    message: str = ""
    temporary: bool = False

    @property
    def text(self) -> str:
        return self.message[:MAX_MESSAGE] or "refused by the application"


class Goodbye(msgspec.Struct, frozen=True):
    """``disconnect``: end the connection with ``code`` (4000-4999) and ``reason``."""

    code: Annotated[int, msgspec.Meta(ge=4000, le=4999)]
    reason: str = ""


Pattern = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]


class ConnectResult(msgspec.Struct, frozen=True):
    """Admitted: as ``user`` (the token's ``sub`` when there is a token), with these grants."""

    user: Annotated[str, msgspec.Meta(min_length=1, max_length=256)] | None = None
    #: Channel patterns it may subscribe to (replace the token's ``channels``).
    channels: Annotated[list[Pattern], msgspec.Meta(max_length=256)] | None = None
    #: Where it may publish, as the ``pub`` claim (replaces the token's).
    pub: bool | Annotated[list[Pattern], msgspec.Meta(max_length=256)] | None = None
    #: Channels it is subscribed to at once, by the server (no ``sub`` frame, no grant needed).
    subscribe: Annotated[list[Channel], msgspec.Meta(max_length=1024)] = []
    #: Shown to others in presence (an object of at most 1 KiB), as the ``info`` claim.
    info: dict[str, Any] | None = None
    #: Unix seconds when the connection's identity expires (then as a token's ``exp``).
    expire_at: Annotated[float, msgspec.Meta(gt=0)] | None = None


class SubscribeResult(msgspec.Struct, frozen=True):
    """Subscribed. ``data`` goes back in the reply; ``info`` is shown in this channel's presence."""

    info: dict[str, Any] | None = None
    data: msgspec.Raw = msgspec.Raw()


class PublishResult(msgspec.Struct, frozen=True):
    """Published: ``data`` instead of the client's, when given; not kept in history if asked."""

    data: msgspec.Raw = msgspec.Raw()
    skip_history: bool = False


class CallResult(msgspec.Struct, frozen=True):
    """The call's answer: ``data`` goes back in the reply."""

    data: msgspec.Raw = msgspec.Raw()


class RefreshResult(msgspec.Struct, frozen=True):
    """The connection lives on until ``expire_at`` (Unix seconds)."""

    expire_at: Annotated[float, msgspec.Meta(gt=0)]


R = TypeVar("R")


class Answer(msgspec.Struct, Generic[R], frozen=True):
    """One of ``result`` (of the hook's own type ``R``), ``error`` or ``disconnect``."""

    result: R | None = None
    error: Refusal | None = None
    disconnect: Goodbye | None = None

    @property
    def kind(self) -> str:
        """``result``, ``error`` or ``disconnect``: what the backend answered."""
        if self.error is not None:
            return "error"
        return "disconnect" if self.disconnect is not None else "result"

    def check(self) -> None:
        given = sum(x is not None for x in (self.result, self.error, self.disconnect))
        if given != 1:
            raise BadAnswer("expected exactly one of result, error, disconnect")


ConnectAnswer = Answer[ConnectResult]
SubscribeAnswer = Answer[SubscribeResult]
PublishAnswer = Answer[PublishResult]
CallAnswer = Answer[CallResult]
RefreshAnswer = Answer[RefreshResult]


A = TypeVar("A", bound=Answer[Any])


def decoder(kind: type[A]) -> Callable[[bytes], A]:
    """A function reading one answer of ``kind``; it raises `BadAnswer` for anything else."""
    decode = msgspec.json.Decoder(kind).decode

    def read(body: bytes) -> A:
        try:
            answer: A = decode(body)
        except msgspec.DecodeError as exc:  # ValidationError too
            raise BadAnswer(str(exc)[:200]) from None
        except RecursionError:
            raise BadAnswer("nested too deeply") from None
        answer.check()
        return answer

    return read
