"""A real hook backend for tests, run as its own process: the example's, and the ways one fails.

``python -m tests.hookbackend --port-file F`` (with ``HOOK_SECRET``) binds a
free port itself (a port picked by the test and bound later could be taken
by another process meanwhile), writes it to F, and serves
examples/hooks_backend.py's hooks at ``/<hook>``, and for any hook:

* ``/slow/<hook>?seconds=S``: answers, but only after S seconds;
* ``/held/<hook>``: answers once the gate is open (it is at first): ``DELETE /gate``
  closes it, ``PUT /gate`` opens it, ``GET /gate`` says how many calls it holds;
* ``/fail/<hook>``: ``500``; ``/garbage/<hook>``: ``200`` that is not JSON;
  ``/huge/<hook>``: ``200`` with 2 MiB of JSON; ``/wrong/<hook>``: ``200``
  JSON of the wrong shape;
* ``GET /requests``: every signed request it took (path, headers, body), for
  tests to read what the gateway sent; ``DELETE /requests`` forgets them.

`HookBackend` starts and stops one from a test.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import tornado.web
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

from tests.servers import UNIT

ROOT = Path(__file__).resolve().parent.parent
SECRET = "hook-secret-for-tests-" + "0123456789abcdef" * 2


def load_example() -> Any:
    spec = importlib.util.spec_from_file_location(
        "examples_hooks_backend", ROOT / "examples" / "hooks_backend.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


REQUESTS: list[dict[str, Any]] = []
#: Open: ``/held/<hook>`` answers at once; closed: it waits until it opens.
GATE = asyncio.Event()
GATE.set()
HELD: list[int] = [0]  # the calls waiting at the gate


class Recorded(tornado.web.RequestHandler):
    def get(self) -> None:
        self.finish({"requests": REQUESTS})

    def delete(self) -> None:
        REQUESTS.clear()


class Gate(tornado.web.RequestHandler):
    def get(self) -> None:
        self.finish({"open": GATE.is_set(), "held": HELD[0]})

    def put(self) -> None:
        GATE.set()

    def delete(self) -> None:
        GATE.clear()


class Misbehaving(tornado.web.RequestHandler):
    """Every way a backend can fail a hook call (the signature is not even read)."""

    def initialize(self, example: Any) -> None:
        self.example = example

    async def post(self, how: str, hook: str) -> None:
        if how == "slow":
            await asyncio.sleep(float(self.get_query_argument("seconds", "5")))
            self.finish(json.dumps(self.example.HOOKS[hook](json.loads(self.request.body))))
        elif how == "held":
            HELD[0] += 1
            try:
                await GATE.wait()
            finally:
                HELD[0] -= 1
            self.finish(json.dumps(self.example.HOOKS[hook](json.loads(self.request.body))))
        elif how == "fail":
            self.set_status(500)
            self.finish("backend error")
        elif how == "garbage":
            self.finish("<html>not json</html>")
        elif how == "huge":
            self.finish(json.dumps({"result": {"data": "x" * (2 << 20)}}))
        else:
            self.finish(json.dumps({"result": 1}))


def make_app(secret: str) -> tornado.web.Application:
    example = load_example()

    def recording(name: str, hook: Any) -> Any:
        def record(request: dict[str, Any]) -> dict[str, Any]:
            REQUESTS.append({"hook": name, "body": request})
            answer: dict[str, Any] = hook(request)
            return answer

        return record

    app: tornado.web.Application = example.make_app(
        secret, {name: recording(name, hook) for name, hook in example.HOOKS.items()}
    )
    app.add_handlers(
        r".*",
        [
            (r"/requests", Recorded),
            (r"/gate", Gate),
            (r"/(slow|held|fail|garbage|huge|wrong)/(\w+)", Misbehaving, {"example": example}),
        ],
    )
    return app


class HookBackend:
    """``python -m tests.hookbackend`` on a free port, started and stopped by a test."""

    def __init__(self, log: Path, secret: str = SECRET) -> None:
        self.port = 0
        self.log = log
        port_file = log.with_suffix(".port")
        port_file.unlink(missing_ok=True)
        env = {**os.environ, "HOOK_SECRET": secret, "PYTHONUNBUFFERED": "1"}
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.hookbackend", "--port-file", str(port_file)],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=out,
            )
        deadline = time.monotonic() + 15 * UNIT
        while True:
            try:
                self.port = self.port or int(port_file.read_text() or 0)
                self.requests()
                return
            except (OSError, ValueError):  # not bound yet (no file, or no port in it)
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"hook backend did not start: {log.read_text()}") from None
                time.sleep(0.05)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def requests(self, hook: str | None = None) -> list[dict[str, Any]]:
        """What the backend was asked (the bodies), in order; of one hook only if given."""
        with urllib.request.urlopen(self.url("/requests"), timeout=5) as answer:
            found: list[dict[str, Any]] = json.load(answer)["requests"]
        return [r["body"] for r in found if hook is None or r["hook"] == hook]

    def forget(self) -> None:
        request = urllib.request.Request(self.url("/requests"), method="DELETE")
        with urllib.request.urlopen(request, timeout=5):
            pass

    def gate(self, method: str = "GET") -> dict[str, Any]:
        """The gate of ``/held/<hook>``: ``PUT`` opens it, ``DELETE`` closes it; what it holds."""
        data = b"" if method == "PUT" else None
        request = urllib.request.Request(self.url("/gate"), data=data, method=method)
        with urllib.request.urlopen(request, timeout=5) as answer:
            body = answer.read()
        return dict(json.loads(body)) if body else {}

    def login(self, user: str) -> str:
        """The session cookie of ``user`` (``session=…``), from the application's login."""
        with urllib.request.urlopen(self.url(f"/login?user={user}"), timeout=5) as answer:
            return f"session={json.load(answer)['session']}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def _main(port_file: Path) -> None:
    sockets = bind_sockets(0, "127.0.0.1")
    server = HTTPServer(make_app(os.environ["HOOK_SECRET"]))
    server.add_sockets(sockets)
    written = port_file.with_suffix(".tmp")
    written.write_text(str(sockets[0].getsockname()[1]))
    written.rename(port_file)  # whole, or not there yet
    await asyncio.Event().wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port-file", type=Path, required=True)
    asyncio.run(_main(parser.parse_args().port_file))
