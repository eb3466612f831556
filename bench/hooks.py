"""What hooks cost: handshakes with and without a connect hook, fan-out with a publish hook.

Each run starts a fresh gateway (one worker, Redis, pinned to CPU 0) and the
example backend (examples/hooks_backend.py, Tornado, one process, not
pinned), then runs the shipped load tool pinned to CPU 1, as bench/fanout.py
does. Variants alternate within each round, so every comparison is made in
the same conditions; the table shows medians over the rounds.

* ``connect``: a burst of ``--connects`` sockets (one token each, 200
  handshakes in flight per load process), with no hook and with
  ``HOOK_CONNECT_URL`` (every handshake waits for the backend's answer):
  connects per second, handshake p50 and p99, server memory per connection.
* ``fanout``: bench/fanout.py's ``sustained`` scenario (10,000 subscribers,
  25 publications/s for 10 s through Redis), with no hook and with
  ``HOOK_PUBLISH_URL`` on ``chat:*``, a channel nobody publishes on here:
  deliveries per second, which must not change (sessions are then
  `gateway.hooks.session.HookedSession`, whose fan-out path is the plain one).

The sockets subscribe to ``room:bench-…``, which the example's connect hook
grants. Rerun (from the repository root; needs Redis on 127.0.0.1:6379,
PostgreSQL as for bench/fanout.py, and ``pip install -e '.[bench]'``)::

    .venv/bin/python -m bench.hooks --rounds 3 --save
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

from bench.fanout import RESULTS, ROOT, SCENARIOS, Scenario, _free_port, run_scenario, save_results

SECRET = secrets.token_hex(32)
VARIANTS = {
    "connect": ("no hook", "connect hook"),
    "fanout": ("no hook", "publish hook"),
}


@contextlib.contextmanager
def backend() -> Iterator[str]:
    """examples/hooks_backend.py on a free port; its base URL."""
    port = _free_port()
    env = {**os.environ, "HOOK_SECRET": SECRET, "PYTHONUNBUFFERED": "1"}
    with open(RESULTS / "hooks-backend.log", "ab") as out:
        argv = [sys.executable, "examples/hooks_backend.py", "--port", str(port)]
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=out)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(url + "/login?user=probe", timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the hook backend did not start") from None
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def settings(variant: str, url: str) -> dict[str, str]:
    """The gateway's environment for ``variant``."""
    if variant == "connect hook":
        return {"HOOK_SECRET": SECRET, "HOOK_CONNECT_URL": f"{url}/connect"}
    if variant == "publish hook":
        return {
            "HOOK_SECRET": SECRET,
            "HOOK_PUBLISH_URL": f"{url}/publish",
            "HOOK_PUBLISH_CHANNELS": "chat:*",
        }
    return {}


def figures(report: dict[str, Any]) -> dict[str, float]:
    c, d = report["connections"], report["deliveries"]
    per = report["server_memory"]["bytes_per_connection"]
    return {
        "connects_per_s": c["per_second"],
        "handshake_p50_ms": c["handshake"]["p50_ms"],
        "handshake_p99_ms": c["handshake"]["p99_ms"],
        "failed": c["failed"],
        "kb_per_conn": round(per / 1000, 2) if per is not None else float("nan"),
        "deliveries_per_s": d["per_second"],
        "lost": d["lost"],
        # The gateway's own CPU per socket opened (its handshake, subscription and
        # deliveries; with a hook, its side of the call): what the backend costs it.
        "cpu_ms_per_conn": round(1000 * report["server_cpu_seconds"] / max(c["opened"], 1), 3),
    }


COLUMNS = {
    "connect": [
        ("connects_per_s", "connects/s", "{:,.0f}"),
        ("handshake_p50_ms", "p50 ms", "{:.1f}"),
        ("handshake_p99_ms", "p99 ms", "{:.1f}"),
        ("cpu_ms_per_conn", "CPU ms/conn", "{:.2f}"),
        ("kb_per_conn", "KB/conn", "{:.2f}"),
        ("failed", "failed", "{:.0f}"),
    ],
    "fanout": [
        ("deliveries_per_s", "deliveries/s", "{:,.0f}"),
        ("cpu_ms_per_conn", "CPU ms/conn", "{:.2f}"),
        ("kb_per_conn", "KB/conn", "{:.2f}"),
        ("lost", "lost", "{:.0f}"),
        ("failed", "failed", "{:.0f}"),
    ],
}


def table(results: dict[str, dict[str, list[dict[str, float]]]]) -> str:
    lines = []
    for name, per_variant in results.items():
        lines.append(f"\n{name}: {SCENARIO_OF[name].connections:,} connections")
        lines.append(f"  {'variant':<14}" + "".join(f"{t:>14}" for _, t, _ in COLUMNS[name]))
        medians = {}
        for variant, runs in per_variant.items():
            med = {k: statistics.median(r[k] for r in runs) for k, _, _ in COLUMNS[name]}
            medians[variant] = med
            cells = "".join(f"{fmt.format(med[k]):>14}" for k, _, fmt in COLUMNS[name])
            lines.append(f"  {variant:<14}{cells}   ({len(runs)} runs)")
        base, hooked = (medians.get(v) for v in VARIANTS[name])
        if base and hooked:
            key = "connects_per_s" if name == "connect" else "deliveries_per_s"
            lines.append(f"  {VARIANTS[name][1]} / no hook: {hooked[key] / base[key]:.2f}x {key}")
    return "\n".join(lines)


SCENARIO_OF: dict[str, Scenario] = {}


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--connects", type=int, default=4000, help="sockets of the connect burst")
    p.add_argument("--scenarios", default="connect,fanout")
    p.add_argument("--save", action="store_true", help="write bench/results/hooks-<date>.json")
    args = p.parse_args()
    SCENARIO_OF["connect"] = Scenario("connect", args.connects, 1, 2, "")
    SCENARIO_OF["fanout"] = SCENARIOS["sustained"]
    names = [s for s in args.scenarios.split(",") if s]
    RESULTS.mkdir(exist_ok=True)
    log = RESULTS / "hooks-servers.log"
    results: dict[str, dict[str, list[dict[str, float]]]] = {}
    raw: list[dict[str, Any]] = []
    with backend() as url:
        for rnd in range(args.rounds):
            for name in names:
                variants = VARIANTS[name] if rnd % 2 == 0 else VARIANTS[name][::-1]
                for variant in variants:
                    print(f"round {rnd + 1}: {name}, {variant}...", file=sys.stderr, flush=True)
                    report = run_scenario(
                        "gateway",
                        SCENARIO_OF[name],
                        log,
                        settings(variant, url),
                        channel="room:bench",
                    )
                    found = figures(report)
                    print(f"  {found}", file=sys.stderr, flush=True)
                    results.setdefault(name, {}).setdefault(variant, []).append(found)
                    raw.append(
                        {"round": rnd, "scenario": name, "variant": variant, "report": report}
                    )
    text = table(results)
    print(text)
    if args.save:
        save_results("hooks", {"runs": raw, "table": text})
    return 0


if __name__ == "__main__":
    sys.exit(main())
