"""Forwarding to a core elsewhere: retries only where repeating is harmless, and the breaker.

The core here is a stand-in HTTP server on a real port that fails as told
and counts what reaches it; the gateway side is the real `UpstreamCore`.
"""

from __future__ import annotations

import asyncio

import pytest
import tornado.web
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

from core.infra.breaker import Breaker
from core.infra.metrics import Metrics
from core.infra.settings import Settings, SettingsError
from core.request import Request
from gateway.upstream import UpstreamCore


class _Flaky(tornado.web.RequestHandler):
    """Answers 503 to the first ``fail`` requests, then 200; counts every request."""

    def initialize(self, state: dict[str, int]) -> None:
        self.state = state

    def _answer(self) -> None:
        self.state["hits"] += 1
        peers = self.state.setdefault("peers", set())  # type: ignore[arg-type]
        peers.add(self.request.connection.stream.socket.getpeername()[1])  # type: ignore[union-attr]
        if self.state["hits"] <= self.state["fail"]:
            status = self.state.get("status", 503)
            self.set_status(status)
            self.finish(b'{"error":{"status":%d,"code":"x","message":"busy"}}' % status)
            return
        self.set_header("ETag", '"3"')
        self.finish(
            b'{"ok":true,"ip":"' + self.request.headers.get("X-Forwarded-For", "").encode() + b'"}'
        )

    get = post = put = patch = delete = _answer


@pytest.fixture
async def flaky(request):
    state: dict = {"hits": 0, "fail": 1}
    sockets = bind_sockets(0, "127.0.0.1")
    server = HTTPServer(tornado.web.Application([(r"/api/.*", _Flaky, {"state": state})]))
    server.add_sockets(sockets)
    settings = {"core_retries": 1, "core_breaker_failures": 3, "core_breaker_seconds": 60.0}
    settings.update(getattr(request, "param", {}))
    core = UpstreamCore(
        Settings(core_url=f"http://127.0.0.1:{sockets[0].getsockname()[1]}", **settings),
        Metrics(),
    )
    await core.open()
    yield core, state
    await core.close()
    server.stop()


KEYED = {"idempotency-key": "k-1"}


@pytest.mark.parametrize(
    ("method", "path", "headers", "hits", "status"),
    [
        ("GET", "/api/projects", {}, 2, 200),
        ("PUT", "/api/projects/1", {}, 2, 200),
        ("DELETE", "/api/projects/1", {}, 2, 200),
        ("POST", "/api/projects", {}, 1, 503),
        ("PATCH", "/api/projects/1", {}, 1, 503),
        ("POST", "/api/projects", KEYED, 2, 200),
        # A key where the core keeps none: a refresh sent twice revokes its session.
        ("POST", "/api/auth/refresh", KEYED, 1, 503),
        ("PATCH", "/api/projects/1", KEYED, 1, 503),
        ("POST", "/api/nowhere", KEYED, 1, 503),
    ],
)
async def test_only_harmless_requests_are_retried(flaky, method, path, headers, hits, status):
    core, state = flaky
    resp = await core.dispatch(Request(method, path, headers=headers, body=b"{}"))
    assert (state["hits"], resp.status) == (hits, status)
    if status == 503:  # the core's own error passes through unchanged
        assert resp.body == b'{"error":{"status":503,"code":"x","message":"busy"}}'
    else:
        assert resp.headers["ETag"] == '"3"'


async def test_the_client_address_replaces_what_the_client_claimed(flaky):
    core, state = flaky
    state["fail"] = 0
    claimed = {"x-forwarded-for": "203.0.113.9"}
    resp = await core.dispatch(Request("GET", "/api/x", headers=claimed, client="127.0.0.7"))
    assert resp.body == b'{"ok":true,"ip":"127.0.0.7"}'


async def test_a_core_that_keeps_failing_opens_the_breaker(flaky):
    core, state = flaky
    state["fail"] = 1000
    for _ in range(2):  # each GET tries twice: four failures in a row
        assert (await core.dispatch(Request("GET", "/api/x"))).status == 503
    hits = state["hits"]
    refused = await core.dispatch(Request("GET", "/api/x"))
    assert refused.status == 503 and int(refused.headers["Retry-After"]) > 50
    assert state["hits"] == hits  # answered at once, without calling the core
    assert core.state()["breaker"] == "open"


