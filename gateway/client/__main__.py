"""``python -m gateway.client``: listen, publish and call REST from a terminal.

::

    python -m gateway.client --token "$TOKEN" listen room:1 projects
    python -m gateway.client --token "$TOKEN" publish room:1 '{"hello": "world"}'
    python -m gateway.client --token "$TOKEN" rpc GET '/api/projects?limit=5'

``listen`` prints one JSON object per publication (``ch``, ``data`` and, on
history channels, ``offset`` and ``epoch``) and a ``gap`` line when missed
publications could not be recovered; it reconnects by itself until
interrupted or ``--count`` publications arrived.

``server …`` calls the server API of the gateway ``--url`` names, with an API
key of the ``server`` scope (or an admin's token) in ``--token``::

    python -m gateway.client --token "$KEY" server disconnect --user 42 --block 3600
    python -m gateway.client --token "$KEY" server connections --user 42
    python -m gateway.client --token "$KEY" server info
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from gateway.client import Client, Gap, Publication, Subscription, servercli

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gateway.client", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--url", default="ws://127.0.0.1:8888/ws", help="the gateway's /ws")
    p.add_argument(
        "--token", default=os.environ.get("TOKEN"), help="JWT or API key (default: $TOKEN)"
    )
    p.add_argument("--msgpack", action="store_true", help="use the MessagePack subprotocol")
    sub = p.add_subparsers(dest="command", required=True)
    listen = sub.add_parser("listen", help="subscribe and print publications as JSON lines")
    listen.add_argument("channels", nargs="+")
    listen.add_argument("--count", type=int, default=0, help="stop after this many (0: never)")
    publish = sub.add_parser("publish", help="publish one JSON value")
    publish.add_argument("channel")
    publish.add_argument("data", help="a JSON value")
    rpc = sub.add_parser("rpc", help="call the REST core over the socket")
    rpc.add_argument("method", choices=["GET", "POST", "PUT", "PATCH", "DELETE"])
    rpc.add_argument("path")
    rpc.add_argument("body", nargs="?", help="a JSON body")
    servercli.add_parser(sub)
    return p


async def _pump(sub: Subscription, out: asyncio.Queue[dict[str, Any]]) -> None:
    async for event in sub:
        if isinstance(event, Gap):
            await out.put({"ch": event.channel, "gap": str(event.reason)})
            continue
        if not isinstance(event, Publication):
            await out.put({"ch": event.ch, "presence": type(event).__name__.lower(),
                           "user": event.info.user})  # fmt: skip
            continue
        line: dict[str, Any] = {"ch": event.channel, "data": event.data}
        if event.offset is not None:
            line.update(offset=event.offset, epoch=event.epoch)
        await out.put(line)


async def _run(args: argparse.Namespace) -> int:
    if args.command == "server":
        return await servercli.run(args)
    encoding = "msgpack" if args.msgpack else "json"
    async with Client(args.url, token=args.token, encoding=encoding) as gw:
        if args.command == "publish":
            await gw.publish(args.channel, json.loads(args.data))
            print(json.dumps({"ok": True}))
            return 0
        if args.command == "rpc":
            body = json.loads(args.body) if args.body else None
            status, _, payload = await gw.rpc(args.method, args.path, body)
            print(json.dumps({"status": status, "body": payload}))
            return 0 if status < 400 else 1
        out: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=1024)
        subs = [await gw.subscribe(ch) for ch in args.channels]
        pumps = [asyncio.create_task(_pump(s, out)) for s in subs]
        try:
            seen = 0
            while not args.count or seen < args.count:
                line = await out.get()
                print(json.dumps(line), flush=True)
                seen += "data" in line
        finally:
            for task in pumps:
                task.cancel()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return asyncio.run(_run(args))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a refused token, an unreachable gateway: one line, not a traceback
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
