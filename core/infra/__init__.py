"""The shared lower layer: what the REST core and the gateway both stand on.

Settings, JWT keys, verification and minting, revocation, rate limiting,
the broker and its one history publisher, the error type and its body,
logging, process runtime, metrics and the HTTP listener. Dependencies point
one way (docs/architecture.md): ``proto`` <- ``core.infra`` <- ``core`` <-
``gateway``; nothing here imports ``core`` outside this package or
``gateway`` (tests/test_layers.py keeps it so).
"""

__all__: list[str] = []
