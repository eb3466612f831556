"""Background tasks that are kept until they finish, and whose failures are logged.

The event loop holds only a weak reference to a task: one nobody keeps may
be collected mid-flight, and an exception nobody retrieves is reported only
as "Task exception was never retrieved" at collection. `TaskSet.spawn`
keeps each task until it is done and logs its failure with the traceback
once, under the owner's logger.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["TaskSet", "finish"]

T = TypeVar("T")


async def finish(task: asyncio.Task[Any], grace: float) -> None:
    """Wait up to ``grace`` s for ``task`` (told to stop) to end by itself, then cancel it.

    For a loop that must not be cancelled mid-query: a query cancelled on a pool
    connection closes that connection under the pool's feet (core/db.py).
    """
    try:
        await asyncio.wait_for(asyncio.shield(task), grace)
    except TimeoutError:
        task.cancel()
    await asyncio.gather(task, return_exceptions=True)


class TaskSet:
    def __init__(self, log: logging.Logger) -> None:
        self._log = log
        self._tasks: set[asyncio.Task[Any]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    def spawn(self, coro: Coroutine[Any, Any, T], name: str | None = None) -> asyncio.Task[T]:
        """Run ``coro`` in the background; its task is kept until it is done."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            self._log.error("background task %s failed", task.get_name(), exc_info=exc)

    async def wait(self, within: float | None = None) -> None:
        """Wait until every task has ended (those spawned meanwhile too), or ``within`` s."""
        loop = asyncio.get_running_loop()
        deadline = None if within is None else loop.time() + within
        while self._tasks:
            left = None if deadline is None else deadline - loop.time()
            if left is not None and left <= 0:
                return
            await asyncio.wait(list(self._tasks), timeout=left)

    async def cancel(self) -> None:
        """Cancel every task still running and wait until they have all ended."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
