"""The two servers the suite judges, each a real process on a free port.

* the gateway: ``python -m gateway`` with one worker, the in-memory broker,
  a private PostgreSQL schema (dropped afterwards) and ``HEADER_TIMEOUT``
  shortened so that the dripped-upgrade case is quick;
* the reference: `tests.conformance.reference` (`websockets`), with the
  gateway's ``MAX_FRAME_BYTES`` as its largest message and its
  ``HEADER_TIMEOUT`` as its opening-handshake timeout.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg

from core.infra.mint import mint_token
from core.infra.settings import Settings
from tests.conformance.cases import Target
from tests.servers import UNIT, free_port, run_in_thread

__all__ = [
    "HEADER_TIMEOUT",
    "MAX_FRAME_BYTES",
    "SECRET",
    "ServerProcess",
    "gateway_process",
    "reference_process",
]

ROOT = Path(__file__).resolve().parents[2]
SECRET = "conformance-secret-" + "0123456789abcdef" * 4
MAX_FRAME_BYTES = 65536
HEADER_TIMEOUT = 2.0
MAX_HEADER_BYTES = 65536


class ServerProcess:
    """A child process serving on ``port``; its output goes to ``log``."""

    def __init__(self, argv: list[str], port: int, log: Path, env: dict[str, str]) -> None:
        self.argv, self.port, self.log, self.env = argv, port, log, env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, ready: str) -> None:
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(self.argv, cwd=ROOT, env=self.env, stdout=out, stderr=out)
        deadline = time.monotonic() + 30 * UNIT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.argv} exited: {self.log.read_text()}")
            if self._ready(ready):
                return
            time.sleep(0.05)
        raise RuntimeError(f"{self.argv} did not become ready: {self.log.read_text()}")

    def _ready(self, ready: str) -> bool:
        if ready.startswith("http"):
            try:
                with urllib.request.urlopen(ready, timeout=1):
                    return True
            except OSError:
                return False
        return ready in self.log.read_text(errors="replace")

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def _settings() -> Settings:
    return Settings(jwt_secret=SECRET)


def token(sub: str = "conformance", channels: tuple[str, ...] = ("room:*",)) -> str:
    """A token the gateway process accepts (it was started with `SECRET`)."""
    return mint_token(_settings(), sub, list(channels), pub=True)


def _drop_schema(database_url: str, schema: str) -> None:
    async def drop() -> None:
        conn = await asyncpg.connect(database_url)
        try:
            await conn.execute(f'drop schema if exists "{schema}" cascade')
        finally:
            await conn.close()

    run_in_thread(drop, 60.0)


@contextlib.contextmanager
def gateway_process(database_url: str, **env: str) -> Iterator[tuple[ServerProcess, Target]]:
    """A gateway process and its `Target` (the socket path carries a token)."""
    port = free_port()
    schema = f"conf_{uuid.uuid4().hex[:10]}"
    with tempfile.TemporaryDirectory(prefix="gw-conformance-") as tmp:
        full_env = {
            **{k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "WORKERS")},
            "HOST": "127.0.0.1",
            "PORT": str(port),
            "WORKERS": "1",
            "JWT_SECRET": SECRET,
            "DATABASE_URL": database_url,
            "DATABASE_SCHEMA": schema,
            "MIGRATE_ON_START": "1",  # a private schema, new for this process
            "DATA_DIR": tmp,
            "MAX_FRAME_BYTES": str(MAX_FRAME_BYTES),
            "HEADER_TIMEOUT": str(HEADER_TIMEOUT),
            "MAX_HEADER_BYTES": str(MAX_HEADER_BYTES),
            # Every case connects from 127.0.0.1: the per-IP connect rate is not under test.
            "RATE_CONNECT_IP": "off",
            # Compression for the cases that offer it (groups 12, 13), every reply compressed.
            "COMPRESSION": "on",
            "COMPRESSION_MIN_BYTES": "0",
            "PYTHONUNBUFFERED": "1",
            **env,
        }
        proc = ServerProcess(
            [sys.executable, "-m", "gateway"], port, Path(tmp) / "gateway.log", full_env
        )
        try:
            proc.start(f"http://127.0.0.1:{port}/readyz")
            target = Target(
                "gateway",
                "127.0.0.1",
                port,
                f"/ws?token={token()}",
                MAX_FRAME_BYTES,
                HEADER_TIMEOUT,
                MAX_HEADER_BYTES,
            )
            yield proc, target
        finally:
            proc.stop()
            _drop_schema(database_url, schema)


@contextlib.contextmanager
def reference_process() -> Iterator[tuple[ServerProcess, Target]]:
    """The `websockets` echo server and its `Target`."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="ws-reference-") as tmp:
        argv = [
            sys.executable,
            "-m",
            "tests.conformance.reference",
            "--port",
            str(port),
            "--max-size",
            str(MAX_FRAME_BYTES),
            "--open-timeout",
            str(HEADER_TIMEOUT),
        ]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        proc = ServerProcess(argv, port, Path(tmp) / "reference.log", env)
        try:
            proc.start("ready")
            target = Target(
                "reference",
                "127.0.0.1",
                port,
                f"/ws?token={token()}",
                MAX_FRAME_BYTES,
                HEADER_TIMEOUT,
                MAX_HEADER_BYTES,
            )
            yield proc, target
        finally:
            proc.stop()
