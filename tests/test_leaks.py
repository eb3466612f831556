"""Small leaks, each attack reproduced: tokens in logs, key files, trailing newlines, odd JSON."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tornado.httpclient import AsyncHTTPClient
from websockets.asyncio.client import connect

from gateway.keys import generate_jwk, write_key_file
from gateway.logs import JsonFormatter, TextFormatter, redact
from tests.harness import http_url, running_gateway, token_for
from tests.servers import UNIT

ROOT = Path(__file__).resolve().parent.parent

# -- tokens in logs ------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["token", "%74oken", "TO%4BEN", "t%6f%6Ben", "access%5Ftoken", "api_key", "password"]
)
def test_every_spelling_of_a_secret_parameter_is_redacted(name):
    line = f"401 GET /ws?x=1&{name}=eyJ.secret.sig#frag (127.0.0.1)"
    assert redact(line) == f"401 GET /ws?x=1&{name}=[redacted]#frag (127.0.0.1)"


def test_other_parameters_stay_readable():
    assert redact("/ws?tokens=1&%2574oken=2&to+ken=3") == "/ws?tokens=1&%2574oken=2&to+ken=3"


async def test_an_encoded_token_parameter_authenticates_but_never_reaches_the_logs(caplog):
    async with running_gateway() as gw:
        token = token_for(gw)
        secret_part = token.rsplit(".", 1)[1]
        with caplog.at_level(logging.DEBUG):
            url = f"ws://127.0.0.1:{gw.port}/ws?%74oken={token}"
            async with connect(url, subprotocols=["gw.v1.json"], proxy=None,  # type: ignore[list-item]
                               open_timeout=5 * UNIT) as ws:  # fmt: skip
                await ws.send(json.dumps({"op": "ping", "id": 1}))
                assert json.loads(await ws.recv())["ok"] is True  # it did authenticate
            http = AsyncHTTPClient(force_instance=True)
            try:
                # A refused socket and an HTTP request with a bad token are logged too.
                refused = await http.fetch(http_url(gw, f"/ws?%74oken={token}x"), raise_error=False)
                assert refused.code == 401
                polled = await http.fetch(http_url(gw, f"/lp?TOKEN={token}&t%6Fken={token}x"),
                                          method="POST", body=b"", raise_error=False)  # fmt: skip
                assert polled.code == 401
            finally:
                http.close()
    server = [r for r in caplog.records if r.name.split(".")[0] in ("gateway", "tornado", "core")]
    assert any("[redacted]" in r.getMessage() for r in server)
    for formatter in (JsonFormatter(), TextFormatter()):
        assert all(secret_part not in formatter.format(r) for r in server)
    assert all(secret_part not in r.getMessage() for r in server)


# -- private key files -----------------------------------------------------------------


def test_key_files_are_owner_only_from_the_first_byte(tmp_path, monkeypatch):
    """Every byte is written to a file already 0600, even with a umask of 0."""
    modes: list[int] = []
    real_write = os.write

    def write(fd: int, data: bytes) -> int:
        modes.append(os.fstat(fd).st_mode & 0o777)
        return real_write(fd, data)

    path = tmp_path / "keys.json"
    old = generate_jwk("ES256", "old")
    path.write_text(json.dumps({"keys": [old]}))
    monkeypatch.setattr(os, "write", write)
    umask = os.umask(0)
    try:
        write_key_file(path, [generate_jwk("ES256", "new"), old])
    finally:
        os.umask(umask)
    assert modes and set(modes) == {0o600}
    assert [k["kid"] for k in json.loads(path.read_text())["keys"]] == ["new", "old"]
    assert path.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["keys.json"]  # no temporary file left


def test_keygen_under_a_permissive_umask_makes_an_owner_only_file(tmp_path):
    path = tmp_path / "keys.json"
    for kid in ("old", "new"):
        done = subprocess.run(
            [sys.executable, "-m", "gateway", "keygen", "--kid", kid, "--add-to", str(path)],
            cwd=ROOT, capture_output=True, text=True, timeout=60, umask=0,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert path.stat().st_mode & 0o777 == 0o600
    assert [k["kid"] for k in json.loads(path.read_text())["keys"]] == ["new", "old"]
