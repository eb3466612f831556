"""A raw WebSocket client for the conformance suite: frames built by hand.

Nothing here comes from the gateway or from `websockets`: the suite must not
share a parser with either server it judges. Frames are built bit by bit
(any opcode, reserved bits, FIN, mask or length encoding, valid or not) and
the server's frames are parsed with a deliberately small reader that records
what it sees instead of judging it. Compressed messages (RFC 7692) are made
and inflated with `zlib` directly, as the answer to the offer says: the
server's window, and whether it keeps its context between messages.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import socket
import zlib
from dataclasses import dataclass, field

__all__ = [
    "Event",
    "Inflater",
    "Recorder",
    "accept_for",
    "close_payload",
    "deflate",
    "extension_answer",
    "frame",
    "parse_server_frames",
    "read_head",
    "set_nodelay",
    "upgrade_request",
]

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    rsv: int = 0,
    masked: bool = True,
    length: int | None = None,
    key: bytes | None = None,
    wide: int = 0,
) -> bytes:
    """One client frame.

    ``length`` overrides the announced payload length, ``key`` the (random)
    masking key, and ``wide`` 1 or 2 announces a short length in the 16- or
    64-bit form.
    """
    n = len(payload) if length is None else length
    head = bytes(((0x80 if fin else 0) | (rsv & 7) << 4 | (opcode & 0x0F),))
    mask_bit = 0x80 if masked else 0
    if n < 126 and not wide:
        head += bytes((mask_bit | n,))
    elif n <= 0xFFFF and wide < 2:
        head += bytes((mask_bit | 126,)) + n.to_bytes(2, "big")
    else:
        head += bytes((mask_bit | 127,)) + n.to_bytes(8, "big")
    if not masked:
        return head + payload
    key = os.urandom(4) if key is None else key
    body = bytes(b ^ key[i & 3] for i, b in enumerate(payload))
    return head + key + body


def close_payload(code: int | None, reason: bytes = b"") -> bytes:
    return b"" if code is None else code.to_bytes(2, "big") + reason


def accept_for(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.encode() + _GUID).digest()).decode()


def upgrade_request(
    path: str,
    host: str,
    *,
    key: str | None = None,
    version: str | None = "13",
    method: str = "GET",
    http: str = "HTTP/1.1",
    upgrade: str | None = "websocket",
    connection: str | None = "Upgrade",
    extra: tuple[tuple[str, str], ...] = (),
    omit_host: bool = False,
) -> tuple[bytes, str]:
    """The bytes of an upgrade request and the key it carries."""
    key = base64.b64encode(os.urandom(16)).decode() if key is None else key
    lines = [f"{method} {path} {http}"]
    if not omit_host:
        lines.append(f"Host: {host}")
    if upgrade is not None:
        lines.append(f"Upgrade: {upgrade}")
    if connection is not None:
        lines.append(f"Connection: {connection}")
    if key:
        lines.append(f"Sec-WebSocket-Key: {key}")
    if version is not None:
        lines.append(f"Sec-WebSocket-Version: {version}")
    lines.extend(f"{name}: {value}" for name, value in extra)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"), key


async def read_head(
    reader: asyncio.StreamReader, limit: int = 65536
) -> tuple[int, dict[str, str], bytes]:
    """(status, headers with lower-case names, bytes read past the head).

    Status 0: the server closed the connection before a whole response head.
    """
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await reader.read(4096)
        if not chunk:
            return 0, {}, data
        data += chunk
        if len(data) > limit:
            raise ValueError("response head too large")
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    status = int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else -1
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, rest


_TAIL = b"\x00\x00\xff\xff"


def deflate(data: bytes, bits: int = 9) -> bytes:
    """One message as a client compresses it on its own (RFC 7692 §7.2.1), tail removed.

    A 512-byte window by default: valid whatever window the server allows.
    """
    z = zlib.compressobj(9, zlib.DEFLATED, -bits)
    out = z.compress(data) + z.flush(zlib.Z_SYNC_FLUSH)
    return out[:-4] if out.endswith(_TAIL) else out


def extension_answer(headers: dict[str, str]) -> dict[str, str | None] | None:
    """The parameters of the permessage-deflate the server agreed to; None if it declined."""
    value = headers.get("sec-websocket-extensions")
    if value is None:
        return None
    for offer in value.split(","):
        name, *params = (part.strip() for part in offer.split(";"))
        if name.lower() == "permessage-deflate":
            answer: dict[str, str | None] = {}
            for param in params:
                key, eq, val = param.partition("=")
                answer[key.strip()] = val.strip().strip('"') if eq else None
            return answer
    return None


class Inflater:
    """Inflates the server's compressed messages the way its answer says it compresses them."""

    def __init__(self, answer: dict[str, str | None]) -> None:
        bits = answer.get("server_max_window_bits")
        self.bits = int(bits) if bits else 15
        self.takeover = "server_no_context_takeover" not in answer
        self._z = zlib.decompressobj(-self.bits)

    def inflate(self, data: bytes) -> bytes:
        """Raises `zlib.error` when the message does not inflate under those rules."""
        if not self.takeover:
            self._z = zlib.decompressobj(-self.bits)
        return self._z.decompress(data + _TAIL)


