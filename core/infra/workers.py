"""Worker processes: several processes of one server sharing one port.

One event loop uses one core. ``WORKERS=N`` (or ``--workers N``; 0, the
default, means one per core) runs N processes of ``python -m gateway`` or
``python -m core``, each a whole server: a gateway with its own Hub, Broker
connection and Core pool, or a REST core with its own database pool. Redis
carries publications, revocations and rate-limit counters between them
exactly as between machines. Without ``REDIS_URL`` those would stay in each
process (no cross-process fan-out, a rate limit per process), so the server
runs one process and says so at start. ``WORKERS=1`` is the plain single
process, with no supervisor.

Start-up, in the master process, before any event loop exists:

1. Bind the listening socket, with ``SO_REUSEPORT`` where the platform has
   it, which also learns the real port when ``PORT=0``. (The embedded
   PostgreSQL, when used, is started once by the master before this and
   stopped by it at the end.)
2. Fork the workers. Worker 0 serves on the inherited socket. With
   ``SO_REUSEPORT`` every other worker closes its inherited copy and binds
   its own socket on the same port when it is ready to serve, and the kernel
   spreads new connections evenly over the sockets; the master closes its
   copy once the workers are started. Without ``SO_REUSEPORT`` all workers
   accept on the one inherited socket (Tornado's pre-fork pattern), and the
   master keeps it to hand to restarted workers.

Then the master only supervises. SIGTERM or SIGINT is forwarded to every
worker, each drains as a single process does (``Gateway.close``,
``CoreServer.close``), and a
worker still alive ``SHUTDOWN_TIMEOUT`` + 5 s later is killed; the master
exits 0 when all stopped cleanly. A worker that dies unexpectedly is logged
with its exit status and started again, after a 1 s pause if it died within
1 s of its start; after 5 such quick deaths in a row the master stops all
workers and exits 1. A master that dies without a word (SIGKILL: the OOM
killer) takes its workers along on Linux: the kernel sends each SIGTERM
(``PR_SET_PDEATHSIG``) and it drains, so none keeps the port.

Metrics: every worker writes a snapshot of its registry every second into
a private temporary directory that the master creates, hands to the
workers at fork and removes at the end; ``/metrics``, on whichever worker
answers, shows every worker's samples labelled ``worker="<index>"``
(core/infra/metricsmerge.py). Log lines of a worker carry its index (``worker``: a JSON field, or ``worker=<index>`` in text).
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import os
import select
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

from tornado.ioloop import PeriodicCallback
from tornado.netutil import bind_sockets

from core.infra.metricsmerge import WorkerRegistry, snapshot_path
from core.infra.runtime import LISTEN_BACKLOG, STOP_SIGNALS, run
from core.infra.settings import Settings

__all__ = ["Serve", "Worker", "supervise", "worker_count"]

log = logging.getLogger("core.infra.workers")

#: A worker that dies within QUICK seconds of its start died quickly: it is
#: restarted after BACKOFF seconds, and GIVE_UP quick deaths in a row stop all.
QUICK = 1.0
BACKOFF = 1.0
GIVE_UP = 5
#: Seconds past SHUTDOWN_TIMEOUT after which a stopping worker is killed.
KILL_AFTER = 5.0
#: Seconds between a worker's metrics snapshots.
SNAPSHOT_EVERY = 1.0

_HANDLED = {*STOP_SIGNALS, signal.SIGCHLD}


def worker_count(settings: Settings) -> tuple[int, str | None]:
    """How many processes to run and, when one for lack of Redis, why."""
    if not settings.redis_url:
        why = "REDIS_URL not set: in-memory broker, single process (no cross-process fan-out)"
        if settings.workers > 1:
            why += f"; running one process, not the {settings.workers} workers asked for"
        return 1, why
    return settings.workers or _cores(), None


def _cores() -> int:
    """Cores this process may run on (its affinity mask, where the platform has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@dataclasses.dataclass(frozen=True, slots=True)
class Worker:
    """What a worker process knows of itself: its index, registry and listener."""

    index: int
    registry: WorkerRegistry
    inherited: list[socket.socket]
    host: str
    port: int

    def sockets(self) -> list[socket.socket]:
        """Sockets to serve on: the inherited ones, or this worker's own reuse-port ones."""
        return self.inherited or bind_sockets(
            self.port, self.host, reuse_port=True, backlog=LISTEN_BACKLOG
        )

    @contextmanager
    def sharing_metrics(self) -> Iterator[None]:
        """Save this worker's metrics snapshot every second while the block runs."""
        self.registry.save()
        saver = PeriodicCallback(self.registry.save, SNAPSHOT_EVERY * 1000)
        saver.start()
        try:
            yield
        finally:
            saver.stop()
            self.registry.remove()


#: How a worker serves (``gateway.__main__._serve``, ``core.__main__._serve``), given the
#: worker it runs as.
Serve = Callable[[Settings, Worker], Coroutine[Any, Any, None]]


def supervise(settings: Settings, count: int, serve: Serve) -> int:
    """Run ``count`` workers on one port until SIGTERM or SIGINT; returns the exit status."""
    reuse_port = hasattr(socket, "SO_REUSEPORT")
    if reuse_port and settings.port:
        # SO_REUSEPORT would let this server share the port with another one
        # already listening there (same user), splitting its traffic: bind
        # once without it first, so a taken port fails as it would for one process.
        try:
            for probe in bind_sockets(settings.port, settings.host):
                probe.close()
        except OSError as exc:
            log.error("cannot listen on %s:%d: %s", settings.host, settings.port, exc.strerror)
            return 2
    sockets = bind_sockets(
        settings.port, settings.host, reuse_port=reuse_port, backlog=LISTEN_BACKLOG
    )
    port: int = sockets[0].getsockname()[1]
    directory = tempfile.mkdtemp(prefix="workers-metrics-")
    log.info(
        "%d worker processes on http://%s:%d (%s)",
        count,
        settings.host,
        port,
        "SO_REUSEPORT, one socket each" if reuse_port else "one shared socket",
    )
    supervisor = _Supervisor(settings, serve, sockets, reuse_port, port, directory)
    try:
        return supervisor.run(count)
    finally:
        for sock in supervisor.sockets:
            sock.close()
        shutil.rmtree(directory, ignore_errors=True)


#: prctl(2) option: the signal the kernel sends this process when its parent dies (Linux).
_PR_SET_PDEATHSIG = 1


def _stop_with(master: int) -> None:
    """Have the kernel send this worker SIGTERM (it drains) when ``master`` dies, on Linux.

    A master killed by SIGKILL (the OOM killer, ``kill -9``) runs no handler: its
    workers kept serving, orphaned, on its port, and the server started again
    exited 2 with the port in use.
    """
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        log.warning(
            "workers will outlive a killed master: prctl failed (errno %d)", ctypes.get_errno()
        )
    elif os.getppid() != master:  # it died before the call
        os.kill(os.getpid(), signal.SIGTERM)


@dataclasses.dataclass(slots=True)
class _Child:
    index: int
    started: float


@dataclasses.dataclass(slots=True)
class _Supervisor:
    settings: Settings
    serve: Serve
    sockets: list[socket.socket]
    reuse_port: bool
    port: int
    directory: str
    children: dict[int, _Child] = dataclasses.field(default_factory=dict)  # by pid
    due: dict[int, float] = dataclasses.field(default_factory=dict)  # index -> restart time
    quick_deaths: int = 0
    stopping: bool = False
    kill_at: float | None = None
    failed: bool = False
    _wakeup: tuple[int, int] = dataclasses.field(default_factory=os.pipe)
    master: int = dataclasses.field(default_factory=os.getpid)
    _mask: set[int | signal.Signals] = dataclasses.field(default_factory=set)

    def run(self, count: int) -> int:
        r, w = self._wakeup
        os.set_blocking(r, False)
        os.set_blocking(w, False)
        previous = {sig: signal.signal(sig, _ignore) for sig in _HANDLED}
        previous_fd = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        try:
            for index in range(count):
                self._start(index)
            if self.reuse_port:
                # Worker 0 holds the listening socket now; restarted workers bind their own.
                for sock in self.sockets:
                    sock.close()
                self.sockets = []
            self._loop()
        except BaseException:
            for pid in self.children:  # no orphan keeps the port
                os.kill(pid, signal.SIGTERM)
            raise
        finally:
            signal.set_wakeup_fd(previous_fd)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            os.close(r)
            os.close(w)
        return 1 if self.failed else 0

    def _loop(self) -> None:
        while self.children or self.due:
            for signum in self._signals(self._timeout()):
                if signum in STOP_SIGNALS:
                    self._stop(signum)
            now = time.monotonic()
            self._reap(now)
            if self.kill_at is not None and now >= self.kill_at:
                self._kill_all()
            for index, at in list(self.due.items()):
                if at <= now:
                    del self.due[index]
                    self._start(index)

    def _timeout(self) -> float | None:
        times = [*self.due.values(), *([] if self.kill_at is None else [self.kill_at])]
        return max(0.0, min(times) - time.monotonic()) if times else None

    def _signals(self, timeout: float | None) -> list[int]:
        """Signals received (their numbers, via the wakeup pipe), waiting up to ``timeout``."""
        r = self._wakeup[0]
        select.select([r], [], [], timeout)
        received = b""
        while True:
            try:
                chunk = os.read(r, 512)
            except BlockingIOError:
                return list(received)
            if not chunk:
                return list(received)
            received += chunk

    def _start(self, index: int) -> None:
        # Signals wait until the child has reset its handlers, so none is lost.
        self._mask = signal.pthread_sigmask(signal.SIG_BLOCK, _HANDLED)
        try:
            pid = os.fork()
            if pid == 0:
                self._become_worker(index)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, self._mask)
        self.children[pid] = _Child(index, time.monotonic())
        log.info("worker %d started (pid %d)", index, pid)

    def _become_worker(self, index: int) -> NoReturn:
        code = 1
        try:
            signal.set_wakeup_fd(-1)
            for sig in _HANDLED:
                signal.signal(sig, signal.SIG_DFL)
            _stop_with(self.master)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            os.close(self._wakeup[0])
            os.close(self._wakeup[1])
            signal.pthread_sigmask(signal.SIG_SETMASK, self._mask)
            inherited = self.sockets
            if self.reuse_port and index != 0:
                for sock in inherited:
                    sock.close()
                inherited = []
            _tag_log_lines(index)
            registry = WorkerRegistry(index, self.directory)
            worker = Worker(index, registry, inherited, self.settings.host, self.port)
            run(self.serve(self.settings, worker))
            code = 0
        except KeyboardInterrupt:
            code = 0  # Ctrl-C before the worker's loop handled signals: nothing to drain
        except BaseException:
            log.exception("worker %d failed", index)
        finally:
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

    def _reap(self, now: float) -> None:
        for pid in list(self.children):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done == 0:
                continue
            child = self.children.pop(pid)
            snapshot_path(self.directory, child.index).unlink(missing_ok=True)
            code = os.waitstatus_to_exitcode(status)
            if not self.stopping:
                self._died(child, pid, code, now)
            elif code in (0, -signal.SIGTERM, -signal.SIGINT):
                log.info("worker %d (pid %d) stopped", child.index, pid)
            else:
                log.warning(
                    "worker %d (pid %d) %s while stopping", child.index, pid, _describe(code)
                )
                self.failed = True

    def _died(self, child: _Child, pid: int, code: int, now: float) -> None:
        lived = now - child.started
        quick = lived < QUICK
        self.quick_deaths = self.quick_deaths + 1 if quick else 0
        what = f"worker {child.index} (pid {pid}) {_describe(code)} after {lived:.1f}s"
        if self.quick_deaths >= GIVE_UP:
            log.error("%s: %d quick deaths in a row, giving up", what, self.quick_deaths)
            self.failed = True
            self._stop(signal.SIGTERM)
            return
        log.warning("%s; restarting%s", what, f" in {BACKOFF:g}s" if quick else "")
        self.due[child.index] = now + (BACKOFF if quick else 0.0)

    def _stop(self, signum: int) -> None:
        if self.stopping:
            return
        self.stopping = True
        self.due.clear()
        self.kill_at = time.monotonic() + self.settings.shutdown_timeout + KILL_AFTER
        log.info("stopping %d workers (%s)", len(self.children), signal.Signals(signum).name)
        for pid in self.children:
            os.kill(pid, signum)

    def _kill_all(self) -> None:
        self.kill_at = None
        for pid, child in self.children.items():
            log.warning("worker %d (pid %d) still running: killed", child.index, pid)
            os.kill(pid, signal.SIGKILL)
            self.failed = True


def _ignore(signum: int, frame: object) -> None:
    """Python-level handler: the wakeup pipe already carries the signal number."""


def _describe(code: int) -> str:
    if code >= 0:
        return f"exited with status {code}"
    try:
        return f"killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"killed by signal {-code}"


class _WorkerField(logging.Filter):
    """Puts the worker's index on every record (the ``worker`` field of JSON lines)."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self.index
        return True


def _tag_log_lines(index: int) -> None:
    for handler in logging.getLogger().handlers:
        handler.addFilter(_WorkerField(index))
