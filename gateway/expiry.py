"""Token expiry for open connections without a timer per connection.

Connections are kept in one-second buckets keyed by their token's ``exp``;
a single periodic sweep pops the buckets that are due. Everything takes
``now`` as an argument, so tests need no sleeping.
"""

from __future__ import annotations

import math
from typing import Generic, TypeVar

__all__ = ["ExpiryWheel"]

T = TypeVar("T")


class ExpiryWheel(Generic[T]):
    def __init__(self) -> None:
        self._buckets: dict[int, set[T]] = {}

    def add(self, item: T, exp: float) -> None:
        self._buckets.setdefault(math.ceil(exp), set()).add(item)

    def discard(self, item: T, exp: float) -> None:
        key = math.ceil(exp)
        bucket = self._buckets.get(key)
        if bucket is not None:
            bucket.discard(item)
            if not bucket:
                del self._buckets[key]

    def pop_due(self, now: float) -> list[T]:
        """Remove and return every item whose expiry is at or before ``now``."""
        due_keys = [k for k in self._buckets if k <= now]
        due: list[T] = []
        for k in sorted(due_keys):
            due.extend(self._buckets.pop(k))
        return due

    def __len__(self) -> int:
        return sum(len(b) for b in self._buckets.values())
