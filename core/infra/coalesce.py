"""Coalescing: concurrent calls to a backend leave together, one round trip for many.

Under load most of a backend call's cost is per round trip (a system call
each way, the backend's read and reply, on PostgreSQL a commit), not per
item. A `Coalescer` lets a caller make its round trip itself, in its own
task, while fewer than ``max_inflight`` are running and nothing is queued,
so a lone caller waits for nothing and its call keeps the timing of a
plain one; items that arrive while the round trips are all taken queue up
and leave together, up to ``max_batch`` per round trip, when one finishes.
Queued items leave in the order they came.

``send(items)`` makes one round trip and returns one outcome per item, in
order: a result, or an exception for that item alone. If it raises, every
item of the batch fails with that exception.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from core.infra.errors import Unavailable
from core.infra.tasks import TaskSet

__all__ = ["Coalescer"]

log = logging.getLogger("core.infra.coalesce")

T = TypeVar("T")
R = TypeVar("R")


class Coalescer(Generic[T, R]):
    def __init__(
        self,
        send: Callable[[list[T]], Awaitable[Sequence[R | BaseException]]],
        *,
        max_batch: int = 64,
        max_inflight: int = 4,
        max_queued: int = 10_000,
        what: str = "calls",
    ) -> None:
        """``what`` names the items in the error a full queue answers (503)."""
        self._send = send
        self._what = what
        self._max_batch = max_batch
        self._max_inflight = max_inflight
        self._max_queued = max_queued
        self._queue: list[tuple[T, asyncio.Future[R]]] = []
        self._inflight = 0
        self._drains = TaskSet(log)
        self.round_trips = 0  # for tests and metrics: batches sent

    async def submit(self, item: T) -> R:
        """``item``'s outcome, once the round trip that carried it is back."""
        if self._inflight < self._max_inflight and not self._queue:
            (outcome,) = await self._alone([item])
            if isinstance(outcome, BaseException):
                raise outcome
            return outcome
        return await self._enqueue([item])[0]

    async def submit_many(self, items: Sequence[T]) -> list[R | Exception]:
        """Each of ``items``' outcomes (a result, or its exception), in order.

        They leave in one round trip when they can; never in a task of their own.
        """
        if self._inflight < self._max_inflight and not self._queue:
            try:
                outcomes = await self._alone(items)
            except Exception as exc:
                return [exc] * len(items)
            return [_plain(outcome) for outcome in outcomes]
        results: list[R | Exception] = []
        for future in self._enqueue(items):
            try:
                results.append(await future)
            except Exception as exc:
                results.append(exc)
        return results

    def _enqueue(self, items: Sequence[T]) -> list[asyncio.Future[R]]:
        """Futures of ``items``, queued for the next round trip."""
        if len(self._queue) + len(items) > self._max_queued:
            raise Unavailable(f"too many {self._what} queued")
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[R]] = []
        for item in items:
            future: asyncio.Future[R] = loop.create_future()
            self._queue.append((item, future))
            futures.append(future)
        if self._inflight < self._max_inflight:
            self._inflight += 1
            self._drains.spawn(self._drain())
        return futures

    async def _alone(self, items: Sequence[T]) -> Sequence[R | BaseException]:
        """The round trip of ``items``, made by their caller (no task in between)."""
        self._inflight += 1
        self.round_trips += 1
        try:
            outcomes = await self._send(list(items))
        finally:
            self._inflight -= 1
            if self._queue and self._inflight < self._max_inflight:
                self._inflight += 1
                self._drains.spawn(self._drain())
        if len(outcomes) != len(items):
            raise RuntimeError(f"{len(outcomes)} outcomes for {len(items)} items")
        return outcomes

    async def _drain(self) -> None:
        try:
            while self._queue:
                batch = self._queue[: self._max_batch]
                del self._queue[: self._max_batch]
                await self._carry(batch)
        finally:
            self._inflight -= 1

    async def _carry(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        self.round_trips += 1
        try:
            outcomes = await self._send([item for item, _ in batch])
            if len(outcomes) != len(batch):
                raise RuntimeError(f"{len(outcomes)} outcomes for {len(batch)} items")
        except BaseException as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for (_, future), outcome in zip(batch, outcomes, strict=True):
            if future.done():  # the caller went away meanwhile
                continue
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)


def _plain(outcome: R | BaseException) -> R | Exception:
    """An outcome to hand back; an exception that is not an `Exception` (a cancellation) is raised."""
    if isinstance(outcome, BaseException) and not isinstance(outcome, Exception):
        raise outcome
    return outcome
