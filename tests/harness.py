"""Helpers for end-to-end tests: a gateway on a real port and a socket client.

The client is the independent `websockets` library, so every frame the
gateway builds by hand is parsed by a strict RFC 6455 implementation.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
from tornado.httpclient import AsyncHTTPClient
from tornado.httputil import HTTPHeaders
from websockets.asyncio.client import ClientConnection, connect

from core.infra.broker import Broker
from core.infra.mint import mint_token
from core.infra.settings import Settings
from gateway.app import Gateway, make_app
from gateway.session import Session
from tests.servers import UNIT

SECRET = "harness-secret-" + "0123456789abcdef" * 4


def unique_prefix() -> str:
    """A Redis channel prefix no other test (or process) uses."""
    return f"gwtest:{uuid.uuid4().hex[:10]}:"


@contextlib.asynccontextmanager
async def running_gateway(broker: Broker | None = None, **overrides: Any) -> AsyncIterator[Gateway]:
    values: dict[str, Any] = {
        "jwt_secret": SECRET,
        "host": "127.0.0.1",
        "port": 0,
        # argon2id at its production cost takes ~0.2 s a hash; tests need no such cost.
        "password_time_cost": 1,
        "password_memory_kib": 8192,
    }
    values.update(overrides)
    gw = await make_app(Settings(**values), broker=broker)
    gw.listen()
    try:
        yield gw
    finally:
        await gw.close()


def token_for(
    gw: Gateway, sub: str = "alice", channels: tuple[str, ...] = ("room:*",), **kw: Any
) -> str:
    return mint_token(gw.settings, sub, list(channels), **kw)


def http_url(gw: Gateway, path: str) -> str:
    return f"http://127.0.0.1:{gw.port}{path}"


class Client:
    """A protocol-speaking socket client for tests."""

    def __init__(self, ws: ClientConnection, binary: bool) -> None:
        self.ws = ws
        self.binary = binary
        self._next_id = 0
        self.pushes: list[dict[str, Any]] = []
        #: The first frame, when a test reads it apart (a connect hook's `subscribed`).
        self.opened: dict[str, Any] | None = None

    def _encode(self, frame: dict[str, Any]) -> str | bytes:
        return msgspec.msgpack.encode(frame) if self.binary else json.dumps(frame)

    def _decode(self, raw: str | bytes) -> dict[str, Any]:
        if self.binary:
            assert isinstance(raw, bytes), "msgpack connections get binary frames"
            return msgspec.msgpack.decode(raw)
        assert isinstance(raw, str), "JSON connections get text frames"
        return json.loads(raw)

    async def send_raw(self, raw: str | bytes) -> None:
        await self.ws.send(raw)

    async def recv(self, timeout: float = 2 * UNIT) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            return self._decode(await self.ws.recv())

    async def request(self, op: str, timeout: float = 2 * UNIT, **fields: Any) -> dict[str, Any]:
        """Send a command and return its reply; pushes seen meanwhile are kept."""
        self._next_id += 1
        cid = self._next_id
        await self.ws.send(self._encode({"id": cid, "op": op, **fields}))
        while True:
            msg = await self.recv(timeout)
            if msg.get("id") == cid and "ok" in msg:
                return msg
            self.pushes.append(msg)

    async def next_push(self, timeout: float = 2 * UNIT) -> dict[str, Any]:
        if self.pushes:
            return self.pushes.pop(0)
        while True:
            msg = await self.recv(timeout)
            if msg.get("op") == "msg":
                return msg


@contextlib.asynccontextmanager
async def ws_client(
    port: int,
    token: str | None,
    *,
    msgpack: bool = False,
    via: str = "query",
    **kw: Any,
) -> AsyncIterator[Client]:
    url = f"ws://127.0.0.1:{port}/ws"
    headers = {}
    if token is not None and via == "query":
        url += f"?token={token}"
    elif token is not None:
        headers["Authorization"] = f"Bearer {token}"
    kw.setdefault("open_timeout", 5 * UNIT)
    kw.setdefault("compression", None)
    async with connect(
        url,
        subprotocols=["gw.v1.msgpack" if msgpack else "gw.v1.json"],  # type: ignore[list-item]
        additional_headers=headers,
        proxy=None,
        **kw,
    ) as ws:
        yield Client(ws, msgpack)


async def call_once(
    port: int, token: str | None, method: str, path: str, raw: bytes | None = None
) -> tuple[int, HTTPHeaders, Any]:
    """One `ApiClient.call` on a client of its own, closed after it."""
    api = ApiClient(port, token)
    try:
        return await api.call(method, path, raw=raw)
    finally:
        api.close()


class ApiClient:
    """JSON over HTTP against a gateway's (or the core's) port, as one caller."""

    def __init__(self, port: int, token: str | None, *, source_ip: str | None = None) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.token = token
        self.source_ip = source_ip  # another loopback address (127.0.0.2) plays another client
        self._http = AsyncHTTPClient(force_instance=True)

    def close(self) -> None:
        self._http.close()

    def prepare(
        self, method: str, body: Any, raw: bytes | None, headers: dict[str, str] | None
    ) -> tuple[dict[str, str], bytes | None]:
        """The headers (the token's too) and the body a call sends."""
        all_headers = dict(headers or {})
        if self.token is not None:
            all_headers.setdefault("Authorization", f"Bearer {self.token}")
        payload = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        if payload is None and method in ("POST", "PUT", "PATCH"):
            payload = b""
        return all_headers, payload

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, HTTPHeaders, Any]:
        """(status, headers, decoded JSON body or None)."""
        all_headers, payload = self.prepare(method, body, raw, headers)
        r = await self._http.fetch(
            self.base + path,
            method=method,
            body=payload,
            headers=all_headers,
            raise_error=False,
            request_timeout=10 * UNIT,
            allow_nonstandard_methods=True,
            network_interface=self.source_ip,
        )
        data = json.loads(r.body) if r.body else None
        return r.code, r.headers, data


