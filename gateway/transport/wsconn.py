"""An open WebSocket after the handshake: one small asyncio Protocol.

Tornado answers the upgrade request (`gateway.transport.websocket`); then
the socket moves to the event loop's own transport (C in uvloop) and this
object, so an idle connection holds no handler, request, headers, stream,
coroutine or task: only the transport, this protocol and its `Session`.

* Bytes in go to a `proto.wsprotocol.WebSocketProtocol` (framing, UTF-8,
  the closing handshake, inflating compressed messages), which returns the
  messages they complete.
  Commands run in order, one task at a time, and only while there are
  some. At most `MAX_INBOX` wait: frames past them stay unparsed, and
  the socket stops reading, until the inbox empties. At most
  `FRAMES_PER_TURN` frames are parsed per event-loop turn, so a read full
  of tiny frames does not stall every other socket.
* Control frames have a budget in the protocol object: at most 16 pongs
  per read (past 15 pings, only the last is answered), and more than
  `proto.wsprotocol.MAX_CONTROL_RUN` pings and pongs without a data message
  close the socket with 1008. The run starts again at each ping of ours
  (so the pongs answering the heartbeat never add up) and when the client
  had been silent for `CONTROL_QUIET` seconds (so its own keep-alive pings
  do not either, even with ``PING_INTERVAL=0``).
* Writes are coalesced: frames for a socket queue in a list until the end
  of the event-loop iteration (or `MAX_PENDING` frames), then go to the
  transport as one write, one system call. When publications arrive faster
  than one at a time (a backlog read from Redis in one go), a socket gets
  several in one write: fan-out degrades into batching, not into a queue.
  A socket that already has a backlog is given the frames themselves
  (shared by all their recipients) rather than its own joined copy, so
  what the send budget counts is what the backlogs really hold.
* With permessage-deflate agreed (`proto.deflate`), a publication goes as
  the frame compressed once per codec for every such socket
  (`Prepared.ws_frame_deflated`), a reply compressed by the process's one
  compressor; the socket itself holds no zlib state, only two references.
* The transport's high-water mark is the send buffer bound
  (``SEND_BUFFER_BYTES``): when the event loop says to pause writing, the
  client is a slow consumer and is closed with 4001.
* A peer that sends its close frame, or breaks the protocol, gets the
  replies to the commands it sent before, then the close frame (its own
  code, or 1002, 1007, 1008, 1009), and the TCP connection is closed.
* Closing sends the close frame once, then waits up to `CLOSE_TIMEOUT`
  seconds for the peer's before dropping the socket; a peer still reading
  through what was queued before the close (a closed slow consumer) gets
  another `CLOSE_TIMEOUT` while its backlog shrinks, a minute at most.
  Once everything, the close frame too, is in the peer's kernel, the
  socket is closed with a FIN (the peer reads on to the close frame); a
  backlog the peer does not read is dropped with a reset. So is one left
  behind the peer's own close frame or FIN (`_linger`): closing outright
  would wait on it for good, or leave it to an orphan socket for minutes.
  A peer that is gone (its kernel reset the connection: it closed its
  socket as our close frame went out), or whose FIN comes once it took
  everything, is let go at once: there is nothing left to wait for.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any, ClassVar, Protocol

from prometheus_client import Histogram

from core.infra.metrics import Metrics
from core.infra.tasks import TaskSet
from core.infra.tcp import ended, kernel_queue, reset_on_close
from gateway.hub import Prepared
from gateway.session import Session
from gateway.transport.inflation import InflateBudget, InflateLimits
from proto import CloseCode, Codec, close_reason, frame, reason_for
from proto.deflate import Agreement, Compressor
from proto.wsframe import OP_PING
from proto.wsprotocol import WebSocketProtocol, WSState

__all__ = [
    "BUDGET_CHECK",
    "CLOSE_TIMEOUT",
    "CONTROL_QUIET",
    "FRAMES_PER_TURN",
    "MAX_INBOX",
    "MAX_PENDING",
    "Backlog",
    "Coalescer",
    "WSConnection",
]

log = logging.getLogger("gateway.websocket")

#: Seconds to wait for the peer's close frame after sending ours, or for a
#: closing slow consumer to read on through what was queued before it.
CLOSE_TIMEOUT = 5.0
#: Rounds of `CLOSE_TIMEOUT` a closing peer that keeps reading is given, at most.
MAX_CLOSE_ROUNDS = 12
#: Frames waiting for the connection's running command before reading pauses.
MAX_INBOX = 32
#: Frames of one socket parsed in one event-loop turn at most (~1 ms): a read
#: of 256 KiB of tiny frames is parsed over several turns, not in one stall.
FRAMES_PER_TURN = 512
#: Frames queued for one socket within one loop iteration before they are written.
MAX_PENDING = 64
#: Seconds between two sums of the send buffers against the process-wide budget.
BUDGET_CHECK = 0.1
#: Seconds of silence after which a client's control frames start a new run
#: (`proto.wsprotocol.MAX_CONTROL_RUN`): keep-alive pings seconds apart never add up.
CONTROL_QUIET = 1.0
_PING = bytes((0x80 | OP_PING, 0))
_TASK = 1  # WSConnection._busy: a task runs the connection's commands
_PARSE = 2  # WSConnection._busy: the held frames are to be parsed on the next loop turn
_SHUT = 4  # WSConnection._busy: our FIN is sent (`_linger`); a flag here, not a slot of its own
#: The command tasks running now, one per busy connection (idle ones hold none).
_RUNNING = TaskSet(log)


def _unsent(transport: Any) -> int:
    """Bytes written to ``transport`` that the peer has not yet acknowledged (0 once it
    reset the connection: none of them will ever be)."""
    sock = transport.get_extra_info("socket")
    if ended(sock):
        return 0
    return int(transport.get_write_buffer_size()) + kernel_queue(sock)


def _reset(transport: Any) -> None:
    """Abort ``transport`` with a TCP reset (`reset_on_close`)."""
    reset_on_close(transport.get_extra_info("socket"))
    transport.abort()


class Backlog(Protocol):
    """A connection whose send buffer counts against `Coalescer`'s budget (sockets, event streams)."""

    @property
    def closing(self) -> bool:
        """Whether it is ending: its backlog no longer leads to a reader."""

    def buffered(self) -> int:
        """Bytes queued for it and not yet taken by the peer."""

    def shed(self, why: str) -> None:
        """End it as a slow consumer (4001)."""

    def abort(self) -> None:
        """Drop it at once, what it holds with it."""