async def test_answers_the_core_means_open_no_breaker(flaky):
    # 501 (a deployment that issues no tokens, core/accounts.py) is the core answering, not
    # failing: anyone may ask for it, and must not shut REST off for everyone by asking.
    core, state = flaky
    state["fail"], state["status"] = 1000, 501
    for _ in range(10):
        assert (await core.dispatch(Request("POST", "/api/auth/refresh"))).status == 501
    assert core.state()["breaker"] == "closed" and state["hits"] == 10


async def test_an_unreachable_core_is_503_with_retry_after_quickly():
    core = UpstreamCore(Settings(core_url="http://127.0.0.1:9", core_timeout=2.0), Metrics())
    await core.open()
    try:
        async with asyncio.timeout(1.5):
            resp = await core.dispatch(Request("GET", "/api/projects"))
    finally:
        await core.close()
    assert resp.status == 503 and resp.headers["Retry-After"] == "1"
    assert b'"code":"unavailable"' in (resp.body or b"")


def test_breaker_opens_after_failures_in_a_row_and_one_probe_closes_it():
    b = Breaker(failures=3, open_for=10.0)
    assert [b.failure(0.0), b.failure(0.0)] == [False, False] and b.refuse(0.0) is None
    b.success()  # not in a row
    assert [b.failure(1.0), b.failure(1.0), b.failure(1.0)] == [False, False, True]
    assert b.refuse(5.0) == pytest.approx(6.0)
    assert b.refuse(11.0) is None and b.state == "half_open"  # the probe goes
    assert b.refuse(11.0) == 1.0  # the others wait for its answer
    assert b.failure(12.0) is True and b.refuse(13.0) == pytest.approx(9.0)
    assert b.refuse(22.0) is None
    b.success()
    assert b.state == "closed" and b.refuse(22.0) is None


def test_a_probe_that_ends_with_no_verdict_lets_the_next_call_probe():
    b = Breaker(failures=1, open_for=10.0)
    b.failure(0.0)
    assert b.refuse(10.0) is None and b.state == "half_open"  # probe 1 goes...
    b.abandon(1)  # ...and ends with no answer from the service (refused before it went)
    assert b.refuse(10.0) is None and b.probes == 2  # the next call probes
    b.success()
    b.abandon(2)  # a verdict came: nothing to abandon
    assert b.state == "closed"


def test_only_the_probe_under_way_is_abandoned():
    b = Breaker(failures=1, open_for=5.0)
    b.failure(0.0)
    assert b.refuse(5.0) is None  # probe 1 goes, and takes its time
    b.failure(6.0)  # a request sent before the breaker opened fails: open again
    assert b.refuse(11.0) is None and b.probes == 2  # probe 2 goes
    b.abandon(1)  # probe 1's caller gives up: probe 2 is still the one
    assert b.state == "half_open" and b.refuse(11.0) == 1.0


@pytest.mark.parametrize(
    "flaky", [{"core_breaker_failures": 1, "core_breaker_seconds": 0.05}], indirect=True
)
@pytest.mark.parametrize("ending", ["refused here", "given up"])
async def test_a_probe_that_ends_with_no_verdict_does_not_keep_the_breaker_half_open(flaky, ending):
    # The probe told the breaker nothing, and every request after it was a 503 for good:
    # a socket user's rpc with a header that cannot go over HTTP/1.1 (answered 400 here),
    # or a probe whose caller went away (a socket closed, a drain's deadline).
    core, state = flaky
    state["fail"] = 2  # a GET and its retry
    assert (await core.dispatch(Request("GET", "/api/x"))).status == 503
    assert core.state()["breaker"] == "open"
    await asyncio.sleep(0.06)  # past CORE_BREAKER_SECONDS: the next request is the probe
    if ending == "refused here":
        forged = {"if-none-match": "a\x01b"}
        assert (await core.dispatch(Request("GET", "/api/x", headers=forged))).status == 400
    else:
        probe = asyncio.ensure_future(core.dispatch(Request("GET", "/api/x")))
        await asyncio.sleep(0)  # it has taken the probe's turn, and is on its way
        assert core.breaker.state == "half_open"
        probe.cancel()
        await asyncio.gather(probe, return_exceptions=True)
    assert (await core.dispatch(Request("GET", "/api/x"))).status == 200
    assert core.state()["breaker"] == "closed"


