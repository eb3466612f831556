"""The README's five-minute tour, run as a newcomer runs it.

Fenced blocks whose info string is ``sh tour`` are run in order in one
bash session (``set -euo pipefail``, so a failing command fails the test):

* ``sh tour-server``: the first terminal (``make run``): started in the
  background, then the test waits for ``/readyz``;
* ``sh tour-listen``: a second terminal that prints what arrives: started in
  the background, its output kept;
* ``sh tour``: typed in another terminal: run, must succeed.

The README's other blocks are the two commands themselves (``make test``
is what runs this test; the tour starts ``make run``) and configuration.

An untagged block right after a ``tour-listen`` block holds lines the
listener must print (``< `` prefixed), checked at the end. The test only
changes what a shared machine needs: a free port instead of 8888, its own
Redis prefix and database schema, and a stand-in ``redis-cli`` (publishing
through redis-py) where the real one is not installed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.harness import unique_prefix
from tests.servers import UNIT, free_port

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
_KINDS = ("sh tour", "sh tour-server", "sh tour-listen")


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(info string, body) of every fenced code block, in order."""
    blocks: list[tuple[str, str]] = []
    info: str | None = None
    lines: list[str] = []
    for line in text.splitlines():
        if line.startswith("```"):
            if info is None:
                info, lines = line[3:].strip(), []
            else:
                blocks.append((info, "\n".join(lines) + "\n"))
                info = None
        elif info is not None:
            lines.append(line)
    return blocks


def tour_blocks(text: str) -> list[tuple[str, str]]:
    """(kind, body) of the tour's blocks in order; kind '' is an expected-output block."""
    return [
        (info, body)
        for info, body in fenced_blocks(text)
        if info in _KINDS or (info == "" and body.startswith("< "))
    ]


def test_the_readme_has_a_runnable_tour():
    kinds = [kind for kind, _ in tour_blocks(README.read_text())]
    assert kinds.count("sh tour-server") == 1 and "sh tour-listen" in kinds
    assert kinds.count("sh tour") >= 3


def _redis_cli_shim(bin_dir: Path, redis_url: str) -> None:
    """A ``redis-cli PUBLISH ch msg`` for machines without the real one."""
    script = bin_dir / "redis-cli"
    script.write_text(
        "#!/bin/sh\n"
        f'exec {sys.executable} -c "import sys, redis; '
        f"r = redis.Redis.from_url('{redis_url}'); "
        'assert sys.argv[1].upper() == \'PUBLISH\'; print(r.publish(sys.argv[2], sys.argv[3]))" "$@"\n'
    )
    script.chmod(0o755)


@pytest.fixture
def tour_env(tmp_path, redis_url, clean_db):
    port = free_port()
    prefix = unique_prefix()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if shutil.which("redis-cli") is None or redis_url != "redis://127.0.0.1:6379/0":
        _redis_cli_shim(bin_dir, redis_url)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "PORT": str(port),
        "REDIS_PREFIX": prefix,
        "DATABASE_URL": clean_db["database_url"],
        "DATABASE_SCHEMA": clean_db["database_schema"],
        "DATA_DIR": str(tmp_path / "data"),
        "LOG_LEVEL": "WARNING",
        "WORKERS": "1",
        "RATE_CONNECT_IP": "off",
    }
    env.pop("JWT_SECRET", None)
    return env, port, prefix, redis_url


def _localize(body: str, port: int, prefix: str, redis_url: str) -> str:
    body = body.replace("127.0.0.1:8888", f"127.0.0.1:{port}")
    body = body.replace("redis://127.0.0.1:6379/0", redis_url)
    return body.replace("PUBLISH gw:", f"PUBLISH {prefix}")


def test_the_tour_runs_as_written(tour_env, tmp_path):
    env, port, prefix, redis_url = tour_env
    blocks = tour_blocks(README.read_text())
    server: subprocess.Popen[bytes] | None = None
    listeners: list[tuple[subprocess.Popen[bytes], Path, list[str]]] = []
    state = tmp_path / "state.sh"  # variables one block sets for the next ones
    state.write_text("")
    subscriptions = 0  # what the listeners started so far hold on the gateway
    try:
        for i, (kind, body) in enumerate(blocks):
            body = _localize(body, port, prefix, redis_url)
            if kind == "":
                if listeners and not listeners[-1][2]:
                    listeners[-1][2].extend(
                        line[2:] for line in body.splitlines() if line.startswith("< ")
                    )
                continue
            script = f"set -euo pipefail\nsource {state}\n{body}\ndeclare -p TOKEN 2>/dev/null >> {state} || true\n"
            if kind == "sh tour-server":
                log = tmp_path / "server.log"
                with open(log, "wb") as out:
                    server = subprocess.Popen(["bash", "-c", script], cwd=ROOT, env=env, stdout=out,
                                              stderr=out, start_new_session=True)  # fmt: skip
                _wait_ready(port, server, log)
            elif kind == "sh tour-listen":
                out_path = tmp_path / f"listen-{i}.txt"
                with open(out_path, "wb") as out:
                    proc = subprocess.Popen(["bash", "-c", script], cwd=ROOT, env=env, stdout=out,
                                            stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
                listeners.append((proc, out_path, []))
                # Subscribed before anything is published: the gateway counts its channels.
                subscriptions += len(body.split(" listen ", 1)[1].split())
                _wait_subscribed(port, subscriptions, proc, out_path)
            else:
                done = subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True,
                                      text=True, timeout=60 * UNIT)  # fmt: skip
                assert done.returncode == 0, (
                    f"tour block {i} failed:\n{body}\n{done.stdout}\n{done.stderr}"
                )
        for _, out_path, expected in listeners:
            deadline = time.monotonic() + 10 * UNIT
            while time.monotonic() < deadline and not _has_all(out_path, expected):
                time.sleep(0.1)
            assert _has_all(out_path, expected), (
                f"expected {expected}, got:\n{out_path.read_text()}"
            )
    finally:
        for proc, _, _ in listeners:
            _stop(proc)
        if server is not None:
            _stop(server)


def _has_all(path: Path, expected: list[str]) -> bool:
    got = []
    for line in path.read_text().splitlines():
        try:
            got.append(json.loads(line.removeprefix("< ")))
        except ValueError:
            continue
    wanted = [json.loads(line) for line in expected]
    return all(any(_contains(g, w) for g in got) for w in wanted)


def _contains(got: object, wanted: object) -> bool:
    """``wanted`` is ``got`` or a part of it (``...`` in the README elides the rest)."""
    if isinstance(wanted, dict) and isinstance(got, dict):
        return all(k in got and _contains(got[k], v) for k, v in wanted.items())
    return bool(got == wanted)


def _subscriptions(port: int) -> float:
    """The gateway's ``gateway_subscriptions`` gauge (0 while /metrics does not answer)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as r:
            text = r.read().decode()
    except OSError:
        return 0.0
    names = ("gateway_subscriptions ", "gateway_subscriptions{")
    lines = [line for line in text.splitlines() if line.startswith(names)]
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines)


def _wait_subscribed(port: int, count: int, proc: subprocess.Popen[bytes], out: Path) -> None:
    deadline = time.monotonic() + 10 * UNIT
    while _subscriptions(port) < count:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"the listener did not subscribe:\n{out.read_text()}")
        time.sleep(0.05)


def _wait_ready(port: int, server: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 120 * UNIT  # make run may build the venv first
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"make run exited:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"the gateway did not become ready:\n{log.read_text()}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
