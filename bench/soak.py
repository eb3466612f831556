"""Soak: 10,000 sockets held for minutes under a steady publication rate.

Starts ``python -m gateway`` (one worker, Redis broker, history on every
channel) and runs the load tool against it: ``--channels`` x ``--group``
sockets, each on its channel and on the shared ``everyone``, publications
at ``--rate`` a second through Redis for ``--minutes``. The gateway's RSS
(every 100 ms) and open descriptors (every second) are sampled from /proc;
the table gives them at the start of publishing and at its end, their
peaks, and the readers' account: deliveries, lost, late, exactly once.

Rerun (from the repository root; Redis on 127.0.0.1:6379)::

    .venv/bin/python -m bench.soak --minutes 10 --save
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import uuid

from bench.fanout import save_results
from bench.slow import MIB, RESULTS, ROOT, SECRET, Sampler, _free_port, _gateway


def _at(series: list[tuple[float, int]], t: float) -> int:
    """The sample nearest to ``t`` seconds."""
    return min(series, key=lambda s: abs(s[0] - t))[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--channels", type=int, default=100)
    p.add_argument("--group", type=int, default=100)
    p.add_argument("--rate", type=float, default=50.0, help="publications a second, in all")
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--payload-bytes", type=int, default=200)
    p.add_argument("--save", action="store_true", help="write bench/results/soak-<date>.json")
    args = p.parse_args()
    RESULTS.mkdir(exist_ok=True)
    port = _free_port()
    prefix = f"soak{uuid.uuid4().hex[:6]}:"
    env = {"HISTORY_CHANNELS": "load:*,everyone", "HISTORY_SIZE": "1000"}
    proc = _gateway(port, prefix, 256 * MIB, env, RESULTS / "soak-server.log")
    messages = int(args.rate * args.minutes * 60)
    load_start = os.getloadavg()
    try:
        tool = [
            sys.executable, "-m", "gateway.loadtest", "--json",
            "--url", f"http://127.0.0.1:{port}", "--secret", SECRET, "--prefix", prefix,
            "--channels", str(args.channels), "--group", str(args.group), "--broadcast", "everyone",
            "--publish", "redis", "--history-channels", "load:*,everyone", "--history-size", "1000",
            "--rate", str(args.rate), "--messages", str(messages),
            "--payload-bytes", str(args.payload_bytes), "--server-pid", str(proc.pid),
        ]  # fmt: skip
        with Sampler(proc.pid, port) as sampler:
            done = subprocess.run(tool, cwd=ROOT, stdout=subprocess.PIPE, text=True)
        report = json.loads(done.stdout)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    d, sk = report["deliveries"], report["sockets"]
    # publishing starts after the processes start (~1 s), connect and settle (2 s)
    pub_start = 1.0 + report["connections"]["seconds"] + 2.0
    pub_end = pub_start + messages / args.rate
    rss0 = report["server_memory"]["rss_after_bytes"]  # the tool's, right before publishing
    rss1 = _at(sampler.rss, pub_end)
    fd0, fd1 = _at(sampler.fds, pub_start), _at(sampler.fds, pub_end)
    rows = [
        ("sockets", f"{report['connections']['subscribed']:,} subscribed of {report['connections']['asked']:,}, "
                    f"{report['connections']['closed_early']:,} closed before the end"),
        ("publishing", f"{messages:,} publications at {args.rate:g}/s ({args.minutes:g} min), "
                       f"{args.payload_bytes} bytes of padding"),
        ("RSS", f"{rss0 / MIB:,.1f} MiB at the start of publishing, {rss1 / MIB:,.1f} MiB at its end "
                f"({(rss1 - rss0) / MIB:+,.1f} MiB), peak {max(v for _, v in sampler.rss) / MIB:,.1f} MiB"),
        ("open descriptors", f"{fd0:,} at the start, {fd1:,} at the end, peak {max(v for _, v in sampler.fds):,}"),
        ("deliveries", f"{d['received']:,} of {d['expected']:,}: lost {d['lost']:,}, late {d['late']:,}, "
                       f"duplicates {d['duplicates']:,}; {d['per_second']:,}/s"),
        ("exactly once", f"{sk['exact']:,} of {sk['accounted']:,} sockets"),
        ("latency", f"p50 {report['latency']['p50_ms']} ms, p99 {report['latency']['p99_ms']} ms, "
                    f"max {report['latency']['max_ms']} ms"),
        ("load average", f"{load_start[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"),
    ]  # fmt: skip
    text = "\n".join(f"| {k} | {v} |" for k, v in rows)
    print("| figure | result |\n|---|---|\n" + text)
    if args.save:
        save_results("soak", {
            "args": vars(args),
            "report": report,
            "table": text,
            "rss_series": sampler.rss[::50],
            "fd_series": sampler.fds[::10],
        })  # fmt: skip
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
