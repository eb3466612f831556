"""Access and refresh tokens issued by the accounts API.

Access tokens are short-lived JWTs the gateway verifies like any other,
signed by the first of ``JWT_SIGNING_KEYS`` (with its ``kid``) or with
``JWT_SECRET`` (HS256):
``sub`` (the user id), ``sid`` (the login session), ``role``, ``channels``
(``USER_CHANNELS`` or ``ADMIN_CHANNELS`` with ``{sub}`` filled in), ``iat``,
``pub`` (``USER_PUBLISH`` or ``ADMIN_PUBLISH``, by default only the user's own
``user:{sub}``: an absent ``pub`` would mean "everywhere it may subscribe"),
``info`` (``{"name": display name}``, what presence shows others),
``exp`` (``ACCESS_TOKEN_TTL``), and ``iss``/``aud`` when configured.

Refresh tokens are 256-bit random strings; only their SHA-256 is stored.
"""

from __future__ import annotations

import hashlib
import secrets

from core.infra.keys import SigningKeys
from core.infra.mint import mint_token
from core.infra.settings import Settings

__all__ = ["Issuer", "new_refresh_token", "refresh_hash"]


def new_refresh_token() -> str:
    return secrets.token_urlsafe(32)


def refresh_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class Issuer:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self.ttl = int(settings.access_token_ttl)
        self.keys = (
            SigningKeys.load(settings.jwt_signing_keys) if settings.jwt_signing_keys else None
        )

    @property
    def ready(self) -> bool:
        """Whether tokens can be issued (needs JWT_SIGNING_KEYS or JWT_SECRET)."""
        return self.keys is not None or bool(self._settings.jwt_secret)

    def jwks(self) -> dict[str, object]:
        """The public keys of issued tokens (none for HS256: a secret is not published)."""
        return self.keys.jwks() if self.keys is not None else {"keys": []}

    def access_token(
        self, user_id: int, role: str, sid: str, now: float | None = None, name: str | None = None
    ) -> str:
        s = self._settings
        sub = str(user_id)
        admin = role == "admin"
        patterns = s.admin_channels if admin else s.user_channels
        channels = [p.replace("{sub}", sub) for p in patterns]
        pub = [p.replace("{sub}", sub) for p in (s.admin_publish if admin else s.user_publish)]
        extra: dict[str, object] = {"sid": sid, "role": role}
        if name is not None:
            extra["info"] = {"name": name}  # shown to others in presence
        return mint_token(
            s, sub, channels, pub=pub, ttl=self.ttl, now=now, extra=extra, signer=self.keys
        )
