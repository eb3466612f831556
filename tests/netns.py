"""Hosts on one machine: network namespaces around a router namespace, links to cut or shape.

A `Network` is a router namespace and one namespace per `Host`, each host on its own /24
(``10.231.K.2``, the router ``10.231.K.1``) over a veth pair, or, for a ``shaped`` host, over
a user-space cable with delay and loss (tests/netwire.py: this kernel has no ``netem``). The
host's root namespace is never touched: the veth pairs are made there and moved at once, the
router forwards only inside its own namespace. Faults are the router's policy rules:
``partition(a, b)`` drops every packet between two hosts (``ip rule ... blackhole``: no
ICMP, no RST, as a dead switch port), ``isolate(a)`` drops everything to and from one host;
``heal`` and ``rejoin`` remove the rules. Processes run in a host with ``ip netns exec``
(`Host.spawn`); the test's own sockets run in a host through `Host.run`, an event loop on a
thread that has entered the host's namespace. `Network.close` kills every process and
deletes every namespace (with its devices and rules); `leftovers` says what is still there.

No pytest here: tests/test_netfault.py wires it into fixtures; docs/testing.md shows how to
drive one by hand.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Coroutine, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, TypeVar

from tests.netwire import setns

__all__ = ["PREFIX", "Host", "Network", "Process", "leftovers", "netns_problem"]

#: Every namespace and root-namespace device of these tests is named with it.
PREFIX = "gwnf"
ROOT = Path(__file__).resolve().parent.parent
_T = TypeVar("_T")


def _run(*argv: str, check: bool = True) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip() or done.returncode}")
    return done.stdout


def netns_problem() -> str | None:
    """Why namespaces cannot be built here (not root, no ``ip``, no TUN), or None."""
    if os.geteuid() != 0:
        return "not root: network namespaces need CAP_SYS_ADMIN and CAP_NET_ADMIN"
    if shutil.which("ip") is None:
        return "no `ip` command (Debian: apt-get install iproute2)"
    if not Path("/dev/net/tun").exists():
        return "no /dev/net/tun for the shaped links"
    probe = f"{PREFIX}probe{uuid.uuid4().hex[:6]}"
    try:
        _run("ip", "netns", "add", probe)
    except (RuntimeError, OSError) as exc:
        return f"cannot make a network namespace: {exc}"
    _run("ip", "netns", "del", probe, check=False)
    return None


def leftovers(prefix: str = PREFIX, workdir: Path | None = None) -> list[str]:
    """What a `Network` named with ``prefix`` left: namespaces, root devices, qdiscs, rules,
    and processes whose command line names ``workdir`` (a daemon escaping its process group).

    Its policy rules and addresses live in its namespaces: deleting them deletes those too.
    """
    found = [f"namespace {n}" for n in _run("ip", "netns", "list").split() if n.startswith(prefix)]
    for line in _run("ip", "-o", "link", "show").splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if name.startswith(prefix):
            found.append(f"device {name} in the root namespace")
    for line in _run("tc", "qdisc", "show").splitlines():
        if f"dev {prefix}" in line:
            found.append(f"qdisc {line}")
    for binary in ("iptables-save", "nft"):  # neither is needed; if installed, check anyway
        if shutil.which(binary):
            rules = _run(binary, *(("list", "ruleset") if binary == "nft" else ()), check=False)
            found.extend(f"{binary}: {r}" for r in rules.splitlines() if prefix in r)
    if workdir is not None:
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            with contextlib.suppress(OSError):
                args = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
                if str(workdir) in args:
                    found.append(f"process {cmdline.parent.name}: {args[:200]}")
    return found


class Process:
    """A process started in a host; its output in ``log``."""

    def __init__(self, name: str, popen: subprocess.Popen[bytes], log: Path) -> None:
        self.name = name
        self.popen = popen
        self.log = log

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.running():
            self.popen.send_signal(sig)

    def wait(self, timeout: float) -> int:
        return self.popen.wait(timeout)

    def kill(self) -> None:
        """SIGKILL its process group (what it started, too) and reap. Idempotent."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(10)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class _NamespaceLoop:
    """An event loop on a thread inside a network namespace: its sockets are the host's."""

    def __init__(self, namespace: str) -> None:
        self.loop = asyncio.new_event_loop()
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()

        def target() -> None:
            try:
                setns(namespace)
            except BaseException as exc:
                ready.set_exception(exc)
                return
            asyncio.set_event_loop(self.loop)
            ready.set_result(None)
            self.loop.run_forever()
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.run_until_complete(self.loop.shutdown_default_executor())
            self.loop.close()

        self.thread = threading.Thread(target=target, name=f"netns-{namespace}", daemon=True)
        self.thread.start()
        ready.result(10)

    def submit(self, coro: Coroutine[Any, Any, _T]) -> concurrent.futures.Future[_T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self) -> None:
        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        if self.thread.is_alive():
            self.submit(cancel_all()).result(10)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)


