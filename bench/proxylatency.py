"""The p50 the CORE_URL hop adds at one connection, A/B against another commit's gateway.

One kept-alive connection to each target, one request at a time (``GET
/api/projects?limit=20``, 15 KB): to the core straight, through the gateway
of ``--baseline`` (``git archive``) and through this tree's gateway, both
with ``CORE_URL`` at the same core. The targets take turns of ``--run``
requests in a row (20; the order of the targets rotating, a first request
to warm up after the others' turns), in blocks of ``--requests`` requests to
each. Each block's median is a target's p50 in it; the added p50 is the
median over blocks of each target's p50 minus the core's in the same block.
Turns of a few milliseconds make the comparison immune to what the machine
does from one second to the next (a noisy neighbour, a frequency change),
which turns of whole blocks were not, while each process still serves
requests back to back, as under load. With ``--run 1`` every request finds
its process idle since its last one (all the others were served
meanwhile): the regime of sporadic traffic, where every process's caches
are cold and Python's work costs several times more. Same placement as
bench/proxy.py: the core on CPU 1, the gateways and this client on CPU 0.

Two byte relays take their turns too, on the gateways' CPU in front of the
same core, with no HTTP at all: ``pyrelay`` (bench/pyrelay.py, asyncio on
uvloop, as the gateway runs) and, with ``socat`` on PATH (Debian's
package), ``relay`` (C). What ``relay`` adds is what any proxy process adds
on this machine before it does any work of its own (two more loopback hops,
two more wake-ups); ``pyrelay`` adds Python's event loop to that; the
gateway's figure beyond ``pyrelay`` is its own work on each request.

Each proxy's CPU per request (user and system time over the requests sent
to it) is reported too: unlike the added p50, it does not depend on how
long the core took.

``--instant-core`` puts bench/instantcore.py where the core was: an answer
of the same size at once, with no database, so that between two requests
nothing runs but this client and the hop. What the hop adds then is its
cost on a CPU whose caches stay warm, as under steady load; with the real
core, PostgreSQL and the core run between two requests and the same work
takes longer.

    .venv/bin/python -m bench.proxylatency --blocks 9 --save    # ~1 minute
    .venv/bin/python -m bench.proxylatency --blocks 9 --instant-core

Needs PostgreSQL with bench/proxy.py's schema seeded (run it once) and Redis.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from bench.fanout import save_results
from bench.proxy import BACK_CPU, FRONT_CPU, LOAD_CPU, make_tier
from bench.rest import Server, baseline_server, cpu_seconds, free_port, mint_token, serve

TARGET = "/api/projects?limit=20"


class Client:
    """One kept-alive connection to one target, one request at a time."""

    def __init__(self, port: int, token: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.head = (
            f"GET {TARGET} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n"
        ).encode()

    def once(self) -> float:
        """Seconds from sending the request to the last byte of its answer."""
        sock = self.sock
        started = time.perf_counter()
        sock.sendall(self.head)
        data = b""
        while b"\r\n\r\n" not in data:
            data += _received(sock)
        answer, _, body = data.partition(b"\r\n\r\n")
        if not answer.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(answer.decode("latin-1"))
        length = next(
            int(line.partition(b":")[2])
            for line in answer.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        while len(body) < length:
            body += _received(sock)
        return time.perf_counter() - started

    def close(self) -> None:
        self.sock.close()


def block(
    clients: dict[str, Client], requests: int, run: int, turn: int, sent: dict[str, int]
) -> dict[str, float]:
    """Each target's median milliseconds over ``requests`` requests, the targets taking turns
    of ``run`` requests each (the order rotating), the first of each turn left out (a warm-up
    after the other targets' turns), so that whatever the machine does meanwhile falls on all
    of them alike while each still serves requests back to back."""
    names = list(clients)
    times: dict[str, list[float]] = {name: [] for name in names}
    for n in range(-(-requests // run)):
        k = (n + turn) % len(names)
        for name in names[k:] + names[:k]:
            client = clients[name]
            client.once()
            times[name].extend(client.once() for _ in range(run))
            sent[name] += run + 1
    return {name: 1000 * statistics.median(found) for name, found in times.items()}


def _received(sock: socket.socket) -> bytes:
    data = sock.recv(65536)
    if not data:
        raise ConnectionError("the server closed the connection in the middle of an answer")
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.proxylatency", description=__doc__)
    parser.add_argument("--blocks", type=int, default=9)
    parser.add_argument("--requests", type=int, default=400, help="requests per block")
    parser.add_argument(
        "--run", type=int, default=20, help="requests in a row to one target (a turn)"
    )
    parser.add_argument("--baseline", default="main", help="the commit whose gateway is 'before'")
    parser.add_argument("--database-url", default="postgresql://127.0.0.1:5432/test")
    parser.add_argument("--schema", default="bench_proxy")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument(
        "--instant-core",
        action="store_true",
        help="bench/instantcore.py in the core's place: the hop's cost with warm caches",
    )
    parser.add_argument(
        "--save", action="store_true", help="bench/results/proxylatency-<date>.json"
    )
    args = parser.parse_args(argv)
    os.sched_setaffinity(0, {int(LOAD_CPU)})
    token = mint_token()
    socat = shutil.which("socat")
    found: dict[str, list[float]] = {"core": [], "before": [], "now": [], "pyrelay": []}
    if socat is not None:
        found["relay"] = []
    with tempfile.TemporaryDirectory(prefix="bench-proxylatency-") as tmp, ExitStack() as stack:
        logs = Path(tmp)
        tier = make_tier(args.database_url, args.schema, args.redis_url, logs)
        ports = {"core": free_port(), "now": free_port(), "before": free_port()}
        core = tier.core(ports["core"])
        if args.instant_core:
            argv = ("-m", "bench.instantcore", "--port", str(ports["core"]))
            core = Server("core", "instant core", (sys.executable, *argv), dict(os.environ))
        pids = {"core": stack.enter_context(serve(core, ports["core"], token, logs, BACK_CPU)).pid}
        now = tier.gateway(ports["now"], ports["core"], key="gateway-now")
        pids["now"] = stack.enter_context(serve(now, ports["now"], token, logs, FRONT_CPU)).pid
        before = baseline_server(args.baseline, now, "gateway-before", ports["before"], logs)
        pids["before"] = stack.enter_context(
            serve(before, ports["before"], token, logs, FRONT_CPU)
        ).pid
        ports["pyrelay"] = free_port()
        target = f"127.0.0.1:{ports['core']}"
        pyrelay = Server(
            "pyrelay",
            "Python relay",
            (
                sys.executable,
                "-m",
                "bench.pyrelay",
                "--port",
                str(ports["pyrelay"]),
                "--target",
                target,
            ),
            dict(os.environ),
        )
        pids["pyrelay"] = stack.enter_context(
            serve(pyrelay, ports["pyrelay"], token, logs, FRONT_CPU)
        ).pid
        if socat is not None:
            ports["relay"] = free_port()
            listen = f"TCP-LISTEN:{ports['relay']},bind=127.0.0.1,reuseaddr,fork,nodelay"
            relay = Server(
                "relay",
                "socat relay",
                (socat, listen, f"TCP:127.0.0.1:{ports['core']},nodelay"),
                dict(os.environ),
            )
            stack.enter_context(serve(relay, ports["relay"], token, logs, FRONT_CPU))
        clients = {name: Client(ports[name], token) for name in found}
        sent = dict.fromkeys(found, 0)
        spent = {name: cpu_seconds(pid) for name, pid in pids.items()}
        try:
            for n in range(args.blocks):
                for name, ms in block(clients, args.requests, args.run, n, sent).items():
                    found[name].append(ms)
            # Each proxy serves only its own turns (the core serves every target's).
            per_request = {
                name: (cpu_seconds(pid) - spent[name]) / sent[name]
                for name, pid in pids.items()
                if name != "core"
            }
        finally:
            for client in clients.values():
                client.close()
    report: dict[str, object] = {
        "blocks_ms": found,
        "baseline": args.baseline,
        "requests": args.requests,
        "run": args.run,
        "instant_core": args.instant_core,
        "cpu_per_request_ms": {name: 1000 * x for name, x in per_request.items()},
    }
    if args.instant_core:
        print("core: bench/instantcore.py (an answer of the same size at once, no database)")
    for name in found:
        print(f"{name}: p50 per block " + ", ".join(f"{x:.2f}" for x in found[name]) + " ms")
    paths = {
        "before": args.baseline,
        "now": "this tree",
        "pyrelay": "bench/pyrelay.py, a byte relay in Python",
        "relay": "socat, a byte relay in C",
    }
    for name in [n for n in found if n != "core"]:
        added = [b - a for a, b in zip(found["core"], found[name], strict=True)]
        share = [b / a - 1 for a, b in zip(found["core"], found[name], strict=True)]
        report[f"added_{name}_ms"] = statistics.median(added)
        report[f"added_{name}_share"] = statistics.median(share)
        print(
            f"{name} ({paths[name]}): added p50 "
            f"{statistics.median(added):+.3f} ms ({statistics.median(share):+.0%}) over the core's "
            f"{statistics.median(found['core']):.3f} ms, median of {args.blocks} blocks"
            + (
                f"; CPU {1000 * per_request[name]:.3f} ms per request"
                if name in per_request
                else ""
            )
        )
    report["loadavg"] = os.getloadavg()
    if args.save:
        save_results("proxylatency-instant" if args.instant_core else "proxylatency", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
