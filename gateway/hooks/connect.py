"""The connect hook: the backend admits (or not) every new connection, before any upgrade.

After the gateway's own checks (draining, ``RATE_CONNECT_IP``, a token that
verifies when there is one, and for sockets a well-formed upgrade, the
origin and capacity), the backend is asked with who the client is: its id,
transport, codec, the token's ``sub`` and claims (``user`` null without a
token), its address, and the request headers named in ``HOOK_FORWARD_HEADERS``
(its cookies, typically). Its answer:

* ``result``: admitted, as ``user`` (required without a token; with one it may
  only repeat the token's ``sub``), with ``channels``/``pub`` grants, presence
  ``info`` and ``expire_at`` replacing the token's, and channels to
  ``subscribe`` it to at once;
* ``error``: refused before any upgrade, ``401`` when its code is 401, else ``403``;
* ``disconnect``: the connection opens only to be closed with that code
  (4000-4999) and reason, so the client knows whether to come back;

and no usable answer (timeout, backend down, breaker open, a bad answer)
refuses with ``503`` and ``Retry-After``: nobody is admitted unchecked.
"""

from __future__ import annotations

import base64
import binascii
import logging
import secrets
from collections.abc import Mapping
from typing import Any

import msgspec

from core.infra.errors import ApiError
from core.infra.identity import API_KEY_PREFIX, Identity
from core.infra.metrics import Metrics
from gateway.hooks.answers import (
    BadAnswer,
    ConnectAnswer,
    ConnectRequest,
    ConnectResult,
    checked_info,
    decoder,
)
from gateway.hooks.client import HookFailed
from gateway.hooks.service import Hooks
from proto import CLOSE_REASON_MAX_BYTES, RESERVED_PREFIX, Grants, InvalidGrants

__all__ = ["Disconnected", "HookedIdentity", "admit", "close_reason_of", "new_client_id"]

log = logging.getLogger("gateway.hooks")

_read = decoder(ConnectAnswer)
_claims = msgspec.json.Decoder(dict[str, Any])


class HookedIdentity(Identity):
    """An identity that came through the connect hook: who, and what its connection starts with.

    ``client`` is the connection's id (the one the hooks were told);
    ``subscribe`` the channels the server subscribes it to when it opens;
    ``own_grants`` / ``own_info``: the hook chose the grants / presence info, which an
    in-band token refresh then keeps (it takes the new token's expiry and session).
    """

    __slots__ = ("client", "own_grants", "own_info", "subscribe")

    client: str
    subscribe: tuple[str, ...]
    own_grants: bool
    own_info: bool