@pytest.mark.parametrize("flaky", [{"core_connection_max_age": 0.05}], indirect=True)
async def test_connections_are_renewed_so_new_core_pods_get_their_share(flaky):
    core, state = flaky
    state["fail"] = 0
    for _ in range(4):
        assert (await core.dispatch(Request("GET", "/api/x"))).status == 200
        await asyncio.sleep(0.06)
    assert len(state["peers"]) == 4  # a fresh connection each time the last one aged
    assert core.pool.size == 1  # the aged ones were closed


async def test_a_pool_younger_than_its_max_age_keeps_its_connection(flaky):
    core, state = flaky
    state["fail"] = 0
    for _ in range(4):
        assert (await core.dispatch(Request("GET", "/api/x"))).status == 200
    assert len(state["peers"]) == 1


async def test_a_header_that_would_split_the_request_is_refused_not_sent(flaky):
    core, state = flaky
    forged = {"if-match": '"1"\r\nX-Forwarded-For: 10.0.0.1'}  # as an rpc frame may carry
    resp = await core.dispatch(Request("PUT", "/api/x", headers=forged, body=b"{}"))
    assert resp.status == 400 and b'"code":"bad_request"' in (resp.body or b"")
    assert state["hits"] == 0 and core.state()["breaker"] == "closed"


@pytest.mark.parametrize("url", ["ftp://core", "core:8081", "http://"])
def test_a_core_url_that_is_not_http_is_a_configuration_error(monkeypatch, url):
    monkeypatch.setenv("CORE_URL", url)
    with pytest.raises(SettingsError, match="CORE_URL"):
        Settings.from_env()


class _RawCore:
    """A core on a real port, in bytes: ``/api/x`` answers at once, ``/api/slow`` once
    ``go`` is set, ``/api/drop`` (and ``/api/projects``, a route that keeps idempotency
    keys) closes the connection unanswered while ``drops`` last."""

    def __init__(self) -> None:
        self.go = asyncio.Event()
        self.slow = asyncio.Event()  # a request for /api/slow came
        self.drops = 0
        self.hits: dict[str, int] = {}
        self.peers: set[int] = set()
        self.server: asyncio.Server | None = None
        self.serving: dict[asyncio.Task[None], asyncio.StreamWriter] = {}

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.serving[task] = writer
        self.peers.add(writer.get_extra_info("peername")[1])
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                path = head.split(b" ", 2)[1].decode()
                self.hits[path] = self.hits.get(path, 0) + 1
                if path == "/api/slow":
                    self.slow.set()
                    await self.go.wait()
                elif path in ("/api/drop", "/api/projects") and self.drops:
                    self.drops -= 1
                    break
                body = b'{"path":"%s"}' % path.encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()
        del self.serving[task]

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        self.go.set()
        for writer in list(self.serving.values()):
            writer.close()
        await asyncio.gather(*self.serving, return_exceptions=True)


@pytest.fixture
async def raw(request):
    fake = _RawCore()
    fake.server = await asyncio.start_server(fake.serve, "127.0.0.1", 0)
    port = fake.server.sockets[0].getsockname()[1]
    settings = {"core_retries": 0, "core_timeout": 0.3} | getattr(request, "param", {})
    core = UpstreamCore(Settings(core_url=f"http://127.0.0.1:{port}", **settings), Metrics())
    await core.open()
    yield core, fake
    await core.close()
    await fake.close()


async def test_a_request_the_core_does_not_answer_in_time_is_504_and_its_connection_dropped(raw):
    core, fake = raw
    assert (await core.dispatch(Request("GET", "/api/x"))).status == 200
    started = asyncio.get_running_loop().time()
    async with asyncio.timeout(2):  # (a request nobody times out would wait forever)
        late = await core.dispatch(Request("GET", "/api/slow"))  # on the kept-alive connection
    waited = asyncio.get_running_loop().time() - started
    assert late.status == 504 and b'"code":"gateway_timeout"' in (late.body or b"")
    assert 0.25 <= waited < 1.0  # CORE_TIMEOUT, kept by the sweep (every 75 ms here)
    fake.go.set()  # its answer comes now, to a connection no longer used
    resp = await core.dispatch(Request("GET", "/api/x"))
    assert (resp.status, resp.body) == (200, b'{"path":"/api/x"}')
    assert len(fake.peers) == 2 and core.pool.in_use == 0 and not core.deadlines


