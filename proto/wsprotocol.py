"""One end of a WebSocket connection after the handshake (RFC 6455), sans I/O.

`WebSocketProtocol` takes the bytes the peer sent (`receive`) and returns the
data messages they complete, reassembled and checked; what the connection must
send in answer (pongs, the closing handshake) waits in `data_to_send`. It does
no I/O and holds no timer: the transport adapters (`gateway.transport.wsconn`
for the server, the load tool's `gateway.loadtest.wsclient` for the client)
write, time out and close the TCP connection as its `state` says.

The rules it enforces, per RFC 6455:

* framing (§5.2): reserved bits clear (but RSV1 on the first frame of a
  message once permessage-deflate was negotiated, RFC 7692 §6), known opcodes, client frames masked and
  server frames not, control frames unfragmented and at most 125 bytes, a frame
  or a reassembled message at most ``max_size`` bytes (1009, refused at the
  frame's header, before its payload is buffered; a continuation, too, by
  what the message would hold with it). A message is reassembled
  in one buffer, so however it is fragmented (into one-byte or empty
  continuation frames too) it holds no more memory than its own size;
* fragmentation (§5.4): a continuation only inside a message, no new message
  inside one, control frames allowed between fragments;
* UTF-8 (§8.1): text messages and close reasons must be valid UTF-8 (1007). The
  check is incremental: a text message is failed at the first invalid byte, in
  whichever fragment, or part of a fragment, it arrives (a compressed one,
  once inflated);
* compression (RFC 7692, with ``deflate=True``): a compressed message is
  inflated once complete (`proto.deflate.inflate`: no context kept between
  messages, at most ``max_size`` bytes out, 1009 past it, 1002 if it is not
  deflate; the adapter may pass an ``inflate`` that keeps an allowance of
  its own, 1008 past it);
* closing (§5.5.1, §7.4): a close frame of one byte, with a code no endpoint may
  send (0-999, 1004-1006, 1015, 1016-2999, 5000 and up) fails with 1002; a valid
  one is answered with its own code (an empty one with an empty one).

Control frames have a budget, or a peer could keep its reader busy with
pings that cost it 6 bytes each (~43,000 in one 256 KiB read, each parsed
and, unbounded, each answered):

* pongs (§5.5.2, §5.5.3): at most `MAX_PONGS` (16) per `receive`. The first 15
  pings of one call are answered one for one; any after them, by one pong
  carrying the last one's payload, queued once the call's frames are read
  (before a close frame that follows them). §5.5.3 lets an endpoint answer
  only the most recent of the pings it has not answered yet; a client that
  pings now and then gets each ping answered;
* runs (policy, not RFC): more than `MAX_CONTROL_RUN` (256) pings, pongs
  and empty non-final continuation frames (which carry nothing) in a row fail the connection with 1008 (policy violation), at the first
  frame past the limit (the rest of the read is not parsed). A run ends at
  a complete data message (not at a continuation frame, or empty fragments
  would reset it for free) and when the adapter says a ping of ours went out
  or the peer paused (`reset_control_run`; `ping` does it too): so pongs
  answering our pings, and a client's own keep-alive pings, never add up.
  Close frames are not counted: the closing handshake always works. The
  count costs the data path one attribute store per message.

`receive` may be given budgets, for an adapter that must share its event
loop: ``max_frames`` frames and ``max_messages`` messages at most per call.
Parsing stops there, and the rest waits in the object unparsed (`held`)
until ``receive(b"")``; however the parsing is split, the outcome is the same.

Every frame that precedes a violation in the same `receive` is processed: its
messages are returned along with the failure.

The states, and what moves between them (anything else changes nothing; in
`CLOSED` input is ignored):

    OPEN     --close sent-->       CLOSING   our close frame is out; the peer's is awaited
    OPEN     --close received-->   CLOSED    answered with a close frame in the same step
    OPEN     --violation-->        CLOSED    a close frame with the violation's code
    CLOSING  --close received-->   CLOSED
    CLOSING  --violation-->        CLOSED    no second close frame

In `CLOSED` only the TCP connection is left to close: a server closes it once
`data_to_send` is written (§7.1.1); a client, after failing, too, and after a
clean closing handshake it waits a while for the server to do it.
"""

from __future__ import annotations

import codecs
import enum
import os
from collections.abc import Callable
from typing import Final

from proto.codes import CloseCode
from proto.deflate import inflate
from proto.wsframe import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    PROTOCOL_ERROR,
    TOO_BIG,
    FrameError,
    close_payload,
    frame,
    unmask,
)

