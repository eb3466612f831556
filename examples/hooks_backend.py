"""An application backend in the loop: the gateway's hooks answered in plain Python and Tornado.

What it does (docs/hooks.md explains each hook):

* **connect**: admits browsers by their session cookie, with no token at all
  (``GET /login?user=ada`` sets one, as a cookie-session app's login would):
  they may use ``room:*``, ``chat:*`` and ask for ``private:*``, and are
  subscribed by the server to ``user:<user>``. A client with a token is
  admitted as its ``sub`` with what its token grants. ``mallory`` is shown
  the door (4501).
* **subscribe** (``HOOK_SUBSCRIBE_CHANNELS=private:*``): only ``private:<you>``
  (welcomed in the reply, shown as its owner in presence); anyone else's is
  refused with the application's code 403.
* **publish** (``HOOK_PUBLISH_CHANNELS=chat:*``): rewrites every chat message
  to ``{"from": <user>, "text": <text, censored>}``, refuses empty ones (400),
  and keeps ``"ephemeral": true`` ones out of history.
* **call**: ``whoami``, ``add`` (sums a list) and ``echo``; anything else is 404.
* **refresh**: another hour for everyone but ``mallory``.

Every request is checked with `gateway.hooks.verify_signature` (a bad or old
signature gets 401, which the gateway counts as a failed call). Run it, then
a gateway pointed at it (the same ``HOOK_SECRET`` on both)::

    export HOOK_SECRET=$(.venv/bin/python -c 'import secrets; print(secrets.token_hex(32))')
    .venv/bin/python examples/hooks_backend.py --port 8001 &
    HOOK_CONNECT_URL=http://127.0.0.1:8001/connect \\
    HOOK_SUBSCRIBE_URL=http://127.0.0.1:8001/subscribe HOOK_SUBSCRIBE_CHANNELS='private:*' \\
    HOOK_PUBLISH_URL=http://127.0.0.1:8001/publish HOOK_PUBLISH_CHANNELS='chat:*' \\
    HOOK_CALL_URL=http://127.0.0.1:8001/call HOOK_REFRESH_URL=http://127.0.0.1:8001/refresh \\
    make run

and open ``http://127.0.0.1:8001/login?user=ada`` (the cookie it sets goes to
the gateway on 127.0.0.1 too: cookies do not care about ports), then
``http://127.0.0.1:8888/demo`` and, in its console::

    const { Gateway } = await import("/client/gateway.js");
    const gw = new Gateway(location.origin, { tokenless: true });
    await gw.connect();
    await gw.call("whoami");                   // {user: "ada"}
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import secrets
import time
from collections.abc import Callable
from http.cookies import CookieError, SimpleCookie
from typing import Any

import tornado.web

from gateway.hooks import SIGNATURE_HEADER, TIMESTAMP_HEADER, verify_signature

__all__ = ["BANNED", "HOOKS", "SESSIONS", "call", "connect", "make_app", "publish", "refresh"]

log = logging.getLogger("hooks_backend")

#: Session cookie -> user: the application's own login sessions.
SESSIONS: dict[str, str] = {}
BANNED = frozenset({"mallory"})
CENSORED = ("darn", "heck")
HOUR = 3600

Hook = Callable[[dict[str, Any]], dict[str, Any]]


def _cookie(headers: dict[str, str], name: str) -> str | None:
    try:
        morsel = SimpleCookie(headers.get("Cookie", "")).get(name)
    except CookieError:
        return None
    return morsel.value if morsel is not None else None


def connect(request: dict[str, Any]) -> dict[str, Any]:
    user = request["user"] or SESSIONS.get(_cookie(request["headers"], "session") or "")
    if user is None:
        return {"error": {"code": 401, "message": "log in first"}}
    if user in BANNED:
        return {"disconnect": {"code": 4501, "reason": "banned"}}
    if request["user"] is not None:
        return {"result": {}}  # a token's client: what its token grants stands
    return {
        "result": {
            "user": user,
            "channels": ["room:*", "chat:*", "private:*"],
            "subscribe": [f"user:{user}"],
            "info": {"name": user.title()},
            "expire_at": int(time.time()) + HOUR,
        }
    }


def subscribe(request: dict[str, Any]) -> dict[str, Any]:
    if request["channel"] != f"private:{request['user']}":
        return {"error": {"code": 403, "message": "not your private channel"}}
    return {"result": {"data": {"welcome": request["user"]}, "info": {"owner": True}}}


def publish(request: dict[str, Any]) -> dict[str, Any]:
    data = request["data"]
    text = str(data.get("text", "") if isinstance(data, dict) else data).strip()
    if not text:
        return {"error": {"code": 400, "message": "empty message"}}
    for word in CENSORED:
        text = text.replace(word, "*" * len(word))
    ephemeral = isinstance(data, dict) and data.get("ephemeral") is True
    return {"result": {"data": {"from": request["user"], "text": text}, "skip_history": ephemeral}}


def call(request: dict[str, Any]) -> dict[str, Any]:
    method, data = request["method"], request.get("data")
    if method == "whoami":
        return {"result": {"data": {"user": request["user"]}}}
    if method == "add" and isinstance(data, list):
        return {"result": {"data": sum(x for x in data if isinstance(x, int | float))}}
    if method == "echo":
        return {"result": {"data": data}}
    return {"error": {"code": 404, "message": f"no method {method}"}}


def refresh(request: dict[str, Any]) -> dict[str, Any]:
    if request["user"] in BANNED:
        return {"disconnect": {"code": 4501, "reason": "banned"}}
    return {"result": {"expire_at": int(time.time()) + HOUR}}


HOOKS: dict[str, Hook] = {
    "connect": connect,
    "subscribe": subscribe,
    "publish": publish,
    "call": call,
    "refresh": refresh,
}


class HookHandler(tornado.web.RequestHandler):
    """``POST /<hook>``: a signed request from the gateway, answered by the hook's function."""

    def initialize(self, secret: str, hook: Hook) -> None:
        self.secret = secret
        self.hook = hook

    def post(self) -> None:
        headers, body = self.request.headers, self.request.body
        if not verify_signature(
            self.secret, headers.get(TIMESTAMP_HEADER), body, headers.get(SIGNATURE_HEADER)
        ):
            log.warning("refused a request with a bad signature from %s", self.request.remote_ip)
            self.set_status(401)
            self.finish({"error": "bad signature"})
            return
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(self.hook(json.loads(body))))


class LoginHandler(tornado.web.RequestHandler):
    """``GET /login?user=ada``: the application's login, as a session cookie."""

    def get(self) -> None:
        user = self.get_query_argument("user")
        session = secrets.token_urlsafe(16)
        SESSIONS[session] = user
        self.set_cookie("session", session, httponly=True, samesite="Lax")
        self.finish({"user": user, "session": session})


def make_app(secret: str, hooks: dict[str, Hook] = HOOKS) -> tornado.web.Application:
    routes: list[Any] = [(r"/login", LoginHandler)]
    routes += [
        (f"/{name}", HookHandler, {"secret": secret, "hook": hook}) for name, hook in hooks.items()
    ]
    return tornado.web.Application(routes)


async def main(port: int, secret: str) -> None:
    make_app(secret).listen(port, "127.0.0.1")
    log.info("hook backend on http://127.0.0.1:%d", port)
    await asyncio.Event().wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="A hook backend for the gateway (docs/hooks.md).")
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    asyncio.run(main(args.port, os.environ["HOOK_SECRET"]))
