"""permessage-deflate on fan-out (issue 20): the same 10,000 sockets, uncompressed and compressed.

Two modes of the gateway, each a fresh process per run (bench.fanout's
machinery: the server pinned to CPU 0, the shipped load tool to CPU 1):

* ``plain``: ``COMPRESSION=off``; the load tool offers nothing;
* ``deflate``: ``COMPRESSION=on`` (level 6, ``COMPRESSION_MIN_BYTES`` 256);
  the load tool offers what Chromium offers (``--compression``) on every
  socket, so every subscriber gets the frame compressed once per publication.

Every publication carries the same realistic body, ``bench/payloads/feed.json``
(an activity feed: 1.6 KB of JSON, 1.7 KB as the pushed frame), via
``--payload-json``. Scenarios (bench.fanout's, 10,000 sockets each):

* ``broadcast``: 10 publications at 1/s: publication-to-last-subscriber time;
* ``sustained``: 25 publications/s for 10 s (250,000 deliveries/s offered):
  deliveries per second achieved.

Figures per mode (medians over ``--rounds``):

* bytes on the wire per delivery: what the server passed to ``write``/``send``
  during the run (``/proc/<pid>/io`` wchar) over the deliveries (frames, their
  headers, and the few handshakes and replies, included);
* the server's own cost: its CPU time from the first publication to the
  last delivery (the load tool reads ``/proc/<pid>/stat``) per delivery, the
  inverse of the deliveries/s one server CPU sustains; and the mean time of
  one fan-out (``gateway_fanout_seconds``: encoding, compressing once, handing
  the frame to every subscriber's queue; the writes come after it);
* what the load tool saw: deliveries/s and the time from publication to the
  last subscriber. Both include the load tool's own work on one CPU, and
  inflating costs a client about 15 us a message: 10,000 inflates add about
  150 ms to "to last" and cap "deliveries/s" at what one CPU inflates
  (a real client inflates only its own messages). On this machine the
  server's figures are the ones that say what compression costs the gateway;
* server RSS per socket (idle, subscribed, compression agreed or not).

Goals: deflate fan-out throughput >= 80% of plain (server CPU per delivery
<= 1.25x plain), bytes per delivery <= 40% of plain.

Before that, in this process: the gateway's own fan-out code (hub, prepared
frames, sockets, coalescer; counting sinks for transports) for one publication
to 10,000 sockets, plain and deflate alternating, in CPU time (`python_path`):
what compression adds per delivery, apart from the system calls, whose cost
shrinks with the bytes. Then the cost per socket of the choice RFC 7692 leaves
to the server, measured
in fresh interpreters: 10,000 protocol objects with compression agreed, as
the gateway keeps them (``client_no_context_takeover``: no zlib state), and
the same each keeping the inflate context a client's context takeover would
need, after one 1.6 KB message and after one of 40 KB (its 32 KB window touched).

Rerun (from the repository root; Redis on 127.0.0.1:6379, PostgreSQL as for
bench.fanout; about 12 minutes with --rounds 3, noisy on a shared machine)::

    .venv/bin/python -m bench.compression --rounds 3 --save
    .venv/bin/python -m bench.compression --contexts-only   # the per-socket cost, 5 s
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from typing import Any

from bench.fanout import RESULTS, ROOT, SCENARIOS, run_scenario, save_results
from core.infra.metrics import Metrics
from gateway.hub import Hub, Prepared
from gateway.transport.wsconn import Coalescer, WSConnection
from proto import JSON_CODEC
from proto.deflate import Compressor, negotiate
from proto.wsframe import frame

PAYLOAD = ROOT / "bench" / "payloads" / "feed.json"
MODES: dict[str, tuple[dict[str, str], tuple[str, ...]]] = {
    "plain": ({"COMPRESSION": "off"}, ()),
    "deflate": ({"COMPRESSION": "on", "COMPRESSION_LEVEL": "6"}, ("--compression",)),
}
_COLUMNS = [
    ("bytes_per_delivery", "bytes/delivery", "{:,.0f}"),
    ("server_us_per_delivery", "server CPU us/d", "{:.2f}"),
    ("fanout_ms", "fan-out ms", "{:.2f}"),
    ("deliveries_per_s", "deliveries/s", "{:,.0f}"),
    ("last_p50_ms", "to last p50 ms", "{:.1f}"),
    ("kb_per_conn", "KB/socket", "{:.2f}"),
    ("lost", "lost", "{:.0f}"),
]
_CONTEXTS = """
import json, re, sys, zlib
from proto.wsprotocol import WebSocketProtocol
def rss():
    return int(re.search(r"VmRSS:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
n, mode = int(sys.argv[1]), sys.argv[2]
keep = mode != "none"
message = zlib.compressobj(6, zlib.DEFLATED, -15)
text = open(sys.argv[3], "rb").read() * (1 if mode != "full" else 25)  # "full": 40 KB, a whole window
body = message.compress(text) + message.flush(zlib.Z_SYNC_FLUSH)
before = rss()
sockets = []
for _ in range(n):
    p = WebSocketProtocol(65536, deflate=True)
    context = None
    if keep:  # what context takeover would keep per socket: a decompressor, used once
        context = zlib.decompressobj(-15)
        context.decompress(body)
    sockets.append((p, context))
print(json.dumps({"bytes_per_socket": (rss() - before) / n}))
"""


def one_frame_sizes() -> dict[str, int]:
    """The pushed frame of one publication, plain and as compressed once for everyone."""
    body = json.dumps(json.loads(PAYLOAD.read_text()), separators=(",", ":")).encode()
    data = b'{"s":1,"t":1764532800.123456,"c":0,"pad":' + body + b"}"
    push = JSON_CODEC.encode_push("bench-broadcast-1234-12345678901234", data, None, None)
    return {
        "data_bytes": len(data),
        "plain_frame": len(frame(push)),
        "deflate_frame": len(frame(Compressor(6).compress(push), compressed=True)),
    }


class _Sink:
    """A transport that takes every write and counts its bytes (no system call)."""

    def __init__(self) -> None:
        self.bytes = 0

    def write(self, data: bytes) -> None:
        self.bytes += len(data)

    def get_write_buffer_size(self) -> int:
        return 0


class _Member:
    """What the hub delivers to: as a session does, straight to the socket's `deliver`."""

    __slots__ = ("ws",)

    def __init__(self, ws: WSConnection) -> None:
        self.ws = ws

    def deliver(self, prepared: Prepared) -> None:
        self.ws.deliver(prepared, JSON_CODEC)


def python_path(n: int = 10_000, rounds: int = 40) -> dict[str, float]:
    """CPU ms of the gateway's own fan-out code for one publication to ``n`` sockets, A/B.

    Real `Hub`, `Prepared`, `WSConnection` and `Coalescer`, the transports
    replaced by counting sinks: everything but the system calls, in this
    process's CPU time (so other load on the machine matters little), the
    two modes alternating round by round.
    """

    async def run() -> dict[str, float]:
        body = json.dumps(json.loads(PAYLOAD.read_text()), separators=(",", ":")).encode()
        data = b'{"s":1,"t":1764532800.123456,"c":0,"pad":' + body + b"}"
        compressor, agreement = Compressor(6), negotiate(["permessage-deflate"])
        setups = {}
        for mode in ("plain", "deflate"):
            hub, coalescer = Hub(Metrics()), Coalescer()
            for _ in range(n):
                ws = WSConnection(b"", JSON_CODEC, None, None, 65536, coalescer, b"",  # type: ignore[arg-type]
                                  compressor if mode == "deflate" else None,
                                  agreement if mode == "deflate" else None)  # fmt: skip
                ws.transport = _Sink()
                hub.add("ch", _Member(ws))  # type: ignore[arg-type]
            setups[mode] = (hub, coalescer)
        times: dict[str, list[float]] = {"plain": [], "deflate": []}
        for r in range(rounds):
            for mode in ("plain", "deflate") if r % 2 == 0 else ("deflate", "plain"):
                hub, coalescer = setups[mode]
                started = time.process_time()
                hub.broadcast("ch", data)
                coalescer.flush()
                times[mode].append(time.process_time() - started)
        return {mode: round(statistics.median(t) * 1000, 2) for mode, t in times.items()}

    return asyncio.run(run())


def figures(report: dict[str, Any]) -> dict[str, float]:
    d = report["deliveries"]
    per = report["server_memory"]["bytes_per_connection"]
    received = d["received"] or 1
    m = report.get("server_metrics", {})
    fanouts = m.get("gateway_fanout_seconds_count") or float("nan")
    return {
        "bytes_per_delivery": report["server_written_bytes"] / received,
        "server_us_per_delivery": (report["server_cpu"]["publishing_seconds"] or 0.0)
        * 1e6
        / received,
        "fanout_ms": m.get("gateway_fanout_seconds_sum", 0.0) * 1000 / fanouts,
        "deliveries_per_s": d["per_second"],
        "last_p50_ms": report["completion"]["p50_ms"],
        "kb_per_conn": round(per / 1000, 2) if per is not None else float("nan"),
        "lost": d["lost"],
        "failed": report["connections"]["failed"],
    }


def context_cost(n: int = 10_000) -> dict[str, float]:
    """RSS per socket of 10,000 compressing protocol objects, without and with an inflate context."""
    out = {}
    for mode in ("none", "keep", "full"):
        argv = [sys.executable, "-c", _CONTEXTS, str(n), mode, str(PAYLOAD)]
        done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=True)
        out[mode] = round(json.loads(done.stdout)["bytes_per_socket"], 1)
    return {"no_context_bytes": out["none"], "inflate_context_bytes": out["keep"],
            "inflate_context_full_bytes": out["full"]}  # fmt: skip


def table(results: dict[str, dict[str, list[dict[str, float]]]]) -> str:
    lines = []
    for name, per_mode in results.items():
        s = SCENARIOS[name]
        lines.append(f"\n{name}: {s.connections:,} sockets, {s.rate:g} publications/s")
        lines.append(f"  {'mode':<9}" + "".join(f"{title:>16}" for _, title, _ in _COLUMNS))
        med = {}
        for mode, runs in per_mode.items():
            med[mode] = {k: statistics.median(r[k] for r in runs) for k, _, _ in _COLUMNS}
            cells = "".join(f"{fmt.format(med[mode][k]):>16}" for k, _, fmt in _COLUMNS)
            lines.append(f"  {mode:<9}{cells}   ({len(runs)} runs)")
        if "plain" in med and "deflate" in med:
            p, z = med["plain"], med["deflate"]
            ratios = ", ".join(
                f"{title} {z[key] / p[key]:.2f}"
                for key, title in (
                    ("bytes_per_delivery", "bytes/delivery"),
                    ("server_us_per_delivery", "server CPU/delivery"),
                    ("fanout_ms", "fan-out"),
                    ("deliveries_per_s", "deliveries/s"),
                    ("last_p50_ms", "to last"),
                    ("kb_per_conn", "KB/socket"),
                )
                if p[key]
            )
            lines.append(f"  deflate / plain: {ratios}")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--scenarios", default="broadcast,sustained")
    p.add_argument("--contexts-only", action="store_true", help="only the per-socket cost")
    p.add_argument(
        "--save", action="store_true", help="write bench/results/compression-<date>.json"
    )
    args = p.parse_args()
    sizes = one_frame_sizes()
    contexts = context_cost()
    path = python_path()
    head = (
        f"one publication: {sizes['data_bytes']:,} bytes of data; pushed frame "
        f"{sizes['plain_frame']:,} bytes plain, {sizes['deflate_frame']:,} compressed "
        f"({sizes['deflate_frame'] / sizes['plain_frame']:.0%})\n"
        f"per socket, compression agreed (10,000 protocol objects): "
        f"{contexts['no_context_bytes']:,.0f} bytes without zlib state (the gateway: "
        f"client_no_context_takeover); keeping an inflate context (client context takeover) "
        f"{contexts['inflate_context_bytes']:,.0f} bytes after one 1.6 KB message, "
        f"{contexts['inflate_context_full_bytes']:,.0f} once a 40 KB one filled its window\n"
        f"the gateway's fan-out code for one publication to 10,000 sockets, system calls "
        f"aside (CPU, median of 40): plain {path['plain']} ms, deflate {path['deflate']} ms "
        f"({path['deflate'] / path['plain']:.2f}x)"
    )
    print(head, flush=True)
    if args.contexts_only:
        return 0
    results: dict[str, dict[str, list[dict[str, float]]]] = {}
    raw: list[dict[str, Any]] = []
    log = RESULTS / "compression-servers.log"
    RESULTS.mkdir(exist_ok=True)
    for rnd in range(args.rounds):
        order = list(MODES) if rnd % 2 == 0 else list(reversed(MODES))
        for name in [s for s in args.scenarios.split(",") if s]:
            for mode in order:
                env, load = MODES[mode]
                print(f"round {rnd + 1}: {name}, {mode}...", file=sys.stderr, flush=True)
                report = run_scenario("gateway", SCENARIOS[name], log, env, "zbench",
                                      (*load, "--payload-json", str(PAYLOAD)))  # fmt: skip
                row = figures(report)
                print(f"  {row}", file=sys.stderr, flush=True)
                results.setdefault(name, {}).setdefault(mode, []).append(row)
                raw.append({"round": rnd, "scenario": name, "mode": mode, "report": report})
    text = head + "\n" + table(results)
    print(text)
    if args.save:
        save_results("compression", {"sizes": sizes, "contexts": contexts, "python_path": path,
                                     "runs": raw, "table": text})  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
