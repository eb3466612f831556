"""Long-poll sessions: a numbered, bounded outbox per client (see gateway/transport/longpoll.py)."""

from __future__ import annotations

import asyncio
import collections
import logging
import time
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
    """The long-poll sessions of this process, bounded in number."""

    def __init__(self, max_sessions: int = 10_000) -> None:
        self._sessions: dict[str, tuple[str, PollSession]] = {}
        self.max_sessions = max_sessions

    def __len__(self) -> int:
        return len(self._sessions)

    def add(self, sub: str, poll: PollSession) -> None:
        self._sessions[poll.sid] = (sub, poll)

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
            del self._sessions[sid]
        return len(gone)