class Coalescer:
    """The sockets with frames queued in this loop iteration; one per gateway.

    It also keeps every socket's send buffer within one process-wide
    ``budget`` (bytes): sockets left with unsent bytes after a flush are
    remembered, and at most every `BUDGET_CHECK` seconds their buffers are
    summed; past the budget, those holding the most are closed first as slow
    consumers (4001) until the rest fit.
    """

    __slots__ = (
        "_backlogged",
        "_budget",
        "_checked",
        "_dirty",
        "_lag",
        "_scheduled",
        "_since",
        "buffered",
        "departed",
    )

    def __init__(self, lag: Histogram | None = None, budget: int | None = None) -> None:
        self._dirty: list[WSConnection] = []
        self._scheduled = False
        self._lag = lag  # gateway_delivery_lag_seconds
        self._since = 0.0
        self._budget = budget
        self._backlogged: set[Backlog] = set()
        self._checked = 0.0
        #: Bytes in send buffers at the last check (gateway_send_buffered_bytes).
        self.buffered = 0
        #: Sockets that left the hub before their TCP connection ended (a shed slow
        #: consumer reading its backlog, a minute at most): still file descriptors
        #: and memory, so still counted against MAX_CONNECTIONS.
        self.departed: set[WSConnection] = set()

    def mark(self, conn: WSConnection) -> None:
        self._dirty.append(conn)
        if not self._scheduled:
            self._scheduled = True
            self._since = time.perf_counter()
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        dirty, self._dirty = self._dirty, []
        since, self._scheduled = self._since, False
        budget = self._budget
        for conn in dirty:
            try:
                conn.flush()
            except Exception:  # one broken socket must not strand the others' frames
                log.exception("write failed; dropping the socket")
                conn.abort()
                continue
            if budget is not None and conn.buffered():
                self._backlogged.add(conn)
        now = time.perf_counter()
        if self._lag is not None:
            self._lag.observe(now - since)
        if self._backlogged and now - self._checked >= BUDGET_CHECK:
            self.check_budget(now)

    def backlogged(self, conn: Backlog) -> None:
        """``conn``, written to outside `flush` (an event stream), holds a backlog."""
        if self._budget is None:
            return
        self._backlogged.add(conn)
        now = time.perf_counter()
        if now - self._checked >= BUDGET_CHECK:
            self.check_budget(now)

    def check_budget(self, now: float) -> int:
        """Sum the backlogged sockets' buffers; past the budget, end the largest first.

        Sockets already closing count too (their backlog is held until the
        peer reads it or the close times out). Until the rest fit, the
        largest backlog goes first: an open socket is shed (4001, after its
        backlog), one already closing is dropped at once, without its close
        frame.
        """
        self._checked = now
        sizes: list[tuple[int, Backlog]] = []
        for conn in list(self._backlogged):
            size = conn.buffered()
            if size:
                sizes.append((size, conn))
            else:
                self._backlogged.discard(conn)
        total = self.buffered = sum(size for size, _ in sizes)
        budget = self._budget
        if budget is None or total <= budget:
            return 0
        # The largest first, open or closing: shedding a small open backlog
        # (a reader a moment behind) while closing ones hold the budget would
        # cost a reader and free nothing.
        sizes.sort(key=lambda item: item[0], reverse=True)
        shed = 0
        why = f"{total} bytes queued in the process, over SEND_BUFFER_TOTAL_BYTES"
        for size, conn in sizes:
            if total <= budget:
                break
            if conn.closing:  # its close frame waits behind a backlog: drop it, freeing that
                conn.abort()
                self._backlogged.discard(conn)
            else:
                conn.shed(why)
                shed += 1
            total -= size
        return shed


