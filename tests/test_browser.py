"""The browser client (gateway/static/gateway.js) and the /demo page in a real Chromium.

Debian's ``chromium`` driven by Playwright (never a downloaded browser). The
client's pure parts (backoff, close codes, codecs) are checked in the page
against the Python implementation; its transports against an in-process
gateway; the demo against real gateway processes on real Redis and
PostgreSQL, through a SIGKILL and a restart on the same port. Screenshots go
to ``test-output/browser/`` (gitignored); the path is printed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from tornado.httpclient import AsyncHTTPClient

from core.infra.broker import RedisBroker
from core.infra.mint import mint_token
from core.infra.settings import Settings
from proto.codes import CloseCode, should_reconnect
from tests import test_processes
from tests.harness import SECRET, ApiClient, running_gateway, token_for, unique_prefix, until
from tests.hookbackend import HookBackend
from tests.servers import UNIT
from tests.test_client_hostile import commands, fake_gateway, frame, subscribed_then_gap
from tests.test_core_rest import PROJECT
from tests.test_hooks import hooked
from tests.test_recovery import BIG

async_api = pytest.importorskip(
    "playwright.async_api", reason="playwright is not installed (pip install -e '.[test]')"
)
expect = async_api.expect

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
SHOTS = Path(__file__).resolve().parent.parent / "test-output" / "browser"
WAIT = 10_000 * UNIT  # ms, for Playwright's expectations

processes = test_processes.processes  # the fixture: real `python -m gateway` processes

# Installing Chromium on a fresh machine may take minutes; the tests themselves do not.
pytestmark = pytest.mark.timeout(int(420 * UNIT))


def _apt_install_chromium() -> str | None:
    """Try ``apt-get install -y chromium``; None if it is there now, else why not."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return (
            f"{CHROMIUM} is missing (install Debian's chromium package; not root with apt-get here)"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    last = ""
    # A stale package list makes the first install fail: update, then try again.
    for step in (["install", "-y", "chromium"], ["update"], ["install", "-y", "chromium"]):
        try:
            run = subprocess.run(
                ["apt-get", *step], env=env, capture_output=True, text=True, timeout=180
            )
        except subprocess.TimeoutExpired:
            return f"apt-get {' '.join(step)} timed out"
        last = (run.stderr.strip().splitlines() or [""])[-1]
        if os.path.exists(CHROMIUM):
            return None
    return f"{CHROMIUM} is missing and apt-get install -y chromium failed: {last}"


@pytest.fixture(scope="session")
def chromium() -> str:
    if not os.path.exists(CHROMIUM):
        reason = _apt_install_chromium()
        if reason is not None:
            pytest.skip(reason)
    return CHROMIUM


@contextlib.asynccontextmanager
async def browser(executable: str) -> AsyncIterator[Any]:
    async with async_api.async_playwright() as pw:
        b = await pw.chromium.launch(executable_path=executable, args=ARGS, headless=True)
        try:
            yield b
        finally:
            await b.close()


