"""The keep-alive HTTP/1.1 client pool the gateway calls other services with (aiohttp).

Used for the REST core elsewhere (gateway/upstream.py) and the hooks' backends
(gateway/hooks/client.py): at most ``limit`` connections, dropped after
``keepalive`` idle seconds; answers read as sent (no decompression) and no
headers beyond those the caller gives.
"""

from __future__ import annotations

import aiohttp

__all__ = ["keepalive_pool"]


def keepalive_pool(
    limit: int, keepalive: float, timeout: aiohttp.ClientTimeout | None = None
) -> aiohttp.ClientSession:
    """A session of at most ``limit`` connections to any host; must run inside the loop."""
    connector = aiohttp.TCPConnector(
        limit=limit, limit_per_host=0, keepalive_timeout=keepalive, ttl_dns_cache=10
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=timeout if timeout is not None else aiohttp.ClientTimeout(total=None),
        auto_decompress=False,
        skip_auto_headers=("User-Agent", "Accept-Encoding"),
    )
