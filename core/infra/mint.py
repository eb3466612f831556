"""Minting tokens this deployment signs: with JWT_SIGNING_KEYS, or JWT_SECRET (HS256)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import jwt

from core.infra.keys import SigningKeys
from core.infra.settings import Settings

__all__ = ["mint_token"]


def mint_token(
    settings: Settings,
    sub: str,
    channels: list[str],
    *,
    pub: bool | list[str] | None = None,
    ttl: float | None = 3600.0,
    now: float | None = None,
    extra: Mapping[str, Any] | None = None,
    signer: SigningKeys | None = None,
) -> str:
    """A token for ``sub``: signed by ``signer``, the JWT_SIGNING_KEYS, or JWT_SECRET (HS256)."""
    if signer is None and settings.jwt_signing_keys:
        signer = SigningKeys.load(settings.jwt_signing_keys)
    secret = settings.jwt_secret
    if signer is None and not secret:
        raise ValueError(
            "minting needs JWT_SIGNING_KEYS or JWT_SECRET (tokens for public keys come from your IdP)"
        )
    issued = int(time.time() if now is None else now)
    claims: dict[str, Any] = {"sub": sub, "channels": channels, "iat": issued}
    if pub is not None:
        claims["pub"] = pub
    if ttl is not None:
        claims["exp"] = issued + int(ttl)
    if settings.jwt_issuer:
        claims["iss"] = settings.jwt_issuer
    if settings.jwt_audience:
        claims["aud"] = settings.jwt_audience
    if extra:
        claims.update(extra)
    if signer is not None:
        return signer.sign(claims)
    assert secret is not None
    return jwt.encode(claims, secret, algorithm="HS256")
