"""Who a request or a connection is: `Identity`, and the errors of finding out.

What the rest of the system knows of a caller after its token was checked
(core/infra/verify.py): the subject, its grants, when it expires, its login
session and role. ``API_KEY_PREFIX`` tells an API key from a JWT, and
`token_from_header` reads a bearer token.
"""

from __future__ import annotations

from typing import Protocol

from proto import Grants

__all__ = ["API_KEY_PREFIX", "AuthError", "Identity", "principal", "token_from_header"]

#: API keys look like ``gwk_<43 characters>``; anything else is a JWT.
API_KEY_PREFIX = "gwk_"


class AuthError(Exception):
    """The request carries no usable token; ``reason`` is a metric label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class Identity:
    """Who is on a connection: only what the gateway needs after the handshake.

    ``exp`` is when the connection must close: the token's ``exp`` plus the
    configured leeway, or None for a token without ``exp``. ``sid`` is the
    login session of tokens this system issued (claim ``sid``), None for
    tokens from elsewhere; ``role`` is ``admin``, ``user`` (the default) or
    ``service`` (an API key); ``rest`` says whether it may call the REST API,
    ``server`` whether it may call the server API (``/api/server/``: API keys
    with the ``server`` scope; admins may without it).
    """

    __slots__ = ("exp", "grants", "info", "local", "rest", "role", "server", "sid", "sub", "token")

    def __init__(
        self,
        sub: str,
        grants: Grants,
        exp: float | None,
        sid: str | None = None,
        role: str = "user",
        rest: bool = True,
        server: bool = False,
    ) -> None:
        self.sub = sub
        self.grants = grants
        self.exp = exp
        self.sid = sid
        self.role = role
        self.rest = rest
        self.server = server
        #: The token's ``info`` claim (JSON object bytes), shown in presence.
        self.info: bytes | None = None
        #: Signed with this deployment's own keys (JWT_SECRET, JWT_SIGNING_KEYS) or an
        #: API key: only then is ``sub`` a users row of the core and ``role`` honoured
        #: by it. A token from an outside identity provider is neither.
        self.local = True
        #: The credential (JWT or API key) this identity was verified from, which a
        #: gateway forwards to a core elsewhere (gateway/upstream.py); never logged.
        self.token: str | None = None

    def __repr__(self) -> str:
        return (
            f"Identity(sub={self.sub!r}, sid={self.sid!r}, role={self.role!r}, "
            f"exp={self.exp!r}, grants={self.grants!r})"
        )


class _Named(Protocol):
    @property
    def sub(self) -> str: ...


def principal(caller: _Named) -> str:
    """Whose state a caller's requests share (idempotency keys, rate limits).

    Its ``sub``, unless an outside identity provider vouched for it (``local``
    false): such a ``sub`` may be any string, a users row's id or
    ``apikey:<id>`` too, and must not reach their keys or spend their limits.
    """
    sub = caller.sub
    return sub if getattr(caller, "local", True) else f"ext:{sub}"


def token_from_header(value: str | None) -> str | None:
    """The token of an ``Authorization: Bearer ...`` header."""
    if not value:
        return None
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None
