"""The admin console (/admin) in headless Chromium, against two real gateway processes.

An admin signs in (the core's token endpoint), sees the connection of a
second browser appear in the live figures, finds that user's connection and
disconnects it (confirming), and publishes into a channel that a third page
shows (confirming). The screenshot in docs/operations.md is taken here:
with ``UPDATE_SCREENSHOTS=1`` it is written to ``docs/admin-console.png``,
otherwise beside the test's other files (so a test run leaves the checkout
as it found it). The browser client also follows a server-side subscription
(a ``subscribed`` push).
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest

from core.infra.mint import mint_token
from core.infra.settings import Settings
from tests import test_browser, test_processes
from tests.harness import SECRET, ApiClient
from tests.test_authz import new_person
from tests.test_browser import WAIT, Page, browser, expect
from tests.test_serverapi_processes import gateway_env

processes = test_processes.processes  # the fixture: real `python -m gateway` processes
chromium = test_browser.chromium  # the fixture: Debian's chromium
DOCS_SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "admin-console.png"


@pytest.fixture
def screenshot(tmp_path: Path) -> Path:
    """Where the console's screenshot goes: docs/ only when asked to update it."""
    if os.environ.get("UPDATE_SCREENSHOTS") == "1":
        return DOCS_SCREENSHOT
    return tmp_path / "admin-console.png"


pytestmark = pytest.mark.timeout(180)

VIEWER_JS = """async ([token, channel]) => {
  const { Gateway } = await import("/client/gateway.js");
  const gw = (window.gw = new Gateway(location.origin, { token }));
  window.got = [];
  window.states = [];
  gw.on("state", (s, info) => window.states.push([s, info.code ?? null]));
  gw.on("subscribed", (sub) => { sub.handlers.onMessage = (data) => window.got.push([sub.channel, data]); });
  gw.subscribe(channel, { onMessage: (data) => window.got.push([channel, data]) });
  await gw.connect();
  return gw.transport.kind;
}"""


async def _viewer(b: Any, port: int, token: str, channel: str) -> Page:
    page = await Page.open(b, f"http://127.0.0.1:{port}/demo")
    assert await page.page.evaluate(VIEWER_JS, [token, channel]) == "websocket"
    return page


async def _got(page: Page) -> list[list[Any]]:
    return await page.page.evaluate("() => window.got")


async def test_an_admin_watches_finds_disconnects_and_publishes(
    chromium, processes, redis_url, clean_db, screenshot
):
    env = gateway_env(
        redis_url,
        clean_db,
        PRESENCE_CHANNELS="room:*",
        HISTORY_CHANNELS="room:*",
        PASSWORD_TIME_COST="1",
        PASSWORD_MEMORY_KIB="8192",
    )
    a, b = processes(**env), processes(**env)
    admin = await new_person(a, clean_db, "admin")
    settings = Settings(jwt_secret=SECRET)
    user_token = mint_token(settings, "visitor-7", ["room:*"])
    viewer_token = mint_token(settings, "viewer-1", ["room:*"])
    async with browser(chromium) as br:
        console = await Page.open(br, f"http://127.0.0.1:{a.port}/admin")
        console.page.on("dialog", lambda dialog: dialog.accept())
        p = console.page
        await p.fill("#email", admin.email)
        await p.fill("#password", "long enough pw")
        await p.get_by_role("button", name="Sign in").click()
        await console.expect_state("connected")
        total = p.locator("#total-connections")
        await expect(total).to_have_text("1", timeout=WAIT)  # the console's own socket
        await expect(p.locator("#total-nodes")).to_have_text("2", timeout=WAIT)

        # A second browser, on the other gateway: its connection appears.
        visitor = await _viewer(br, b.port, user_token, "room:5")
        await expect(total).to_have_text("2", timeout=WAIT)
        viewer = await _viewer(br, b.port, viewer_token, "room:1")
        await expect(total).to_have_text("3", timeout=WAIT)

        # The visitor's connection, found by user, disconnected after a confirmation.
        await p.fill("#user", "visitor-7")
        await p.get_by_role("button", name="Search").click()
        rows = p.locator("#connections tbody tr")
        await expect(rows).to_have_count(1, timeout=WAIT)
        await expect(rows.first).to_contain_text("room:5")
        await p.fill("#channel", "room:1")
        await p.get_by_role("button", name="Open").click()
        await expect(p.locator("#channel-presence")).to_contain_text("viewer-1", timeout=WAIT)
        api = ApiClient(a.port, admin.token)
        try:  # a few seconds of traffic for the charts and the screenshot
            for n in range(40):
                body = {"channels": ["room:5", "room:6"], "data": n}
                assert (await api.call("POST", "/api/server/broadcast", body))[0] == 200
                await asyncio.sleep(0.1)
        finally:
            api.close()
        await expect(p.locator("#busiest tbody tr").first).to_contain_text("room:5")
        await p.screenshot(path=str(screenshot), full_page=True)
        assert screenshot.read_bytes().startswith(b"\x89PNG")
        await rows.first.get_by_role("button", name="Disconnect").click()
        await expect(p.locator("#user-note")).to_contain_text("disconnected 1", timeout=WAIT)
        await expect(total).to_have_text("2", timeout=WAIT)
        states = await visitor.page.evaluate("() => window.states")
        assert states[-1] == ["disconnected", 4511]  # 4500-4999: the client does not come back

        # Publishing into a channel (confirmed) reaches the third page, and its history.
        await p.fill("#publish-data", '{"text": "hello from the console"}')
        await p.get_by_role("button", name="Publish").click()
        await expect(p.locator("#channel-note")).to_contain_text(
            "published on room:1", timeout=WAIT
        )
        await expect(p.locator("#channel-history")).to_contain_text("hello from the console")
        await viewer.page.wait_for_function("() => window.got.length >= 1", timeout=WAIT)
        assert await _got(viewer) == [["room:1", {"text": "hello from the console"}]]

        # The browser client follows a server-side subscription, from another gateway.
        api = ApiClient(a.port, admin.token)
        try:
            status, _, done = await api.call(
                "POST", "/api/server/subscribe", {"user": "viewer-1", "ch": "room:9"}
            )
            assert status == 200 and done["count"] == 1, done
            status, _, _ = await api.call(
                "POST", "/api/server/publish", {"ch": "room:9", "data": [9]}
            )
            assert status == 200
        finally:
            api.close()
        await viewer.page.wait_for_function("() => window.got.length >= 2", timeout=WAIT)
        assert (await _got(viewer))[1] == ["room:9", [9]]
        errors = console.errors + visitor.errors + viewer.errors
        assert errors == [], json.dumps(errors)
