"""Password hashing with argon2id (argon2-cffi), off the event loop, and password rules.

A hash costs tens to hundreds of milliseconds by design, so it runs in a
worker thread. The cost comes from Settings (RFC 9106's second recommended
profile by default: 3 passes, 64 MiB); hashes made with other parameters
still verify and are re-hashed at the next login.

New passwords follow NIST SP 800-63B: at least 8 characters (1024 at most,
so passphrases fit), any Unicode, no composition rules; refused when common
(a shipped list of 10,000, `common_passwords`), only whitespace, one or two
characters repeated, a run like ``abcdefgh``, or built on the account's
e-mail name. `password_problems` says which, for a 422.

Hashes take turns by client address (`PER_ADDRESS`): the rate limits of
core/logins.py count failures only, so a client that knows its own password
could otherwise have every worker thread hash for it, and everyone else's
logins wait behind its queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gzip
import itertools
from collections.abc import AsyncIterator, Callable
from importlib.resources import files
from typing import TypeVar

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from core.infra.errors import ErrorDetail
from core.infra.settings import Settings

__all__ = ["PER_ADDRESS", "Passwords", "common_passwords", "password_problems"]

_T = TypeVar("_T")

#: Hashes one client address (`core.infra.clientip.limit_key`) has computed at once in a
#: process; its others wait their turn. A hash already runs on two lanes (parallelism 2).
PER_ADDRESS = 2

#: Where the rules put their message in a 422 (the registration body's field).
_FIELD = "$.password"
#: An e-mail name this long or longer is refused inside a password, shorter only alone.
_MIN_NAME_INSIDE = 4


@functools.cache
def common_passwords() -> frozenset[str]:
    """The shipped list (lower-case), read once on first use; see common_passwords.LICENSE."""
    raw = files("core").joinpath("common_passwords.txt.gz").read_bytes()
    return frozenset(gzip.decompress(raw).decode("utf-8").split())


def password_problems(password: str | None, email: str | None = None) -> list[ErrorDetail]:
    """Why ``password`` may not be chosen (by the owner of ``email``); [] when it may."""
    if password is None:
        return []  # absent or of the wrong type: reported by the field's own check
    folded = password.strip().casefold()
    if not folded:
        message = "password must not be only whitespace"
    elif len(set(folded)) <= 2:
        message = "password must have more than two different characters"
    elif _is_run(folded):
        message = "password must not be a run of consecutive characters (abcdefgh, 98765432)"
    elif folded in common_passwords():
        message = "this is one of the most common passwords; choose another (a few unrelated words make a good one)"
    elif email and _uses_email(folded, email.casefold()):
        message = "password must not contain your e-mail address or the name before its @"
    else:
        return []
    return [ErrorDetail(_FIELD, message)]


def _is_run(text: str) -> bool:
    steps = {ord(b) - ord(a) for a, b in itertools.pairwise(text)}
    return steps in ({1}, {-1})


def _uses_email(folded: str, email: str) -> bool:
    name = email.rpartition("@")[0]
    if email in folded or folded == name:
        return True
    return len(name) >= _MIN_NAME_INSIDE and name in folded


class _Gate:
    __slots__ = ("slots", "users")

    def __init__(self, size: int) -> None:
        self.slots = asyncio.Semaphore(size)
        self.users = 0  # holding a slot or waiting for one


class _Turns:
    """At most ``per_key`` holders of a turn per key at once; the others wait, first come first."""

    def __init__(self, per_key: int) -> None:
        self._per_key = per_key
        self._gates: dict[str, _Gate] = {}  # only keys someone holds or waits for

    @contextlib.asynccontextmanager
    async def turn(self, key: str) -> AsyncIterator[None]:
        gate = self._gates.get(key)
        if gate is None:
            gate = self._gates[key] = _Gate(self._per_key)
        gate.users += 1
        try:
            async with gate.slots:
                yield
        finally:
            gate.users -= 1
            if not gate.users:
                del self._gates[key]


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
        self._turns = _Turns(PER_ADDRESS)

    async def hash(self, password: str, who: str) -> str:
        """The hash of ``password``, computed in turn with the other hashes for ``who``."""
        return await self._in_turn(who, self._hasher.hash, password)

    async def verify(self, stored: str | None, password: str, who: str) -> tuple[bool, bool]:
        """(matches, needs rehash) of ``password`` against ``stored`` (None: no account).

        ``who`` is the client's address key: its hashes take turns (`PER_ADDRESS`).
        """
        return await self._in_turn(who, self._check, stored, password)

    async def _in_turn(self, who: str, work: Callable[..., _T], *args: object) -> _T:
        async def run() -> _T:
            async with self._turns.turn(who):
                return await asyncio.to_thread(work, *args)

        # A caller that gives up (its socket closed) leaves the turn held until the
        # worker thread is done: the thread cannot be stopped.
        return await asyncio.shield(run())

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
