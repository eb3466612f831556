"""``python -m gateway.loadtest``: many authenticated sockets against a gateway.

See `gateway.loadtest.cli` for the command and docs/performance.md for the
measured runs.
"""

__all__: list[str] = []
