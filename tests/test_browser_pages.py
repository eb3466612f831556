"""What the gateway's pages let a browser do with other people's data: their headers, what
the documentation pages keep, and the browser client's MessagePack decoding, in Chromium.

The pages' own rendering of hostile data (names, channels, presence, publications) is
checked by hand in docs/security.md ("Pages and scripts in the browser"); these tests
hold what was fixed.
"""

from __future__ import annotations

import asyncpg
from tornado.httpclient import AsyncHTTPClient

from tests import test_browser
from tests.harness import ApiClient, running_gateway, token_for
from tests.test_browser import WAIT, Page, browser, expect
from tests.test_core_rest import PROJECT

chromium = test_browser.chromium  # the fixture: Debian's chromium

PAGES = ("/demo", "/demo/", "/admin", "/admin/", "/docs", "/docs/", "/redoc", "/redoc/")


async def test_every_page_forbids_framing_inline_scripts_and_sniffing():
    http = AsyncHTTPClient(force_instance=True)
    try:
        async with running_gateway() as gw:
            for path in PAGES:
                r = await http.fetch(f"http://127.0.0.1:{gw.port}{path}")
                policy = dict(
                    part.strip().split(" ", 1)
                    for part in r.headers.get("Content-Security-Policy", "").split(";")
                    if part.strip()
                )
                assert r.headers["Content-Type"] == "text/html; charset=utf-8", path
                assert r.headers.get("X-Content-Type-Options") == "nosniff", path
                assert r.headers.get("Cross-Origin-Opener-Policy") == "same-origin", path
                assert policy.get("frame-ancestors") == "'none'", (path, policy)
                assert policy.get("object-src") == "'none'", (path, policy)
                scripts = policy.get("script-src", policy.get("default-src", ""))
                assert scripts.startswith("'self'") and "unsafe" not in scripts, (path, policy)
            for path in ("/openapi.json", "/client/gateway.js", "/admin/admin.js"):
                r = await http.fetch(f"http://127.0.0.1:{gw.port}{path}")
                assert r.headers.get("X-Content-Type-Options") == "nosniff", path
    finally:
        http.close()


async def test_the_docs_pages_keep_no_credential_and_load_nothing_from_elsewhere(chromium):
    """Swagger UI's Authorize wrote what it got (with the password flow: the password, the
    access and the refresh token, in clear) to the gateway origin's localStorage, for every
    page of the origin to read, after the tab was closed; ReDoc fetched its logo from
    cdn.redoc.ly on each view."""
    async with running_gateway() as gw, browser(chromium) as b:
        base = f"http://127.0.0.1:{gw.port}"
        context = await b.new_context()
        asked: set[str] = set()  # of another origin, and what the page's policy stopped
        stopped: set[str] = set()
        context.on("request", lambda r: asked.add(r.url))
        context.on("requestfailed", lambda r: r.failure == "csp" and stopped.add(r.url))
        page = Page(await context.new_page())
        p = page.page
        await p.goto(base + "/docs")
        token = token_for(gw)
        await p.get_by_role("button", name="Authorize").first.click()
        await p.fill("#auth-bearer-value", token)
        await p.locator(".modal-ux button.authorize").first.click()
        logout = p.locator(".modal-ux button", has_text="Logout")
        await expect(logout).to_be_visible(timeout=WAIT)
        assert await p.locator(".opblock").count() > 10  # the policy lets Swagger UI work
        # Another page of the origin, later: nothing of the token is stored.
        other = await context.new_page()
        await other.goto(base + "/demo")
        stored = await other.evaluate("() => JSON.stringify({...localStorage, ...sessionStorage})")
        assert token not in stored and token[-20:] not in stored, stored
        assert await other.evaluate("() => document.cookie") == ""
        redoc = await context.new_page()
        await redoc.goto(base + "/redoc")
        await redoc.wait_for_selector("[data-section-id]", timeout=WAIT)
        await redoc.wait_for_load_state("networkidle")
        ours = (base + "/", f"blob:{base}/")
        assert {url for url in asked - stopped if not url.startswith(ours)} == set()
        assert page.errors == []


