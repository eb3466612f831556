"""The Tornado gateway process: sockets, hub, broker, HTTP endpoints.

Start one with ``python -m gateway`` (see ``--help``) or, in code, with
`gateway.app.make_app`.
"""

__all__: list[str] = []
