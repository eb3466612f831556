"""Which pages may open a connection that carries no token: one the browser authenticates.

A connection with a token proves itself: a page of any origin that holds the
token may use it (``ALLOWED_ORIGINS=*``, the default, admits any). A
connection without one is admitted by the connect hook from what the browser
sends by itself, its cookies, and a browser sends them with a socket
handshake from any page of the same site (another port, a sibling
subdomain), or of any site for cookies marked ``SameSite=None``. A
WebSocket has no CORS to stop that page reading what comes back, so it would
read the user's pushes and call, publish and subscribe as them
(cross-site WebSocket hijacking).

So a request without a token that names its ``Origin`` (every browser does
on a socket handshake) is admitted only from an origin ``ALLOWED_ORIGINS``
names itself, or from the gateway's own: the origin whose host and port are
the request's ``Host`` (the demo page, a page the gateway serves behind the
same name). ``*`` does not count for it, nor does ``null`` (sandboxed frames,
``file:``). A request with no ``Origin`` is no browser's page.
"""

from __future__ import annotations

from urllib.parse import urlsplit

__all__ = ["may_connect_without_token", "same_origin"]

_DEFAULT_PORTS = {"http": "80", "https": "443"}


def _authority(host: str, scheme: str) -> str:
    """``host[:port]`` in lower case, without the scheme's default port."""
    host = host.strip().lower()
    default = _DEFAULT_PORTS.get(scheme)
    if default is not None and host.endswith(":" + default):
        host = host[: -len(default) - 1]
    return host


def same_origin(origin: str, host: str | None) -> bool:
    """Whether ``origin`` (an ``Origin`` header) is the origin serving ``host`` (a ``Host``)."""
    if not host:
        return False
    try:
        parts = urlsplit(origin.strip())
        netloc = parts.netloc
    except ValueError:
        return False
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not netloc or "@" in netloc:
        return False
    return _authority(netloc, scheme) == _authority(host, scheme)


def may_connect_without_token(
    origin: str | None, host: str | None, allowed: tuple[str, ...]
) -> bool:
    """Whether a request without a token from ``origin`` may go on to the connect hook."""
    if origin is None:
        return True
    return (origin != "*" and origin in allowed) or same_origin(origin, host)
