"""The load tool's command line: its options and their checks.

See `gateway.loadtest.cli` for what a run does and docs/performance.md
("The load tool") for every option and figure.
"""

from __future__ import annotations

import argparse
import os
from ipaddress import IPv4Address, ip_address
from pathlib import Path
from urllib.parse import urlsplit

__all__ = ["PER_PROCESS", "check", "is_loopback", "parse_sources", "parser"]

#: Connections per client process by default: well under a 20,000 open-file limit.
PER_PROCESS = 5000


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m gateway.loadtest",
        description="Open many authenticated connections to a gateway, publish, and measure.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--url", default="http://127.0.0.1:8888", help="the gateway's base URL")
    p.add_argument(
        "--urls",
        default="",
        help="comma list of gateway URLs: sockets connect to the first and reconnect "
        "to the next, round the list (overrides --url)",
    )
    p.add_argument("--path", default="/ws", help="WebSocket path")
    p.add_argument("--mode", choices=["ws", "sse", "longpoll"], default="ws", help="transport")
    p.add_argument("-n", "--connections", type=int, default=1000, help="connections to open")
    p.add_argument(
        "--channel",
        default="load",
        help="the channel (with --channels N > 1, the channels are CHANNEL:0…CHANNEL:N-1)",
    )
    p.add_argument("--channels", type=int, default=1, help="channels the sockets are spread over")
    p.add_argument(
        "--group",
        type=int,
        default=0,
        help="sockets per channel (sets -n to channels x group; 0: -n round-robin)",
    )
    p.add_argument("--broadcast", default="", help="a channel every socket also subscribes to")
    p.add_argument(
        "--spread",
        choices=["round-robin", "random"],
        default="round-robin",
        help="how publications are spread over the channels (the broadcast one included)",
    )
    auth = p.add_mutually_exclusive_group()
    auth.add_argument(
        "--secret", help="JWT_SECRET of the gateway: mint one HS256 token per connection"
    )
    auth.add_argument(
        "--tokens", type=Path, help="file of tokens, one per line (reused round-robin)"
    )
    p.add_argument("--ttl", type=float, default=3600.0, help="lifetime of minted tokens, seconds")
    p.add_argument(
        "--processes",
        type=int,
        default=0,
        help=f"client processes (default: one per {PER_PROCESS} connections)",
    )
    p.add_argument(
        "--sources",
        default="127.0.0.2-127.0.0.9",
        help="local source addresses, a range or comma list ('' for the default)",
    )
    p.add_argument("--concurrency", type=int, default=200, help="handshakes in flight per process")
    p.add_argument(
        "--connect-rate",
        type=float,
        default=0.0,
        help="new connections per second in all (0: as fast as the server takes them)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        help="seconds for one connection's handshake and subscription",
    )
    p.add_argument(
        "--publish",
        choices=["redis", "http", "none"],
        default="redis",
        help="how publications are sent",
    )
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0", help="for --publish redis")
    p.add_argument("--prefix", default="gw:", help="the gateway's REDIS_PREFIX")
    p.add_argument(
        "--history-channels",
        default="",
        help="with --publish redis: the gateways' HISTORY_CHANNELS (comma list), so "
        "publications go through history and can be recovered",
    )
    p.add_argument("--history-size", type=int, default=100, help="the gateways' HISTORY_SIZE")
    p.add_argument("--history-ttl", type=float, default=300.0, help="the gateways' HISTORY_TTL")
    p.add_argument("--rate", type=float, default=10.0, help="publications per second, in all")
    p.add_argument("--messages", type=int, default=100, help="publications to send")
    p.add_argument("--payload-bytes", type=int, default=0, help="padding added to each publication")
    p.add_argument(
        "--payload-json",
        type=argparse.FileType("rb"),
        help="a file holding a JSON value added to each publication (as its pad): a realistic "
        "body, which compresses as real data does (--payload-bytes pads with x's)",
    )
    p.add_argument(
        "--compression",
        action="store_true",
        help="offer permessage-deflate on every socket, as browsers do (the gateway's "
        "COMPRESSION=on accepts it)",
    )
    p.add_argument(
        "--drain",
        type=float,
        default=10.0,
        help="seconds after the last publication within which deliveries are on time",
    )
    p.add_argument(
        "--late-wait",
        type=float,
        default=30.0,
        help="after the drain window, wait for late deliveries until none came for this long",
    )
    p.add_argument(
        "--reconnect",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="reconnect sockets (ws) and streams (sse) closed before the end, recovering "
        "with since (sse: Last-Event-ID); long-poll sessions do not reconnect",
    )
    p.add_argument(
        "--backoff",
        type=float,
        default=0.5,
        help="first reconnection delay, seconds: doubled per failure, times 0.5-1 jitter",
    )
    p.add_argument("--backoff-max", type=float, default=10.0, help="longest reconnection delay")
    p.add_argument(
        "--kill-after",
        type=float,
        help="seconds after publishing starts to SIGKILL --kill-pid (or run --kill-cmd)",
    )
    p.add_argument(
        "--kill-pid",
        type=int,
        action="append",
        default=[],
        help="a local server process to SIGKILL (repeatable; loopback URLs only)",
    )
    p.add_argument(
        "--kill-cmd", help="a command to run instead (split like a shell, not run by one)"
    )
    p.add_argument(
        "--stall",
        type=int,
        default=0,
        help="sockets (of -n, ws) that stop reading once subscribed and stay open: stalled "
        "consumers, counted apart from the readers",
    )
    p.add_argument(
        "--slow",
        type=int,
        default=0,
        help="sockets (of -n, ws) that read at most --slow-rate bytes a second, counted apart",
    )
    p.add_argument(
        "--slow-rate", type=float, default=0.0, help="bytes a second a --slow socket reads"
    )
    p.add_argument(
        "--laggard-mss",
        type=int,
        default=0,
        help="TCP_MAXSEG of stalled and slow sockets (e.g. 1448: a network path's, so the "
        "server's kernel holds ~200 KB for one, not loopback's ~4 MB; 0: the system's)",
    )
    p.add_argument(
        "--laggard-rcvbuf",
        type=int,
        default=0,
        help="SO_RCVBUF of stalled and slow sockets (bytes; 0: the system's)",
    )
    p.add_argument(
        "--laggard-wait",
        type=float,
        default=10.0,
        help="after the readers are done, wait until every stalled and slow socket was closed "
        "or dropped, at most this long (the gateway gives a closed one 5 s to read on)",
    )
    p.add_argument("--metrics-url", help="the server's /metrics (default: URL + /metrics)")
    p.add_argument(
        "--server-pid",
        type=int,
        action="append",
        default=[],
        help="read server memory from /proc/PID instead of /metrics (repeatable)",
    )
    p.add_argument(
        "--settle",
        type=float,
        default=2.0,
        help="seconds to wait after connecting before reading server memory",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    return p


def parse_sources(spec: str) -> list[str]:
    """``127.0.0.2-127.0.0.9`` or ``127.0.0.2,127.0.0.3`` to a list of addresses."""
    out: list[str] = []
    for part in filter(None, (s.strip() for s in spec.split(","))):
        if "-" in part:
            lo, hi = (IPv4Address(x) for x in part.split("-", 1))
            out.extend(str(IPv4Address(i)) for i in range(int(lo), int(hi) + 1))
        else:
            out.append(str(IPv4Address(part)))
    return out


def is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ip_address(host).is_loopback
    except ValueError:
        return False


def check(args: argparse.Namespace, urls: list[str]) -> str | None:
    """What is wrong with the arguments, or None."""
    if args.channels < 1 or args.group < 0:
        return "--channels must be at least 1 and --group at least 0"
    if args.publish != "none" and args.messages > 0 and not args.rate > 0:
        return "--rate must be above 0"
    if args.drain < 0 or args.late_wait < 0 or args.backoff <= 0 or args.backoff_max <= 0:
        return "--drain and --late-wait must be at least 0, --backoff and --backoff-max above 0"
    n = args.channels * args.group if args.group else args.connections
    if args.stall < 0 or args.slow < 0 or args.stall + args.slow > n:
        return "--stall and --slow must be at least 0 and together at most the connections"
    if (args.stall or args.slow) and args.mode != "ws":
        return "--stall and --slow need --mode ws"
    if args.slow and not args.slow_rate > 0:
        return "--slow needs --slow-rate above 0"
    if args.kill_after is not None and not (args.kill_pid or args.kill_cmd):
        return "--kill-after needs --kill-pid or --kill-cmd"
    if (args.kill_pid or args.kill_cmd) and args.kill_after is None:
        return "--kill-pid and --kill-cmd need --kill-after"
    if args.kill_pid:
        if not all(is_loopback(u) for u in urls):
            return "--kill-pid kills local processes: every URL must be a loopback address"
        for pid in args.kill_pid:
            try:
                os.kill(pid, 0)
            except OSError as exc:
                return f"--kill-pid {pid}: {exc.strerror}"
    return None
