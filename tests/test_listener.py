"""What an unauthenticated client meets first: header timeout, pending cap, body limits, client IP."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from core.infra.clientip import TrustedProxies
from core.infra.proxyprotocol import V2_SIGNATURE, ProxyHeaderError, parse_v1, parse_v2
from core.infra.rate import Rate
from tests.harness import ApiClient, running_gateway, token_for
from tests.servers import UNIT


class Raw:
    """A hand-driven HTTP/1.1 client: bytes out as the test says, the answer as it comes."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def response(self, timeout: float = 2 * UNIT) -> tuple[int, dict[str, str], Any]:
        """The next response (status, headers, JSON body or None)."""
        async with asyncio.timeout(timeout):
            head = await self.reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            headers = {
                k.lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:] if h)
            }
            body = await self.reader.readexactly(int(headers.get("content-length", "0")))
        return int(lines[0].split()[1]), headers, json.loads(body) if body else None

    async def closed_within(self, timeout: float) -> bool:
        """Whether the server closes the connection within ``timeout`` (reading what it sends)."""
        try:
            async with asyncio.timeout(timeout):
                while await self.reader.read(65536):
                    pass
        except TimeoutError:
            return False
        except ConnectionError:
            pass
        return True

    def close(self) -> None:
        self.writer.close()