async def test_a_request_given_up_by_its_caller_frees_its_connection(raw):
    core, fake = raw
    assert (await core.dispatch(Request("GET", "/api/x"))).status == 200
    waiting = asyncio.ensure_future(core.dispatch(Request("GET", "/api/slow")))
    await fake.slow.wait()
    waiting.cancel()  # as a socket that closes with an rpc under way
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert core.pool.in_use == 0 and not core.deadlines
    fake.go.set()
    resp = await core.dispatch(Request("GET", "/api/x"))
    assert (resp.status, resp.body) == (200, b'{"path":"/api/x"}')
    assert len(fake.peers) == 2  # the connection the answer was owed on was not reused


@pytest.mark.parametrize(
    "raw", [{"core_pool_size": 1, "core_retries": 2, "core_breaker_failures": 2}], indirect=True
)
async def test_waiting_for_a_busy_pool_is_503_busy_and_no_failure_of_the_core(raw):
    # Under a burst, requests that wait CORE_TIMEOUT for a pooled connection were 504s
    # counted as the core failing: a few opened the breaker, and REST was off for all.
    core, fake = raw
    assert (await core.dispatch(Request("GET", "/api/x"))).status == 200
    held = core.pool.take()  # the pool's one connection, busy as with a long request
    assert held is not None
    started = asyncio.get_running_loop().time()
    answers = await asyncio.gather(*(core.dispatch(Request("GET", "/api/x")) for _ in range(4)))
    waited = asyncio.get_running_loop().time() - started
    for resp in answers:
        assert resp.status == 503 and resp.headers["Retry-After"] == "1"
        assert b"connections to the REST core are all busy" in (resp.body or b"")
    assert 0.25 <= waited < 0.6  # one CORE_TIMEOUT: not retried (the core was never asked)
    assert fake.hits["/api/x"] == 1 and core.breaker.state == "closed"
    assert core.breaker.failures == 0
    errors = core._metrics.core_upstream_errors
    assert errors.labels("pool_timeout")._value.get() == 4
    assert errors.labels("timeout")._value.get() == 0
    core.pool.give(held, True)
    assert (await core.dispatch(Request("GET", "/api/x"))).status == 200
    assert core.pool.in_use == 0 and core.pool.size == 1


@pytest.mark.parametrize(
    ("method", "path", "headers", "status", "hits"),
    [
        ("GET", "/api/drop", {}, 200, 2),
        ("POST", "/api/drop", {}, 503, 1),
        ("POST", "/api/projects", KEYED, 200, 2),
        ("POST", "/api/drop", KEYED, 503, 1),  # no route of the core's keeps its key
    ],
)
async def test_a_kept_alive_connection_the_core_closed_is_replaced_only_when_harmless(
    raw, method, path, headers, status, hits
):
    core, fake = raw
    assert (await core.dispatch(Request("GET", "/api/x"))).status == 200
    fake.drops = 1  # the core closes the kept-alive connection as the request comes
    resp = await core.dispatch(Request(method, path, headers=headers, body=b"{}"))
    assert (resp.status, fake.hits[path]) == (status, hits)
    assert core.pool.in_use == 0
    if status == 200:  # sent again on a new connection, not counted as a failure
        assert resp.body == b'{"path":"%s"}' % path.encode() and core.breaker.failures == 0


@pytest.mark.parametrize("header", ["x-forwarded-for", "forwarded"])
@pytest.mark.parametrize("client", ["203.0.113.9", "2001:db8::17"])
def test_the_core_reads_the_client_s_address_whichever_forwarding_header_it_reads(header, client):
    from tornado.httputil import HTTPHeaders

    from core.infra.clientip import TrustedProxies
    from gateway.upstream import forward_headers

    forged = {"x-forwarded-for": "198.51.100.66", "forwarded": "for=198.51.100.66"}
    sent = HTTPHeaders()
    for name, value in forward_headers(forged, None, client, "r-1"):
        sent.add(name, value)
    core = TrustedProxies(["127.0.0.1/32"], header)  # the gateway's address is trusted
    assert core.client_ip("127.0.0.1", sent) == client
