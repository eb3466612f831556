"""bench.chaos's clients over plain HTTP: an event stream and a long-poll session.

Each keeps the same account as a socket (`bench.chaos.Sock`: per channel,
delivered once, repaired, duplicated, reported or silently lost); only the
way it reaches the gateway, and resumes, differs:

* ``sse``: what a page's ``EventSource`` does by itself. ``GET /sse?ch=…``;
  when the stream ends (a gateway killed or drained, a ``close`` event, a
  stream cut), it comes back to the other gateway with the ``id:`` of the
  last event it got as ``Last-Event-ID``, and nothing else: the position the
  gateway gave it. A ``gap`` event, or a ``reply`` saying ``recovered:
  false``, is the gateway telling it of a loss (an event stream cannot ask
  ``history``); anything missed without one is silent.
* ``longpoll``: gateway.js's long-poll transport under its ``Gateway``.
  ``POST /lp``, the ``sub`` frames (``since`` the last position) in a
  ``POST /lp/<id>``, then one poll at a time with the cursor it was given.
  A poll that fails (the gateway gone, ``404``, ``5xx``) or a ``410`` ends
  the session: a new one on the other gateway, resubscribed with ``since``.
  A ``gap`` is repaired with ``history`` frames, as on a socket.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import aiohttp
import msgspec

from bench.chaos import Frame, Sock

__all__ = ["LongPollSock", "SSESock"]

#: a poll is given up this long after the server's LONGPOLL_TIMEOUT (gateway.js has none)
POLL_TIMEOUT = 40.0


class _Close(msgspec.Struct):
    code: int = 1006


class _HttpSock(Sock):
    task: asyncio.Task[None] | None = None

    def base(self) -> str:
        host, port = self.owner.spec.urls[self.url]
        return f"http://{host}:{port}"

    @property
    def http(self) -> aiohttp.ClientSession:
        sessions: list[aiohttp.ClientSession] = self.owner.http
        return sessions[self.index % len(sessions)]

    async def connect(self) -> None:
        self.acked, self.close_code = 0, 0
        self.task = asyncio.ensure_future(self.run())

    async def run(self) -> None:
        me = asyncio.current_task()
        try:
            await self.session()
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            self.owner.counts.c[f"{self.kind} {type(exc).__name__}"] += 1
        except asyncio.CancelledError:
            return
        if self.task is not me:
            return  # aborted meanwhile (its cancel not yet seen): abort() came back once already
        self.task = None
        self.dropped()

    async def session(self) -> None:
        raise NotImplementedError

    kind = "http"

    def abort(self) -> None:
        task, self.task = self.task, None
        if task is not None:
            task.cancel()
            if not self.owner.stopping:
                asyncio.get_running_loop().call_soon(self.dropped)


class SSESock(_HttpSock):
    """A page's ``EventSource``: resumes with ``Last-Event-ID`` only."""

    kind = "sse"
    last_id: str | None = None

    async def session(self) -> None:
        names = self.owner.spec.names
        query = "&".join(f"ch={names[c]}" for c in self.chans)
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "text/event-stream"}
        if self.last_id is not None:
            headers["Last-Event-ID"] = self.last_id
        timeout = aiohttp.ClientTimeout(total=None, connect=10, sock_read=60)
        async with self.http.get(f"{self.base()}/sse?{query}", headers=headers,
                                 timeout=timeout) as resp:  # fmt: skip
            if resp.status != 200:
                self.owner.counts.c[f"HTTP {resp.status}"] += 1
                return
            event, event_id = "message", None
            data: list[bytes] = []
            async for raw in resp.content:
                line = raw.rstrip(b"\r\n")
                if not line:
                    if event_id is not None:
                        self.last_id = event_id  # as EventSource keeps it, before dispatch
                    if data:
                        self.event(event, b"\n".join(data))
                    event, data, event_id = "message", [], None
                    if self.close_code:
                        return
                    continue
                field, _, value = line.partition(b":")
                value = value[1:] if value.startswith(b" ") else value
                if field == b"data":
                    data.append(value)
                elif field == b"event":
                    event = value.decode()
                elif field == b"id":
                    event_id = value.decode()

    def event(self, name: str, data: bytes) -> None:
        if name == "close":
            self.close_code = msgspec.json.decode(data, type=_Close).code or 1006
            return
        self.message(data)  # a reply has its "id", a push its "op": the socket's frames

    def ask_history(self, slot: int) -> None:
        # An event stream cannot ask: the gap stays told (gateway.js's onGap over SSE).
        self.held[slot] = None


class LongPollSock(_HttpSock):
    """gateway.js's ``LongPollTransport``: a session, a cursor, a new session after a failure."""

    kind = "longpoll"
    sid: str | None = None

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.retries = [0] * len(self.chans)  # a slot's temporary refusals in a row

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"}

    async def session(self) -> None:
        c = self.owner.counts.c
        timeout = aiohttp.ClientTimeout(total=POLL_TIMEOUT)
        async with self.http.post(f"{self.base()}/lp", headers=self.headers(), data=b"",
                                  timeout=timeout) as resp:  # fmt: skip
            if resp.status != 201:
                c[f"HTTP {resp.status}"] += 1
                return
            opened = await resp.json(content_type=None)
        self.sid, cursor = opened["session"], opened["cursor"]
        if not await self.post([self.sub_frame(slot) for slot in range(len(self.chans))]):
            return
        url = f"{self.base()}/lp/{self.sid}"
        while True:
            async with self.http.get(f"{url}?cursor={cursor}", headers=self.headers(),
                                     timeout=timeout) as resp:  # fmt: skip
                if resp.status not in (200, 410):
                    c[f"poll HTTP {resp.status}"] += 1
                    return
                poll = await resp.json(content_type=None)
            cursor = poll["cursor"]
            for message in poll["messages"]:
                self.message(msgspec.json.encode(message))
            if resp.status == 410:
                self.close_code = (poll.get("close") or {}).get("code", 1006)
                return

    def sub_reply(self, slot: int, f: Frame) -> None:
        if f.ok or f.error is None or not f.error.temporary:
            self.retries[slot] = 0
            super().sub_reply(slot, f)
            return
        # gateway.js asks again on the same session, with backoff, while it is wanted
        # (a new session each time would leave the last to idle out on the gateway).
        self.owner.counts.c[f"sub error {f.error.code}, asked again"] += 1
        spec, task = self.owner.spec, self.task
        self.retries[slot] += 1
        delay = min(spec.backoff_max, spec.backoff * 2 ** self.retries[slot]) * random.uniform(
            0.5, 1
        )

        def again() -> None:
            if self.task is task and task is not None:
                self.send(self.sub_frame(slot))

        asyncio.get_running_loop().call_later(delay, again)

    async def post(self, frames: list[dict[str, Any]]) -> bool:
        """Send frames on the session; False (and the session given up) when not taken."""
        timeout = aiohttp.ClientTimeout(total=10)
        async with self.http.post(f"{self.base()}/lp/{self.sid}", headers=self.headers(),
                                  data=msgspec.json.encode(frames), timeout=timeout) as resp:  # fmt: skip
            if resp.status == 202:
                return True
            self.owner.counts.c[f"send HTTP {resp.status}"] += 1
            return False

    def send(self, obj: dict[str, Any]) -> None:
        if self.task is None or self.sid is None:
            return
        task = self.task

        async def one() -> None:
            try:
                if await self.post([obj]):
                    return
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                self.owner.counts.c[f"send {type(exc).__name__}"] += 1
            if self.task is task:  # gateway.js: a failed send fails the transport
                self.abort()

        self.owner.spawn(one())
