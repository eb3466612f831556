"""``python -m gateway.client server …``: the server API from a terminal.

::

    python -m gateway.client --token "$KEY" server info
    python -m gateway.client --token "$KEY" server connections --user 42
    python -m gateway.client --token "$KEY" server disconnect --user 42 --reason banned --block 3600
    python -m gateway.client --token "$KEY" server subscribe room:7 --user 42
    python -m gateway.client --token "$KEY" server publish room:7 '{"text": "hi"}'

``--token`` is an API key with the ``server`` scope (or an admin's token);
the gateway is the one ``--url`` names, over HTTP. Each call prints the
answer as one JSON object; a refusal prints the error body on stderr and
exits 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from gateway.client.polling import http_base
from gateway.serverclient import ServerClient, ServerError

__all__ = ["add_parser", "run"]


def _who(p: argparse.ArgumentParser) -> None:
    p.add_argument("--user", required=True, help="all connections of this user (a token's sub)")
    p.add_argument("--client", help="only this connection of the user (its id, as listed)")


def add_parser(commands: Any) -> None:
    """Add ``server`` and its calls to the CLI's sub-commands."""
    server = commands.add_parser("server", help="call the server API (needs the server scope)")
    calls = server.add_subparsers(dest="call", required=True)
    p = calls.add_parser("publish", help="publish one JSON value")
    p.add_argument("channel")
    p.add_argument("data", help="a JSON value")
    p = calls.add_parser("broadcast", help="publish one JSON value on many channels")
    p.add_argument("data", help="a JSON value")
    p.add_argument("channels", nargs="+")
    p = calls.add_parser("disconnect", help="close a user's or a client's connections")
    _who(p)
    p.add_argument("--code", type=int, default=4511, help="close code, 4000-4999")
    p.add_argument("--reason", default="")
    p.add_argument("--block", type=float, default=0.0, help="refuse the user for N seconds")
    p = calls.add_parser("unblock", help="take a blocked user's connections again")
    p.add_argument("--user", required=True)
    for name in ("subscribe", "unsubscribe"):
        p = calls.add_parser(name, help=f"{name} a user's or a client's connections")
        p.add_argument("channel")
        _who(p)
    _who(calls.add_parser("connections", help="list a user's or a client's connections"))
    p = calls.add_parser("channels", help="active channels, busiest first")
    p.add_argument("--pattern", default="*")
    p.add_argument("--limit", type=int, default=100)
    for name in ("presence", "presence_stats"):
        calls.add_parser(name, help=f"{name} of a channel").add_argument("channel")
    p = calls.add_parser("history", help="a page of a channel's history")
    p.add_argument("channel")
    p.add_argument("--since", type=int, default=0)
    p.add_argument("--limit", type=int, default=100)
    calls.add_parser("info", help="every gateway: version, load, memory, health")


def _body(args: argparse.Namespace) -> dict[str, Any]:
    """The call's JSON body, from the command line."""
    body: dict[str, Any] = {}
    for name in ("user", "client", "pattern", "limit", "since", "code", "reason"):
        value = getattr(args, name, None)
        if value not in (None, ""):
            body[name] = value
    if getattr(args, "block", 0):
        body["block_seconds"] = args.block
    if getattr(args, "channel", None) is not None:
        body["ch"] = args.channel
    if args.call == "broadcast":
        body["channels"] = args.channels
    if args.call in ("publish", "broadcast"):
        body["data"] = json.loads(args.data)
    return body


async def run(args: argparse.Namespace) -> int:
    async with ServerClient(http_base(args.url), args.token or "") as api:
        try:
            answer = await api.call(args.call, _body(args))
        except ServerError as exc:
            print(
                json.dumps(
                    {
                        "error": exc.body
                        or {"status": exc.status, "code": exc.code, "message": exc.message}
                    }
                ),
                file=sys.stderr,
            )
            return 1
    print(json.dumps(answer))
    return 0
