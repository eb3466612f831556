"""Load clients for the HTTP transports: Server-Sent Events and long-poll.

Both count publications into the process's `Tally` exactly as the socket
client does (`gateway.loadtest.wsclient`), so the report reads the same
whichever transport was loaded.
"""

from __future__ import annotations

import asyncio
import time
from urllib.parse import quote

import msgspec

from gateway.client.encoding import JSON
from gateway.loadtest.ledger import Ledger
from gateway.loadtest.sources import connected
from gateway.loadtest.stats import Tally
from gateway.loadtest.stream import Owner, StreamClient
from gateway.loadtest.wsclient import parse_push
from proto import Sub

__all__ = ["SSEClient", "longpoll_client", "sse_request"]


def sse_request(host: str, channels: list[str], token: str | None) -> bytes:
    query = "&".join(f"ch={quote(ch)}" for ch in channels)
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return (
        f"GET /sse?{query} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n{auth}\r\n"
    ).encode()


_LAST_ID = b"Last-Event-ID: "


class SSEClient(StreamClient):
    """One ``EventSource``-like stream: headers, then chunked events.

    Like a browser's, it remembers the ``id:`` of the last event that had
    one and sends it as ``Last-Event-ID`` when it reconnects (`renew`).
    """

    __slots__ = ("body", "chunk", "last_id")

    def __init__(
        self,
        request: bytes,
        channels: list[str],
        tally: Tally,
        done: asyncio.Future[bool],
        ledger: Ledger,
        owner: Owner | None = None,
    ) -> None:
        super().__init__(request, channels, tally, done, ledger, owner)
        self.body = b""  # de-chunked bytes not yet split into events
        self.chunk = 0  # bytes left in the current chunk (self.buffer: not yet de-chunked)
        self.last_id = b""

    def renew(self, request: bytes, done: asyncio.Future[bool]) -> None:
        cut = request.find(b"\r\n" + _LAST_ID)
        if cut >= 0:  # the previous connection's
            request = request[:cut] + b"\r\n\r\n"
        if self.last_id:
            request = request[:-2] + _LAST_ID + self.last_id + b"\r\n\r\n"
        super().renew(request, done)
        self.body = b""
        self.chunk = 0

    def data_received(self, data: bytes) -> None:
        raw = self.buffer + data
        self.buffer = b""
        if not self.open:
            rest = self.head(raw, b"200")
            if rest is None:
                return
            raw = rest
        body = []
        while raw:
            if self.chunk == 0:
                line = raw.find(b"\r\n")
                if line < 0:
                    break
                if line == 0:  # the CRLF closing the previous chunk
                    raw = raw[2:]
                    continue
                self.chunk = int(raw[:line].split(b";")[0], 16)
                raw = raw[line + 2 :]
                if self.chunk == 0:  # the last chunk: the stream ended
                    self.close()
                    return
            take = raw[: self.chunk]
            body.append(take)
            self.chunk -= len(take)
            raw = raw[len(take) :]
        self.buffer = raw
        if body:
            self._events(b"".join(body))

    def _events(self, data: bytes) -> None:
        data = self.body + data
        *events, self.body = data.split(b"\n\n")
        for event in events:
            kind = b""
            payload = b""
            for line in event.split(b"\n"):
                if line.startswith(b"event: "):
                    kind = line[7:]
                elif line.startswith(b"data: "):
                    payload = line[6:]
                elif line.startswith(b"id: "):
                    self.last_id = line[4:]
            if kind == b"msg":
                push = parse_push(payload)
                if push is not None and push.data is not None:
                    d = push.data
                    self.tally.delivered(self.ledger, d.c, d.s, d.t, time.time())
                else:
                    self.tally.errors["unparsed event"] += 1
            elif kind == b"reply":
                reply = parse_push(payload)
                if reply is None:
                    self.tally.errors["unparsed event"] += 1
                    continue
                error = reply.error.code if reply.error is not None else "?"
                self.reply((reply.id or 0) - 1, reply.ok, error, reply.recovered, reply.offset,
                           reply.epoch)  # fmt: skip
            elif kind == b"close":
                self.tally.errors[f"close event {payload.decode('latin-1')}"] += 1
                close = parse_push(payload)
                if close is not None and close.code is not None:
                    self.code = close.code


async def _request(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    head: str,
    body: bytes = b"",
) -> tuple[int, bytes]:
    """One keep-alive HTTP/1.1 exchange; the gateway answers with Content-Length."""
    writer.write(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
    headers = await reader.readuntil(b"\r\n\r\n")
    status = int(headers[9:12])
    length = 0
    for line in headers.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line[15:])
    return status, await reader.readexactly(length)


class _Poll(msgspec.Struct):
    messages: list[msgspec.Raw] = []
    cursor: int = 0
    session: str | None = None


_decode_poll = msgspec.json.Decoder(_Poll).decode


async def longpoll_client(
    host: str,
    port: int,
    source: str | None,
    channels: list[str],
    token: str | None,
    tally: Tally,
    done: asyncio.Future[bool],
    ledger: Ledger,
) -> None:
    """One long-poll session: create, subscribe, then poll until cancelled."""
    started = time.monotonic()
    try:
        if source:
            sock = await connected(host, port, source)
            reader, writer = await asyncio.open_connection(sock=sock)
        else:
            reader, writer = await asyncio.open_connection(host, port)
    except OSError as exc:
        tally.errors[type(exc).__name__] += 1
        done.set_result(False)
        return
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    head = "{} {} HTTP/1.1\r\nHost: " + host + "\r\n" + auth + "Content-Type: application/json\r\n"
    try:
        status, body = await _request(reader, writer, head.format("POST", "/lp"))
        if status != 201:
            raise _Refused(f"HTTP {status}")
        sid = _decode_poll(body).session
        tally.opened += 1
        tally.connect_seconds.add(time.monotonic() - started)
        subs = b",".join(JSON.command(Sub(id=i, ch=ch)) for i, ch in enumerate(channels, 1))
        status, _ = await _request(
            reader, writer, head.format("POST", f"/lp/{sid}"), b"[" + subs + b"]"
        )
        if status != 202:
            raise _Refused(f"HTTP {status}")
        cursor = 0
        replies = 0
        while True:
            status, body = await _request(
                reader, writer, head.format("GET", f"/lp/{sid}?cursor={cursor}")
            )
            if status != 200:
                tally.closed += 1
                raise _Refused(f"HTTP {status}")
            poll = _decode_poll(body)
            cursor = poll.cursor
            now = time.time()
            for raw in poll.messages:
                push = parse_push(bytes(raw))
                if push is None:
                    tally.errors["unparsed message"] += 1
                elif push.data is not None:
                    tally.delivered(ledger, push.data.c, push.data.s, push.data.t, now)
                elif push.id is not None:
                    replies += 1
                    if replies == len(channels) and not done.done():
                        tally.subscribed += 1
                        done.set_result(True)
    except _Refused as exc:
        tally.errors[str(exc)] += 1
    except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
        tally.errors[type(exc).__name__] += 1
    finally:
        writer.close()
        if not done.done():
            done.set_result(False)


class _Refused(Exception):
    pass
