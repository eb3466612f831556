"""The control channel's messages: every one is defined here, and only here.

Processes (gateways and standalone cores) tell each other about changes
that must apply everywhere at once by publishing on the broker's `CONTROL`
channel, which every process receives whatever it subscribes to:

* ``{"type": "sessions_revoked", "sids": [...]}``: these login sessions
  are revoked (core/infra/revocation.py);
* ``{"type": "api_keys_changed"}``: reload the active API keys
  (core/apikeys.py).

A message this version does not know, or a malformed one, decodes to None
and is ignored (a newer process may send more kinds during a rollout).
"""

from __future__ import annotations

import logging

import msgspec

from core.infra.broker.base import CONTROL, Publisher

__all__ = ["CONTROL", "ApiKeysChanged", "ControlMessage", "SessionsRevoked", "broadcast", "decode"]

log = logging.getLogger("core.infra.control")


class SessionsRevoked(msgspec.Struct, tag_field="type", tag="sessions_revoked"):
    sids: list[str]


class ApiKeysChanged(msgspec.Struct, tag_field="type", tag="api_keys_changed"):
    pass


ControlMessage = SessionsRevoked | ApiKeysChanged

_decoder = msgspec.json.Decoder(ControlMessage)
_encoder = msgspec.json.Encoder()


def decode(data: bytes) -> ControlMessage | None:
    """The message in ``data``, or None for one this version does not know."""
    try:
        return _decoder.decode(data)
    except msgspec.DecodeError:
        log.debug("control message ignored: %r", data[:200])
        return None


async def broadcast(publisher: Publisher, message: ControlMessage) -> None:
    """Publish ``message`` to every process; raises what the publisher raises."""
    await publisher.publish(CONTROL, _encoder.encode(message))
