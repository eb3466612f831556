"""bench/instantcore.py answers as the core does, so the gateway in front of it takes the
path it takes in front of the real core (bench/proxylatency.py ``--instant-core``).

Were its answers of another shape, the gateway would read them with `ResponseReader`
and write them anew, and the bench would measure a path the real core never causes.
"""

from __future__ import annotations

import asyncio

from bench import instantcore
from gateway.passthrough import Verbatim, VerbatimReader
from tests.servers import UNIT, connect_once_listening, free_port


async def test_each_request_gets_an_answer_the_gateway_passes_on_verbatim() -> None:
    port = free_port()
    body = instantcore.body_of(15000)
    server = asyncio.create_task(instantcore._serve(port, body))
    try:
        reader, writer = await connect_once_listening(port)
        ids = ["first-id", "0123456789abcdef"]
        heads = [
            f"GET /api/projects?limit=20 HTTP/1.1\r\nHost: x\r\nX-Request-Id: {rid}\r\n\r\n"
            for rid in ids
        ]
        writer.write("".join(heads).encode())  # two at once: answered in order
        for rid in ids:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5 * UNIT)
            length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
            answer = head + await asyncio.wait_for(reader.readexactly(length), 5 * UNIT)
            passed = VerbatimReader(rid).feed(answer)
            assert isinstance(passed, Verbatim) and passed.status == 200
            assert answer.endswith(body)
        writer.close()
        await writer.wait_closed()
    finally:
        server.cancel()
        await asyncio.gather(server, return_exceptions=True)


def test_the_page_is_json_of_about_the_size_asked() -> None:
    import json

    page = instantcore.body_of(15000)
    assert 15000 <= len(page) < 15200
    assert len(json.loads(page)["items"]) > 20