def parse_server_frames(data: bytes) -> tuple[list[tuple[int, bool, bytes, bool]], int]:
    """The whole frames at the start of ``data`` and the bytes they take.

    Each is ``(opcode, fin, payload, wrong)``; ``wrong`` when no server may
    send it (masked, or reserved bits set). Nothing is judged beyond that.
    """
    frames, used = _server_frames(data)
    return [(op, fin, payload, wrong or rsv1) for op, fin, payload, wrong, rsv1 in frames], used


def _server_frames(data: bytes) -> tuple[list[tuple[int, bool, bytes, bool, bool]], int]:
    """As `parse_server_frames`, with RSV1 apart: ``(opcode, fin, payload, wrong, rsv1)``."""
    frames: list[tuple[int, bool, bytes, bool, bool]] = []
    pos = 0
    while len(data) - pos >= 2:
        b0, b1 = data[pos], data[pos + 1]
        n = b1 & 0x7F
        head = 2
        if n == 126:
            if len(data) - pos < 4:
                break
            n, head = int.from_bytes(data[pos + 2 : pos + 4], "big"), 4
        elif n == 127:
            if len(data) - pos < 10:
                break
            n, head = int.from_bytes(data[pos + 2 : pos + 10], "big"), 10
        if b1 & 0x80:
            head += 4
        end = pos + head + n
        if end > len(data):
            break
        frames.append(
            (
                b0 & 0x0F,
                bool(b0 & 0x80),
                data[pos + head : end],
                bool(b1 & 0x80 or b0 & 0x30),
                bool(b0 & 0x40),
            )
        )
        pos = end
    return frames, pos


@dataclass(frozen=True)
class Event:
    """What arrived from the server, and when (loop time).

    ``kind``: ``text`` / ``binary`` (a whole data message), ``ping``, ``pong``,
    ``close`` (``code`` 1005 when the frame had no payload), ``bad`` (a frame
    no server may send: masked, reserved bits, unknown opcode), ``eof``.
    """

    kind: str
    at: float
    payload: bytes = b""
    code: int | None = None


@dataclass
class Recorder:
    """Reads the server's frames off one connection into `events`."""

    reader: asyncio.StreamReader
    buffer: bytes = b""
    events: list[Event] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    inflater: Inflater | None = None  # permessage-deflate was agreed
    _message: list[bytes] | None = None
    _message_kind: str = ""
    _compressed: bool = False

    def data_count(self) -> int:
        return sum(1 for e in self.events if e.kind in ("text", "binary"))

    def first(self, kind: str) -> Event | None:
        return next((e for e in self.events if e.kind == kind), None)

    async def run(self) -> None:
        try:
            self._parse()
            while True:
                try:
                    chunk = await self.reader.read(65536)
                except (ConnectionError, OSError):
                    chunk = b""
                if not chunk:
                    self._add(Event("eof", asyncio.get_running_loop().time()))
                    return
                self.buffer += chunk
                self._parse()
        finally:
            self.changed.set()

    async def wait(self, until: float) -> bool:
        """Wait for a new event until loop time ``until``; False on timeout."""
        self.changed.clear()
        left = until - asyncio.get_running_loop().time()
        if left <= 0:
            return False
        try:
            await asyncio.wait_for(self.changed.wait(), left)
        except TimeoutError:
            return False
        return True

    def _add(self, event: Event) -> None:
        self.events.append(event)
        self.changed.set()

    def _parse(self) -> None:
        now = asyncio.get_running_loop().time()
        frames, used = _server_frames(self.buffer)
        self.buffer = self.buffer[used:]
        for opcode, fin, payload, wrong, rsv1 in frames:
            # RSV1 marks the first frame of a compressed message, once agreed (RFC 7692 §6).
            if wrong or (rsv1 and (self.inflater is None or opcode not in (1, 2))):
                self._add(Event("bad", now, payload))
            else:
                self._frame(opcode, fin, payload, now, rsv1)

    def _frame(self, opcode: int, fin: bool, payload: bytes, now: float, rsv1: bool) -> None:
        if opcode in (1, 2):
            if self._message is not None:
                self._add(Event("bad", now, payload))
                return
            self._message, self._message_kind = [payload], "text" if opcode == 1 else "binary"
            self._compressed = rsv1
        elif opcode == 0:
            if self._message is None:
                self._add(Event("bad", now, payload))
                return
            self._message.append(payload)
        elif opcode == 8:
            code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            self._add(Event("close", now, payload[2:], code))
            return
        elif opcode in (9, 10):
            self._add(Event("ping" if opcode == 9 else "pong", now, payload))
            return
        else:
            self._add(Event("bad", now, payload))
            return
        if fin and self._message is not None:
            message, self._message = b"".join(self._message), None
            if self._compressed and self.inflater is not None:
                try:
                    message = self.inflater.inflate(message)
                except zlib.error:
                    self._add(Event("bad", now, message))
                    return
            self._add(Event(self._message_kind, now, message))


def set_nodelay(writer: asyncio.StreamWriter) -> None:
    """Each write leaves as its own segment: chopped frames arrive chopped."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
