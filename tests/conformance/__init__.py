"""WebSocket conformance suite (issue 14): Autobahn's groups over raw sockets.

`cases` is the table of cases and their expected verdicts (`utf8` holds the
classic decoder-test sequences), `wire` the raw client, `runner` plays a
case and judges it, `processes` starts the gateway and the reference server
(`reference`, on `websockets`), `known` lists what the gateway fails today,
and `strategies` holds the hypothesis strategies of tests/test_fuzz.py.
``python -m tests.conformance`` prints the per-group table (docs/conformance.md).
"""
