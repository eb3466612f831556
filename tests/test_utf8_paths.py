"""Invalid UTF-8, by every way in, reaches no subscriber and disconnects none.

The subscribers are the `websockets` library (a strict RFC 6455 client: a text
frame that is not UTF-8 makes it fail its own connection with 1007), in both
codecs, on a gateway with a real Redis broker and history. The attacker tries
each entry path in turn: a JSON text frame, a binary frame on a JSON socket, a
msgpack string, HTTP publishing, a backend's plain PUBLISH and a history entry
written straight into Redis. Afterwards the subscribers receive the next
publication, live and recovered from history, on the connections they had.
"""

from __future__ import annotations

import asyncio
import base64
import json

import msgspec
import redis.asyncio as aioredis
from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from core.infra.broker import RedisBroker
from gateway.loadtest.handshake import handshake_request
from gateway.loadtest.wsclient import client_frame
from proto import ErrorCode
from tests.harness import running_gateway, token_for, unique_prefix, ws_client
from tests.servers import UNIT

BAD = (b"\xed\xa0\x80", b"\xff", b"\xc0\xaf", b"\xf4\x90\x80\x80")


async def _raw_json_text_pub(port: int, token: str, bad: bytes) -> int:
    """A JSON text frame whose data holds ``bad``: the attacker's own close code."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(handshake_request(f"127.0.0.1:{port}", "/ws", token))
        await reader.readuntil(b"\r\n\r\n")
        writer.write(client_frame(b'{"id":1,"op":"pub","ch":"room:1","data":"' + bad + b'"}'))
        async with asyncio.timeout(5 * UNIT):
            while True:
                head = await reader.readexactly(2)
                payload = await reader.readexactly(head[1] & 0x7F)
                if head[0] & 0x0F == 0x8:
                    return int.from_bytes(payload[:2], "big")
    finally:
        writer.close()


async def test_invalid_utf8_by_every_entry_path_reaches_no_one_and_disconnects_no_one(redis_url):
    prefix = unique_prefix()
    broker = RedisBroker(redis_url, prefix)
    redis = aioredis.Redis.from_url(redis_url)
    http = AsyncHTTPClient()
    async with running_gateway(broker, history_channels=("room:*",), history_size=100) as gw:
        token = token_for(gw, channels=("room:*",), pub=True)
        async with (
            ws_client(gw.port, token) as json_sub,
            ws_client(gw.port, token, msgpack=True) as mp_sub,
            ws_client(gw.port, token) as attacker,
            ws_client(gw.port, token, msgpack=True) as attacker_mp,
        ):
            for sub in (json_sub, mp_sub):
                assert (await sub.request("sub", ch="room:1"))["ok"]
            assert (await attacker.request("pub", ch="room:1", data="before"))["ok"]
            first = await json_sub.next_push(5 * UNIT)
            assert (await mp_sub.next_push(5 * UNIT))["data"] == "before"
            for bad in BAD:
                # 1. a JSON text frame: the attacker's own connection fails with 1007
                assert await _raw_json_text_pub(gw.port, token, bad) == 1007
                # 2. the same bytes in a binary frame on a JSON socket: an error reply
                await attacker.send_raw(b'{"id":9,"op":"pub","ch":"room:1","data":"' + bad + b'"}')
                reply = await attacker.recv(5 * UNIT)
                assert reply["error"]["code"] == ErrorCode.INVALID_DATA, reply
                # 3. a msgpack str that is not UTF-8
                raw = msgspec.msgpack.encode({"id": 9, "op": "pub", "ch": "room:1", "data": "x"})
                await attacker_mp.send_raw(raw.replace(b"\xa1x", bytes([0xA0 | len(bad)]) + bad))
                reply = await attacker_mp.recv(5 * UNIT)
                assert reply["error"]["code"] == ErrorCode.INVALID_DATA, reply
                # 4. HTTP publishing
                response = await http.fetch(
                    HTTPRequest(f"http://127.0.0.1:{gw.port}/api/publish", method="POST",
                                headers={"Authorization": f"Bearer {token}"},
                                body=b'{"ch":"room:1","data":"' + bad + b'"}'),
                    raise_error=False,
                )  # fmt: skip
                assert response.code in (400, 422), response.code
                assert "error" in json.loads(response.body)
                # 5. a backend's plain PUBLISH
                await redis.publish(f"{prefix}room:1", b'"' + bad + b'"')
            # 6. an entry written straight into the history stream, where recovery reads next
            stream = f"{prefix}h:{{room:1}}"
            await redis.hincrby(f"{prefix}m:{{room:1}}", "o", 1)  # as the script would
            await redis.xadd(stream, {"d": b'"\xed\xa0\x80"'}, id=f"{first['offset'] + 1}-1")
            # msgpack bin is carried, as base64, to JSON and msgpack subscribers alike
            assert (await attacker_mp.request("pub", ch="room:1", data=b"\xff\x00"))["ok"]
            assert (await attacker.request("pub", ch="room:1", data="after"))["ok"]
            for sub in (json_sub, mp_sub):
                got = [(await sub.next_push(5 * UNIT))["data"] for _ in range(2)]
                assert got == [base64.b64encode(b"\xff\x00").decode(), "after"], got
            # the same subscriber recovers from history on a new subscription: no poison in it
            async with ws_client(gw.port, token) as late:
                since = {"offset": first["offset"], "epoch": first["epoch"]}
                reply = await late.request("sub", ch="room:1", since=since)
                assert reply["ok"], reply
                recovered = [(await late.next_push(5 * UNIT))["data"] for _ in range(2)]
                assert recovered[-1] == "after"
                assert recovered[0] == base64.b64encode(b"\xff\x00").decode()
            # nobody was disconnected: both subscribers still answer
            for sub in (json_sub, mp_sub):
                assert (await sub.request("ping"))["ok"]
        metrics = (await http.fetch(f"http://127.0.0.1:{gw.port}/metrics")).body.decode()
        # the poison read from Redis was dropped where it came in: 4 live, 1 from history
        assert 'gateway_publications_dropped_total{source="live"} 4.0' in metrics
        assert 'gateway_publications_dropped_total{source="history"} 1.0' in metrics
    await redis.aclose()
    http.close()
