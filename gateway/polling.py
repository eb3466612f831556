"""Long-poll sessions: a numbered, bounded outbox per client (see gateway/transport/longpoll.py)."""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from typing import ClassVar

from gateway.hub import Prepared
from gateway.session import Session
from proto import JSON_CODEC, CloseCode, Codec

__all__ = ["LongPollSessions", "PollSession"]

log = logging.getLogger("gateway.longpoll")


class PollSession:
    """One long-poll client: its outbox, its waiter and its protocol session."""

    kind: ClassVar[str] = "longpoll"

    def __init__(self, sid: str, limit_bytes: int) -> None:
        self.sid = sid
        self.session: Session | None = None
        self.outbox: collections.deque[tuple[int, bytes]] = collections.deque()
        self.size = 0
        self.limit_bytes = limit_bytes
        self.seq = 0
        self.closed: CloseCode | None = None
        self.last_poll = time.monotonic()
        self.on_close: Callable[[], None] | None = None
        self._wake = asyncio.Event()

    # -- Transport -------------------------------------------------------------

    def send(self, payload: bytes) -> None:
        self._queue(payload)

    def deliver(self, prepared: Prepared, codec: Codec) -> None:
        self._queue(prepared.payload(JSON_CODEC))

    def disconnect(self, code: CloseCode) -> None:
        if self.closed is None:
            self.closed = code
            if self.session is not None:
                self.session.closed()
            if self.on_close is not None:
                self.on_close()
            self._wake.set()

    def heartbeat(self, now: float, dead_after: float) -> None:
        return None  # polls are the heartbeat: see LongPollSessions.expire

    # -- polling ---------------------------------------------------------------

    def _queue(self, payload: bytes) -> None:
        if self.closed is not None:
            return
        if self.size + len(payload) > self.limit_bytes:
            log.warning("closing long-poll session %s: outbox full", self.sid[:8])
            self.disconnect(CloseCode.SLOW_CONSUMER)
            return
        self.seq += 1
        self.outbox.append((self.seq, payload))
        self.size += len(payload)
        self._wake.set()

    def ack(self, cursor: int) -> None:
        while self.outbox and self.outbox[0][0] <= cursor:
            self.size -= len(self.outbox.popleft()[1])

    async def poll(self, cursor: int, wait: float) -> tuple[list[bytes], int]:
        """Messages after ``cursor`` (waiting up to ``wait`` seconds for one), and the new cursor."""
        self.last_poll = time.monotonic()
        self.ack(cursor)
        if not self.outbox and self.closed is None:
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), wait)
            except TimeoutError:
                pass
        self.last_poll = time.monotonic()
        messages = [payload for seq, payload in self.outbox if seq > cursor]
        return messages, self.outbox[-1][0] if self.outbox else max(cursor, 0)


class LongPollSessions:
    """The long-poll sessions of this process, bounded in number and per user.

    Both bounds count every session held, a closed one too until it is
    forgotten (its outbox still answers the client's last poll). A user at
    ``max_per_user`` who opens another has their closed sessions forgotten
    first, so only open ones can hold them back; one user's closed sessions
    thus never fill the process. Neither bound counts against the sockets'
    ``MAX_CONNECTIONS``.
    """

    def __init__(self, max_sessions: int = 2000, max_per_user: int = 8) -> None:
        self._sessions: dict[str, tuple[str, PollSession]] = {}
        self._by_user: dict[str, set[str]] = {}
        self._open_total = 0
        self.max_sessions = max_sessions
        self.max_per_user = max_per_user

    def __len__(self) -> int:
        return len(self._sessions)

    @property
    def open_count(self) -> int:
        """Open sessions (each is a member of the hub)."""
        return self._open_total

    def refusal(self, sub: str) -> str | None:
        """Why ``sub`` may not open one more session now: ``"user"``, ``"process"``, or None."""
        held = self._by_user.get(sub, set())
        if len(held) >= self.max_per_user:
            for sid in [sid for sid in held if self._sessions[sid][1].closed is not None]:
                self._forget(sid)
            if len(held) >= self.max_per_user:
                return "user"
        if len(self._sessions) >= self.max_sessions:
            return "process"
        return None

    def add(self, sub: str, poll: PollSession) -> None:
        self._sessions[poll.sid] = (sub, poll)
        self._by_user.setdefault(sub, set()).add(poll.sid)
        if poll.closed is None:
            self._open_total += 1
            poll.on_close = self._closed

    def _closed(self) -> None:
        self._open_total -= 1

    def _forget(self, sid: str) -> None:
        sub, _ = self._sessions.pop(sid)
        held = self._by_user[sub]
        held.discard(sid)
        if not held:
            del self._by_user[sub]

    def get(self, sid: str, sub: str) -> PollSession | None:
        """The session ``sid`` if it belongs to ``sub``."""
        found = self._sessions.get(sid)
        return found[1] if found is not None and found[0] == sub else None

    def expire(self, now: float, idle: float) -> int:
        """Close sessions not polled for ``idle`` seconds, and forget closed ones."""
        gone = []
        for sid, (_, poll) in self._sessions.items():
            if poll.closed is None and now - poll.last_poll > idle:
                poll.disconnect(CloseCode.GOING_AWAY)
            if poll.closed is not None and now - poll.last_poll > idle:
                gone.append(sid)
        for sid in gone:
            self._forget(sid)
        return len(gone)
