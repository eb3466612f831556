"""`HookedSession`: a client session whose backend takes part in its commands and its expiry.

Made instead of a plain `gateway.session.Session` only when a gateway has
hooks, so a gateway without any pays nothing for them. It adds:

* server-side subscriptions (the connect hook's ``subscribe``), made when the
  connection opens, before its first command runs;
* ``sub`` on a channel of ``HOOK_SUBSCRIBE_CHANNELS``: the backend is asked
  after the gateway's own checks (grants, limits); ``result`` subscribes, its
  ``data`` in the reply and its ``info`` in the channel's presence;
* ``pub`` on a channel of ``HOOK_PUBLISH_CHANNELS``: the backend is asked
  first; ``result`` publishes its ``data`` (or the client's), in history unless
  ``skip_history``;
* ``call``: the backend's ``result.data`` is the reply's ``data``;
* before the identity expires (``TOKEN_NOTICE`` seconds ahead), the refresh
  hook is asked for a new ``expire_at``, again every few seconds while it
  fails, until the deadline (then 4002, as for a token).

Every hook may answer ``error`` (an error reply: codes 400-1999 as they are,
others as 103) or ``disconnect`` (the connection ends with its code). No
usable answer applies the hook's failure policy (docs/hooks.md): the
temporary error 110, or with ``HOOK_SUBSCRIBE_FAIL_OPEN`` /
``HOOK_PUBLISH_FAIL_OPEN`` the command as if there were no hook.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from collections.abc import Callable, Container, Coroutine, Mapping
from typing import Any, TypeVar

import msgspec

from core.infra.identity import Identity
from gateway.hooks.answers import (
    Answer,
    CallAnswer,
    CallRequest,
    PublishAnswer,
    RefreshAnswer,
    RefreshRequest,
    SubscribeAnswer,
    SubscribeRequest,
    checked_info,
    decoder,
)
from gateway.hooks.client import Endpoint, HookFailed
from gateway.hooks.connect import HookedIdentity, close_reason_of, hooked
from gateway.hooks.service import Hooks
from gateway.session import Session
from proto import (
    APP_ERRORS,
    Call,
    CloseCode,
    Command,
    ErrorCode,
    History,
    Position,
    PresenceQuery,
    PresenceStats,
    Pub,
    Sub,
)

__all__ = ["HookedSession", "session_factory"]

log = logging.getLogger("gateway.hooks")

_read_answer = decoder(SubscribeAnswer)
_read_publish = decoder(PublishAnswer)
_read_call = decoder(CallAnswer)
_read_refresh = decoder(RefreshAnswer)
#: Seconds between two refresh calls while the refresh hook fails (at random, within).
RETRY = (1.0, 5.0)


def session_factory(hooks: Hooks | None) -> Callable[..., Session]:
    """What the transports make their sessions with: a plain `Session` without hooks."""
    return Session if hooks is None else functools.partial(HookedSession, hooks)


S = TypeVar("S", SubscribeRequest, CallRequest)


def _with_data(kind: type[S], data: bytes | None, client: str, user: str, name: str) -> S:
    """A request with ``data`` when there is some: none is the default itself (left out)."""
    return kind(client, user, name) if data is None else kind(client, user, name, msgspec.Raw(data))


def _read_subscribe(body: bytes) -> SubscribeAnswer:
    answer = _read_answer(body)
    info = answer.result.info if answer.result is not None else None
    if info is not None:
        checked_info(info)
    return answer


class HookedSession(Session):
    __slots__ = ("hooks", "refreshing")

    def __init__(self, hooks: Hooks, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.hooks = hooks
        self.refreshing = False  # a refresh hook call is under way
        identity = self.identity
        if isinstance(identity, HookedIdentity):
            self.client_id = identity.client

    # -- opening -------------------------------------------------------------------

    def boot(
        self, positions: Mapping[str, Position] | None = None
    ) -> Coroutine[Any, Any, None] | None:
        identity = self.identity
        if isinstance(identity, HookedIdentity) and identity.subscribe:
            return self._subscribe_server_side(identity.subscribe, positions or {})
        return None

    async def _subscribe_server_side(
        self, channels: tuple[str, ...], positions: Mapping[str, Position]
    ) -> None:
        conn = self.conn
        for ch in channels:
            if conn.closed:
                return
            if self._claim(ch) is not None:
                continue  # the server API's subscribe of it came first
            try:
                # As the server API's: a `subscribed` push, with where a history
                # channel stands, so that a client back from a reconnect can
                # read what it missed (`history` from its own last offset).
                await self._server_subscribe_claimed(ch, positions.get(ch))
            except Exception as exc:
                log.warning("closing %s: its subscription to %s failed: %s", self.subject, ch, exc)
                self.transport.disconnect(CloseCode.UNAVAILABLE)
                return
            finally:
                self._unclaim(ch)

    def _server_channels(self) -> Container[str]:
        identity = self.identity
        hooked = identity.subscribe if isinstance(identity, HookedIdentity) else ()
        return {*hooked, *self.server_held} if self.server_held else hooked

    # -- commands ------------------------------------------------------------------

    async def _run(self, cmd: Command) -> None:
        hooks = self.hooks
        try:
            if isinstance(cmd, Sub):
                if hooks.subscribe is not None and hooks.subscribe_channels.applies(cmd.ch):
                    await self._hooked_subscribe(hooks.subscribe, cmd)
                    return
            elif isinstance(cmd, Pub):
                if hooks.publish is not None and hooks.publish_channels.applies(cmd.ch):
                    await self._hooked_publish(cmd)
                    return
            elif isinstance(cmd, Call) and hooks.call is not None:
                await self._call(hooks.call, cmd)
                return
            elif isinstance(cmd, History | PresenceQuery | PresenceStats):
                if (
                    hooks.subscribe is not None
                    and cmd.ch not in self.conn.subscriptions
                    and hooks.subscribe_channels.applies(cmd.ch)
                ):
                    # Reading a channel is the subscribe hook's to allow: no way around it.
                    code, why = ErrorCode.PERMISSION_DENIED, f"subscribe to {cmd.ch} first"
                    self._reply_error(self.conn.error_reply(cmd, code, why), code)
                    return
        except Exception as exc:
            self._failed(cmd, exc)
            return
        await super()._run(cmd)

    async def _hooked_subscribe(self, endpoint: Endpoint, cmd: Sub) -> None:
        request = _with_data(
            SubscribeRequest, self._client_data(cmd.data), self.client_id, self.subject, cmd.ch
        )
        try:
            answer, data = await self.hooks.ask_with_data(
                endpoint, request, _read_subscribe, self.node.max_publication_bytes
            )
        except HookFailed:
            if self.hooks.subscribe_fail_open:
                await self._subscribe(cmd)
            else:
                self._unavailable(cmd, "the subscribe hook did not answer")
            return
        if not self._refused(cmd, answer) and not self.conn.closed:
            assert answer.result is not None
            info = answer.result.info
            await self._subscribe(cmd, data, None if info is None else msgspec.json.encode(info))

    async def _hooked_publish(self, cmd: Pub) -> None:
        data, max_bytes = self.codec.data_to_json(cmd.data), self.node.max_publication_bytes
        try:
            decided = await self.hooks.decide_publish(
                self.client_id, self.subject, cmd.ch, data, max_bytes
            )
        except HookFailed:
            self._unavailable(cmd, "the publish hook did not answer")
            return
        if isinstance(decided, Answer):
            self._refused(cmd, decided)
            return
        published, history = decided
        await self.node.publish(cmd.ch, published, checked=True, history=history)
        if not self.conn.closed:
            self.transport.send(self.conn.ok(cmd))

    async def _call(self, endpoint: Endpoint, cmd: Call) -> None:
        request = _with_data(
            CallRequest, self._client_data(cmd.data), self.client_id, self.subject, cmd.method
        )
        try:
            answer, data = await self.hooks.ask_with_data(
                endpoint, request, _read_call, self.node.max_publication_bytes
            )
        except HookFailed:
            self._unavailable(cmd, "the call hook did not answer")
            return
        if not self._refused(cmd, answer) and not self.conn.closed:
            self.transport.send(self.codec.data_reply(cmd.id, data))

    def _client_data(self, raw: msgspec.Raw) -> bytes | None:
        """A frame's optional ``data`` as JSON (`InvalidData` when not publishable)."""
        return self.codec.data_to_json(raw) if len(raw) else None

    def _refused(self, cmd: Command, answer: Answer[Any]) -> bool:
        """Act on an ``error`` or ``disconnect`` answer; False for a ``result``."""
        if answer.disconnect is not None:
            goodbye = answer.disconnect
            self.transport.disconnect(goodbye.code, close_reason_of(goodbye.reason))
            return True
        error = answer.error
        if error is None:
            return False
        code = error.code if error.code in APP_ERRORS else int(ErrorCode.PERMISSION_DENIED)
        self.metrics.errors.labels("app" if code in APP_ERRORS else str(code)).inc()
        if not self.conn.closed:
            self.transport.send(self.codec.app_error(cmd.id, code, error.text, error.temporary))
        return True

    def _unavailable(self, cmd: Command, detail: str) -> None:
        code = ErrorCode.UNAVAILABLE
        self._reply_error(self.conn.error_reply(cmd, code, detail), code)

    # -- identity ------------------------------------------------------------------

    def _adopt(self, identity: Identity) -> Identity:
        """An in-band refresh: the new token's expiry and session; the hook's grants and info."""
        old = self.identity
        if not isinstance(old, HookedIdentity):
            return identity
        new = hooked(identity, old.client)
        new.subscribe = old.subscribe
        if old.own_grants:
            new.grants, new.own_grants = old.grants, True
        if old.own_info:
            new.info, new.own_info = old.info, True
        return new

    def expiring(self) -> None:
        endpoint = self.hooks.refresh
        if endpoint is None or self.identity.token is not None:
            super().expiring()  # a token can be refreshed in band as well
        if endpoint is not None and not self.refreshing and not self.conn.closed:
            self.refreshing = True
            self.hooks.tasks.spawn(self._refresh_hook(endpoint))

    async def _refresh_hook(self, endpoint: Endpoint) -> None:
        """Ask for a new ``expire_at`` until answered, or until the identity expires."""
        try:
            while not self.conn.closed:
                identity = self.identity
                kind = self.transport_kind
                request = RefreshRequest(self.client_id, self.subject, kind, identity.exp)
                try:
                    answer = await self.hooks.ask(endpoint, request, _read_refresh)
                except HookFailed:
                    left = (identity.exp or 0.0) - time.time()
                    if left <= RETRY[0]:
                        return  # closed at the deadline (4002); the client reconnects
                    await asyncio.sleep(random.uniform(RETRY[0], min(RETRY[1], left)))
                    continue
                if self._refused_refresh(answer) or self.identity is not identity:
                    return  # refused, or refreshed in band meanwhile
                assert answer.result is not None
                self._extend(answer.result.expire_at)
                return
        finally:
            self.refreshing = False

    def _refused_refresh(self, answer: RefreshAnswer) -> bool:
        if answer.disconnect is not None:
            goodbye = answer.disconnect
            self.transport.disconnect(goodbye.code, close_reason_of(goodbye.reason))
            return True
        if answer.error is not None:
            why = answer.error.text
            log.info("refresh refused for %s: %s (closed at expiry)", self.subject, why)
            return True
        return False

    def _extend(self, expire_at: float) -> None:
        old = self.identity
        new = hooked(old, self.client_id, exp=expire_at, keep_exp=False)
        self.identity = new
        self.node.hub.reidentify(self, (old.exp, old.sid), (new.exp, new.sid))
