"""The HTTP side of hooks: signed POSTs to the backends, bounded in every way.

One `HookClient` per process sends every hook call over one aiohttp session:
HTTP/1.1 keep-alive connections, at most ``HOOK_CONCURRENCY`` of them and as
many calls in flight; ``HOOK_QUEUE`` more may wait for a slot, and beyond that
a call fails at once (``overloaded``) rather than queue without end. Each call, the
wait for a slot included, has ``HOOK_TIMEOUT`` seconds. An answer is read up
to a bound (``MAX_PUBLICATION_BYTES`` plus 64 KiB; more: ``too_large``),
must be a ``200``, and must decode as its hook's answer (``bad_answer``
otherwise). No call is ever retried: a publish or a call must not happen
twice because an answer was slow.

Each hook has its own `core.infra.breaker.Breaker` (``HOOK_BREAKER_FAILURES``
failures in a row open it for ``HOOK_BREAKER_SECONDS``; then one call probes):
while it is open the backend is not called and the call fails at once
(``breaker_open``). Every failure raises `HookFailed` with its kind, counted
in ``gateway_hook_errors_total{hook, kind}`` and logged (at most one line a
second per hook); the caller applies the hook's failure policy.
"""

from __future__ import annotations

import asyncio
import logging
import time
import urllib.parse
from collections.abc import Callable
from typing import Any, TypeVar

import aiohttp

from core.infra.breaker import Breaker
from core.infra.metrics import Metrics
from core.infra.settings import Settings
from core.infra.throttled import ThrottledLog
from gateway.hooks.answers import Answer, BadAnswer
from gateway.hooks.signature import signed_headers
from gateway.httppool import keepalive_pool

__all__ = ["Endpoint", "HookClient", "HookFailed"]

log = logging.getLogger("gateway.hooks")

A = TypeVar("A", bound=Answer[Any])
#: Seconds an idle kept-alive connection to a backend is kept.
KEEPALIVE = 4.0


class HookFailed(Exception):
    """A hook call that brought no usable answer; ``kind`` is the metric's label."""

    def __init__(self, hook: str, kind: str, detail: str) -> None:
        super().__init__(f"{hook} hook: {kind}: {detail}")
        self.hook = hook
        self.kind = kind
        self.detail = detail


class Endpoint:
    """One configured hook: its name, its backend's URL, and that backend's breaker."""

    __slots__ = ("breaker", "last_error", "name", "throttled", "url")

    def __init__(self, name: str, url: str, breaker: Breaker) -> None:
        self.name = name
        self.url = url
        self.breaker = breaker
        self.last_error: str | None = None
        self.throttled = ThrottledLog(log)

    def state(self) -> dict[str, Any]:
        """For readiness: where the backend is (no credentials) and what its breaker says."""
        parts = urllib.parse.urlsplit(self.url)
        host = parts.netloc.rpartition("@")[2]
        where = urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))
        return {"url": where, "breaker": self.breaker.state, "last_error": self.last_error}


class HookClient:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        assert settings.hook_secret is not None
        self._secret = settings.hook_secret.encode()
        self._timeout = settings.hook_timeout
        self._concurrency = settings.hook_concurrency
        self._slots = asyncio.Semaphore(settings.hook_concurrency)
        #: Calls under way or waiting for a slot: at most HOOK_CONCURRENCY + HOOK_QUEUE.
        self.pending = 0
        self._max_pending = settings.hook_concurrency + settings.hook_queue
        self._max_answer = settings.max_publication_bytes + 65536
        self._metrics = metrics
        self._session: aiohttp.ClientSession | None = None
        metrics.hook_in_flight.set_function(lambda: self.pending)

    async def open(self) -> None:
        # An idle connection is dropped after KEEPALIVE s, before a backend's own idle timeout
        # (uvicorn's and Node's are 5 s) can close it under a request, which could not be retried.
        self._session = keepalive_pool(self._concurrency, KEEPALIVE)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def ask(self, endpoint: Endpoint, body: bytes, read: Callable[[bytes], A]) -> A:
        """``endpoint``'s answer to ``body`` (JSON), read by ``read``; or `HookFailed`."""
        hook, breaker = endpoint.name, endpoint.breaker
        if self.pending >= self._max_pending:
            raise self._failed(endpoint, "overloaded", "too many hook calls waiting")
        if breaker.refuse(time.monotonic()) is not None:
            raise self._failed(endpoint, "breaker_open", "its backend keeps failing")
        # From here on this call ends in a success or a failure of the breaker (it may be
        # the probe of a half-open breaker, which must not be left waiting for ever).
        self.pending += 1
        started = time.perf_counter()
        settled = False
        try:
            answer = read(await self._post(endpoint, body))
            settled = True
            breaker.success()
        except HookFailed as exc:
            settled = True
            if breaker.failure(time.monotonic()):
                seconds = breaker.open_for
                log.warning("%s hook failing (%s): not called for %.0f s", hook, exc.kind, seconds)
            raise self._failed(endpoint, exc.kind, exc.detail) from None
        except BadAnswer as exc:
            settled = True
            breaker.failure(time.monotonic())
            raise self._failed(endpoint, "bad_answer", str(exc)) from None
        finally:
            self.pending -= 1
            if not settled and breaker.state == "half_open":
                breaker.failure(time.monotonic())  # cancelled: let another call probe later
            self._metrics.hook_seconds.labels(hook).observe(time.perf_counter() - started)
        self._metrics.hook_calls.labels(hook, answer.kind).inc()
        return answer

    async def _post(self, endpoint: Endpoint, body: bytes) -> bytes:
        assert self._session is not None, "HookClient.open() first"
        hook = endpoint.name
        headers = signed_headers(self._secret, body)
        headers["Content-Type"] = "application/json"
        try:
            async with asyncio.timeout(self._timeout), self._slots:
                async with self._session.post(
                    endpoint.url, data=body, headers=headers, allow_redirects=False
                ) as answer:
                    if answer.status != 200:
                        raise HookFailed(hook, "status", f"HTTP {answer.status}")
                    if (answer.content_length or 0) > self._max_answer:
                        raise HookFailed(hook, "too_large", f"over {self._max_answer} bytes")
                    return await self._read(hook, answer.content)
        except TimeoutError:
            raise HookFailed(hook, "timeout", f"no answer within {self._timeout} s") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise HookFailed(hook, "unreachable", f"{type(exc).__name__}: {exc}") from None

    async def _read(self, hook: str, content: aiohttp.StreamReader) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while chunk := await content.readany():
            size += len(chunk)
            if size > self._max_answer:
                raise HookFailed(hook, "too_large", f"over {self._max_answer} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def _failed(self, endpoint: Endpoint, kind: str, detail: str) -> HookFailed:
        self._metrics.hook_errors.labels(endpoint.name, kind).inc()
        if kind not in ("breaker_open", "overloaded"):
            self._metrics.hook_calls.labels(endpoint.name, "none").inc()
            endpoint.last_error = f"{kind}: {detail}"
        endpoint.throttled.warning("%s hook failed (%s): %s", endpoint.name, kind, detail)
        return HookFailed(endpoint.name, kind, detail)