class Disconnected(Exception):
    """The connect hook answered ``disconnect``: open, then close with ``code`` and ``reason``."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"{code} {reason}")
        self.code = code
        self.reason = reason


def new_client_id() -> str:
    return secrets.token_hex(8)


def close_reason_of(reason: str) -> str:
    """``reason`` cut to what a close frame carries (123 bytes of UTF-8)."""
    return reason.encode()[:CLOSE_REASON_MAX_BYTES].decode("utf-8", "ignore")


def hooked(
    identity: Identity, client: str, *, exp: float | None = None, keep_exp: bool = True
) -> HookedIdentity:
    """A copy of ``identity`` as a `HookedIdentity` (its own ``exp`` unless ``keep_exp``)."""
    expires = identity.exp if keep_exp else exp
    copy = HookedIdentity(
        identity.sub, identity.grants, expires, identity.sid, identity.role, identity.rest
    )
    copy.info, copy.local, copy.token = identity.info, identity.local, identity.token
    if isinstance(identity, HookedIdentity):
        copy.client, copy.subscribe = identity.client, identity.subscribe
        copy.own_grants, copy.own_info = identity.own_grants, identity.own_info
    else:
        copy.client, copy.subscribe, copy.own_grants, copy.own_info = client, (), False, False
    return copy


async def admit(
    hooks: Hooks,
    identity: Identity | None,
    *,
    client: str,
    transport: str,
    protocol: str,
    remote_ip: str,
    headers: Mapping[str, str],
    metrics: Metrics,
) -> HookedIdentity:
    """The identity the connect hook admits; `ApiError` (refused) or `Disconnected`."""
    endpoint = hooks.connect
    assert endpoint is not None
    token = identity.token if identity is not None else None
    request = ConnectRequest(
        client=client,
        transport=transport,
        protocol=protocol,
        user=identity.sub if identity is not None else None,
        remote_addr=remote_ip,
        headers={name: value for name in hooks.forward_headers if (value := headers.get(name))},
        claims=_claims_of(token) if token else None,
    )
    admitted: list[HookedIdentity] = []

    def read(body: bytes) -> ConnectAnswer:
        answer = _read(body)
        if answer.result is not None:
            admitted.append(_identity(hooks, answer.result, identity, client))
        return answer

    try:
        answer = await hooks.ask(endpoint, request, read)
    except HookFailed:
        metrics.handshake_failures.labels("hook_unavailable").inc()
        message = "the connect hook did not answer, retry later"
        raise ApiError(503, "unavailable", message, headers={"Retry-After": "1"}) from None
    if answer.disconnect is not None:
        metrics.handshake_failures.labels("hook_disconnect").inc()
        raise Disconnected(answer.disconnect.code, close_reason_of(answer.disconnect.reason))
    if answer.error is not None:
        metrics.handshake_failures.labels("hook_refused").inc()
        why = answer.error.text
        log.info("connection refused by the connect hook from %s: %s", remote_ip, why)
        if answer.error.code == 401:
            raise ApiError(401, "unauthorized", answer.error.text)
        raise ApiError(403, "forbidden", answer.error.text)
    return admitted[0]


def _identity(
    hooks: Hooks, result: ConnectResult, identity: Identity | None, client: str
) -> HookedIdentity:
    """The admitted identity; `BadAnswer` when ``result`` cannot make one."""
    if identity is None and result.user is None:
        raise BadAnswer("result.user is required for a client without a token")
    if identity is not None and result.user is not None and result.user != identity.sub:
        raise BadAnswer("result.user must be the token's sub")
    base = identity if identity is not None else Identity(result.user or "", Grants((), True), None)
    if identity is None:
        base.local = False  # the application's user, not one of the core's accounts
    admitted = hooked(base, client, exp=result.expire_at, keep_exp=result.expire_at is None)
    if result.channels is not None or result.pub is not None:
        claims = {
            "channels": result.channels
            if result.channels is not None
            else list(base.grants.channels),
            "pub": result.pub if result.pub is not None else _pub_claim(base.grants),
        }
        try:
            admitted.grants = Grants.from_claims(claims, reserved=hooks.reserved)
        except InvalidGrants as exc:
            raise BadAnswer(str(exc)) from None
        admitted.own_grants = True
    if result.info is not None:
        admitted.info, admitted.own_info = checked_info(result.info), True
    channels = tuple(dict.fromkeys(result.subscribe))
    if len(channels) > hooks.max_subscriptions:
        raise BadAnswer(f"result.subscribe holds over {hooks.max_subscriptions} channels")
    if any(ch.startswith(RESERVED_PREFIX) for ch in channels):
        raise BadAnswer("result.subscribe names a reserved channel")
    admitted.subscribe = channels
    return admitted


def _pub_claim(grants: Grants) -> bool | list[str]:
    return grants.publish if isinstance(grants.publish, bool) else list(grants.publish)


def _claims_of(token: str) -> dict[str, Any] | None:
    """The payload of a JWT that was verified already (an API key has none)."""
    if token.startswith(API_KEY_PREFIX):
        return None
    try:
        payload = token.split(".")[1]
        return _claims.decode(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, binascii.Error, ValueError, msgspec.DecodeError):
        return None
