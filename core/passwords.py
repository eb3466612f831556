"""Password hashing with argon2id (argon2-cffi), off the event loop.

A hash costs tens to hundreds of milliseconds by design, so it runs in a
worker thread. The cost comes from Settings (RFC 9106's second recommended
profile by default: 3 passes, 64 MiB); hashes made with other parameters
still verify and are re-hashed at the next login.
"""

from __future__ import annotations

import asyncio

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from gateway.settings import Settings

__all__ = ["Passwords"]


class Passwords:
    def __init__(self, settings: Settings) -> None:
        self._hasher = PasswordHasher(
            time_cost=settings.password_time_cost,
            memory_cost=settings.password_memory_kib,
            parallelism=2,
        )
        # Verified against when the account does not exist, so that a login
        # for an unknown e-mail takes as long as one with a wrong password.
        # Made on first use, in the worker thread: a hash blocks for its cost.
        self._decoy: str | None = None

    async def hash(self, password: str) -> str:
        return await asyncio.to_thread(self._hasher.hash, password)

    async def verify(self, stored: str | None, password: str) -> tuple[bool, bool]:
        """(matches, needs rehash) of ``password`` against ``stored`` (None: no account)."""
        return await asyncio.to_thread(self._check, stored, password)

    def _check(self, stored: str | None, password: str) -> tuple[bool, bool]:
        if stored is None and self._decoy is None:
            self._decoy = self._hasher.hash("decoy password, never matches")
        try:
            self._hasher.verify(stored or self._decoy or "", password)
        except (VerificationError, InvalidHashError):
            return False, False
        if stored is None:
            return False, False
        return True, self._hasher.check_needs_rehash(stored)