class KeptAliveClient(ApiClient):
    """`ApiClient` over kept-alive HTTP/1.1 connections (Tornado's client closes each one).

    A connection's requests after its first are served off Tornado
    (core/fastrest.py), so a test run with this client exercises that path;
    ``reused`` counts the requests sent on a connection that had answered one.
    """

    def __init__(self, port: int, token: str | None, *, source_ip: str | None = None) -> None:
        super().__init__(port, token, source_ip=source_ip)
        self.port = port
        self.reused = 0
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    def close(self) -> None:
        super().close()
        for _, writer in self._idle:
            writer.close()
        self._idle.clear()

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, HTTPHeaders, Any]:
        lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{self.port}"]
        all_headers, payload = self.prepare(method, body, raw, headers)
        if payload is not None and len(payload) > 65536:
            # Refused before its body is read (413), closed with the body unread: the reset
            # may drop the answer before this client reads it; Tornado's client reads it.
            return await super().call(method, path, raw=payload, headers=headers)
        if payload is not None:
            all_headers.setdefault("Content-Type", "application/json")
            all_headers["Content-Length"] = str(len(payload))
        lines += [f"{name}: {value}" for name, value in all_headers.items()]
        data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (payload or b"")
        if self._idle:
            reader, writer = self._idle.pop()
            self.reused += 1
        else:
            local = None if self.source_ip is None else (self.source_ip, 0)
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port, local_addr=local)
        try:
            writer.write(data)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10 * UNIT)
            text = head.decode("latin-1")
            eol = text.index("\r\n")
            status = int(text[:eol].split()[1])
            got = HTTPHeaders.parse(text[eol:])
            length = 0 if method == "HEAD" else int(got.get("Content-Length", "0"))
            content = await asyncio.wait_for(reader.readexactly(length), 10 * UNIT)
        except BaseException:
            writer.close()
            raise
        if got.get("Connection", "").lower() == "close":
            writer.close()
        else:
            self._idle.append((reader, writer))
        return status, got, json.loads(content) if content else None


async def until(check: Any, timeout: float = 5 * UNIT, step: float = 0.01) -> None:
    """Wait until ``check()`` (a function, or a coroutine function) is true, or fail."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"the condition never held within {timeout} s")
        await asyncio.sleep(step)


class CommandTurns:
    """Counts the frames sessions run (`Session.handle`), and the most in one loop turn."""

    def __init__(self, monkeypatch: Any) -> None:
        self.calls = 0
        handle = Session.handle

        async def counted(session: Session, data: bytes | str) -> None:
            self.calls += 1
            await handle(session, data)

        monkeypatch.setattr(Session, "handle", counted)

    async def most_per_turn(self, done: Callable[[], bool], turns: int = 200_000) -> int:
        """Turn the event loop until ``done()``: the most frames run in one turn."""
        most = 0
        while turns and not done():
            before = self.calls
            await asyncio.sleep(0)  # one turn of the loop: other clients run here
            most = max(most, self.calls - before)
            turns -= 1
        return most