@contextlib.asynccontextmanager
async def raw(port: int, before_accept: bytes = b"") -> AsyncIterator[Raw]:
    """A connection; with ``before_accept``, one whose first bytes are in before the accept.

    The server runs on this event loop: it accepts only once this yields, as
    a busy server accepts a burst of connections (the listener's fast routes).
    """
    if before_accept:
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(before_accept)
        reader, writer = await asyncio.open_connection(sock=sock)
    else:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    conn = Raw(reader, writer)
    try:
        yield conn
    finally:
        conn.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def request(method: str, path: str, headers: dict[str, str] | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


# -- header timeout and pending connections -------------------------------------


@pytest.mark.parametrize("path", ["/api/projects", "/ws?token=x", "/healthz"])
async def test_a_dripped_request_is_cut_within_the_header_timeout(path):
    async with running_gateway(header_timeout=1.0 * UNIT) as gw, raw(gw.port) as c:
        started = time.monotonic()
        await c.send(f"GET {path} HTTP/1.1\r\n".encode())
        assert await _cut_while_dripping(c, b"X-Drip: 1\r\n")  # a header line every 0.2 s
        assert time.monotonic() - started < 2.5 * UNIT


async def _cut_while_dripping(c: Any, drop: bytes) -> bool:
    """Send ``drop`` every 0.2 s for up to 10 s; True once the server cut the connection."""
    for _ in range(int(10 / 0.2)):
        try:
            await c.send(drop)
        except ConnectionError:
            return True
        if await c.closed_within(0.2 * UNIT):
            return True
    return False


async def test_a_dripped_body_is_cut_within_the_body_timeout():
    async with running_gateway(body_timeout=1.0 * UNIT) as gw, raw(gw.port) as c:
        # The token route takes anyone's body (it is the login).
        head = {"Content-Type": "application/x-www-form-urlencoded", "Content-Length": "1000"}
        await c.send(request("POST", "/api/auth/token", head))
        started = time.monotonic()
        assert await _cut_while_dripping(c, b"x")
        assert time.monotonic() - started < 2.5 * UNIT


async def test_pending_connections_per_ip_are_capped_and_freed_by_finished_headers():
    async with running_gateway(max_pending_per_ip=3, header_timeout=30.0) as gw:
        async with raw(gw.port) as a, raw(gw.port), raw(gw.port):
            await a.send(b"GET /hea")  # three connections that have not finished their headers
            await asyncio.sleep(0.1 * UNIT)
            async with raw(gw.port) as d:
                status, headers, body = await d.response()
                assert status == 429 and body["error"]["code"] == "rate_limited"
                assert headers["retry-after"] == "1"
                assert await d.closed_within(1 * UNIT)
            await a.send(b"lthz HTTP/1.1\r\nHost: x\r\n\r\n")  # one finishes its headers
            assert (await a.response())[0] == 200
            await asyncio.sleep(0.1 * UNIT)
            async with raw(gw.port) as e:
                await e.send(request("GET", "/healthz", {"Connection": "close"}))
                assert (await e.response())[0] == 200
            assert (
                gw.server is not None and gw.server.pending("127.0.0.1") == 2
            )  # b and c; a has spoken HTTP
        await asyncio.sleep(0.1 * UNIT)
        assert gw.server.pending("127.0.0.1") == 0


async def test_oversized_request_targets_and_headers_are_answered_414_and_431():
    async with running_gateway(max_header_bytes=4096) as gw:
        async with raw(gw.port) as c:
            await c.send(request("GET", "/healthz?" + "a" * 5000))
            status, _, body = await c.response()
            assert status == 414 and body["error"]["code"] == "uri_too_long"
        async with raw(gw.port) as c:
            await c.send(request("GET", "/ws", {f"X-Big-{i}": "b" * 1000 for i in range(5)}))
            status, _, body = await c.response()
            assert status == 431 and body["error"]["code"] == "headers_too_large"
        async with raw(gw.port) as c:  # far past the limit: answered too, then closed
            await c.send(request("GET", "/healthz", {"X-Huge": "h" * 9000}))
            assert (await c.response())[0] == 431
            assert await c.closed_within(1 * UNIT)
        async with raw(gw.port) as c:
            await c.send(request("GET", "/healthz", {"X-Fine": "f" * 3000, "Connection": "close"}))
            assert (await c.response())[0] == 200


# -- bodies: refused at the headers ---------------------------------------------

HUGE = {"Content-Length": str(10**9), "Content-Type": "application/json"}


async def test_a_body_over_the_route_limit_is_refused_before_it_is_sent():
    async with running_gateway(max_body_bytes=1000) as gw:
        token = token_for(gw)
        cases = [
            ("POST", "/api/projects", {"Authorization": f"Bearer {token}"}, 413),
            ("POST", "/api/publish", {"Authorization": f"Bearer {token}"}, 413),
            ("POST", "/lp/abc", {"Authorization": f"Bearer {token}"}, 413),
            ("POST", "/healthz", {}, 413),  # takes no body at all
            ("GET", "/ws", {}, 413),
            ("POST", "/no/such/route", {}, 404),
            ("POST", "/api/no-such-route", {}, 404),
        ]
        for method, path, headers, expected in cases:
            async with raw(gw.port) as c:
                started = time.monotonic()
                await c.send(request(method, path, {**headers, **HUGE}))  # and no body
                status, _, body = await c.response(1 * UNIT)
                assert (status, path) == (expected, path)
                assert body["error"]["status"] == expected
                assert time.monotonic() - started < 1 * UNIT
                assert await c.closed_within(1 * UNIT)
        # Within the limit, the same route answers as ever.
        api = ApiClient(gw.port, token)
        try:
            status, _, body = await api.call("POST", "/api/publish", {"ch": "room:1", "data": 1})
            assert status == 200 and body == {"ok": True}
        finally:
            api.close()


async def test_routes_anyone_may_call_take_small_bodies_and_refusals_are_made_unread():
    """Without a token, at most 8 KiB is buffered; a body the route would refuse
    from this caller (403, or 404 for another user's account) is never read."""
    async with running_gateway() as gw:
        user = token_for(gw, "7")
        key_like = token_for(gw, "8")
        cases = [
            ("/api/auth/token", {"Content-Length": "9000"}, 413),
            ("/api/auth/register", {"Content-Length": "9000"}, 413),
            ("/api/auth/refresh", {"Content-Length": "9000"}, 413),
            ("/api/keys", {"Authorization": f"Bearer {user}", **HUGE}, 403),  # admins only
            ("/api/users", {"Authorization": f"Bearer {key_like}", **HUGE}, 403),  # admins only
        ]
        for path, headers, expected in cases:
            async with raw(gw.port) as c:
                await c.send(request("POST", path, headers))  # and no body
                status, _, body = await c.response(1 * UNIT)
                assert (status, path) == (expected, path), body
        async with raw(gw.port) as c:  # another user's account: 404, as the route says
            await c.send(
                request("PATCH", "/api/users/8", {"Authorization": f"Bearer {user}", **HUGE})
            )
            assert (await c.response(1 * UNIT))[0] == 404


async def test_a_route_that_needs_a_token_answers_401_before_reading_the_body():
    async with running_gateway() as gw:
        for path, headers in [
            ("/api/projects", {}),
            ("/api/projects", {"Authorization": "Bearer not-a-token"}),
            ("/api/publish", {}),
            ("/lp/abc", {}),
        ]:
            async with raw(gw.port) as c:
                await c.send(request("POST", path, {**headers, "Content-Length": "500"}))
                status, headers_out, body = await c.response(1 * UNIT)
                assert status == 401 and body["error"]["code"] == "unauthorized", path
                assert headers_out["www-authenticate"] == "Bearer"


async def test_a_head_refused_before_its_body_is_answered_without_one(caplog):
    """A refusal's JSON body written to a HEAD was more than its Content-Length allows:
    Tornado raised, the client got no answer and each such request logged a traceback."""
    async with running_gateway() as gw, raw(gw.port) as c:
        await c.send(request("HEAD", "/api/projects", {"Content-Length": "5"}))
        async with asyncio.timeout(1 * UNIT):
            head = await c.reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 4"), head  # 405: HEAD is no method of the route
        assert await c.closed_within(1 * UNIT)  # with nothing after the head
    assert not [r for r in caplog.records if r.exc_info], caplog.text


async def test_a_chunked_body_is_cut_with_413_when_it_passes_the_limit():
    async with running_gateway(max_publish_bytes=1000) as gw, raw(gw.port) as c:
        head = {"Authorization": f"Bearer {token_for(gw)}", "Transfer-Encoding": "chunked"}
        await c.send(request("POST", "/api/publish", head))
        chunk = b"x" * 500
        answered = None
        for _ in range(20):  # up to 10 kB, never the last chunk
            try:
                await c.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                answered = await c.response(0.2 * UNIT)
                break
            except TimeoutError:
                continue
        assert answered is not None
        assert answered[0] == 413 and answered[2]["error"]["code"] == "payload_too_large"


async def test_token_less_bodies_are_refused_without_being_read():
    """Token-less connections announcing 4 MiB bodies (sending 64 KiB): each answered at once."""
    async with running_gateway() as gw:

        async def one(path: str) -> int:
            async with raw(gw.port) as c:
                await c.send(request("POST", path, {"Content-Length": str(4 << 20)}) + b"x" * 65536)
                return (await c.response(2 * UNIT))[0]

        statuses = await asyncio.gather(*(one(p) for p in ["/api/projects", "/nope", "/lp"] * 10))
        assert sorted(set(statuses)) == [401, 404]


# -- client IP behind trusted proxies -------------------------------------------


async def _new_lp_session(port: int, token: str, forwarded_for: str | None) -> int:
    api = ApiClient(port, token)
    try:
        headers = {} if forwarded_for is None else {"X-Forwarded-For": forwarded_for}
        return (await api.call("POST", "/lp", raw=b"", headers=headers))[0]
    finally:
        api.close()


async def test_a_trusted_proxy_names_the_client_and_its_limits_are_per_client():
    rate = Rate(2, 60.0)
    async with running_gateway(trusted_proxies=("127.0.0.0/8",), rate_connect_ip=rate) as gw:
        token = token_for(gw)
        # The client wrote "1.1.1.1" itself; the proxy appended what it saw, 203.0.113.7.
        for spoof in ("1.1.1.1", "1.1.1.2"):
            assert await _new_lp_session(gw.port, token, f"{spoof}, 203.0.113.7") == 201
        assert await _new_lp_session(gw.port, token, "1.1.1.3, 203.0.113.7") == 429
        assert await _new_lp_session(gw.port, token, "203.0.113.8") == 201  # another client


async def test_the_core_counts_logins_per_forwarded_client(clean_db):
    from tests.test_accounts import login

    settings = {"trusted_proxies": ("127.0.0.0/8",), "rate_login_ip": Rate(2, 60.0)}
    async with running_gateway(**clean_db, **settings) as gw:
        anon = ApiClient(gw.port, None)
        try:
            for i in range(2):
                status, _ = await login(
                    anon, f"u{i}@example.com", "nope nope", **{"X-Forwarded-For": "203.0.113.5"}
                )
                assert status == 400
            status, body = await login(
                anon, "z@example.com", "nope nope", **{"X-Forwarded-For": "203.0.113.5"}
            )
            assert status == 429 and body["error"]["code"] == "rate_limited"
            # Another client behind the same balancer is not held back.
            assert (
                await login(
                    anon, "z@example.com", "nope nope", **{"X-Forwarded-For": "203.0.113.6"}
                )
            )[0] == 400
        finally:
            anon.close()


async def test_forwarding_headers_from_an_untrusted_peer_are_ignored():
    rate = Rate(2, 60.0)
    async with running_gateway(trusted_proxies=("10.0.0.0/8",), rate_connect_ip=rate) as gw:
        token = token_for(gw)
        assert await _new_lp_session(gw.port, token, "203.0.113.1") == 201
        assert await _new_lp_session(gw.port, token, "203.0.113.2") == 201
        assert await _new_lp_session(gw.port, token, "203.0.113.3") == 429  # all 127.0.0.1


def test_client_ip_resolution():
    from tornado.httputil import HTTPHeaders

    proxies = TrustedProxies(["10.0.0.0/8", "fd00::/8"])

    def ip(peer: str, **headers: str) -> str:
        return proxies.client_ip(
            peer, HTTPHeaders({k.replace("_", "-"): v for k, v in headers.items()})
        )

    assert ip("192.0.2.1", X_Forwarded_For="198.51.100.1") == "192.0.2.1"  # untrusted peer
    assert ip("10.0.0.5", X_Forwarded_For="198.51.100.1") == "198.51.100.1"
    assert ip("10.0.0.5", X_Forwarded_For="6.6.6.6, 198.51.100.1, 10.0.0.9") == "198.51.100.1"
    assert ip("10.0.0.5", X_Forwarded_For="10.1.1.1, 10.0.0.9") == "10.1.1.1"  # all proxies
    assert ip("10.0.0.5", X_Forwarded_For="junk, 10.0.0.9") == "10.0.0.9"  # stops at junk
    assert ip("10.0.0.5") == "10.0.0.5"
    assert ip("10.0.0.5", X_Forwarded_For="198.51.100.1:4431") == "198.51.100.1"
    assert ip("::ffff:10.0.0.5", X_Forwarded_For="2001:db8::1") == "2001:db8::1"
    # Forwarded is ignored unless it is the configured header, and then it is the only one.
    assert ip("10.0.0.5", Forwarded="for=198.51.100.1") == "10.0.0.5"
    rfc = TrustedProxies(["10.0.0.0/8"], "forwarded")
    headers = HTTPHeaders({"Forwarded": 'for=6.6.6.6, for="[2001:db8::2]:80";proto=https',
                           "X-Forwarded-For": "7.7.7.7"})  # fmt: skip
    assert rfc.client_ip("10.0.0.5", headers) == "2001:db8::2"
    assert rfc.client_ip("10.0.0.5", HTTPHeaders({"Forwarded": "for=unknown"})) == "10.0.0.5"


def test_only_short_forwarding_headers_of_trusted_peers_are_remembered():
    from tornado.httputil import HTTPHeaders

    proxies = TrustedProxies(["10.0.0.0/8"])

    def ip(peer: str, forwarded: str) -> str:
        return proxies.client_ip(peer, HTTPHeaders({"X-Forwarded-For": forwarded}))

    for _ in range(2):  # the second time from memory, the same
        assert ip("10.0.0.5", "6.6.6.6, 198.51.100.1") == "198.51.100.1"
    assert proxies._resolved.cache_info()[:4] == (1, 1, 4096, 1)  # hits, misses, max, size
    # A client behind the proxy making its header long, or an untrusted peer: resolved
    # as ever, never remembered, so that memory cannot be filled with their headers.
    long = ", ".join(f"6.6.6.{i}" for i in range(40)) + ", 198.51.100.2"
    assert ip("10.0.0.5", long) == "198.51.100.2"
    assert ip("192.0.2.1", "198.51.100.3") == "192.0.2.1"
    assert proxies._resolved.cache_info().currsize == 1


# -- PROXY protocol --------------------------------------------------------------


def proxy_v1(source: str) -> bytes:
    family = "TCP6" if ":" in source else "TCP4"
    dest = "::1" if ":" in source else "127.0.0.1"
    return f"PROXY {family} {source} {dest} 51234 80\r\n".encode()


def proxy_v2(source: str, command: int = 1) -> bytes:
    import ipaddress

    addresses = ipaddress.IPv4Address(source).packed + bytes([127, 0, 0, 1]) + b"\xc8\x22\x00\x50"
    tlv = b"\xea\x00\x05vpce1"  # AWS puts its endpoint id in a TLV: skipped
    body = addresses + tlv
    return V2_SIGNATURE + bytes([0x20 | command, 0x11]) + len(body).to_bytes(2, "big") + body


async def _lp_through_proxy(port: int, token: str, header: bytes) -> int:
    async with raw(port) as c:
        await c.send(header + request("POST", "/lp", {"Authorization": f"Bearer {token}",
                                                      "Content-Length": "0"}))  # fmt: skip
        return (await c.response())[0]


async def test_proxy_protocol_names_the_client_for_per_ip_limits():
    settings = {
        "proxy_protocol": True,
        "trusted_proxies": ("127.0.0.0/8",),
        "rate_connect_ip": Rate(2, 60.0),
    }
    async with running_gateway(**settings) as gw:
        token = token_for(gw)
        assert await _lp_through_proxy(gw.port, token, proxy_v1("203.0.113.9")) == 201
        assert await _lp_through_proxy(gw.port, token, proxy_v2("203.0.113.9")) == 201
        assert await _lp_through_proxy(gw.port, token, proxy_v1("203.0.113.9")) == 429
        assert await _lp_through_proxy(gw.port, token, proxy_v2("198.51.100.4")) == 201
        assert await _lp_through_proxy(gw.port, token, proxy_v1("2001:db8::7")) == 201
        # LOCAL (the balancer's health check) is served as from the balancer.
        async with raw(gw.port) as c:
            await c.send(proxy_v2("0.0.0.0", command=0) + request("GET", "/healthz"))
            assert (await c.response())[0] == 200
        # No header at all (the kubelet's probe): served as from the TCP peer.
        async with raw(gw.port) as c:
            await c.send(request("GET", "/healthz"))
            assert (await c.response())[0] == 200
        # A malformed one: closed unanswered.
        async with raw(gw.port) as c:
            await c.send(b"PROXY TCP4 nonsense\r\n" + request("GET", "/healthz"))
            assert await c.closed_within(1 * UNIT)
            assert c.reader.at_eof()


async def test_a_header_a_client_sends_through_the_balancer_is_not_a_proxy_header():
    settings = {"proxy_protocol": True, "trusted_proxies": ("127.0.0.0/8",)}
    async with running_gateway(**settings) as gw, raw(gw.port) as c:
        # The balancer's header first, then what the client sent: a forged header.
        await c.send(
            proxy_v1("203.0.113.9") + proxy_v1("198.51.100.1") + request("GET", "/healthz")
        )
        assert (await c.response())[0] == 400


async def test_proxy_protocol_from_an_untrusted_peer_is_not_believed():
    settings = {
        "proxy_protocol": True,
        "trusted_proxies": ("10.0.0.0/8",),
        "rate_connect_ip": Rate(2, 60.0),
    }
    async with running_gateway(**settings) as gw:
        token = token_for(gw)
        # Not even read: from an untrusted peer, "PROXY ..." is a bad request line.
        for n in range(3):
            assert await _lp_through_proxy(gw.port, token, proxy_v1(f"203.0.113.{n}")) == 400
        # Its own requests are served, and limited, as from its own address.
        assert await _lp_through_proxy(gw.port, token, b"") == 201
        assert await _lp_through_proxy(gw.port, token, b"") == 201
        assert await _lp_through_proxy(gw.port, token, b"") == 429


async def test_proxy_protocol_pending_connections_count_per_client():
    settings = {
        "proxy_protocol": True,
        "trusted_proxies": ("127.0.0.0/8",),
        "max_pending_per_ip": 1,
    }
    async with running_gateway(**settings) as gw, raw(gw.port) as first:
        await first.send(proxy_v1("203.0.113.9") + b"GET /hea")  # pending for 203.0.113.9
        await asyncio.sleep(0.1 * UNIT)
        async with raw(gw.port) as second:
            await second.send(proxy_v1("203.0.113.9"))
            assert (await second.response())[0] == 429
        async with raw(gw.port) as other:
            await other.send(proxy_v1("198.51.100.4") + request("GET", "/healthz"))
            assert (await other.response())[0] == 200


def test_proxy_header_parsing():
    assert parse_v1(b"PROXY TCP4 192.0.2.1 10.0.0.1 1 2\r\n") == "192.0.2.1"
    assert parse_v1(b"PROXY UNKNOWN\r\n") is None
    for bad in (b"PROXY TCP4 nope 10.0.0.1 1 2\r\n", b"PROXY TCP6 192.0.2.1 ::1 1 2\r\n",
                b"PROXY UDP4 192.0.2.1 10.0.0.1 1 2\r\n", b"PROXY TCP4 192.0.2.1\r\n"):  # fmt: skip
        with pytest.raises(ProxyHeaderError):
            parse_v1(bad)
    header = proxy_v2("192.0.2.9")
    assert parse_v2(header[:16], header[16:]) == "192.0.2.9"
    with pytest.raises(ProxyHeaderError):
        parse_v2(header[:16], header[16:20])  # short address block
    with pytest.raises(ProxyHeaderError):
        parse_v2(b"\x00" * 16, b"")


def test_per_address_limits_count_an_ipv6_host_by_its_64():
    from core.infra.clientip import limit_key

    assert (
        limit_key("2001:db8:1:2:aaaa::1")
        == limit_key("2001:db8:1:2:ffff::9")
        == "2001:db8:1:2::/64"
    )
    assert limit_key("2001:db8:1:3::1") != limit_key("2001:db8:1:2::1")
    assert limit_key("203.0.113.7") == "203.0.113.7"
    assert limit_key("") == "" and limit_key("not an ip:") == "not an ip:"


@pytest.mark.parametrize("length", [b"\xb2", b"\xb9\xb2"])  # "²", "¹²": str.isdigit() says yes
async def test_a_content_length_of_other_digits_is_a_400_not_a_failure(length, caplog):
    async with running_gateway() as gw, raw(gw.port) as c:
        head = request("POST", "/api/projects", {"Authorization": f"Bearer {token_for(gw)}"})
        await c.send(head[:-2] + b"Content-Length: " + length + b"\r\n\r\n")
        status, _, _ = await c.response(1 * UNIT)
    assert status == 400
    assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text


async def test_a_body_sent_a_few_bytes_at_a_time_on_a_kept_alive_connection_is_read_once(
    clean_db, monkeypatch
):
    """Each piece of a body used to read its head again (and copy all it had): a head near
    MAX_HEADER_BYTES and a body sent a byte at a time held the event loop."""
    from core import fastrest
    from tests.test_core_rest import PROJECT

    reads = []

    def counted(*args: Any, **kwargs: Any) -> Any:
        reads.append(1)
        return parse(*args, **kwargs)

    parse = fastrest.parse_head
    monkeypatch.setattr(fastrest, "parse_head", counted)
    async with running_gateway(**clean_db) as gw, raw(gw.port) as c:
        auth = {"Authorization": f"Bearer {token_for(gw, extra={'role': 'admin'})}"}
        await c.send(request("GET", "/api/projects?limit=1", auth))  # Tornado's: then adopted
        assert (await c.response())[0] == 200
        body = json.dumps(PROJECT).encode()
        head = request("POST", "/api/projects", {**auth, "Content-Length": str(len(body))})
        await c.send(head)
        for at in range(0, len(body), 2):
            await c.send(body[at : at + 2])
            await asyncio.sleep(0.002)
        status, _, created = await c.response()
    assert status == 201 and created["name"] == PROJECT["name"]
    assert len(body) > 100 and len(reads) <= 2  # the POST's head, once (and no more)


async def test_a_head_read_looks_at_each_byte_a_few_times_not_at_every_packet():
    """Tornado's stream searched all it held for the head's end at every packet: 60 KB of
    head, then a byte at a time, held the event loop for HEADER_TIMEOUT on 20 KB/s."""
    from core.infra.httpstream import HEAD_END, HTTPStream

    scanned: list[int] = []

    class Counting:
        pattern = HEAD_END

        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def search(self, buf: bytearray, pos: int = 0) -> Any:
            scanned.append(len(buf) - pos)
            return self.inner.search(buf, pos)

    ours, theirs = socket.socketpair()
    stream = HTTPStream(ours)
    try:
        head = stream.read_until_regex(HEAD_END, max_bytes=65536)
        stream._read_regex = Counting(stream._read_regex)  # type: ignore[assignment]
        theirs.sendall(b"GET / HTTP/1.1\r\nX: " + b"y" * 60000)
        await asyncio.sleep(0.05)
        for piece in [b"y"] * 200 + [b"\r", b"\n", b"\r", b"\n"]:  # the end split up too
            theirs.send(piece)
            await asyncio.sleep(0.001)
        got = await asyncio.wait_for(head, 5 * UNIT)
    finally:
        stream.close()
        theirs.close()
    assert got.endswith(b"y\r\n\r\n") and len(got) == 60000 + 19 + 200 + 4
    assert sum(scanned) < 5 * len(got)  # 24 MB before


async def test_a_request_sent_a_byte_at_a_time_is_answered():
    async with running_gateway() as gw, raw(gw.port) as c:
        for byte in request("GET", "/healthz"):
            await c.send(bytes([byte]))
        assert (await c.response())[0] == 200
