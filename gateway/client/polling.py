"""The long-poll fallback: a `/lp` session with the socket transport's interface.

Where a proxy or a network lets plain HTTP through but not WebSocket
upgrades, the client carries the same frames over the gateway's long-poll
endpoint (docs/protocol.md): ``POST /lp`` makes a session, ``POST
/lp/<id>`` sends commands, and one ``GET /lp/<id>?cursor=N`` at a time
brings replies and pushes, which go to ``on_message`` exactly as socket
messages would. A ``410`` ends it with the session's close code; a network
failure ends it with 1006, and the client reconnects as it would after a
dropped socket. JSON only (the long-poll endpoint speaks JSON).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import msgspec
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest, HTTPResponse

from gateway.client.exceptions import ConnectionClosed, HandshakeError
from gateway.client.transport import Closed, OnMessage

__all__ = ["LongPoll", "http_base", "open_longpoll"]

_ABNORMAL = 1006
_POLL_MARGIN = 15.0  # seconds beyond the server's LONGPOLL_TIMEOUT (25 s) before a poll is given up


class _Poll(msgspec.Struct):
    messages: list[msgspec.Raw] = []
    cursor: int = 0
    session: str | None = None
    close: dict[str, Any] | None = None
    token: str | None = None  # a session admitted without a token: its own secret


_decode = msgspec.json.Decoder(_Poll).decode


def http_base(url: str) -> str:
    """``ws://host:port/ws`` -> ``http://host:port``."""
    parts = urlsplit(url)
    scheme = "https" if parts.scheme in ("wss", "https") else "http"
    return urlunsplit((scheme, parts.netloc, "", "", ""))


class LongPoll:
    """One long-poll session; ``send``, ``close``, ``closed`` as on `WebSocket`."""

    def __init__(self, base: str, sid: str, headers: dict[str, str], on_message: OnMessage) -> None:
        self.closed: asyncio.Future[Closed] = asyncio.get_running_loop().create_future()
        self._base = f"{base}/lp/{sid}"
        self._headers = headers
        self._on_message = on_message
        self._http = AsyncHTTPClient(force_instance=True)
        self._reading = asyncio.Event()
        self._reading.set()
        self._task = asyncio.create_task(self._poll())

    async def _poll(self) -> None:
        cursor = 0
        while True:
            await self._reading.wait()
            try:
                resp = await self._fetch(f"{self._base}?cursor={cursor}", "GET")
                poll = _decode(resp.body)
            except (OSError, HTTPClientError, msgspec.DecodeError) as exc:
                self._end(Closed(_ABNORMAL, str(exc)))
                return
            cursor = poll.cursor
            for message in poll.messages:
                if self.closed.done():
                    return  # aborted by the client: the rest is dropped with the session
                self._on_message(bytes(message))
            if resp.code == 410:
                code = int((poll.close or {}).get("code", _ABNORMAL))
                self._end(Closed(code, "long-poll session closed"))
                return

    async def _fetch(self, url: str, method: str, body: bytes | None = None) -> HTTPResponse:
        request = HTTPRequest(url, method, headers=self._headers, body=body,
                              request_timeout=25.0 + _POLL_MARGIN)  # fmt: skip
        resp = await self._http.fetch(request, raise_error=False)
        if resp.code == 599 or resp.code >= 500 or resp.code in (401, 404):
            raise HTTPClientError(resp.code, message=str(resp.error or resp.reason), response=resp)
        return resp

    def _end(self, closed: Closed) -> None:
        if not self.closed.done():
            self.closed.set_result(closed)
        self._http.close()

    async def send(self, payload: bytes, binary: bool) -> None:
        if self.closed.done():
            raise ConnectionClosed(*self.closed.result())
        try:
            resp = await self._fetch(self._base, "POST", b"[" + payload + b"]")
        except (OSError, HTTPClientError) as exc:
            self._task.cancel()
            self._end(Closed(_ABNORMAL, str(exc)))
            raise ConnectionClosed(_ABNORMAL, str(exc)) from None
        if resp.code == 410:
            raise ConnectionClosed(*(await self.closed))

    async def close(self, code: int = 1000, reason: str = "") -> Closed:
        """Stop polling; the server lets the session expire (LONGPOLL_IDLE)."""
        self._task.cancel()
        self._end(Closed(code, reason))
        return await self.closed

    def abort(self) -> None:
        self._task.cancel()
        self._end(Closed(_ABNORMAL, "aborted"))

    def pause_reading(self) -> None:
        self._reading.clear()

    def resume_reading(self) -> None:
        self._reading.set()


async def open_longpoll(
    url: str, token: str | None, on_message: OnMessage, extra: Mapping[str, str] | None = None
) -> LongPoll:
    """Make a session on the gateway of ``url`` (its ``/ws`` address is fine).

    ``extra``: headers for the request that makes it (a ``Cookie``); a session
    admitted without a token carries the secret the gateway gives it after that.
    """
    base = http_base(url)
    headers = {**(extra or {}), "Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    http = AsyncHTTPClient(force_instance=True)
    try:
        resp = await http.fetch(HTTPRequest(f"{base}/lp", "POST", headers=headers, body=b""),
                                raise_error=False)  # fmt: skip
    finally:
        http.close()
    if resp.code == 599:
        raise OSError(f"cannot reach {base}: {resp.error}")
    if resp.code != 201:
        raise HandshakeError.refused(resp.code, resp.body or b"", resp.headers.get("Retry-After"))
    opened = _decode(resp.body)
    sid = opened.session
    assert sid is not None
    if opened.token is not None:  # its own secret: the cookie alone opens no session's polls
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {opened.token}"}
    return LongPoll(base, sid, headers, on_message)
