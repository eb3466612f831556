"""REST core: a slim JSON handler layer on an asyncpg pool.

One route table (`core.service.api_routes`) is served in-process by the gateway
under ``/api/``, alone by ``python -m core``, and over the socket by ``rpc``
frames. See docs/rest.md.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
