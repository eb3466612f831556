"""Long-poll sessions: a numbered, bounded outbox per client (see gateway/transport/longpoll.py)."""

from __future__ import annotations

import asyncio
import collections
import hmac
import logging
import time
from collections.abc import Callable, Container
from typing import ClassVar

import msgspec

from core.infra.identity import Identity
from gateway.hub import Prepared
from gateway.session import Session
from proto import JSON_CODEC, CloseCode, Codec

__all__ = ["LongPollSessions", "PollSession", "Waits"]

log = logging.getLogger("gateway.longpoll")


class Waits:
    """The process's waiting polls: their callbacks, and their timeouts by one sweep.

    With 10,000 sessions on a channel, a publication releases 10,000 waiting
    polls and they all wait again a moment later. Rather than a timer and a
    callback handle per poll, a released poll's callback joins one list run
    on the loop's next pass, and a waiting session joins one set that a
    timer sweeps every quarter of the timeout (at most every second): a
    poll is answered empty between its timeout and a quarter of it (at most
    a second) later.
    """

    __slots__ = ("_every", "_ready", "_scheduled", "_sweep", "waiting")

    def __init__(self) -> None:
        self.waiting: set[PollSession] = set()
        self._ready: list[Callable[[], None]] = []
        self._scheduled = False
        self._sweep: asyncio.TimerHandle | None = None
        self._every = 1.0

    def release(self, waiter: Callable[[], None]) -> None:
        """Call ``waiter`` on the loop's next pass."""
        self._ready.append(waiter)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._run)

    def _run(self) -> None:
        ready, self._ready = self._ready, []
        self._scheduled = False
        for waiter in ready:
            try:
                waiter()
            except Exception:  # one poll's failure is its own
                log.exception("answering a long-poll failed")

    def wait(self, poll: PollSession, timeout: float) -> None:
        """``poll`` waits: it is released by the sweep once ``timeout`` has passed."""
        self.waiting.add(poll)
        if self._sweep is None:
            self._every = min(1.0, timeout / 4)
            self._sweep = asyncio.get_running_loop().call_later(self._every, self._expire)

    def _expire(self) -> None:
        self._sweep = None
        now = time.monotonic()
        for poll in [poll for poll in self.waiting if poll.deadline <= now]:
            poll.expire()
        if self.waiting:
            self._sweep = asyncio.get_running_loop().call_later(self._every, self._expire)