class Page:
    """One browser context and page, keeping the page's uncaught errors."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.errors: list[str] = []
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))

    @classmethod
    async def open(cls, b: Any, url: str) -> Page:
        context = await b.new_context()
        page = cls(await context.new_page())
        await page.page.goto(url)
        return page

    async def sign_in(self, email: str, name: str) -> None:
        p = self.page
        await p.fill("#email", email)
        await p.fill("#password", "correct horse battery")
        await p.fill("#name", name)
        await p.get_by_role("button", name="Sign in").click()
        await self.expect_state("connected")

    async def expect_state(self, state: str, timeout: float = WAIT) -> None:
        await expect(self.page.locator("#status")).to_have_attribute(
            "data-state", state, timeout=timeout
        )

    def project(self, name: str) -> Any:
        return self.page.locator("#projects li", has_text=name)

    async def create(self, name: str) -> None:
        await self.page.fill("#project-name", name)
        await self.page.get_by_role("button", name="Create").click()

    async def screenshot(self, name: str) -> Path:
        SHOTS.mkdir(parents=True, exist_ok=True)
        path = SHOTS / name
        await self.page.screenshot(path=str(path), full_page=True)
        return path


# -- The client's pure parts, and its transports, in the browser ------------------

UNITS_JS = """async () => {
  const m = await import("/client/gateway.js");
  const bounds = { minDelay: 100, maxDelay: 5000 };
  const samples = Array.from({ length: 2000 }, (_, i) => m.backoff(i % 12, bounds));
  const frame = { id: 7, op: "sub", ch: "projects", since: { offset: 42, epoch: "9f3ac2d1" } };
  const values = [0, 127, 128, -1, -33, 65536, 2 ** 32, 2 ** 53 - 1, -(2 ** 40), 1.5, "", "é".repeat(40),
                  "x".repeat(70000), null, true, [1, [2]], Array(20).fill(0), { a: { b: "c" } }];
  return {
    lowest: [0, 1, 2, 5, 6, 20].map((a) => m.backoff(a, bounds, () => 0)),
    highest: [0, 1, 2, 5, 6, 20].map((a) => m.backoff(a, bounds, () => 1)),
    sampleMin: Math.min(...samples), sampleMax: Math.max(...samples),
    distinct: new Set(samples).size,
    reconnect: CODES.map((c) => m.shouldReconnect(c)),
    msgpack: Array.from(m.msgpackEncode(frame)),
    json: m.JSON_CODEC.encode(frame),
    decoded: m.msgpackDecode(new Uint8Array(PACKED)),
    binary: Array.from(m.msgpackDecode(new Uint8Array(PACKED)).data[4]),
    roundTrips: values.every((v) => JSON.stringify(m.msgpackDecode(m.msgpackEncode(v))) === JSON.stringify(v)),
    endpoints: [m.endpoints("http://h:1/"), m.endpoints("wss://h/x/ws")],
  };
}"""

CODES = [1000, 1001, 1002, 1006, 1008, 1009, 1011, 4000, 4001, 4002, 4499, 4500, 4502, 4999]
PACKED_VALUE = {
    "op": "msg",
    "ch": "room:1",
    "offset": 2**40,
    "data": [1.25, -5, "ü", None, b"\x00\xff"],
}


async def test_client_backoff_close_codes_and_codecs(chromium):
    async with running_gateway() as gw, browser(chromium) as b:
        page = await Page.open(b, f"http://127.0.0.1:{gw.port}/demo")
        script = UNITS_JS.replace("CODES", str(CODES)).replace(
            "PACKED", str(list(msgspec.msgpack.encode(PACKED_VALUE)))
        )
        out = await page.page.evaluate(script)
    # Full jitter: 0 at worst, min(maxDelay, minDelay * 2^attempt) at best.
    assert out["lowest"] == [0] * 6
    assert out["highest"] == [100, 200, 400, 3200, 5000, 5000]
    assert 0 <= out["sampleMin"] < 50 and 4000 < out["sampleMax"] < 5000 and out["distinct"] > 1900
    assert out["reconnect"] == [should_reconnect(c) for c in CODES]
    frame = {"id": 7, "op": "sub", "ch": "projects", "since": {"offset": 42, "epoch": "9f3ac2d1"}}
    assert bytes(out["msgpack"]) == msgspec.msgpack.encode(frame)
    assert msgspec.json.decode(out["json"]) == frame
    assert out["decoded"]["data"][:4] == PACKED_VALUE["data"][:4] and out["binary"] == [0, 255]
    assert {k: out["decoded"][k] for k in ("op", "ch", "offset")} == {
        "op": "msg",
        "ch": "room:1",
        "offset": 2**40,
    }
    assert out["roundTrips"] is True
    assert out["endpoints"] == [{"http": "http://h:1", "ws": "ws://h:1/ws"},
                                {"http": "https://h/x", "ws": "wss://h/x/ws"}]  # fmt: skip
    assert page.errors == []


TRANSPORT_JS = """async ([options, token]) => {
  const { Gateway } = await import("/client/gateway.js");
  if (options.brokenWebSocket) {
    // A proxy that refuses sockets: every open fails, while plain HTTP works.
    window.WebSocket = class { constructor() { setTimeout(() => this.onclose({ code: 1006, reason: "" }), 5); }
                               close() {} send() {} };
  }
  const gw = new Gateway(location.origin, { token, minDelay: 10, maxDelay: 50, ...options });
  const states = [];
  gw.on("state", (s) => states.push(s));
  const got = [];
  const sub = gw.subscribe("room:1", { onMessage: (data) => got.push(data) });
  await gw.connect();
  await sub.ready;
  await gw.publish("room:1", { n: 1, text: "é" });
  const refused = await gw.publish("admin:1", 1).then(() => null, (e) => e.code);
  const rpc = await gw.rpc("GET", "/api/projects").then((r) => r.status, (e) => e.code);
  while (got.length < 1) await new Promise((r) => setTimeout(r, 10));
  const transport = gw.transport.kind;
  await sub.unsubscribe();
  gw.disconnect();
  return { got, refused, rpc, transport, states };
}"""


@pytest.mark.parametrize(
    ("options", "transport"),
    [
        ({"codec": "msgpack"}, "websocket"),
        ({"transports": ["sse"]}, "sse"),
        ({"transports": ["longpoll"]}, "longpoll"),
        (
            {"brokenWebSocket": True, "openAttempts": 2, "transports": ["websocket", "longpoll"]},
            "longpoll",
        ),
    ],
    ids=["websocket-msgpack", "sse", "longpoll", "fallback"],
)
async def test_client_transports_against_a_gateway(chromium, options, transport):
    async with running_gateway() as gw, browser(chromium) as b:
        page = await Page.open(b, f"http://127.0.0.1:{gw.port}/demo")
        out = await page.page.evaluate(TRANSPORT_JS, [options, token_for(gw)])
    assert out["transport"] == transport
    assert out["got"] == [{"n": 1, "text": "é"}]
    assert out["refused"] == 103  # the token allows room:* only
    assert out["rpc"] == 503  # this gateway has no database: the core answers 503
    assert out["states"][0] == "connecting" and out["states"][-2:] == ["connected", "disconnected"]
    assert page.errors == []


REFRESH_JS = """async ([short, long, seconds]) => {
  const { Gateway } = await import("/client/gateway.js");
  const reasons = [];
  const getToken = async ({ reason }) => { reasons.push(reason); return reason === "connect" ? short : long; };
  const gw = new Gateway(location.origin, { getToken });
  const states = [];
  gw.on("state", (s) => states.push(s));
  const got = [];
  gw.subscribe("room:1", { onMessage: (data) => got.push(data) });
  await gw.connect();
  // Past the first token's exp and grace: still the same connection.
  await new Promise((r) => setTimeout(r, seconds * 1000));
  await gw.publish("room:1", "still here");
  while (got.length < 1) await new Promise((r) => setTimeout(r, 10));
  gw.disconnect();
  return { reasons, states, got };
}"""


async def test_client_refreshes_its_token_in_band_before_expiry(chromium):
    async with running_gateway(token_grace=0.2) as gw, browser(chromium) as b:
        page = await Page.open(b, f"http://127.0.0.1:{gw.port}/demo")
        short, long = token_for(gw, ttl=2), token_for(gw, ttl=600)
        out = await page.page.evaluate(REFRESH_JS, [short, long, 3 * UNIT])
    # The `expiring` push (TOKEN_NOTICE is 60 s, more than the token has) asked for a new token.
    assert out["reasons"] == ["connect", "expiring"]
    assert out["states"] == ["connecting", "connected", "disconnected"]
    assert out["got"] == ["still here"]
    assert page.errors == []


async def test_client_and_demo_are_served_with_cache_validators():
    http = AsyncHTTPClient(force_instance=True)
    try:
        async with running_gateway() as gw:
            base = f"http://127.0.0.1:{gw.port}"
            for path, kind in (("/client/gateway.js", "text/javascript"), ("/demo", "text/html"),
                               ("/demo/", "text/html"), ("/demo/demo.js", "text/javascript"),
                               ("/demo/demo.css", "text/css")):  # fmt: skip
                r = await http.fetch(base + path)
                assert r.headers["Content-Type"].startswith(kind), path
                assert r.headers["Cache-Control"] == "no-cache" and r.headers["ETag"], path
            r = await http.fetch(base + "/client/gateway.js?v=1")
            assert "max-age=31536000" in r.headers["Cache-Control"]
            again = await http.fetch(base + "/client/gateway.js", raise_error=False,
                                     headers={"If-None-Match": r.headers["ETag"]})  # fmt: skip
            assert again.code == 304
            assert (await http.fetch(base + "/demo/gateway.py", raise_error=False)).code == 404
    finally:
        http.close()


# -- The demo, end to end ---------------------------------------------------------


async def test_demo_is_live_across_pages_and_recovers_after_a_gateway_is_killed(
    chromium, processes, tmp_path, data_dir, redis_url, clean_db, capsys
):
    env = {
        "REDIS_URL": redis_url, "REDIS_PREFIX": unique_prefix(), "JWT_SECRET": SECRET,
        "DATABASE_URL": clean_db["database_url"], "DATABASE_SCHEMA": clean_db["database_schema"],
        "PRESENCE_CHANNELS": "projects", "PASSWORD_TIME_COST": "1", "PASSWORD_MEMORY_KIB": "8192",
    }  # fmt: skip
    gateway = processes(**env)
    other = processes(**env)  # a second node on the same Redis and database
    token = mint_token(Settings(jwt_secret=SECRET), "tester", ["projects"], extra={"role": "admin"})
    rest, rest_other = ApiClient(gateway.port, token), ApiClient(other.port, token)
    restarted: test_processes.GatewayProcess | None = None
    url = f"http://127.0.0.1:{gateway.port}/demo"
    try:
        async with browser(chromium) as b:
            ada, bob = await Page.open(b, url), await Page.open(b, url)
            await ada.sign_in("ada@example.com", "Ada")
            await bob.sign_in("bob@example.com", "Bob")

            await ada.create("Apollo")
            status, _, _ = await rest.call("POST", "/api/projects", {**PROJECT, "name": "Borealis"})
            assert status == 201
            for page in (ada, bob):
                await expect(page.project("Apollo")).to_have_count(1, timeout=WAIT)
                await expect(page.project("Borealis")).to_have_count(1, timeout=WAIT)
                await expect(page.page.locator("#presence")).to_contain_text("Ada", timeout=WAIT)
                await expect(page.page.locator("#presence")).to_contain_text("Bob", timeout=WAIT)
            await expect(ada.page.locator("#presence")).to_contain_text("Ada (you)")
            # Only its owner (or an admin) deletes a project (docs/security.md).
            await ada.project("Apollo").get_by_role("button", name="Delete").click()
            await expect(bob.project("Apollo")).to_have_count(0, timeout=WAIT)
            shots = [await ada.screenshot("1-live-ada.png"), await bob.screenshot("1-live-bob.png")]

            gateway.stop(signal.SIGKILL)
            for page in (ada, bob):
                await page.expect_state("reconnecting")
            shots.append(await ada.screenshot("2-reconnecting.png"))
            # Written through the other node while the pages' node is down: kept
            # in the channel's history in Redis.
            status, _, _ = await rest_other.call(
                "POST", "/api/projects", {**PROJECT, "name": "Cassini"}
            )
            assert status == 201

            restarted = test_processes.GatewayProcess(tmp_path, data_dir, **env)
            restarted.port, restarted.env["PORT"] = gateway.port, str(gateway.port)
            restarted.start()
            for page in (ada, bob):
                await page.expect_state("connected", timeout=2 * WAIT)
                await expect(page.project("Cassini")).to_have_count(1, timeout=WAIT)
                await expect(page.page.locator("#recovery")).to_have_attribute(
                    "data-recovered", "true"
                )
                await expect(page.project("Borealis")).to_have_count(1)
                await expect(page.project("Apollo")).to_have_count(0)
            shots += [
                await ada.screenshot("3-recovered-ada.png"),
                await bob.screenshot("3-recovered-bob.png"),
            ]
            assert ada.errors == [] and bob.errors == []
    finally:
        rest.close()
        rest_other.close()
        if restarted is not None and restarted.proc is not None and restarted.proc.poll() is None:
            restarted.stop(signal.SIGKILL)
    with capsys.disabled():
        print(f"\nscreenshots: {SHOTS} ({', '.join(p.name for p in shots)})")


async def test_the_demo_keeps_a_deleted_project_deleted_when_an_older_event_comes_late(
    chromium, clean_db
):
    """Two processes publish in the order their writes finish, and a relayed event comes
    seconds late: an update can arrive after the deletion that followed it (docs/rest.md).
    Two core processes, a PATCH and a DELETE of one project at once: 19 of 300 pairs
    delivered ``deleted`` v2 and then ``updated`` v2, which put the project back on every
    board (the demo applied what was not older than what it showed: nothing)."""
    async with running_gateway(**clean_db) as gw, browser(chromium) as b:
        admin = ApiClient(gw.port, mint_token(gw.settings, "admin", [], extra={"role": "admin"}))
        try:
            page = await Page.open(b, f"http://127.0.0.1:{gw.port}/demo")
            await page.sign_in("ada@example.com", "Ada")
            status, _, doomed = await admin.call(
                "POST", "/api/projects", {**PROJECT, "name": "Doomed"}
            )
            assert status == 201
            await expect(page.project("Doomed")).to_have_count(1, timeout=WAIT)
            assert (await admin.call("DELETE", f"/api/projects/{doomed['id']}"))[0] == 204
            late = {"type": "updated", "id": doomed["id"], "version": 1, "data": doomed}
            await gw.ctx.node.publish("projects", msgspec.json.encode(late))
            status, _, _ = await admin.call("POST", "/api/projects", {**PROJECT, "name": "Later"})
            assert status == 201
            # Events of one channel arrive in order: once Later is shown, the late one came.
            await expect(page.project("Later")).to_have_count(1, timeout=WAIT)
            assert await page.project("Doomed").count() == 0  # not put back
            assert page.errors == []
        finally:
            admin.close()


# -- Hooks: a browser with no token, admitted by its cookie -----------------------------

COOKIE_JS = """async ([kind]) => {
  const { Gateway } = await import("/client/gateway.js");
  const gw = new Gateway(location.origin, { tokenless: true, transports: [kind] });
  const got = [], server = [];
  gw.on("publication", (p) => server.push(p));
  await gw.connect();
  const sub = gw.subscribe("chat:lobby", { onMessage: (data) => got.push(data) });
  await sub.ready;
  const who = await gw.call("whoami");
  await gw.publish("chat:lobby", { text: "darn browsers" });
  const refused = await new Promise((resolve) => gw.subscribe("private:bob", { onError: (e) => resolve(e.code) }));
  while (got.length < 1 || server.length < 1) await new Promise((r) => setTimeout(r, 10));
  const transport = gw.transport.kind;
  gw.disconnect();
  return { who, got, server, refused, transport, cookie: document.cookie };
}"""


@pytest.mark.parametrize("kind", ["websocket", "longpoll"])
async def test_a_browser_without_a_token_is_admitted_by_its_cookie(chromium, tmp_path, kind):
    backend = HookBackend(tmp_path / "backend.log")
    try:
        async with running_gateway(**hooked(backend)) as gw, browser(chromium) as b:
            page = await Page.open(b, backend.url("/login?user=ada"))  # the application's login
            await page.page.goto(f"http://127.0.0.1:{gw.port}/demo")
            run = asyncio.create_task(page.page.evaluate(COOKIE_JS, [kind]))
            await until(lambda: gw.hub.subscriber_count("user:ada") == 1 or run.done())
            await gw.ctx.node.publish("user:ada", b'{"note":"for ada"}')
            out = await run
        asked = backend.requests("connect")
    finally:
        backend.stop()
    assert out["transport"] == kind
    assert out["who"] == {"user": "ada"}
    assert out["got"] == [{"from": "ada", "text": "**** browsers"}]  # rewritten by the backend
    server_side = {"ch": "user:ada", "data": {"note": "for ada"}, "offset": None, "epoch": None}
    assert out["server"] == [server_side]  # no handler of the app's: a "publication" event
    assert out["refused"] == 403  # the backend's own code
    assert out["cookie"] == ""  # HttpOnly: the page never sees it, the gateway gets it
    assert asked[0]["user"] is None and asked[0]["headers"]["Cookie"].startswith("session=")
    assert asked[0]["headers"]["Origin"] == f"http://127.0.0.1:{gw.port}"
    assert page.errors == []


ANOTHER_PAGE_JS = """async ([port]) => {
  const got = [];
  const ws = new WebSocket(`ws://127.0.0.1:${port}/ws`, ["gw.v1.json"]);
  ws.onmessage = (e) => got.push(JSON.parse(e.data));
  const opened = await new Promise((resolve) => { ws.onopen = () => resolve(true); ws.onerror = () => resolve(false); });
  if (opened) while (!got.some((m) => m.op === "msg")) await new Promise((r) => setTimeout(r, 10));
  return { opened, got };
}"""


async def test_a_page_of_another_origin_cannot_open_a_socket_with_the_user_s_cookie(
    chromium, tmp_path
):
    """Cross-site WebSocket hijacking: a page of another origin of the same site (here
    the application's own, another port) opened a socket to the gateway; Chromium sent
    the user's SameSite=Lax session cookie with it, the connect hook admitted her, and
    the page read her private pushes (`ALLOWED_ORIGINS=*`, the default)."""
    backend = HookBackend(tmp_path / "backend.log")
    try:
        async with running_gateway(**hooked(backend)) as gw, browser(chromium) as b:
            page = await Page.open(b, backend.url("/login?user=ada"))  # not the gateway's origin
            run = asyncio.create_task(page.page.evaluate(ANOTHER_PAGE_JS, [gw.port]))
            await until(lambda: gw.hub.subscriber_count("user:ada") == 1 or run.done())
            await gw.ctx.node.publish("user:ada", b'{"note":"for ada only"}')
            out = await run
        asked = backend.requests("connect")
    finally:
        backend.stop()
    assert out == {"opened": False, "got": []}
    assert asked == []  # refused before the application's backend was asked


HOOKED_HISTORY_JS = """async ([kind]) => {
  const { Gateway } = await import("/client/gateway.js");
  const gw = new Gateway(location.origin, { tokenless: true, transports: [kind], minDelay: 50, maxDelay: 200 });
  const state = (window.__hooked = { got: [], recovered: [], errors: [], made: 0 });
  gw.on("subscribed", (sub) => {
    state.made += 1;
    sub.handlers.onMessage = (data, meta) => state.got.push([meta.offset, data.n]);
    sub.handlers.onRecovered = (recovered) => state.recovered.push(recovered);
  });
  gw.on("error", (err) => state.errors.push(err.code));
  await gw.connect();
  if (kind === "sse") gw.subscribe("room:1"); // an event stream opens for a channel of its own
  state.gw = gw;
}"""


@pytest.mark.parametrize("kind", ["websocket", "sse"])
async def test_a_connect_hook_s_history_channel_loses_nothing_across_a_reconnect(
    chromium, tmp_path, kind
):
    # The gateway makes the hook's channel again on the new connection: gateway.js reads
    # what was missed from history (over SSE, the gateway recovers it from the id).
    backend = HookBackend(tmp_path / "backend.log")
    try:
        settings = hooked(backend, history_channels=("user:*",))
        async with running_gateway(**settings) as gw, browser(chromium) as b:
            page = await Page.open(b, backend.url("/login?user=ada"))
            await page.page.goto(f"http://127.0.0.1:{gw.port}/demo")
            await page.page.evaluate(HOOKED_HISTORY_JS, [kind])

            async def got(n: int) -> bool:
                return len(await page.page.evaluate("window.__hooked.got")) >= n

            await until(lambda: gw.hub.subscriber_count("user:ada") == 1)
            await gw.ctx.node.publish("user:ada", b'{"n": 1}')
            await until(lambda: got(1))
            gw.ctx.status.draining = True  # reconnects refused (503) while publications go on
            assert gw.hub.close_subject("ada", CloseCode.SHUTDOWN) == 1
            await until(lambda: gw.hub.subscriber_count("user:ada") == 0)
            for n in (2, 3):
                await gw.ctx.node.publish("user:ada", b'{"n": %d}' % n)
            gw.ctx.status.draining = False
            await until(lambda: got(3), timeout=10 * UNIT)
            await gw.ctx.node.publish("user:ada", b'{"n": 4}')
            await until(lambda: got(4))
            out = await page.page.evaluate(
                "({ got: window.__hooked.got, recovered: window.__hooked.recovered,"
                " errors: window.__hooked.errors, made: window.__hooked.made })"
            )
    finally:
        backend.stop()
    assert out["got"] == [[1, 1], [2, 2], [3, 3], [4, 4]]  # each once, in order
    assert out["recovered"] == [True] and out["errors"] == [] and out["made"] == 1
    assert page.errors == []


# -- permessage-deflate (issue 20): the browser negotiates, gateway.js needs nothing -----

COMPRESSED_JS = """async ([token, big]) => {
  const raw = new WebSocket(`ws://${location.host}/ws?token=${token}`, "gw.v1.json");
  await new Promise((resolve, reject) => { raw.onopen = resolve; raw.onerror = reject; });
  const extensions = raw.extensions;
  raw.close();
  const { Gateway } = await import("/client/gateway.js");
  const gw = new Gateway(location.origin, { token });
  const got = [];
  const sub = gw.subscribe("room:z", { onMessage: (data) => got.push(data) });
  await gw.connect();
  await sub.ready;
  // Chromium compresses what it sends too: two publications, each inflated on its own.
  await gw.publish("room:z", big);
  await gw.publish("room:z", big);
  while (got.length < 2) await new Promise((r) => setTimeout(r, 10));
  gw.disconnect();
  return { extensions, got };
}"""


async def test_chromium_negotiates_compression_and_gets_compressed_publications(chromium):
    big = {
        "items": [{"id": i, "name": "widget", "price": 9.5, "tags": ["a", "b"]} for i in range(40)]
    }
    async with running_gateway(compression=True) as gw, browser(chromium) as b:
        page = await Page.open(b, f"http://127.0.0.1:{gw.port}/demo")
        out = await page.page.evaluate(COMPRESSED_JS, [token_for(gw), big])
        compressor = gw.ctx.compressor
        assert compressor is not None
    # What Chromium agreed to: the gateway's answer to its offer.
    assert out["extensions"] == (
        "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
    )
    assert out["got"] == [big, big]
    # The two deliveries went out as the shared compressed frame, a fraction of the plain one.
    assert compressor.delivered == 2
    assert compressor.delivered_bytes < compressor.delivered_plain / 4
    assert page.errors == []


# -- Against a large recovery, and a faulty or hostile gateway (docs/security.md) -----------

BACKLOG_JS = """async ([token, since]) => {
  const { Gateway } = await import("/client/gateway.js");
  const gw = new Gateway(location.origin, { token });
  const out = (window.__backlog = { states: [], got: [], gaps: 0, recovered: [] });
  gw.on("state", (s) => out.states.push(s));
  gw.subscribe("feed:big", { since, onMessage: (data, { offset }) => out.got.push(offset),
                             onGap: () => out.gaps++, onRecovered: (r) => out.recovered.push(r) });
  await gw.connect();
}"""


async def test_the_browser_client_recovers_a_large_backlog_whole_on_one_connection(
    chromium, redis_url
):
    # 99 missed publications of 60 KB: the gateway sends 256 KiB of them after its
    # `recovered: true`, then a `gap`; gateway.js pages the rest with `history`. Every
    # one arrives once, in order, on one connection; onGap was called for that gap
    # although nothing was lost (an application reloading its state on it, for nothing).
    prefix = unique_prefix()
    async with running_gateway(
        RedisBroker(redis_url, prefix), redis_url=redis_url, redis_prefix=prefix,
        history_channels=("feed:*",), history_size=100,
    ) as gw, browser(chromium) as b:  # fmt: skip
        node = gw.ctx.node
        first = await node.publish("feed:big", BIG)
        for _ in range(99):
            await node.publish("feed:big", BIG)
        page = await Page.open(b, f"http://127.0.0.1:{gw.port}/demo")
        since = {"offset": first.offset, "epoch": first.epoch}
        await page.page.evaluate(BACKLOG_JS, [token_for(gw, channels=("feed:*",)), since])

        async def got(n: int) -> bool:
            return len(await page.page.evaluate("window.__backlog.got")) >= n

        await until(lambda: got(99))
        live = await node.publish("feed:big", b'{"n":1}')
        await until(lambda: got(100))
        out = await page.page.evaluate("window.__backlog")
    assert out["got"] == [*range(2, 101), live.offset]
    assert (
        out["gaps"] == 0 and all(out["recovered"]) and out["states"] == ["connecting", "connected"]
    )
    assert page.errors == []


HOSTILE_JS = """async ([url, script]) => {
  const { Gateway } = await import("/client/gateway.js");
  const gw = new Gateway(url, { token: "t", timeout: 2000, minDelay: 10, maxDelay: 50, pingInterval: 0 });
  const out = (window.__hostile = { states: [], got: [], gaps: 0, errors: [], replies: [] });
  gw.on("state", (s) => out.states.push(s));
  gw.on("error", (e) => out.errors.push(String(e.code)));
  gw.subscribe("c", { onMessage: (data, { offset }) => out.got.push(offset), onGap: () => out.gaps++ });
  await gw.connect();
  if (script === "frames") {
    for (let i = 0; i < 2; i++) out.replies.push(await gw.ping().then(() => "ok", (e) => String(e.code)));
  }
}"""


async def _hostile(b: Any, page_gw: Any, handler: Any, script: str, done: str) -> Any:
    """What gateway.js saw connected to the fake gateway ``handler``, once ``done``."""
    page = await Page.open(b, f"http://127.0.0.1:{page_gw.port}/demo")
    async with fake_gateway(handler) as url:
        await page.page.evaluate(HOSTILE_JS, [url, script])

        async def settled() -> bool:
            return bool(
                await page.page.evaluate(f"(({{got, replies}}) => {done})(window.__hostile)")
            )

        await until(settled)
        out = await page.page.evaluate("window.__hostile")
    assert page.errors == []  # nothing thrown in the page
    return out


async def test_the_browser_client_bounds_a_repair_and_skips_frames_it_cannot_use(chromium):
    # A gap, then live pushes and no history answer: gateway.js held every one (without
    # bound) and waited for `timeout`, then delivered them after the hole. A history page
    # of publications already seen, its top ahead: it asked again forever. A frame that is
    # not JSON, `null`, or an error reply without `error` threw in the page, and the command
    # answered so never settled.
    async def repair(ws: Any, n: int) -> None:
        async for cmd in commands(ws):
            if cmd["op"] == "sub" and n == 1:
                await subscribed_then_gap(ws, cmd)
            elif cmd["op"] == "history" and n == 1:
                for offset in range(100, 1200):  # live ones; the history never answers
                    await ws.send(frame(op="msg", ch="c", data=0, offset=offset, epoch="e"))
            elif cmd["op"] == "sub" and n == 2:  # recovers from 6, then the same trick
                assert cmd["since"] == {"offset": 6, "epoch": "e"}
                await ws.send(frame(id=cmd["id"], ok=True, recovered=True, offset=7, epoch="e"))
                await ws.send(frame(op="msg", ch="c", data=7, offset=7, epoch="e"))
                await ws.send(frame(op="gap", ch="c"))
            elif cmd["op"] == "history":
                stale = [{"offset": cmd["since"], "data": 0}]
                await ws.send(
                    frame(id=cmd["id"], ok=True, offset=900, epoch="e", publications=stale)
                )
                await ws.send(frame(op="msg", ch="c", data=901, offset=901, epoch="e"))

    async def frames(ws: Any, n: int) -> None:
        async for cmd in commands(ws):
            if cmd["op"] == "ping":
                for odd in ("{not json", "null", "[]", frame(id=10**6, ok=False),
                            frame(op="msg", ch=5), frame(op="future")):  # fmt: skip
                    await ws.send(odd)
                answer = (
                    {"id": cmd["id"], "ok": False}
                    if cmd["id"] == 2
                    else {"id": cmd["id"], "ok": True}
                )
                await ws.send(frame(**answer))
            else:
                await ws.send(frame(id=cmd["id"], ok=True))

    async with running_gateway() as gw, browser(chromium) as b:
        out = await _hostile(b, gw, repair, "repair", "got.length >= 3")
        assert out["got"] == [6, 7, 901] and out["gaps"] == 1  # the stale page: a gap, once
        assert out["states"] == ["connecting", "connected", "reconnecting", "connected"]

        out = await _hostile(b, gw, frames, "frames", "replies.length >= 2")
        assert out["replies"] == ["111", "ok"]  # an error reply without its error is one
        assert out["errors"] == ["bad_frame"]  # once per connection
        assert out["states"] == ["connecting", "connected"]