class WSConnection(asyncio.Protocol):
    """One client socket: frames in, frames out, a Session in between."""

    kind: ClassVar[str] = "websocket"

    __slots__ = (
        "_busy",
        "_closing",
        "_coalescer",
        "_code",
        "_compressor",
        "_deflate_max",
        "_early",
        "_end",
        "_inbox",
        "_last_seen",
        "_make_session",
        "_metrics",
        "_pending",
        "_pinged",
        "_protocol",
        "_response",
        "_timer",
        "codec",
        "session",
        "transport",
    )  # fmt: skip

    def __init__(
        self,
        response: bytes,
        codec: Codec,
        make_session: Callable[[WSConnection], Session],
        metrics: Metrics,
        max_frame: int,
        coalescer: Coalescer,
        early: bytes = b"",
        compressor: Compressor | None = None,
        agreement: Agreement | None = None,
        inflate: InflateLimits | None = None,
    ) -> None:
        """``inflate``: what this client may make us inflate (None: no limit)."""
        self._response = response  # the 101, written first
        self._early = early  # what the client sent behind its upgrade request
        self.codec = codec
        #: Called once, then dropped: the closure it usually is (four cells, a
        #: tuple, a function) would otherwise outlive the handshake, six more
        #: objects per socket for every full collection to walk.
        self._make_session: Callable[[WSConnection], Session] | None = make_session
        self._metrics = metrics
        self._coalescer = coalescer
        self._pending: list[bytes] | None = None
        self.transport: Any = None  # asyncio.Transport (uvloop's is not a subclass)
        self.session: Session | None = None
        if agreement is not None and inflate is not None:
            budget = InflateBudget(inflate)
            self._protocol = WebSocketProtocol(max_frame, deflate=True, inflate=budget)
        else:
            self._protocol = WebSocketProtocol(max_frame, deflate=agreement is not None)
        self._compressor = compressor if agreement is not None else None
        # The longest message compressed for this client (its window, RFC 7692 §7.1.2.1).
        self._deflate_max = agreement.max_bytes if agreement is not None else 0
        self._end: bytes | None = None  # the protocol's last frames, once it closed
        self._inbox: collections.deque[bytes] | None = None
        self._busy = 0  # _TASK | _PARSE | _SHUT
        self._closing = False
        self._timer: asyncio.TimerHandle | None = None
        self._last_seen = time.monotonic()
        self._pinged = 0.0
        self._code = 1006  # the close code, once one was sent or received

    # -- asyncio.Protocol --------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        transport.write(self._response)  # type: ignore[attr-defined]
        self._response = b""
        make_session, self._make_session = self._make_session, None
        assert make_session is not None  # the transport is made once
        self.session = session = make_session(self)
        session.open()
        log.info("socket open", extra={"conn": session.client_id, "user": session.identity.sub})
        # Closed as it opened (its session revoked meanwhile): nothing to set up.
        boot = None if self._closing else session.boot()
        if boot is not None:  # the client's frames wait in the inbox until it is done
            self._busy |= _TASK
            _RUNNING.spawn(self._boot(boot))
        if self._early:
            early, self._early = self._early, b""
            self.data_received(early)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._closing = True
        self._coalescer.departed.discard(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._inbox = None
        session = self.session
        if session is not None:
            session.closed(self._code, self._protocol.close_reason)
            log.info("socket closed", extra={"conn": session.client_id, "user": session.identity.sub,
                                             "code": self._code})  # fmt: skip

    def pause_writing(self) -> None:
        """The send buffer passed its bound: a slow consumer."""
        self.shed("send buffer full")

    def buffered(self) -> int:
        """Bytes queued for this socket and not yet taken by the kernel (closing or not)."""
        transport = self.transport
        return 0 if transport is None else int(transport.get_write_buffer_size())

    @property
    def closing(self) -> bool:
        return self._closing

    def shed(self, why: str) -> None:
        """Close as a slow consumer (4001): what is queued goes first, then the close."""
        if self._closing or self.transport is None:
            return
        self._metrics.slow_consumers.inc()
        sub = self.session.identity.sub if self.session else "?"
        log.warning("closing slow consumer %s (%s)", sub, why)
        # Deferred: this may run inside a hub broadcast, which must not see
        # its member set change under it.
        asyncio.get_running_loop().call_soon(self._close_slow)
        self._closing = True  # nothing more is queued for this client

    def _close_slow(self) -> None:
        self._depart(int(CloseCode.SLOW_CONSUMER))  # leaves the hub now, not when the socket ends
        self._close(int(CloseCode.SLOW_CONSUMER), close_reason(CloseCode.SLOW_CONSUMER))

    def _depart(self, code: int, reason: str = "") -> None:
        """Leave the hub (every channel) before the TCP connection ends."""
        if self.session is not None and self.transport is not None:
            self._coalescer.departed.add(self)
            self.session.closed(code, reason)

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        if now - self._last_seen >= CONTROL_QUIET:
            self._protocol.reset_control_run()
        self._last_seen = now
        self._take(data)

    def eof_received(self) -> bool:
        """The peer's FIN. With nothing of ours unacknowledged the connection closes now;
        else it ends as a closing one does (`_closing_timer`): a FIN once the peer took it
        all, a reset if it reads nothing. A plain close would wait for good on a backlog
        that the peer never reads, or leave it to an orphan socket for minutes."""
        transport = self.transport
        if transport is None or not _unsent(transport):
            return False
        if self._timer is None:  # no close under way: the peer left without a close frame
            self._depart(1006, "")
            self._closing = True
            self._linger(transport)
        return True  # reading stops; the timer ends the connection

    # -- frames in ---------------------------------------------------------

    def _take(self, data: bytes) -> None:
        """Parse ``data`` (and frames held back before it) as far as the budgets allow.

        At most `FRAMES_PER_TURN` frames per event-loop turn, and no more
        messages than the inbox has room for: frames past either wait in
        the protocol object, unparsed, with reading paused, for a later turn
        (`_parse_later`: at once when the frame budget stopped the parse, or
        once the command task finds its inbox empty, `_next`).
        """
        transport = self.transport
        if transport is None:
            return
        protocol = self._protocol
        inbox = self._inbox
        room = MAX_INBOX - len(inbox) if inbox else MAX_INBOX
        for payload in protocol.receive(data, room, FRAMES_PER_TURN):
            self._message(payload)
        if protocol.state is WSState.OPEN:
            pongs = protocol.data_to_send()
            if pongs:
                self._write(pongs)
        # CLOSING (our close frame is out) ends only with the peer's close frame or a
        # violation: a frame the peer sent before it saw ours is no reason to hang up.
        elif protocol.state is WSState.CLOSED:
            if self._end is None:
                self._ended()
            return
        if not protocol.held:
            if not data:  # parsing on from a pause: reading was paused, and nothing came since
                transport.resume_reading()
            return
        transport.pause_reading()
        inbox = self._inbox
        if not inbox or len(inbox) < MAX_INBOX:  # the frame budget, not the inbox, stopped it
            self._parse_later()

    def _parse_later(self) -> None:
        """Parse the held frames on the next loop turn (once, however often asked)."""
        if not self._busy & _PARSE:
            self._busy |= _PARSE
            asyncio.get_running_loop().call_soon(self._parse_held)

    def _parse_held(self) -> None:
        self._busy &= ~_PARSE
        self._take(b"")

    def _next(self) -> bytes | None:
        """The next command waiting for this connection's task, if any."""
        if self._closing:
            return None
        inbox = self._inbox
        if not inbox and self._protocol.held:
            # Not here, in the command task: commands that never wait (refused
            # ones) would parse the whole read in one turn. The next turn does.
            self._parse_later()
            return None
        return inbox.popleft() if inbox else None

    def _ended(self) -> None:
        """The protocol closed: the peer's close frame came, or the peer broke the protocol.

        Either way the commands that came before (in the same read or
        earlier) still run, for at most `CLOSE_TIMEOUT`, with reading
        stopped; their replies go out, then the close frame (the answer to
        the peer's, or 1002/1007/1008/1009), then the TCP connection is closed.
        """
        protocol = self._protocol
        transport = self.transport
        if transport is None:
            return
        self._end = protocol.data_to_send()
        self._code = protocol.close_code or 1005
        if protocol.failure is not None:
            log.info("closing a socket that broke the protocol: %s", protocol.failure.reason)
        if self._busy & _TASK and not self._closing:
            transport.pause_reading()
            self._timer = asyncio.get_running_loop().call_later(CLOSE_TIMEOUT, self._hang_up)
            return
        self._hang_up()

    def _hang_up(self) -> None:
        """Write what is queued and the protocol's last frames, then close the TCP connection."""
        transport = self.transport
        if transport is None or transport.is_closing() or self._busy & _SHUT:
            return
        if self._pending and not self._closing:
            pending, self._pending = self._pending, []
            self._emit(pending)
        self._closing = True
        if self._end:
            transport.write(self._end)
        if self._timer is not None:
            self._timer.cancel()
        self._linger(transport)

    def _linger(self, transport: Any) -> None:
        """Send a FIN behind what is queued, and close once the peer has taken it all.

        Reading on, the peer's own FIN closes it (`eof_received`); one that reads
        nothing is reset by `_closing_timer`. Closing at once would leave what it
        did not read to an orphan socket that the kernel keeps for minutes.
        """
        if self._busy & _SHUT:
            return
        self._busy |= _SHUT
        left = _unsent(transport)
        if not left:  # all taken already
            transport.close()
            return
        transport.write_eof()
        # Reading was paused while the commands before the close ran (`_ended`): the
        # peer's FIN would go unseen until the timer. What comes now is discarded.
        transport.resume_reading()
        self._timer = asyncio.get_running_loop().call_later(
            CLOSE_TIMEOUT, self._closing_timer, left, 1
        )

    def _message(self, payload: bytes) -> None:
        if self._closing:
            return
        if self._busy & _TASK:
            inbox = self._inbox
            if inbox is None:
                inbox = self._inbox = collections.deque()
            inbox.append(payload)  # within MAX_INBOX: `_take` parses no more than fit
            return
        self._busy |= _TASK
        _RUNNING.spawn(self._run(payload))

    async def _boot(self, boot: Coroutine[Any, Any, None]) -> None:
        """Run the session's opening work, then the frames that came meanwhile."""
        try:
            await boot
        except Exception:
            log.exception("opening a socket's session failed")
        payload = self._next() if self.session is not None else None
        if payload is not None:
            await self._run(payload)
            return
        self._busy &= ~_TASK
        if self._end is not None:  # the connection failed while its session was opening
            self._hang_up()

    async def _run(self, payload: bytes | None) -> None:
        """Run this connection's commands in order until none is waiting."""
        try:
            while payload is not None and self.session is not None:
                await self.session.handle(payload)
                payload = self._next()
        finally:
            self._busy &= ~_TASK
            if self._end is not None:  # the connection failed while commands were waiting
                self._hang_up()

    # -- Transport (what the Session uses) ---------------------------------

    def send(self, payload: bytes) -> None:
        compressor = self._compressor
        if compressor is not None:
            n = len(payload)
            if compressor.worth(n) and n <= self._deflate_max:
                compressed = compressor.compress(payload)
                if len(compressed) < n:
                    self._write(frame(compressed, self.codec.binary, compressed=True))
                    return
        self._write(frame(payload, self.codec.binary))

    def deliver(self, prepared: Prepared, codec: Codec) -> None:
        compressor = self._compressor
        if compressor is None:
            self._write(prepared.ws_frame(codec))
        else:
            self._write(prepared.ws_frame_deflated(codec, compressor, self._deflate_max))

    def disconnect(self, code: int, reason: str | None = None) -> None:
        self._close(int(code), reason_for(code) if reason is None else reason)

    def heartbeat(self, now: float, dead_after: float) -> None:
        if self._closing or self.transport is None or self._end is not None:
            return
        # Dropped only once pinged since it was last heard: a socket that
        # joined in the middle of a liveness round may wait for its first
        # visit longer than ``dead_after`` without being at fault.
        if self._pinged > self._last_seen and now - self._last_seen > dead_after:
            sub = self.session.identity.sub if self.session else "?"
            log.info("dropping %s: nothing heard for %.0fs", sub, now - self._last_seen)
            self._metrics.dead_peers.inc()
            self._depart(1006, "no answer to ping")
            # No close handshake: a peer that answers nothing would not answer it.
            self.abort()
            return
        self._pinged = now
        self._protocol.reset_control_run()  # the pong that answers this is no flood
        self.transport.write(_PING)

    def abort(self) -> None:
        """Drop the socket at once (a reset); nothing more is written to it."""
        self._closing = True
        if self.transport is not None:
            _reset(self.transport)

    def _write(self, data: bytes) -> None:
        if self._closing:
            return
        pending = self._pending
        if pending is None:
            self._pending = [data]
            self._coalescer.mark(self)
        else:
            pending.append(data)
            if len(pending) >= MAX_PENDING:
                self._pending = []  # still marked: the coalescer flushes the rest
                self._emit(pending)

    def flush(self) -> None:
        """Write what is queued, as one write (the coalescer calls this)."""
        pending, self._pending = self._pending, None
        if pending:
            self._emit(pending)

    def _emit(self, pending: list[bytes]) -> None:
        transport = self.transport
        if transport is None or self._closing:
            return
        if len(pending) == 1:
            transport.write(pending[0])
        elif transport.get_write_buffer_size():
            # A backlog: the transport keeps what it is given until sent, a
            # partly sent object whole. The frames themselves are shared with
            # every socket they go to; a join would be this socket's own copy.
            transport.writelines(pending)
        else:
            transport.write(b"".join(pending))

    def _close(self, code: int, reason: str) -> None:
        transport = self.transport
        if transport is None or self._timer is not None or transport.is_closing():
            return
        frame = self._protocol.close(code, reason)
        if not frame:
            return
        if self._pending:  # what was sent before the close goes before it
            pending, self._pending = self._pending, []
            self._emit(pending)
        self._closing = True
        self._code = code
        transport.write(frame)
        left = _unsent(transport)
        self._timer = asyncio.get_running_loop().call_later(
            CLOSE_TIMEOUT, self._closing_timer, left, 1
        )

    def _closing_timer(self, left: int, rounds: int) -> None:
        """End the TCP connection, unless the peer is still reading what precedes our close.

        A slow consumer closed with 4001 that reads again gets everything
        queued and then the close frame: while its backlog shrinks, it is
        given another `CLOSE_TIMEOUT` (`MAX_CLOSE_ROUNDS` at most). Once all
        of it is in the peer's kernel, the connection ends with a FIN; one
        that holds a backlog its peer does not read ends with a reset.
        """
        transport = self.transport
        if transport is None:
            return
        now_left = _unsent(transport)
        if now_left == 0:
            # The close frame reached the peer's kernel; a reset would discard what
            # its reader has not taken yet, and there is no queue of ours to free.
            transport.close()
            return
        if now_left < left and rounds < MAX_CLOSE_ROUNDS:  # progress (even to the last byte)
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(CLOSE_TIMEOUT, self._closing_timer, now_left, rounds + 1)
            return
        _reset(transport)
