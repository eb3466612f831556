"""`Hooks`: the configured hooks of one gateway, and how to ask each.

Made by `make_app` only when at least one ``HOOK_*_URL`` is set (else the
gateway holds ``None`` and no path looks further), closed with the gateway.
The connection paths use it through `gateway.hooks.connect` (admission) and
`gateway.hooks.session` (the commands and expiry of a hooked connection);
``POST /api/publish`` asks `Hooks.decide_publish` as a session's ``pub`` does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

import msgspec

from core.infra.breaker import Breaker
from core.infra.history import ChannelPatterns
from core.infra.metrics import Metrics
from core.infra.settings import Settings
from core.infra.tasks import TaskSet
from gateway.hooks.answers import (
    Answer,
    BadAnswer,
    PublishAnswer,
    PublishRequest,
    PublishResult,
    decoder,
)
from gateway.hooks.client import Endpoint, HookClient, HookFailed
from proto import InvalidData
from proto.publication import check_json

__all__ = ["Hooks"]

log = logging.getLogger("gateway.hooks")

A = TypeVar("A", bound=Answer[Any])
#: What a result carries as ``data`` (connect's and refresh's carry none).
R = TypeVar("R")
_encode = msgspec.json.Encoder().encode
_read_publish = decoder(PublishAnswer)


def _data(raw: msgspec.Raw, max_bytes: int) -> bytes | None:
    """A backend's ``data`` as publishable JSON (None when absent); `BadAnswer` otherwise."""
    if not len(raw):
        return None
    try:
        return check_json(bytes(raw), max_bytes)
    except InvalidData as exc:
        raise BadAnswer(f"result.data: {exc.reason}") from None


class Hooks:
    """Each hook's `Endpoint` (None when not configured) and the policies around them."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.client = HookClient(settings, metrics)
        urls = settings.hook_urls()

        def endpoint(name: str) -> Endpoint | None:
            url = urls.get(name)
            if url is None:
                return None
            breaker = Breaker(settings.hook_breaker_failures, settings.hook_breaker_seconds)
            found = Endpoint(name, url, breaker)
            metrics.hook_breaker_open.labels(name).set_function(
                lambda: 0 if breaker.state == "closed" else 1
            )
            return found

        self.connect = endpoint("connect")
        self.subscribe = endpoint("subscribe")
        self.publish = endpoint("publish")
        self.call = endpoint("call")
        self.refresh = endpoint("refresh")
        self.subscribe_channels = ChannelPatterns(settings.hook_subscribe_channels)
        self.publish_channels = ChannelPatterns(settings.hook_publish_channels)
        self.subscribe_fail_open = settings.hook_subscribe_fail_open
        self.publish_fail_open = settings.hook_publish_fail_open
        self.forward_headers = settings.hook_forward_headers
        self.max_subscriptions = settings.max_subscriptions
        self.reserved = settings.core_channels
        #: Refresh calls under way, one per connection at most.
        self.tasks = TaskSet(log)

    @classmethod
    async def open(cls, settings: Settings, metrics: Metrics) -> Hooks | None:
        """The gateway's hooks, or None when none is configured."""
        if not settings.hook_urls():
            return None
        hooks = cls(settings, metrics)
        await hooks.client.open()
        for name, endpoint in hooks.endpoints().items():
            log.info("%s hook at %s", name, endpoint.state()["url"])
        return hooks

    async def close(self) -> None:
        await self.tasks.cancel()
        await self.client.close()

    def endpoints(self) -> dict[str, Endpoint]:
        found = (self.connect, self.subscribe, self.publish, self.call, self.refresh)
        return {e.name: e for e in found if e is not None}

    def state(self) -> dict[str, Any]:
        """For readiness (a hook's backend down never makes the gateway unready)."""
        return {name: endpoint.state() for name, endpoint in self.endpoints().items()}

    async def ask(
        self, endpoint: Endpoint, request: msgspec.Struct, read: Callable[[bytes], A]
    ) -> A:
        """The backend's answer to ``request``; `HookFailed` when there is no usable one."""
        return await self.client.ask(endpoint, _encode(request), read)

    async def ask_with_data(
        self,
        endpoint: Endpoint,
        request: msgspec.Struct,
        read: Callable[[bytes], Answer[R]],
        max_bytes: int,
    ) -> tuple[Answer[R], bytes | None]:
        """The backend's answer, and its ``result.data`` checked as a publication (None: none)."""
        checked: list[bytes | None] = []

        def checking(body: bytes) -> Answer[R]:
            answer = read(body)
            if answer.result is not None:
                checked.append(_data(getattr(answer.result, "data", msgspec.Raw()), max_bytes))
            return answer

        answer = await self.ask(endpoint, request, checking)
        return answer, checked[0] if checked else None

    async def decide_publish(
        self, client: str, user: str, ch: str, data: bytes, max_bytes: int
    ) -> tuple[bytes, bool] | Answer[PublishResult]:
        """What to publish on ``ch`` (a channel of ``HOOK_PUBLISH_CHANNELS``) for ``user``.

        ``(data, through history)``, or the backend's refusal (its ``error`` or
        ``disconnect``); `HookFailed` without an answer, unless
        ``HOOK_PUBLISH_FAIL_OPEN`` publishes ``data`` unchanged.
        """
        assert self.publish is not None
        request = PublishRequest(client, user, ch, msgspec.Raw(data))
        try:
            answer, replaced = await self.ask_with_data(
                self.publish, request, _read_publish, max_bytes
            )
        except HookFailed:
            if self.publish_fail_open:
                return data, True
            raise
        if answer.result is None:
            return answer
        return replaced or data, not answer.result.skip_history