__all__ = [
    "INVALID_DATA",
    "MAX_CONTROL_RUN",
    "MAX_PONGS",
    "POLICY_VIOLATION",
    "TRANSITIONS",
    "Event",
    "WSState",
    "WebSocketProtocol",
    "masked_frame",
    "receivable",
]

#: Close code for a text message or close reason that is not UTF-8 (RFC 6455 §7.4.1).
INVALID_DATA: Final = int(CloseCode.INVALID_DATA)
#: Close code for a peer past a budget of this module (RFC 6455 §7.4.1: policy violation).
POLICY_VIOLATION: Final = int(CloseCode.POLICY_VIOLATION)
#: Control frames (pings, pongs) in a row before the connection fails with 1008. A run
#: ends at a data message and at `reset_control_run` (a ping of ours, a pause of the
#: peer's): no client sends hundreds in one; a flood of empty pings reaches it in 1.5 KB.
MAX_CONTROL_RUN: Final = 256
#: Pongs queued in one `receive` at most: past 15 pings, only the last is answered.
MAX_PONGS: Final = 16
_NO_STATUS: Final = 1005
#: The start of a frame left by a read is kept in a bytearray, which later reads
#: extend in place, from this size on; a shorter one is joined to the next read
#: (parsing bytes is quicker, and its copy is small).
_GROW_IN_PLACE: Final = 16384


class WSState(enum.Enum):
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


class Event(enum.Enum):
    CLOSE_SENT = "close sent"
    CLOSE_RECEIVED = "close received"
    VIOLATION = "violation"


TRANSITIONS: Final[dict[tuple[WSState, Event], WSState]] = {
    (WSState.OPEN, Event.CLOSE_SENT): WSState.CLOSING,
    (WSState.OPEN, Event.CLOSE_RECEIVED): WSState.CLOSED,
    (WSState.OPEN, Event.VIOLATION): WSState.CLOSED,
    (WSState.CLOSING, Event.CLOSE_RECEIVED): WSState.CLOSED,
    (WSState.CLOSING, Event.VIOLATION): WSState.CLOSED,
}

_KNOWN = frozenset((OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG))
_DATA = frozenset((OP_TEXT, OP_BINARY))  # the frames RSV1 may mark as compressed
_utf8_decoder = codecs.getincrementaldecoder("utf-8")


def receivable(code: int) -> bool:
    """Whether a close frame may carry ``code`` (RFC 6455 §7.4.1, §7.4.2, IANA registry).

    1004 is reserved; 1005, 1006 and 1015 are for reporting, never sent;
    1016-2999 are unassigned; 3000-4999 are for libraries and applications.
    """
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


