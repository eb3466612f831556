"""WebSocket conformance suite (issue 14): Autobahn's groups over raw sockets.

`cases` is the table of cases and their expected verdicts, `wire` the raw
client, `runner` plays a case and judges it, `processes` starts the gateway
and the reference server (`reference`, on `websockets`), and
``python -m tests.conformance`` prints the per-group table (docs/conformance.md).
"""