PROTO_JS = """async (token) => {
  const { Gateway } = await import("/client/gateway.js");
  const got = {};
  const gws = ["json", "msgpack"].map((codec) => new Gateway(location.origin, { token, codec }));
  for (const [i, gw] of gws.entries()) {
    gw.subscribe("room:1", { onMessage: (data) => { got[gw.codec.subprotocol] = data; } });
    await gw.connect();
    await gw.subscriptions.get("room:1").ready;
  }
  // A publisher on the shared channel:
  await gws[0].publish("room:1", { text: "hi", __proto__: null, ["__proto__"]: { admin: true } });
  while (Object.keys(got).length < 2) await new Promise((r) => setTimeout(r, 10));
  gws.forEach((gw) => gw.disconnect());
  const look = (d) => ({ admin: d.admin ?? null, keys: Object.keys(d), plain: Object.getPrototypeOf(d) === Object.prototype,
                         json: JSON.stringify(d) });
  return { json: look(got["gw.v1.json"]), msgpack: look(got["gw.v1.msgpack"]) };
}"""


async def test_a_publisher_s_proto_key_is_data_for_msgpack_subscribers_too(chromium):
    """A publication ``{"__proto__": {"admin": true}}``: the JSON codec's subscribers got a
    key ``__proto__``; gateway.js's MessagePack decoder set the object's prototype instead,
    so its subscribers saw ``data.admin === true`` (inherited), a key the publisher never
    wrote at the top and that a publish hook checking keys never saw."""
    async with running_gateway() as gw, browser(chromium) as b:
        page = await Page.open(b, f"http://127.0.0.1:{gw.port}/demo")
        out = await page.page.evaluate(PROTO_JS, token_for(gw, pub=True))
    assert out["json"]["admin"] is None and out["json"]["plain"] is True
    assert out["msgpack"] == out["json"], out
    assert out["json"]["keys"] == ["text", "__proto__"]
    assert page.errors == []


COUNT_JS = """() => {
  window.added = 0;
  new MutationObserver((changes) => changes.forEach((c) => {
    window.added += [...c.addedNodes].filter((n) => n.nodeName === "LI").length;
  })).observe(document.querySelector("#projects"), { childList: true });
}"""


async def test_the_demo_redraws_only_the_project_that_changed(chromium, clean_db):
    """Each change event redrew the whole board: with 5,000 projects (five accounts' worth)
    ~130 ms of the viewer's page an event, and an account may change its own projects 20
    times a second (`RATE_REST`): every viewer's tab fell behind, 84% busy."""
    board = 300
    conn = await asyncpg.connect(clean_db["database_url"])
    try:
        await conn.execute(
            f'insert into "{clean_db["database_schema"]}".projects (name, owner_email, budget, '
            "starts_on) select 'filler ' || g, 'owner@example.com', 1, '2026-12-03' "
            "from generate_series(1, $1) g",
            board,
        )
    finally:
        await conn.close()
    async with running_gateway(**clean_db) as gw, browser(chromium) as b:
        page = await Page.open(b, f"http://127.0.0.1:{gw.port}/demo")
        await page.sign_in("viewer@example.com", "Viewer")
        items = page.page.locator("#projects li")
        await expect(items).to_have_count(board, timeout=WAIT)
        await page.page.evaluate(COUNT_JS)
        api = ApiClient(gw.port, token_for(gw, "owner", extra={"role": "admin"}))
        try:
            merge = {"Content-Type": "application/merge-patch+json"}
            status, _, _ = await api.call("PATCH", "/api/projects/7", {"name": "renamed"},
                                          headers=merge)  # fmt: skip
            assert status == 200
            await expect(page.project("renamed")).to_have_count(1, timeout=WAIT)
            assert (await api.call("DELETE", "/api/projects/8"))[0] == 204
            await expect(items).to_have_count(board - 1, timeout=WAIT)
            status, _, made = await api.call("POST", "/api/projects", {**PROJECT, "name": "new"})
            assert status == 201
            await expect(items.first).to_contain_text("new", timeout=WAIT)
        finally:
            api.close()
        assert await page.page.evaluate("() => window.added") == 2  # "renamed" and "new"
        order = await items.evaluate_all("(all) => all.map((li) => Number(li.dataset.id))")
        assert order == sorted(order, reverse=True) and 8 not in order and made["id"] in order
        assert page.errors == []
