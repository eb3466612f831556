"""Real gateway processes: two nodes on one Redis, the CLI, embedded mode."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from websockets.exceptions import ConnectionClosed

from proto import CloseCode
from tests.harness import SECRET, ApiClient, unique_prefix, ws_client
from tests.servers import UNIT, free_port
from tests.test_core_rest import PROJECT

ROOT = Path(__file__).resolve().parent.parent


class GatewayProcess:
    """``python -m gateway`` (or, with ``module="core"``, the REST core alone).

    One process (``WORKERS=1``) unless ``env`` says otherwise.
    """

    def __init__(self, tmp: Path, data_dir: Path, module: str = "gateway", **env: str) -> None:
        self.module = module
        self.port = free_port()
        self.log = tmp / f"{module}-{self.port}.log"
        self.env = {
            **os.environ,
            "PORT": str(self.port),
            "HOST": "127.0.0.1",
            "DATA_DIR": str(data_dir),
            "PYTHONUNBUFFERED": "1",
            "WORKERS": "1",
            **env,
        }
        for name in ("REDIS_URL", "JWT_SECRET", "DATABASE_URL", "DATABASE_SCHEMA"):
            if env.get(name) is None:
                self.env.pop(name, None)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> GatewayProcess:
        return self.spawn().ready()

    def spawn(self) -> GatewayProcess:
        """Run the process; `ready` waits until it answers (15 s from now at most)."""
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", self.module], cwd=ROOT, env=self.env, stdout=out, stderr=out
            )
        self._deadline = time.monotonic() + 15 * UNIT
        return self

    def ready(self) -> GatewayProcess:
        assert self.proc is not None, "spawn() first"
        while time.monotonic() < self._deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited: {self.log.read_text()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=1):
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"gateway did not become ready: {self.log.read_text()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def output(self) -> str:
        return self.log.read_text()


def start_together(*processes: GatewayProcess) -> list[GatewayProcess]:
    """Run ``processes`` at once, then wait for each to answer: their start-ups (~0.6 s of
    imports each, on a core of its own when one is free) overlap. If one fails, every one
    still running is killed."""
    try:
        for gp in processes:
            gp.spawn()
        return [gp.ready() for gp in processes]
    except BaseException:
        for gp in processes:
            if gp.proc is not None and gp.proc.poll() is None:
                gp.proc.kill()
                gp.proc.wait()
        raise


class Processes:
    """What the ``processes`` fixture gives: ``processes(**env)`` starts one and waits for it,
    ``processes.together(2, **env)`` starts two alike at once. All are killed after the test."""

    def __init__(self, tmp_path: Path, data_dir: Path) -> None:
        self.tmp_path, self.data_dir = tmp_path, data_dir
        self.started: list[GatewayProcess] = []

    def __call__(self, module: str = "gateway", **env: str) -> GatewayProcess:
        return self.together(1, module, **env)[0]

    def together(self, count: int, module: str = "gateway", **env: str) -> list[GatewayProcess]:
        made = [GatewayProcess(self.tmp_path, self.data_dir, module, **env) for _ in range(count)]
        self.started += made
        return start_together(*made)


@pytest.fixture
def processes(tmp_path, data_dir):
    spawned = Processes(tmp_path, data_dir)
    yield spawned
    for gp in spawned.started:
        if gp.proc is not None and gp.proc.poll() is None:
            gp.stop(signal.SIGKILL)


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=30,
    )


def mint(data_dir: Path, *extra: str, secret: str | None = SECRET) -> str:
    env = {"DATA_DIR": str(data_dir)}
    if secret:
        env["JWT_SECRET"] = secret
    out = cli("token", "--sub", "alice", "--channels", "room:*", *extra, env=env)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


async def test_plain_redis_publish_reaches_sockets_on_two_processes(
    processes, redis_url, data_dir, database_url, core_schema
):
    prefix = unique_prefix()
    env = {"REDIS_URL": redis_url, "REDIS_PREFIX": prefix, "JWT_SECRET": SECRET,
           "DATABASE_URL": database_url, "DATABASE_SCHEMA": core_schema}  # fmt: skip
    a, b = processes.together(2, **env)
    token = mint(data_dir)
    async with ws_client(a.port, token) as ca, ws_client(b.port, token) as cb:
        assert (await ca.request("sub", ch="room:1"))["ok"]
        assert (await cb.request("sub", ch="room:1"))["ok"]
        client = aioredis.Redis.from_url(redis_url)
        try:
            # One subscriber connection per process, whatever the socket count.
            assert await client.publish(f"{prefix}room:1", '{"any":"json"}') == 2
        finally:
            await client.aclose()
        for c in (ca, cb):
            assert await c.next_push() == {"op": "msg", "ch": "room:1", "data": {"any": "json"}}
        # A socket's publish on process A reaches process B.
        assert (await ca.request("pub", ch="room:1", data={"from": "a"}))["ok"]
        assert await cb.next_push() == {"op": "msg", "ch": "room:1", "data": {"from": "a"}}
        assert await ca.next_push() == {"op": "msg", "ch": "room:1", "data": {"from": "a"}}


async def test_sigterm_closes_sockets_with_reconnect_code_and_exits(
    processes, redis_url, data_dir, database_url, core_schema
):
    gp = processes(REDIS_URL=redis_url, REDIS_PREFIX=unique_prefix(), JWT_SECRET=SECRET,
                   DATABASE_URL=database_url, DATABASE_SCHEMA=core_schema)  # fmt: skip
    async with ws_client(gp.port, mint(data_dir)) as c:
        assert (await c.request("sub", ch="room:1"))["ok"]
        gp.proc.send_signal(signal.SIGTERM)
        with pytest.raises(ConnectionClosed) as info:
            await c.recv(timeout=5 * UNIT)
        assert info.value.rcvd.code == CloseCode.SHUTDOWN
    # The one SIGTERM is enough: the process exits by itself, with status 0.
    assert await asyncio.to_thread(gp.proc.wait, 15 * UNIT) == 0
    assert "shutting down" in gp.output()


async def test_embedded_mode_runs_without_redis_or_secret(processes, data_dir):
    gp = processes()  # no REDIS_URL, no JWT_SECRET: as `make run` on a fresh machine
    log = gp.output()
    assert "in-memory broker" in log and "JWT_SECRET is not set" in log
    token = mint(data_dir, secret=None)  # reads the secret the gateway generated
    async with ws_client(gp.port, token) as c, ws_client(gp.port, token) as d:
        assert (await c.request("sub", ch="room:1"))["ok"]
        assert (await d.request("pub", ch="room:1", data=[1, 2]))["ok"]
        assert await c.next_push() == {"op": "msg", "ch": "room:1", "data": [1, 2]}
    body = json.dumps({"ch": "room:1", "data": "via http"}).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{gp.port}/api/publish",
        data=body,
        headers={"Authorization": f"Bearer {token}"},
        method="POST",
    )
    assert json.loads(await asyncio.to_thread(_read, req)) == {"ok": True}
    assert token not in gp.output()


async def test_embedded_postgres_keeps_data_across_a_restart(processes, data_dir):
    gp = processes()  # no DATABASE_URL: `make run` starts PostgreSQL under DATA_DIR
    assert "embedded PostgreSQL" in gp.output()
    token = mint(data_dir, "--role", "admin", secret=None)  # an admin writes any project
    api = ApiClient(gp.port, token)
    try:
        status, _, created = await api.call("POST", "/api/projects", PROJECT)
    finally:
        api.close()
    assert status == 201, created
    assert await asyncio.to_thread(gp.stop) == 0
    again = processes()
    api = ApiClient(again.port, token)
    try:
        status, _, body = await api.call("GET", f"/api/projects/{created['id']}")
    finally:
        api.close()
    assert status == 200 and body == created


async def test_standalone_core_serves_the_api_and_its_writes_reach_gateway_sockets(
    processes, redis_url, clean_db, data_dir
):
    prefix = unique_prefix()
    shared = {"REDIS_URL": redis_url, "REDIS_PREFIX": prefix, "JWT_SECRET": SECRET}
    db = {"DATABASE_URL": clean_db["database_url"], "DATABASE_SCHEMA": clean_db["database_schema"]}
    core = processes("core", **shared, **db)
    gateway = processes(**shared, **db)  # the socket tier, on the same database
    token = mint(data_dir, "--channels", "projects", "--role", "admin")
    api = ApiClient(core.port, token)
    try:
        async with ws_client(gateway.port, token) as c:
            assert (await c.request("sub", ch="projects"))["ok"]
            status, headers, created = await api.call("POST", "/api/projects", PROJECT)
            assert status == 201 and headers["Location"] == f"/api/projects/{created['id']}"
            push = await c.next_push()
        status, _, doc = await api.call("GET", "/openapi.json")
        assert status == 200 and "/api/projects/{id}" in doc["paths"]
        assert (await api.call("GET", "/api/nope"))[0] == 404
        assert headers["X-Request-Id"]  # every REST answer names its request (and its log line)
        url = f"http://127.0.0.1:{core.port}/metrics"
        metrics = (await asyncio.to_thread(_read, urllib.request.Request(url))).decode()
        assert (
            'gateway_rest_request_seconds_count{route="createProject",status="201"} 1.0' in metrics
        )
        assert 'gateway_db_pool_connections{state="max"}' in metrics
    finally:
        api.close()
    assert push["data"] == {"type": "created", "id": created["id"], "version": 1, "data": created}
    assert push["offset"] >= 1 and push["epoch"]  # through history: recoverable after a reconnect
    assert await asyncio.to_thread(core.stop) == 0


def _read(req: urllib.request.Request) -> bytes:
    with urllib.request.urlopen(req, timeout=5 * UNIT) as r:
        body: bytes = r.read()
        return body


def test_help_lists_every_setting():
    out = cli("--help")
    assert out.returncode == 0
    for name in (
        "HOST",
        "PORT",
        "REDIS_URL",
        "DATABASE_URL",
        "JWT_SECRET",
        "JWT_PUBLIC_KEY",
        "JWT_JWKS_FILE",
        "JWT_ISSUER",
        "JWT_AUDIENCE",
        "SEND_BUFFER_BYTES",
    ):
        assert name in out.stdout, name


def test_bad_setting_is_a_clear_error():
    out = cli(env={"PORT": "eighty"})
    assert out.returncode == 2 and "PORT" in out.stderr
    assert "Traceback" not in out.stderr


def test_token_command_mints_verifiable_tokens(data_dir):
    import jwt

    token = mint(data_dir, "--channels", "user:alice", "--pub", "no", "--ttl", "60")
    claims = jwt.decode(token, SECRET, algorithms=["HS256"])
    assert claims["sub"] == "alice" and claims["channels"] == ["room:*", "user:alice"]
    assert claims["pub"] is False and 55 <= claims["exp"] - claims["iat"] <= 60