def masked_frame(opcode: int, payload: bytes, mask: bytes | None = None) -> bytes:
    """One masked, unfragmented frame, as a client sends it (RFC 6455 §5.3)."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n <= 0xFFFF:
        head = bytes((0x80 | opcode, 0xFE)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0xFF)) + n.to_bytes(8, "big")
    if mask is None:
        mask = os.urandom(4)
    return head + mask + unmask(mask, payload)


class WebSocketProtocol:
    """The RFC 6455 state of one connection, server side or (``client=True``) client side."""

    __slots__ = (
        "_buffer",
        "_checked",
        "_client",
        "_compressed",
        "_fragments",
        "_inflate",
        "_max_size",
        "_out",
        "_pong",
        "_pongs",
        "_pos",
        "_run",
        "_text",
        "_utf8",
        "close_code",
        "close_reason",
        "failure",
        "state",
    )

    def __init__(
        self,
        max_size: int,
        *,
        client: bool = False,
        deflate: bool = False,
        inflate: Callable[[bytes, int], bytes] = inflate,
    ) -> None:
        """``deflate``: permessage-deflate was agreed; ``inflate`` inflates a message then."""
        self._max_size = max_size
        self._client = client
        # permessage-deflate agreed (RSV1 marks a compressed message): how to inflate one
        self._inflate = inflate if deflate else None
        self._compressed = False  # whether the message being reassembled is
        self.state = WSState.OPEN
        # Bytes received and not parsed yet: a bytearray while they are the
        # start of one frame, which each read extends in place.
        self._buffer: bytes | bytearray = b""
        # Where the frames held back by a budget of `receive` begin in _buffer
        # (-1: none are; _buffer holds at most the start of one frame).
        self._pos = -1
        self._out = b""  # control frames to send (rare: no list held per connection)
        self._pongs = 0  # pongs for this receive's pings: queued in _out, or the one held
        self._pong: bytes | None = None  # the payload of the latest ping past MAX_PONGS - 1
        self._run = 0  # control frames since the last data message (or reset_control_run)
        # The message being reassembled, in one buffer: a list of fragments would
        # hold an object per fragment (~40 times the payload of one-byte ones).
        self._fragments: bytearray | None = None
        self._text = False  # whether it is a text message
        self._utf8: codecs.IncrementalDecoder | None = None  # its UTF-8 check, when spread out
        self._checked = 0  # payload bytes of the buffered, incomplete frame already checked
        #: The close code and reason of the closing handshake's first frame: the
        #: peer's, or ours when we closed first or the connection failed.
        self.close_code: int | None = None
        self.close_reason = ""
        #: The violation that failed the connection, if one did.
        self.failure: FrameError | None = None

    # -- in ----------------------------------------------------------------

    def receive(
        self, data: bytes, max_messages: int | None = None, max_frames: int | None = None
    ) -> list[bytes]:
        """Take bytes from the peer; returns the data messages they complete, in order.

        With ``max_messages`` or ``max_frames``, parsing stops once that many
        messages were completed or frames read: the frames after them are
        held back (`held`) until a later call (``receive(b"")`` parses on).
        """
        if self._closed():
            return []
        start = 0
        buffer = self._buffer
        joined: bytes | bytearray = data
        if buffer:
            if self._pos >= 0:
                if data:
                    joined = buffer[self._pos :] + data
                else:
                    joined, start = buffer, self._pos
            elif isinstance(buffer, bytearray):  # the start of a frame: it grows in place
                buffer += data
                joined = buffer
            else:
                joined = buffer + data
            self._buffer = b""
        self._pos = -1
        messages: list[bytes] = []
        try:
            used = self._parse(joined, start, messages, max_messages, max_frames)
        except FrameError as exc:
            self._violation(exc)
            return messages
        if self._pongs:
            self._end_pongs()
        if used < len(joined) and not self._closed():
            if self._pos >= 0:  # a budget stopped it: the frames from _pos wait
                self._buffer = joined
            elif len(joined) - used < _GROW_IN_PLACE:  # a short start: joined to the next read
                self._buffer = bytes(joined[used:])
            elif isinstance(joined, bytearray):
                self._buffer = joined[used:] if used else joined
            else:  # kept in a bytearray, which the rest of the frame extends without a copy
                self._buffer = bytearray(memoryview(joined)[used:])
        return messages

    @property
    def held(self) -> bool:
        """Whether a budget of `receive` stopped it before the end of what came (call again)."""
        return self._pos >= 0

    def data_to_send(self) -> bytes:
        """The control frames to send now (pongs, a close frame), once; b"" if none."""
        out, self._out = self._out, b""
        return out

    def reset_control_run(self) -> None:
        """Start a new run of the peer's control frames (`MAX_CONTROL_RUN`).

        For the adapter: a ping of ours went out (built elsewhere; `ping` resets
        too), so the pong answering it is no flood; or the peer had paused.
        """
        self._run = 0

    # -- out ---------------------------------------------------------------

    def close(self, code: int, reason: str = "") -> bytes:
        """Start the closing handshake: the close frame to send, or b"" when not open."""
        if self.state is not WSState.OPEN:
            return b""
        self._move(Event.CLOSE_SENT)
        self.close_code, self.close_reason = code, reason
        return self._frame(OP_CLOSE, close_payload(code, reason))

    def pong(self, payload: bytes) -> bytes:
        """A pong frame (for a heartbeat the adapter sends itself)."""
        return self._frame(OP_PONG, payload)

    def ping(self, payload: bytes = b"") -> bytes:
        """A ping frame; the peer's control frames start a new run (its pong is no flood)."""
        self._run = 0
        return self._frame(OP_PING, payload)

    def message(self, payload: bytes, binary: bool) -> bytes:
        """One data frame for ``payload`` (b"" once the connection is closing)."""
        if self.state is not WSState.OPEN:
            return b""
        return self._frame(OP_BINARY if binary else OP_TEXT, payload)

    # -- internals ---------------------------------------------------------

    def _frame(self, opcode: int, payload: bytes) -> bytes:
        if self._client:
            return masked_frame(opcode, payload)
        if opcode == OP_TEXT or opcode == OP_BINARY:
            return frame(payload, opcode == OP_BINARY)
        return bytes((0x80 | opcode, len(payload))) + payload

    def _closed(self) -> bool:
        return self.state is WSState.CLOSED

    def _move(self, event: Event) -> None:
        self.state = TRANSITIONS.get((self.state, event), self.state)

    def _violation(self, exc: FrameError) -> None:
        self._end_pongs()  # the pings before the violation are answered first
        if self.state is WSState.OPEN:
            self._out += self._frame(OP_CLOSE, close_payload(exc.code, exc.reason))
        self._move(Event.VIOLATION)
        self.failure = exc
        self.close_code = exc.code
        self.close_reason = exc.reason
        self._buffer = b""
        self._fragments = None
        self._compressed = False
        self._utf8 = None

    def _parse(
        self,
        data: bytes | bytearray,
        pos: int,
        messages: list[bytes],
        max_messages: int | None,
        max_frames: int | None,
    ) -> int:
        """Handle the complete frames of ``data`` from ``pos`` on, within the budgets.

        Returns where parsing stopped; when a budget stopped it, that is also
        `_pos` (else what is left is at most the start of one frame).
        """
        size = len(data)
        masked = 0 if self._client else 0x80
        grown = type(data) is bytearray  # a long frame's reads (its payload sliced is one)
        max_size = self._max_size
        frames = -1 if max_frames is None else max_frames
        if max_messages is None:
            max_messages = -1
        elif max_messages <= 0:
            if pos < size:
                self._pos = pos
            return pos
        while size - pos >= 2:
            if not frames:
                self._pos = pos
                return pos
            frames -= 1
            b0, b1 = data[pos], data[pos + 1]
            opcode = b0 & 0x0F
            rsv = b0 & 0x70
            if rsv and (rsv != 0x40 or self._inflate is None or opcode not in _DATA):
                raise FrameError(PROTOCOL_ERROR, "reserved bits set")
            if opcode not in _KNOWN:
                raise FrameError(PROTOCOL_ERROR, f"unknown opcode {opcode}")
            if b1 & 0x80 != masked:
                raise FrameError(PROTOCOL_ERROR, "client frames must be masked"
                                 if masked else "server frames must not be masked")  # fmt: skip
            n = b1 & 0x7F
            head = 2
            if n == 126:
                if size - pos < 4:
                    break
                n = int.from_bytes(data[pos + 2 : pos + 4], "big")
                head = 4
            elif n == 127:
                if size - pos < 10:
                    break
                n = int.from_bytes(data[pos + 2 : pos + 10], "big")
                head = 10
            if opcode >= OP_CLOSE and (n > 125 or not b0 & 0x80):
                raise FrameError(PROTOCOL_ERROR, "control frames are short and unfragmented")
            if n > max_size:
                raise FrameError(TOO_BIG, f"frame over {max_size} bytes")
            mask: bytes | bytearray = b""
            if masked:
                mask = data[pos + head : pos + head + 4]
                head += 4
            end = pos + head + n
            if end > size:  # the frame waits for the rest: first, whether it may
                fragments = self._fragments
                if opcode == OP_CONT and fragments is not None and len(fragments) + n > max_size:
                    raise FrameError(TOO_BIG, f"message over {max_size} bytes")
                if size - pos > head and not rsv:
                    self._check_partial(opcode, data, pos + head, size, mask)
                break
            payload: bytes
            if masked:
                payload = unmask(mask, data[pos + head : end])
            elif grown:
                payload = bytes(data[pos + head : end])
            else:
                payload = data[pos + head : end]  # type: ignore[assignment]  # bytes: not grown
            pos = end
            if opcode >= OP_CLOSE:
                self._control(opcode, payload)
                if self.state is WSState.CLOSED:
                    return pos
            else:
                message = self._data(opcode, bool(b0 & 0x80), payload, bool(rsv))
                if message is not None:
                    self._run = 0
                    if self.state is WSState.OPEN:
                        messages.append(message)
                        if len(messages) == max_messages and pos < size:
                            self._pos = pos
                            return pos
        return pos

    def _check_partial(
        self, opcode: int, data: bytes | bytearray, start: int, end: int, mask: bytes | bytearray
    ) -> None:
        """Check the UTF-8 of a text frame's payload as far as it has arrived."""
        if self._fragments is None:
            text = opcode == OP_TEXT
        else:
            text = opcode == OP_CONT and self._text and not self._compressed
        if not text or start + self._checked >= end:
            return
        chunk = data[start + self._checked : end]
        if mask:
            k = self._checked % 4
            chunk = unmask(mask[k:] + mask[:k], chunk)
        decoder = self._utf8
        if decoder is None:
            decoder = self._utf8 = _utf8_decoder()
        self._checked += len(chunk)
        _decode(decoder, chunk, final=False)

    def _data(self, opcode: int, fin: bool, payload: bytes, compressed: bool) -> bytes | None:
        checked, self._checked = self._checked, 0
        fragments = self._fragments
        if opcode == OP_CONT:
            if fragments is None:
                raise FrameError(PROTOCOL_ERROR, "continuation frame without a message")
            if not payload and not fin:  # a no-op, as cheap to send as a ping: counted as one
                self._count()
                return None
            if len(fragments) + len(payload) > self._max_size:  # come whole, unchecked yet
                raise FrameError(TOO_BIG, f"message over {self._max_size} bytes")
            fragments += payload
        elif fragments is not None:
            raise FrameError(PROTOCOL_ERROR, "new message inside a fragmented one")
        else:
            self._text = opcode == OP_TEXT
            if fin:  # the common case: one frame, one message
                decoder, self._utf8 = self._utf8, None
                if compressed and self._inflate is not None:
                    payload = self._inflate(payload, self._max_size)
                if self._text and not payload.isascii():
                    if decoder is None:
                        _check_utf8(payload)
                    else:
                        _decode(decoder, payload[checked:], final=True)
                return payload
            self._fragments = fragments = bytearray(payload)
            self._compressed = compressed
        if self._compressed:
            if not fin:
                return None
            self._fragments = None
            self._compressed = False
            assert self._inflate is not None
            message = self._inflate(bytes(fragments), self._max_size)
            if self._text and not message.isascii():
                _check_utf8(message)
            return message
        if self._text:
            decoder = self._utf8
            if decoder is None:
                decoder = self._utf8 = _utf8_decoder()
            _decode(decoder, payload[checked:], final=fin)
        if not fin:
            return None
        self._fragments = None
        self._utf8 = None
        return bytes(fragments)

    def _control(self, opcode: int, payload: bytes) -> None:
        if opcode == OP_CLOSE:  # never counted: the closing handshake always works
            code, reason = _parse_close(payload)
            if self.state is WSState.OPEN:
                self._end_pongs()  # a ping before the close is answered before it
                self.close_code, self.close_reason = code, reason
                reply = b"" if code == _NO_STATUS else code.to_bytes(2, "big")
                self._out += self._frame(OP_CLOSE, reply)
            self._move(Event.CLOSE_RECEIVED)
            self._buffer = b""
            return
        self._count()
        if opcode == OP_PING and self.state is WSState.OPEN:
            pongs = self._pongs
            if pongs < MAX_PONGS - 1:
                self._pongs = pongs + 1
                self._out += self._frame(OP_PONG, payload)
            else:  # answered once this receive's frames are read, if no later ping replaces it
                self._pongs = MAX_PONGS
                self._pong = payload

    def _count(self) -> None:
        """One more frame in the peer's run of frames that carry nothing (`MAX_CONTROL_RUN`)."""
        run = self._run + 1
        if run > MAX_CONTROL_RUN:
            raise FrameError(
                POLICY_VIOLATION,
                f"over {MAX_CONTROL_RUN} control or empty frames without a message",
            )
        self._run = run

    def _end_pongs(self) -> None:
        """Queue the pong held for this receive's last ping, if any; the next call starts at 0."""
        self._pongs = 0
        pong = self._pong
        if pong is not None:
            self._pong = None
            self._out += self._frame(OP_PONG, pong)


