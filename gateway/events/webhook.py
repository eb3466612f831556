"""The events webhook: connection events POSTed in signed batches (EVENTS_WEBHOOK_URL).

The recorder offers each batch it appended to the stream; they wait in one
bounded queue (``queue`` events, of which subscribes and unsubscribes fill
MEMBERSHIP_SHARE at most, so connects and disconnects always find room;
more are dropped, counted and logged) and one task sends them in order, ``batch`` at a time, as
``{"events": [...]}``, signed with HOOK_SECRET as the hooks' requests are
(`gateway.hooks.signature`). A POST that gets no 2xx answer within
``timeout`` seconds is sent again, the same bytes with a fresh signature,
after a jittered backoff, up to ``retries`` times; then its events are
dropped and counted. Redirects are not followed. Only the status counts:
at most ANSWER_CAP bytes of an answer's body are read, and a connection
whose answer is longer is closed, not kept alive (its 2xx still delivers
the batch). The stream is the durable
copy; the webhook is at least once while the gateway runs and the backend
answers within the retries.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import time
from collections.abc import Callable

import aiohttp

from core.infra.backoff import Backoff
from core.infra.metrics import Metrics
from core.infra.throttled import ThrottledLog
from gateway.hooks.signature import signed_headers

__all__ = ["Webhook"]

log = logging.getLogger("gateway.events")
_dropping = ThrottledLog(log, 10.0)
_failing = ThrottledLog(log, 10.0)
_long = ThrottledLog(log, 10.0)


#: Waits between attempts of a failed POST.
RETRY = Backoff(0.5, 10.0)
#: Share of the queue subscribe and unsubscribe events may fill: one user's churn of
#: subscriptions never leaves the connects and disconnects of others without room.
MEMBERSHIP_SHARE = 0.75
#: Bytes of an answer's body read at most (the status is all the webhook needs).
ANSWER_CAP = 64 * 1024


class Webhook:
    def __init__(
        self,
        url: str,
        secret: str,
        metrics: Metrics,
        *,
        batch: int = 100,
        queue: int = 10_000,
        retries: int = 5,
        timeout: float = 5.0,
        backoff: Backoff = RETRY,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.url = url
        self._secret = secret
        self._metrics = metrics
        self._batch = batch
        self._limit = queue
        self._retries = retries
        self._timeout = timeout
        self._backoff = backoff
        self._clock = clock
        self._membership_limit = int(queue * MEMBERSHIP_SHARE)
        self._membership = 0  # subscribe and unsubscribe events in the queue
        self._queue: collections.deque[tuple[bytes, bool]] = collections.deque()
        self._session: aiohttp.ClientSession | None = None
        self._sending: asyncio.Task[None] | None = None
        metrics.events_queued.labels("webhook").set_function(lambda: len(self._queue))

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self._timeout),
            connector=aiohttp.TCPConnector(limit=1),  # one POST at a time, kept alive
            auto_decompress=False,  # the body is skipped: never inflate it
        )

    def offer(self, events: list[bytes], *, membership: bool = False) -> None:
        """Queue ``events`` for delivery; those beyond the queue's bound are dropped.

        ``membership``: they are subscribes and unsubscribes, which may fill
        MEMBERSHIP_SHARE of the queue at most; connects and disconnects may
        fill all of it, so they always find the rest.
        """
        room = self._limit - len(self._queue)
        if membership:
            room = min(room, self._membership_limit - self._membership)
        if len(events) > room:
            dropped = len(events) - max(room, 0)
            self._metrics.events_dropped.labels("webhook").inc(dropped)
            _dropping.warning(
                "dropped %d %s events for the webhook: %d wait, %d of them subscribes and "
                "unsubscribes (at most %d: %d%% of EVENTS_WEBHOOK_QUEUE)",
                dropped,
                "subscribe/unsubscribe" if membership else "connect/disconnect",
                len(self._queue),
                self._membership,
                self._membership_limit,
                MEMBERSHIP_SHARE * 100,
            )
            events = events[: max(room, 0)]
        if not events:
            return
        self._queue.extend((event, membership) for event in events)
        if membership:
            self._membership += len(events)
        if self._sending is None and self._session is not None:
            self._sending = asyncio.get_running_loop().create_task(self._send_all())

    async def _send_all(self) -> None:
        try:
            while self._queue:
                events = list(itertools.islice(self._queue, self._batch))
                body = b'{"events":[%s]}' % b",".join(event for event, _ in events)
                if not await self._deliver(body):
                    self._metrics.events_dropped.labels("webhook").inc(len(events))
                    log.warning(
                        "dropped %d events: the webhook failed %d times",
                        len(events),
                        self._retries + 1,
                    )
                for _ in events:
                    _, membership = self._queue.popleft()
                    self._membership -= membership
        except Exception:  # the sender survives anything; the next offer restarts it
            log.exception("the events webhook sender failed")
        finally:
            self._sending = None

    async def _deliver(self, body: bytes) -> bool:
        """POST ``body`` until it is accepted or the retries are spent."""
        for attempt in range(self._retries + 1):
            if attempt:
                await asyncio.sleep(self._backoff.delay(attempt - 1))
            kind = await self._post(body)
            if kind is None:
                self._metrics.webhook_deliveries.inc()
                return True
            self._metrics.webhook_failures.labels(kind).inc()
            _failing.warning("events webhook POST failed (%s), attempt %d", kind, attempt + 1)
        return False

    async def _post(self, body: bytes) -> str | None:
        """One POST; None when accepted, else the kind of failure."""
        assert self._session is not None
        headers = {"Content-Type": "application/json"}
        headers.update(signed_headers(self._secret, body, self._clock()))
        try:
            async with self._session.post(
                self.url, data=body, headers=headers, allow_redirects=False
            ) as response:
                status = response.status
                if not await _skipped(response):
                    response.close()  # the rest is never read: this connection is not reused
                    _long.warning(
                        "the events webhook answered %d with a body over %d bytes: "
                        "its connection was closed",
                        status,
                        ANSWER_CAP,
                    )
        except TimeoutError:
            return "timeout"
        except aiohttp.ClientError:
            return "unreachable"
        return None if 200 <= status < 300 else f"status_{status // 100}xx"

    async def close(self, wait: float = 5.0) -> None:
        """Deliver what waits (``wait`` s at most), then stop."""
        sending = self._sending
        if sending is not None:
            await asyncio.wait([sending], timeout=wait)
            sending.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sending
        if self._queue:
            log.warning("stopping with %d events not delivered to the webhook", len(self._queue))
        if self._session is not None:
            await self._session.close()


async def _skipped(response: aiohttp.ClientResponse) -> bool:
    """Read the rest of ``response``'s body and drop it; False if it is over ANSWER_CAP bytes."""
    if (response.content_length or 0) > ANSWER_CAP:
        return False
    read = 0
    while chunk := await response.content.read(ANSWER_CAP + 1 - read):
        read += len(chunk)
        if read > ANSWER_CAP:
            return False
    return True
