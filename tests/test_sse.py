"""Server-Sent Events: the socket's session over an event stream, with Last-Event-ID recovery."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
from collections.abc import AsyncIterator
from urllib.parse import urlencode

from gateway.loadtest.wsclient import client_frame
from gateway.transport.sse import decode_positions, encode_positions
from tests.harness import running_gateway, token_for, until
from tests.servers import UNIT
from tests.test_wsconn import raw_socket

FEED = {"history_channels": ("feed:*",), "history_size": 50}


class EventStream:
    """A raw HTTP/1.0 reader of one event stream (no chunking to undo)."""

    def __init__(self, reader: asyncio.StreamReader, status: int) -> None:
        self.reader = reader
        self.status = status

    async def next(self, timeout: float = 3 * UNIT) -> dict[str, str]:
        event: dict[str, str] = {}
        async with asyncio.timeout(timeout):
            while True:
                line = (await self.reader.readline()).decode().rstrip("\n")
                if not line:
                    if event:
                        return event
                    if self.reader.at_eof():
                        raise EOFError
                    continue
                if line.startswith(":"):
                    continue  # a keep-alive comment
                field, _, value = line.partition(": ")
                event[field] = value

    async def next_of(self, name: str) -> dict[str, str]:
        while True:
            event = await self.next()
            if event.get("event") == name:
                return event


def eventsource_events(text: str) -> list[dict[str, str]]:
    """The events an ``EventSource`` dispatches from ``text`` (the HTML standard's parsing).

    Lines end at CR, LF or CRLF; ``data`` lines are joined with LF; an empty
    line dispatches the event, if it has data. The last, unfinished line is left.
    """
    events: list[dict[str, str]] = []
    event: dict[str, str] = {}
    data: list[str] = []
    for line in re.split(r"\r\n|\r|\n", text)[:-1]:
        if not line:
            if data:
                events.append({**event, "data": "\n".join(data)})
            event, data = {}, []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "data":
            data.append(value)
        else:
            event[field] = value
    return events


@contextlib.asynccontextmanager
async def sse(port: int, token: str | None, channels: list[str], last_id: str | None = None
              ) -> AsyncIterator[EventStream]:  # fmt: skip
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    headers = f"Authorization: Bearer {token}\r\n" if token else ""
    if last_id:
        headers += f"Last-Event-ID: {last_id}\r\n"
    query = urlencode([("ch", c) for c in channels])
    writer.write(f"GET /sse?{query} HTTP/1.0\r\nHost: test\r\n{headers}\r\n".encode())
    status = int((await reader.readline()).split()[1])
    while (await reader.readline()) not in (b"\r\n", b""):
        pass
    try:
        yield EventStream(reader, status)
    finally:
        writer.close()


async def test_events_carry_replies_publications_and_positions():
    async with running_gateway(**FEED) as gw:
        token = token_for(gw, channels=("feed:*", "room:*"))
        async with sse(gw.port, token, ["feed:1", "room:1"]) as s:
            assert s.status == 200
            replies = [json.loads((await s.next_of("reply"))["data"]) for _ in range(2)]
            assert [r["ok"] for r in replies] == [True, True]
            await gw.ctx.node.publish("feed:1", b'{"n":1}')
            await gw.ctx.node.publish("room:1", b'{"plain":true}')
            first, second = await s.next_of("msg"), await s.next_of("msg")
        assert json.loads(first["data"])["data"] == {"n": 1} and first["id"]
        assert json.loads(second["data"]) == {"op": "msg", "ch": "room:1", "data": {"plain": True}}
        assert "id" not in second


async def test_last_event_id_recovers_what_was_missed():
    async with running_gateway(**FEED) as gw:
        token = token_for(gw, channels=("feed:*",))
        async with sse(gw.port, token, ["feed:a", "feed:b"]) as s:
            await s.next_of("reply")
            await s.next_of("reply")
            await gw.ctx.node.publish("feed:a", b'{"n":1}')
            await gw.ctx.node.publish("feed:b", b'{"n":1}')
            await s.next_of("msg")
            last_id = (await s.next_of("msg"))["id"]
        for ch, n in (("feed:a", 2), ("feed:b", 2), ("feed:a", 3)):  # while away
            await gw.ctx.node.publish(ch, b'{"n":%d}' % n)
        async with sse(gw.port, token, ["feed:a", "feed:b"], last_id) as s:
            events = [await s.next() for _ in range(5)]  # 2 replies, 3 recovered
        replies = [json.loads(e["data"]) for e in events if e["event"] == "reply"]
        assert [r["recovered"] for r in replies] == [True, True]
        got = [json.loads(e["data"]) for e in events if e["event"] == "msg"]
        assert [(m["ch"], m["data"]["n"]) for m in got] == [
            ("feed:a", 2), ("feed:a", 3), ("feed:b", 2)
        ]  # fmt: skip


async def test_a_channel_quiet_since_the_stream_opened_is_recovered_from_last_event_id():
    """The reply's position is in the event id: a channel with no msg yet is not resubscribed
    afresh after a reconnect, losing what it missed meanwhile without a word."""
    async with running_gateway(**FEED) as gw:
        token = token_for(gw, channels=("feed:*",))
        await gw.ctx.node.publish("feed:b", b'{"n":1}')  # it stands somewhere before the stream
        async with sse(gw.port, token, ["feed:a", "feed:b"]) as s:
            await s.next_of("reply")
            await s.next_of("reply")
            await gw.ctx.node.publish("feed:a", b'{"n":1}')
            last_id = (await s.next_of("msg"))["id"]  # feed:b had nothing since the stream opened
        await gw.ctx.node.publish("feed:b", b'{"n":2}')  # while away
        async with sse(gw.port, token, ["feed:a", "feed:b"], last_id) as s:
            replies = [json.loads((await s.next_of("reply"))["data"]) for _ in range(2)]
            assert [r.get("recovered") for r in replies] == [True, True], replies
            got = json.loads((await s.next_of("msg"))["data"])
        assert (got["ch"], got["data"]) == ("feed:b", {"n": 2})


async def _two_missed(gw, s: EventStream, monkeypatch) -> None:
    """``n`` 1 on ``feed:5`` read, then 2 and 3 kept in history while the broker link is down."""
    await gw.ctx.node.publish("feed:5", b'{"n":1}')
    await s.next_of("msg")
    monkeypatch.setattr(gw.ctx.node.broker, "_send", lambda *args: None)
    await gw.ctx.node.publish("feed:5", b'{"n":2}')
    await gw.ctx.node.publish("feed:5", b'{"n":3}')
    monkeypatch.undo()


async def test_a_gap_is_filled_from_history_for_a_stream_that_cannot_ask(monkeypatch):
    """A stream cannot page ``history``: the gateway fills a gap itself, and sends ``gap``
    only where the history cannot (here a channel without one)."""
    async with running_gateway(**FEED) as gw:
        token = token_for(gw, channels=("feed:*", "room:*"))
        async with sse(gw.port, token, ["feed:5", "room:5"]) as s:
            await s.next_of("reply")
            await s.next_of("reply")
            await _two_missed(gw, s, monkeypatch)
            for member in gw.hub.connections:  # the link is back: a gap on each channel
                member.gap("feed:5")
                member.gap("room:5")
            await gw.ctx.node.publish("feed:5", b'{"n":4}')
            events = [await s.next() for _ in range(4)]
        got = [(e["event"], json.loads(e["data"]).get("data") or json.loads(e["data"])["ch"])
               for e in events]  # fmt: skip
        assert got == [("gap", "room:5"), ("msg", {"n": 2}), ("msg", {"n": 3}), ("msg", {"n": 4})]


async def test_a_gap_noticed_at_the_next_publication_is_filled_before_it(monkeypatch):
    """Nothing told of the lost link: the gateway notices the offsets jump and sends the gap
    just before the publication that jumped; the repair must hold that one back, not let it
    carry the stream past the hole (then read from there, and find nothing missing)."""
    async with running_gateway(**FEED) as gw:
        token = token_for(gw, channels=("feed:*",))
        async with sse(gw.port, token, ["feed:5"]) as s:
            await s.next_of("reply")
            await _two_missed(gw, s, monkeypatch)
            await gw.ctx.node.publish("feed:5", b'{"n":4}')
            events = [await s.next() for _ in range(3)]
        got = [(e["event"], json.loads(e["data"]).get("data")) for e in events]
        assert got == [("msg", {"n": 2}), ("msg", {"n": 3}), ("msg", {"n": 4})]


async def test_refusals_are_plain_http():
    async with running_gateway(**FEED) as gw:
        async with sse(gw.port, None, ["feed:1"]) as s:
            assert s.status == 401
        async with sse(gw.port, token_for(gw), []) as s:
            assert s.status == 400
        async with sse(gw.port, token_for(gw, channels=("feed:*",)), ["admin:1"]) as s:
            reply = json.loads((await s.next_of("reply"))["data"])
            assert reply["ok"] is False and reply["error"]["code"] == 103


async def test_a_subscription_that_cannot_be_made_ends_the_stream_with_4004():
    """Never a silent open stream: EventSource (and gateway.js) reconnect with backoff."""
    from core.infra.broker import BrokerUnavailable, MemoryBroker

    class Down(MemoryBroker):
        async def subscribe(self, ch: str) -> None:
            if ch == "room:down":
                raise BrokerUnavailable("Redis is not connected")
            await super().subscribe(ch)

    async with running_gateway(Down()) as gw:
        token = token_for(gw)
        async with sse(gw.port, token, ["room:up", "room:down"]) as s:
            replies = [json.loads((await s.next_of("reply"))["data"]) for _ in range(2)]
            assert [r["ok"] for r in replies] == [True, False]
            assert replies[1]["error"] == {
                "code": 110,
                "message": "service unavailable, retry later",
                "temporary": True,
            }
            retry = await s.next()
            assert 1000 <= int(retry["retry"]) <= 5000
            assert json.loads((await s.next_of("close"))["data"]) == {"code": 4004}
            with contextlib.suppress(EOFError):
                await s.next()
                raise AssertionError("the stream went on after its close event")
        assert gw.hub.connection_count() == 0 and not gw.hub.has_subscribers("room:up")


async def test_publications_with_line_breaks_between_tokens_arrive_whole():
    """JSON may break lines between tokens; each line is a data: line, which EventSource joins."""
    async with running_gateway() as gw:
        token = token_for(gw)
        async with sse(gw.port, token, ["room:1"]) as s:
            assert s.status == 200
            received = b""

            async def events_until(last: str) -> list[dict[str, str]]:
                nonlocal received
                async with asyncio.timeout(3 * UNIT):
                    while not any(last in e["data"] for e in eventsource_events(received.decode())):
                        chunk = await s.reader.read(65536)
                        assert chunk, "the stream ended"
                        received += chunk
                return eventsource_events(received.decode())

            await events_until('"ok":true')  # the reply: subscribed
            async with raw_socket(gw, token) as ws:
                ws.send(
                    client_frame(b'{"op":"pub","ch":"room:1","id":1,"data":{"a":\n\n1,"b":\r2}}')
                )
                ws.send(client_frame(b'{"op":"pub","ch":"room:1","id":2,"data":{"last":true}}'))
                assert [await ws.json() for _ in range(2)] == [
                    {"id": 1, "ok": True}, {"id": 2, "ok": True}
                ]  # fmt: skip
                events = await events_until('"last"')
    msgs = [json.loads(e["data"]) for e in events if e.get("event") == "msg"]
    assert [m["data"] for m in msgs] == [{"a": 1, "b": 2}, {"last": True}]


async def test_a_full_process_refuses_new_streams_with_503_as_it_refuses_sockets():
    async with running_gateway(max_connections=2) as gw:
        token = token_for(gw)
        async with sse(gw.port, token, ["room:1"]) as a, sse(gw.port, token, ["room:2"]) as b:
            assert (a.status, b.status) == (200, 200)
            await a.next_of("reply")
            await b.next_of("reply")
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            writer.write(
                f"GET /sse?ch=room:3 HTTP/1.0\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
            )
            try:
                async with asyncio.timeout(3 * UNIT):
                    head = await reader.readuntil(b"\r\n\r\n")
                    assert head.startswith(b"HTTP/1.1 503") and b"\r\nRetry-After: 1\r\n" in head
                    assert json.loads(await reader.read())["error"]["code"] == "unavailable"
            finally:
                writer.close()
        assert gw.ctx.metrics.handshake_failures.labels("capacity")._value.get() == 1


async def test_an_event_id_holds_only_the_streams_own_positions():
    """Positions of other channels in Last-Event-ID are dropped, not carried in every id after."""
    junk = {f"feed:other{i}": (i, "9f3ac2d1") for i in range(600)}
    async with running_gateway(**FEED) as gw:
        token = token_for(gw, channels=("feed:*",))
        async with sse(gw.port, token, ["feed:a"], encode_positions(junk)) as s:
            await s.next_of("reply")
            await gw.ctx.node.publish("feed:a", b'{"n":1}')
            event = await s.next_of("msg")
    assert set(decode_positions(event["id"])) == {"feed:a"}


def _silent_stream(port: int, token: str, ch: str) -> socket.socket:
    """An event stream whose client then reads nothing (a small receive window)."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port))
    s.sendall(
        f"GET /sse?ch={ch} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
    )
    return s


async def _publish_until_cut_off(gw, ch: str, streams: int) -> None:
    payload = b'{"x":"' + b"a" * 8000 + b'"}'
    for _ in range(4000):
        await gw.ctx.node.publish(ch, payload)
        await asyncio.sleep(0)
        if gw.ctx.metrics.slow_consumers._value.get() >= streams:
            return
    raise AssertionError("the streams were never cut off")


def _ended(s: socket.socket) -> bool:
    """Whether the gateway ended the connection: what it sent, then EOF or a reset."""
    s.settimeout(3 * UNIT)
    try:
        while s.recv(1 << 16):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        return False
    return True


async def test_a_slow_reader_is_cut_off_and_its_connection_ends_with_it():
    # Before, a cut-off stream left the hub (and the count of MAX_CONNECTIONS) but
    # kept its TCP connection, SEND_BUFFER_BYTES held for it, for as long as the
    # client said nothing: ~1 MiB a stream, without bound.
    async with running_gateway(send_buffer_bytes=128 << 10) as gw:
        s = _silent_stream(gw.port, token_for(gw), "room:1")
        try:
            await until(lambda: gw.ctx.node.hub.connection_count() == 1)
            await _publish_until_cut_off(gw, "room:1", 1)
            assert _ended(s)
            await until(lambda: gw.ctx.node.hub.connection_count() == 0)
        finally:
            s.close()


async def test_event_streams_backlogs_count_in_the_process_budget():
    # Before, only sockets counted in SEND_BUFFER_TOTAL_BYTES: four silent streams
    # held 14.5 MB against a 256 KiB budget, never cut off.
    budget = 256 << 10
    async with running_gateway(send_buffer_bytes=16 << 20, send_buffer_total_bytes=budget) as gw:
        held = [_silent_stream(gw.port, token_for(gw), "room:1") for _ in range(4)]
        try:
            await until(lambda: gw.ctx.node.hub.connection_count() == 4)
            await _publish_until_cut_off(gw, "room:1", 4)
            assert gw.ctx.coalescer.buffered > budget  # what the budget check saw
            assert all(_ended(s) for s in held)
        finally:
            for s in held:
                s.close()