def _decode(decoder: codecs.IncrementalDecoder, data: bytes | bytearray, final: bool) -> None:
    try:
        decoder.decode(data, final)
    except UnicodeDecodeError as exc:
        raise FrameError(INVALID_DATA, "invalid UTF-8 in a text message") from exc
    if not final:
        # Python's decoder holds ED A0..ED BF back (for its surrogatepass handler):
        # the start of a UTF-16 surrogate, which no byte after it can make valid.
        pending = decoder.getstate()[0]
        if len(pending) > 1 and pending[0] == 0xED and pending[1] >= 0xA0:
            raise FrameError(INVALID_DATA, "invalid UTF-8 in a text message")


def _check_utf8(data: bytes) -> None:
    try:
        data.decode()
    except UnicodeDecodeError as exc:
        raise FrameError(INVALID_DATA, "invalid UTF-8 in a text message") from exc


def _parse_close(payload: bytes) -> tuple[int, str]:
    """The code and reason of a close frame's payload (1005 when it has none)."""
    if not payload:
        return _NO_STATUS, ""
    if len(payload) == 1:
        raise FrameError(PROTOCOL_ERROR, "close frame of one byte")
    code = int.from_bytes(payload[:2], "big")
    if not receivable(code):
        raise FrameError(PROTOCOL_ERROR, f"close code {code} may not be sent")
    try:
        reason = payload[2:].decode()
    except UnicodeDecodeError:
        raise FrameError(INVALID_DATA, "invalid UTF-8 in a close reason") from None
    return code, reason
