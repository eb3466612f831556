"""Flame graphs of one REST endpoint under load, for docs/performance.md.

Starts one of bench/rest.py's servers exactly as it does (same environment,
pinned to CPU 1, schema reseeded), drives one endpoint with ``wrk -t1 -c64``
from CPU 0, and records the server with py-spy for the measured run. Saves
``bench/results/rest-profile-<server>-<endpoint>-<label>.svg`` (a flame
graph) and ``.txt`` beside it (the collapsed stacks, for a diff), and prints
the requests/s wrk saw while py-spy sampled and the server's CPU time per
request (from /proc; sampling slows the server a little, so
read the figures only against another run of this tool). On a busy machine
the CPU time per request is the figure to compare: throughput moves with
everyone else's load, the work per request much less.

``--baseline REF`` profiles the gateway of commit REF instead (bench/rest.py).

Rerun (about 20 s; needs ``wrk``, Redis and py-spy, ``pip install -e '.[bench]'``)::

    .venv/bin/python -m bench.restprofile --server gateway --endpoint POST --label after
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.rest import (
    BASELINE,
    OURS,
    PEERS,
    RESULTS,
    ROOT,
    SEED_ROWS,
    WRK_CPU,
    add_database_arguments,
    base_env,
    baseline_server,
    cpu_seconds,
    create_schema,
    free_port,
    make_endpoints,
    make_servers,
    mint_token,
    parse_wrk,
    pinned,
    reseed,
    seed_records,
    serve,
    wrk,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.restprofile", description=__doc__)
    parser.add_argument("--server", choices=[*OURS, *PEERS], default="gateway")
    parser.add_argument("--endpoint", choices=["GET", "POST"], default="POST")
    parser.add_argument("--label", default="now", help="file name suffix (before, after, ...)")
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--baseline", metavar="REF", help="profile the gateway of commit REF")
    add_database_arguments(parser, "bench_rest")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    env = base_env(args.database_url, args.schema)
    asyncio.run(create_schema(args.database_url, args.schema, False))
    subprocess.run([sys.executable, "-m", "core", "migrate"], cwd=ROOT, env=env, check=True)
    asyncio.run(reseed(args.database_url, args.schema, seed_records(SEED_ROWS)))
    token = mint_token()
    ports = {key: free_port() for key in (*OURS, BASELINE, *PEERS)}
    name = f"{args.server}-{args.endpoint.lower()}-{args.label}"
    svg = RESULTS / f"rest-profile-{name}.svg"
    with tempfile.TemporaryDirectory(prefix="bench-restprofile-") as tmp:
        (server,) = make_servers([args.server], env, ports, args.redis_url, Path(tmp))
        if args.baseline:
            server = baseline_server(args.baseline, server, BASELINE, ports[BASELINE], Path(tmp))
        endpoint = next(
            e for e in make_endpoints(token, Path(tmp)) if e.name.startswith(args.endpoint)
        )
        url = f"http://127.0.0.1:{ports[server.key]}"
        with serve(server, ports[server.key], token, Path(tmp)) as proc:
            wrk(url, endpoint, 2, args.connections)
            outputs = [("flamegraph", svg), ("raw", svg.with_suffix(".txt"))]
            spies = [
                subprocess.Popen(
                    pinned(WRK_CPU, [str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(proc.pid), "--rate",
                                     str(args.rate), "--duration", str(args.duration),
                                     "--format", fmt, "--output", str(path)]),
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                for fmt, path in outputs
            ]  # fmt: skip
            cpu_before = cpu_seconds(proc.pid)
            result = parse_wrk(wrk(url, endpoint, args.duration, args.connections))
            cpu = cpu_seconds(proc.pid) - cpu_before
            for spy in spies:
                spy.wait(30)
    per_request_ms = 1000 * cpu / (result.requests_per_s * args.duration)
    print(
        f"{name}: {result.requests_per_s:,.0f} req/s while sampled, "
        f"{per_request_ms:.3f} ms of server CPU per request; saved {svg.relative_to(ROOT)}"
    )
    return 0 if result.valid else 1


if __name__ == "__main__":
    sys.exit(main())