class PollSession:
    """One long-poll client: its outbox, its waiter and its protocol session."""

    kind: ClassVar[str] = "longpoll"

    def __init__(self, sid: str, limit_bytes: int, waits: Waits | None = None) -> None:
        self.sid = sid
        self.waits = waits if waits is not None else Waits()
        self.session: Session | None = None
        self.outbox: collections.deque[tuple[int, bytes]] = collections.deque()
        self.size = 0
        self.limit_bytes = limit_bytes
        self.seq = 0
        #: The close code once closed (a `CloseCode`, or a hook backend's own), and its reason.
        self.closed: int | None = None
        self.reason: str | None = None
        self.last_poll = time.monotonic()
        #: The outbox overflowed: nothing more is queued, and the close follows.
        self.overflowed = False
        self.on_close: Callable[[], None] | None = None
        #: The token of the last request whose signature was checked, and its identity.
        self.token = ""
        self.identity: Identity | None = None
        self._waiter: Callable[[], None] | None = None
        #: Monotonic time at which the waiting poll is answered empty.
        self.deadline = 0.0

    # -- Transport -------------------------------------------------------------

    def send(self, payload: bytes) -> None:
        self._queue(payload)

    def deliver(self, prepared: Prepared, codec: Codec) -> None:
        self._queue(prepared.payload(JSON_CODEC))

    def disconnect(self, code: int, reason: str | None = None) -> None:
        if self.closed is None:
            self.closed = int(code)
            self.reason = reason
            if self.session is not None:
                self.session.closed(int(code), reason or "")
            if self.on_close is not None:
                self.on_close()
            self._release()

    def heartbeat(self, now: float, dead_after: float) -> None:
        return None  # polls are the heartbeat: see LongPollSessions.expire

    def close_field(self) -> bytes:
        """``,"close":{"code":…}`` for the answer of a closed session's last poll, with
        the ``reason`` the server API or the application's backend gave."""
        close: dict[str, object] = {"code": self.closed}
        if self.reason is not None:
            close["reason"] = self.reason
        return b',"close":' + msgspec.json.encode(close)

    # -- polling ---------------------------------------------------------------

    def _queue(self, payload: bytes) -> None:
        if self.closed is not None or self.overflowed:
            return
        if self.size + len(payload) > self.limit_bytes:
            # Closed on the next turn of the loop, not here: this is called
            # while a publication is handed to every subscriber of a channel,
            # and closing unsubscribes (the channel's members would change
            # under the fan-out). Nothing more is queued meanwhile.
            log.warning("closing long-poll session %s: outbox full", self.sid[:8])
            self.overflowed = True
            asyncio.get_running_loop().call_soon(self.disconnect, CloseCode.SLOW_CONSUMER)
            return
        self.seq += 1
        self.outbox.append((self.seq, payload))
        self.size += len(payload)
        self._release()

    def ack(self, cursor: int) -> None:
        while self.outbox and self.outbox[0][0] <= cursor:
            self.size -= len(self.outbox.popleft()[1])

    def holds(self, token: str, now: float, revoked: Container[str]) -> bool:
        """Whether ``token`` is the one last verified for this session, still valid at ``now``.

        A poll carrying it needs no signature check: the same bytes were
        verified (compared in constant time); expiry and revocation are still
        checked here.
        """
        identity = self.identity
        if identity is None or not token or not hmac.compare_digest(token, self.token):
            return False
        if identity.exp is not None and now >= identity.exp:
            return False
        return identity.sid is None or identity.sid not in revoked

    def remember(self, token: str, identity: Identity) -> None:
        """``token`` was verified and belongs to this session's subject."""
        self.token, self.identity = token, identity

    def answer(self, cursor: int) -> tuple[list[bytes], int]:
        """Messages after ``cursor`` and the new cursor (everything up to ``cursor`` acknowledged)."""
        self.last_poll = time.monotonic()
        self.ack(cursor)
        messages = [payload for seq, payload in self.outbox if seq > cursor]
        return messages, self.outbox[-1][0] if self.outbox else max(cursor, 0)

    def ready(self) -> bool:
        """A poll would be answered now (something to carry, or the session closed)."""
        return bool(self.outbox) or self.closed is not None

    def wait(self, on_ready: Callable[[], None], timeout: float) -> None:
        """Call ``on_ready`` once something arrives, the session closes or ``timeout`` passes.

        A session holds one waiting poll: a second one answers the first at
        once (its client has moved on, or retries after losing the answer).
        """
        self._release()
        self.last_poll = now = time.monotonic()
        self._waiter = on_ready
        self.deadline = now + timeout
        self.waits.wait(self, timeout)

    def cancel_wait(self, on_ready: Callable[[], None]) -> None:
        """Forget ``on_ready`` (its connection closed): the outbox keeps what it would carry."""
        if self._waiter == on_ready:  # (bound methods: equal, not identical)
            self._waiter = None
            self.waits.waiting.discard(self)

    def expire(self) -> None:
        """The waiting poll's timeout passed (`Waits`): it is answered, empty."""
        self._release()

    def _release(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None:
            self.waits.waiting.discard(self)
            # Called on the loop's next pass, not inside the delivery: messages
            # queued together (a reply and its pushes) leave in one answer.
            self.last_poll = time.monotonic()
            self.waits.release(waiter)


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
        #: The waiting polls of every session here.
        self.waits = Waits()
        self.max_sessions = max_sessions
        self.max_per_user = max_per_user

    def __len__(self) -> int:
        return len(self._sessions)

    @property
    def open_count(self) -> int:
        """Open sessions (each is a member of the hub)."""
        return self._open_total

    def refusal(self, owner: str) -> str | None:
        """Why ``owner`` may not open one more session now: ``"user"``, ``"process"``, or None.

        ``owner`` is the caller's `core.infra.identity.principal`, not its bare ``sub``: an
        outside identity provider's ``sub: "42"`` is not this deployment's user 42, and
        spends none of their sessions.
        """
        held = self._by_user.get(owner, set())
        if len(held) >= self.max_per_user:
            for sid in [sid for sid in held if self._sessions[sid][1].closed is not None]:
                self._forget(sid)
            if len(held) >= self.max_per_user:
                return "user"
        if len(self._sessions) >= self.max_sessions:
            return "process"
        return None

    def add(self, owner: str, poll: PollSession) -> None:
        """Hold ``poll``, which belongs to ``owner`` (a principal, as for `refusal`)."""
        self._sessions[poll.sid] = (owner, poll)
        self._by_user.setdefault(owner, set()).add(poll.sid)
        if poll.closed is None:
            self._open_total += 1
            poll.on_close = self._closed

    def _closed(self) -> None:
        self._open_total -= 1

    def _forget(self, sid: str) -> None:
        owner, _ = self._sessions.pop(sid)
        held = self._by_user[owner]
        held.discard(sid)
        if not held:
            del self._by_user[owner]

    def find(self, sid: str) -> tuple[str, PollSession] | None:
        """The session ``sid`` and the principal it belongs to."""
        return self._sessions.get(sid)

    def get(self, sid: str, owner: str) -> PollSession | None:
        """The session ``sid`` if it belongs to ``owner`` (a principal)."""
        found = self._sessions.get(sid)
        return found[1] if found is not None and found[0] == owner else None

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
