"""Server-Sent Events: ``GET /sse?ch=projects&ch=user:42`` for ``EventSource``.

Admission is the socket's (token in ``Authorization`` or ``?token=``,
grants, limits, a full process's 503); each ``ch`` is subscribed through the same session, so
errors and recovery are the socket's too. The stream carries:

* ``event: reply`` - the reply to each subscription (``recovered``,
  ``offset``, ``epoch``, or an error), as on the socket; with the ``id:``
  of a ``msg`` when it says where its channel stands (not ``recovered:
  true``: the missed ones follow), so that a reconnect resumes a channel
  that has had nothing since;
* ``event: msg`` - a publication, the socket's push as ``data``; on history
  channels with an ``id:`` holding every history channel's position, so the
  browser's automatic reconnect (``Last-Event-ID``) recovers what it missed
  on all of them (positions it gives for other channels are dropped);
* ``event: expiring`` / ``gap`` / ``subscribed`` / ``unsubscribed`` - the
  socket's pushes (a ``gap`` only where the history cannot fill it: the
  gateway fills it itself, as the stream cannot ask ``history``); a connect hook's channels are recovered from
  ``Last-Event-ID`` too, their ``subscribed`` saying ``recovered``;
* ``event: close`` - ``{"code": 4002}`` and the like, then the stream ends;
  a subscription refused with a temporary error (Redis unavailable) ends
  the stream at once with ``4004`` and a jittered ``retry:``, so that no
  stream stays open with nothing on it;
* ``: ping`` comments on the liveness schedule, which keep proxies from
  timing out an idle stream.

An event's JSON is one ``data:`` line, or one for each of its lines when it
breaks lines between tokens (a publication may): ``EventSource`` joins them
with LF, which JSON reads as whitespace.

The stream's write buffer is bounded like a socket's: a reader that falls
behind by ``SEND_BUFFER_BYTES`` is cut off, its TCP connection reset at
once with what it held, and recovers on reconnect (``Last-Event-ID``). Its
backlog counts in the process's ``SEND_BUFFER_TOTAL_BYTES`` with the
sockets' (`Coalescer.backlogged`): past it, the largest are cut off first.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import random
from collections.abc import Callable, Coroutine
from typing import Any, ClassVar

import msgspec
from tornado.iostream import IOStream, StreamBufferFullError, StreamClosedError

from core.errormap import JsonErrors
from core.infra.errors import ApiError
from core.infra.identity import Identity
from core.infra.tcp import kernel_queue, reset_on_close
from gateway.context import Context
from gateway.hooks.connect import Disconnected, HookedIdentity
from gateway.hub import Prepared
from gateway.recovery import repair_gap
from gateway.session import Session
from gateway.transport.admission import admit, admit_hooked_request, refuse_full
from proto import JSON_CODEC, CloseCode, Codec, Connection, Position

__all__ = ["SSEHandler", "decode_positions", "encode_positions"]

log = logging.getLogger("gateway.sse")

_positions = msgspec.json.Decoder(dict[str, tuple[int, str]])


class _Op(msgspec.Struct):
    op: str | None = None


_push_op = msgspec.json.Decoder(_Op)


class _Stands(msgspec.Struct):
    """Where a reply to a ``sub`` (or a ``subscribed`` push) says a channel stands."""

    id: int | None = None
    ch: str | None = None
    ok: bool = True
    offset: int | None = None
    epoch: str | None = None
    recovered: bool | None = None


_stands = msgspec.json.Decoder(_Stands)


def encode_positions(positions: dict[str, tuple[int, str]]) -> str:
    return base64.urlsafe_b64encode(msgspec.json.encode(positions)).rstrip(b"=").decode()


def decode_positions(event_id: str | None) -> dict[str, tuple[int, str]]:
    """The positions in a ``Last-Event-ID``; none when it is absent or not ours."""
    if not event_id:
        return {}
    try:
        raw = base64.urlsafe_b64decode(event_id + "=" * (-len(event_id) % 4))
        return _positions.decode(raw)
    except (binascii.Error, ValueError, msgspec.DecodeError):
        return {}


def _valid(positions: dict[str, tuple[int, str]]) -> dict[str, Position]:
    """The positions a client gave that are positions (an offset in range, an epoch's length)."""
    valid = {}
    for ch, (offset, epoch) in positions.items():
        try:
            valid[ch] = msgspec.convert({"offset": offset, "epoch": epoch}, Position)
        except msgspec.ValidationError:
            log.info("ignoring an invalid Last-Event-ID position for %s", ch)
    return valid


class SSEHandler(JsonErrors):
    kind: ClassVar[str] = "sse"
    ctx: Context

    def initialize(self, ctx: Context) -> None:
        self.ctx = ctx
        self._identity: Identity | None = None
        self._positions: dict[str, tuple[int, str]] = {}
        self._channels: list[str] = []  # its ``ch``s: the reply with id n answers the nth
        self._repairs: set[asyncio.Task[None]] = set()  # gaps being filled from history
        self._repairing: dict[str, bool] = {}  # their channels: another gap came meanwhile
        self._ended: asyncio.Event = asyncio.Event()
        self._session: Session | None = None
        self._refused = False  # a subscription failed with a temporary error
        self._goodbye: Disconnected | None = None
        #: The close code and reason sent, once one was (1006: the client went away).
        self._code, self._reason = 1006, ""

    async def prepare(self) -> None:
        ctx = self.ctx
        identity = await admit(self, ctx)
        refuse_full(ctx)
        if ctx.hooks is not None and ctx.hooks.connect is not None:
            self._requested()  # a request the gateway refuses is not the backend's to see
            try:
                identity = await admit_hooked_request(self, ctx, identity, self.kind)
            except Disconnected as goodbye:
                self._goodbye = goodbye
        self._identity = identity

    def _requested(self) -> list[str]:
        channels = list(dict.fromkeys(self.get_query_arguments("ch")))
        if not 1 <= len(channels) <= self.ctx.settings.max_subscriptions:
            limit = self.ctx.settings.max_subscriptions
            raise ApiError(400, "bad_request", f"give 1 to {limit} channels as ?ch=")
        return channels

    async def get(self) -> None:
        ctx, identity = self.ctx, self._identity
        channels = self._channels = self._requested()
        last = self.request.headers.get("Last-Event-ID") or self.get_query_argument(
            "last_event_id", None
        )
        # Only the stream's own history channels (its ``ch``, and those its connect
        # hook subscribes it to): a position for any other would be carried in the
        # id of every msg from now on.
        hooked = identity.subscribe if isinstance(identity, HookedIdentity) else ()
        given, history = decode_positions(last), ctx.node.history_policy
        self._positions = {
            ch: given[ch] for ch in (*channels, *hooked) if ch in given and history.applies(ch)
        }
        self.set_header("Content-Type", "text/event-stream")
        self.set_header("Cache-Control", "no-store")
        self.set_header("X-Accel-Buffering", "no")  # nginx: do not buffer the stream
        stream = self._stream()
        if stream is not None:
            stream.max_write_buffer_size = ctx.settings.send_buffer_bytes
        self.flush()
        if self._goodbye is not None:  # the connect hook's disconnect: the stream's only event
            self.disconnect(self._goodbye.code, self._goodbye.reason)
            return
        assert identity is not None  # without a connect hook, a token is required
        limit = ctx.settings.max_subscriptions
        conn = Connection(JSON_CODEC, identity.grants, max_subscriptions=limit)
        session = self._session = ctx.new_session(
            self, conn, identity, ctx.node, ctx.metrics, remote_ip=self.request.remote_ip or ""
        )
        session.open()
        try:
            if self._ended.is_set():  # closed as it opened (its session revoked meanwhile)
                return
            boot = session.boot(_valid({ch: self._positions[ch] for ch in hooked
                                        if ch in self._positions}))  # fmt: skip
            if boot is not None:
                await boot
                if self._ended.is_set():  # its server-side subscriptions failed (4004)
                    return
            for n, ch in enumerate(channels, 1):
                frame: dict[str, object] = {"id": n, "op": "sub", "ch": ch}
                if ch in self._positions:
                    offset, epoch = self._positions[ch]
                    frame["since"] = {"offset": offset, "epoch": epoch}
                await session.handle(msgspec.json.encode(frame))
            if self._refused:
                log.warning("ending an event stream whose subscription failed; it reconnects")
                self._write(b"retry: %d\n\n" % random.randint(1000, 5000))
                self.disconnect(CloseCode.UNAVAILABLE)
            await self._ended.wait()
        finally:
            session.closed(self._code, self._reason)

    def on_connection_close(self) -> None:
        self._ended.set()

    # -- Transport -------------------------------------------------------------

    def send(self, payload: bytes) -> None:
        # Replies carry an "id"; the socket's other pushes name their "op".
        op = _push_op.decode(payload).op if payload.startswith(b'{"op"') else "reply"
        if op == "reply" and b'"temporary":true' in payload:
            self._refused = True
        if op == "gap" and self._repair(payload):
            return
        event_id = self._stands(payload) if op in ("reply", "subscribed") else None
        self._event(op or "reply", payload, event_id)

    def _repair(self, payload: bytes) -> bool:
        """Fill a ``gap`` from history, as a reconnect with ``Last-Event-ID`` would: a stream
        cannot ask ``history``, so the gap alone (a Redis link lost a moment) cost its client a
        reload of every channel. The ``gap`` goes out only when the history cannot fill it."""
        ch, session = _stands.decode(payload).ch, self._session
        if ch is None or ch not in self._positions or session is None:
            return False
        if ch in self._repairing:  # another gap meanwhile: once this repair is done, again
            self._repairing[ch] = True
            return True
        fill = repair_gap(session, ch, Position(*self._positions[ch]), self._teller(payload))
        if fill is None:
            return True  # told at once
        self._repairing[ch] = False
        task = asyncio.ensure_future(self._repair_from_history(session, ch, fill, payload))
        self._repairs.add(task)
        task.add_done_callback(self._repairs.discard)
        return True

    def _teller(self, gap: bytes) -> Callable[[], None]:
        return lambda: self._event("gap", gap)

    async def _repair_from_history(
        self, session: Session, ch: str, fill: Coroutine[Any, Any, None] | None, gap: bytes
    ) -> None:
        try:
            while fill is not None:  # and again from the last one delivered (`deliver` moves it)
                await fill
                if not self._repairing[ch]:
                    return
                self._repairing[ch] = False
                since = Position(*self._positions[ch])
                fill = repair_gap(session, ch, since, self._teller(gap))
        finally:
            del self._repairing[ch]

    def _stands(self, payload: bytes) -> str | None:
        """The event id for a channel's reply or ``subscribed`` push that says where it stands.

        Live pushes continue after that position (unless the reply says
        ``recovered: true``: the missed ones follow, each with its id), so it is
        where the stream resumes. Without it, a channel with nothing published
        since the stream opened was missing from ``Last-Event-ID`` and, after a
        reconnect, subscribed afresh: what it missed meanwhile was lost, unsaid.
        """
        stands = _stands.decode(payload)
        ch = stands.ch
        if ch is None and stands.id is not None and 0 < stands.id <= len(self._channels):
            ch = self._channels[stands.id - 1]
        if (
            ch is None
            or not stands.ok
            or stands.recovered is True
            or stands.offset is None
            or stands.epoch is None
        ):
            return None
        self._positions[ch] = (stands.offset, stands.epoch)
        return encode_positions(self._positions)

    def deliver(self, prepared: Prepared, codec: Codec) -> None:
        event_id = None
        if prepared.offset is not None and prepared.epoch is not None:
            self._positions[prepared.ch] = (prepared.offset, prepared.epoch)
            event_id = encode_positions(self._positions)
        self._event("msg", prepared.payload(JSON_CODEC), event_id)

    def disconnect(self, code: int, reason: str | None = None) -> None:
        event = {"code": int(code)} if reason is None else {"code": int(code), "reason": reason}
        self._event("close", msgspec.json.encode(event))
        if not self._ended.is_set():
            self._code, self._reason = int(code), reason or ""
        self._ended.set()

    def heartbeat(self, now: float, dead_after: float) -> None:
        self._write(b": ping\n\n")

    def _event(self, name: str, data: bytes, event_id: str | None = None) -> None:
        head = b"event: " + name.encode() + b"\n"
        if event_id is not None:
            head = b"id: " + event_id.encode() + b"\n" + head
        if b"\n" in data or b"\r" in data:
            # JSON may break lines between tokens (a publication's data, a hook's):
            # a line each, which EventSource joins with LF, lest an empty one end the event.
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\ndata: ")
        self._write(head + b"data: " + data + b"\n\n")

    def _write(self, chunk: bytes) -> None:
        if self._ended.is_set():
            return
        try:
            self.write(chunk)
            self.flush()
        except StreamBufferFullError:
            self.shed(f"over SEND_BUFFER_BYTES ({self.ctx.settings.send_buffer_bytes})")
        except StreamClosedError:
            self._ended.set()
        else:
            stream = self._stream()
            if stream is not None and stream.writing():
                self.ctx.coalescer.backlogged(self)

    # -- Backlog (the process's SEND_BUFFER_TOTAL_BYTES) -----------------------------

    @property
    def closing(self) -> bool:
        return self._ended.is_set()

    def buffered(self) -> int:
        stream = self._stream()
        if stream is None or stream.closed():
            return 0
        held = getattr(stream, "_write_buffer", None)  # Tornado's own, not in its API
        return (0 if held is None else len(held)) + kernel_queue(stream.socket)

    def shed(self, why: str) -> None:
        """Cut off a slow reader: 4001, and its connection reset with what it held."""
        if self._ended.is_set():
            return
        self.ctx.metrics.slow_consumers.inc()
        log.warning("cutting off a slow event-stream reader (%s)", why)
        self._code = int(CloseCode.SLOW_CONSUMER)
        self._ended.set()
        self.abort()

    def abort(self) -> None:
        """Reset the TCP connection: a reader that reads nothing would hold its backlog for good."""
        stream = self._stream()
        if stream is not None and not stream.closed():
            reset_on_close(stream.socket)
            stream.close()

    def _stream(self) -> IOStream | None:
        # HTTP1Connection has the stream (not the HTTPConnection interface).
        return getattr(self.request.connection, "stream", None)