class Host:
    """One machine of the network: a namespace, an address, processes and sockets in it."""

    def __init__(self, network: Network, name: str, index: int) -> None:
        self.network = network
        self.name = name
        self.namespace = f"{network.prefix}{name}"
        self.ip = f"10.231.{index}.2"
        self.router_ip = f"10.231.{index}.1"
        self._loop: _NamespaceLoop | None = None

    def __repr__(self) -> str:
        return f"<Host {self.name} {self.ip}>"

    def command(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.namespace, *argv]

    def spawn(
        self, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None
    ) -> Process:
        """Start ``argv`` in this host, output to ``<workdir>/<host>-<name>.log``."""
        log = self.network.workdir / f"{self.name}-{name}.log"
        with open(log, "ab") as out:
            popen = subprocess.Popen(
                self.command(*argv),
                cwd=ROOT,
                env={**os.environ, **(env or {})},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a group of its own, killed whole (`Process.kill`)
            )
        process = Process(f"{self.name}/{name}", popen, log)
        self.network.processes.append(process)
        return process

    def exec(self, *argv: str, check: bool = True) -> str:
        """Run ``argv`` in this host to its end; its stdout."""
        return _run(*self.command(*argv), check=check)

    def submit(self, coro: Coroutine[Any, Any, _T]) -> concurrent.futures.Future[_T]:
        """Start ``coro`` on this host's event loop (so its sockets are this host's)."""
        if self._loop is None:
            self._loop = _NamespaceLoop(self.namespace)
        return self._loop.submit(coro)

    async def run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        """Await ``coro`` run on this host's event loop."""
        return await asyncio.wrap_future(self.submit(coro))

    def close_loop(self) -> None:
        loop, self._loop = self._loop, None
        if loop is not None:
            loop.close()


class Network:
    """A router namespace and its hosts; see the module's docstring."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.prefix = f"{PREFIX}{uuid.uuid4().hex[:4]}"
        self.router = f"{self.prefix}-r"
        self.hosts: dict[str, Host] = {}
        self.processes: list[Process] = []
        self._wires: dict[str, subprocess.Popen[bytes]] = {}
        self._rules: set[tuple[str, ...]] = set()
        self._namespaces: list[str] = []
        self._add_namespace(self.router)
        self._sysctl(self.router, "net/ipv4/ip_forward", "1")

    def _add_namespace(self, namespace: str) -> None:
        _run("ip", "netns", "add", namespace)
        self._namespaces.append(namespace)
        _run("ip", "-n", namespace, "link", "set", "lo", "up")

    @staticmethod
    def _sysctl(namespace: str, key: str, value: str) -> None:
        # /proc/sys/net is the writer's own namespace's: this touches the router's only.
        _run("ip", "netns", "exec", namespace, "sh", "-c", f"echo {value} > /proc/sys/{key}")

    def host(self, name: str, shaped: bool = False) -> Host:
        """A new host named ``name`` (``shaped``: its link is a tests/netwire.py cable)."""
        index = len(self.hosts) + 1
        host = Host(self, name, index)
        self.hosts[name] = host
        self._add_namespace(host.namespace)
        outside = f"{self.prefix}-{index}"  # the router's end
        if shaped:
            wire = subprocess.Popen(
                [sys.executable, "-m", "tests.netwire", f"{self.router}:{outside}",
                 f"{host.namespace}:eth0"],
                cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            )  # fmt: skip
            self._wires[name] = wire
            assert wire.stdout is not None
            if wire.stdout.readline().strip() != b"ready":
                raise RuntimeError(f"the cable to {name} did not start")
        else:
            inside = f"{self.prefix}-{index}h"
            _run("ip", "link", "add", inside, "type", "veth", "peer", "name", outside)
            _run("ip", "link", "set", outside, "netns", self.router)
            _run("ip", "link", "set", inside, "netns", host.namespace)
            _run("ip", "-n", host.namespace, "link", "set", inside, "name", "eth0")
        _run("ip", "-n", host.namespace, "addr", "add", f"{host.ip}/24", "dev", "eth0")
        _run("ip", "-n", host.namespace, "link", "set", "eth0", "up")
        _run("ip", "-n", host.namespace, "route", "add", "default", "via", host.router_ip)
        _run("ip", "-n", self.router, "addr", "add", f"{host.router_ip}/24", "dev", outside)
        _run("ip", "-n", self.router, "link", "set", outside, "up")
        return host

    # -- faults ------------------------------------------------------------------

    def _rule(self, add: bool, *selector: str) -> None:
        if add == (selector in self._rules):
            return
        verb = "add" if add else "del"
        _run("ip", "-n", self.router, "rule", verb, *selector, "priority", "100", "blackhole")
        (self._rules.add if add else self._rules.discard)(selector)

    def partition(self, a: Host, b: Host) -> None:
        """Drop every packet between ``a`` and ``b``, both ways, silently."""
        self._rule(True, "from", a.ip, "to", b.ip)
        self._rule(True, "from", b.ip, "to", a.ip)

    def heal(self, a: Host, b: Host) -> None:
        self._rule(False, "from", a.ip, "to", b.ip)
        self._rule(False, "from", b.ip, "to", a.ip)

    def isolate(self, a: Host) -> None:
        """Drop every packet to and from ``a``: its cable is cut, nobody is told."""
        self._rule(True, "from", a.ip)
        self._rule(True, "to", a.ip)

    def rejoin(self, a: Host) -> None:
        self._rule(False, "from", a.ip)
        self._rule(False, "to", a.ip)

    def shape(self, host: Host, delay: float, loss: float) -> None:
        """``delay`` seconds each way and ``loss`` (0..1) dropped on a shaped host's cable."""
        wire = self._wires[host.name]
        assert wire.stdin is not None
        wire.stdin.write(f"shape {delay} {loss}\n".encode())
        wire.stdin.flush()

    # -- teardown ----------------------------------------------------------------

    def close(self) -> None:
        """Stop loops and processes, delete every namespace. Safe after any failure."""
        for host in self.hosts.values():
            host.close_loop()
        for process in self.processes:
            process.kill()
        for wire in self._wires.values():
            stdin: IO[bytes] | None = wire.stdin
            if stdin is not None:
                stdin.close()
            if wire.stdout is not None:
                wire.stdout.close()
            wire.send_signal(signal.SIGTERM)
            wire.wait(10)
        for namespace in reversed(self._namespaces):
            _run("ip", "netns", "del", namespace, check=False)
        self._namespaces.clear()
