"""JWT verification before the upgrade, and token minting.

Keys decide the algorithms, never the token: an HMAC secret admits HS*, a
public key admits the algorithms of its type (RSA: RS*/PS*, EC: the ES* of
its curve, Ed25519: EdDSA), a JWKS file admits what each key declares.
``alg: none`` is never accepted, and a token is always verified with the key
of its algorithm's family, so an RS256 public key can never be used as an
HMAC secret (algorithm confusion).
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import time
from collections.abc import Container, Mapping
from pathlib import Path
from typing import Any

import jwt
import msgspec
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from gateway.keys import SigningKeys
from gateway.settings import Settings
from proto import Grants, InvalidGrants

__all__ = [
    "API_KEY_PREFIX",
    "AuthError",
    "Identity",
    "Verifier",
    "ensure_key_material",
    "mint_token",
    "token_from_header",
]

log = logging.getLogger("gateway.auth")

_HMAC = ("HS256", "HS384", "HS512")
MAX_INFO_BYTES = 1024
#: API keys look like ``gwk_<43 characters>``; anything else is a JWT.
API_KEY_PREFIX = "gwk_"
_EC_ALGS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}


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
    ``service`` (an API key); ``rest`` says whether it may call the REST API.
    """

    __slots__ = ("exp", "grants", "info", "local", "rest", "role", "sid", "sub")

    def __init__(
        self,
        sub: str,
        grants: Grants,
        exp: float | None,
        sid: str | None = None,
        role: str = "user",
        rest: bool = True,
    ) -> None:
        self.sub = sub
        self.grants = grants
        self.exp = exp
        self.sid = sid
        self.role = role
        self.rest = rest
        #: The token's ``info`` claim (JSON object bytes), shown in presence.
        self.info: bytes | None = None
        #: Signed with this deployment's own keys (JWT_SECRET, JWT_SIGNING_KEYS) or an
        #: API key: only then is ``sub`` a users row of the core and ``role`` honoured
        #: by it. A token from an outside identity provider is neither.
        self.local = True

    def __repr__(self) -> str:
        return (
            f"Identity(sub={self.sub!r}, sid={self.sid!r}, role={self.role!r}, "
            f"exp={self.exp!r}, grants={self.grants!r})"
        )


def _algorithms_for(key: Any) -> tuple[str, ...]:
    if isinstance(key, rsa.RSAPublicKey):
        return ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
    if isinstance(key, ec.EllipticCurvePublicKey):
        alg = _EC_ALGS.get(key.curve.name)
        return (alg,) if alg else ()
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return ("EdDSA",)
    raise ValueError(f"unsupported public key type {type(key).__name__}")


class Verifier:
    CACHE_SIZE = 8192

    def __init__(
        self,
        settings: Settings,
        revoked: Container[str] = frozenset(),
        api_keys: Mapping[bytes, Identity] | None = None,
    ) -> None:
        self._cache: dict[str, Identity] = {}
        self._revoked = revoked
        #: SHA-256 of each active API key -> its identity (kept current by the core).
        self.api_keys: Mapping[bytes, Identity] = api_keys if api_keys is not None else {}
        self._issuer = settings.jwt_issuer
        self._audience = settings.jwt_audience
        self._leeway = settings.jwt_leeway
        self._max_bytes = settings.max_token_bytes
        self._reserved_channels = settings.core_channels
        self._secret = settings.jwt_secret
        self._public: Any = None
        self._public_algs: tuple[str, ...] = ()
        self._jwks: dict[str, jwt.PyJWK] = {}
        if settings.jwt_public_key:
            pem = settings.jwt_public_key
            if not pem.lstrip().startswith("-----BEGIN"):
                pem = Path(pem).read_text()
            self._public = load_pem_public_key(pem.encode())
            self._public_algs = _algorithms_for(self._public)
        if settings.jwt_jwks_file:
            keyset = jwt.PyJWKSet.from_json(Path(settings.jwt_jwks_file).read_text())
            self._jwks = {k.key_id: k for k in keyset.keys if k.key_id}
        if settings.jwt_signing_keys:
            # Tokens we issue verify with the public halves of our signing keys.
            self._jwks.update(SigningKeys.load(settings.jwt_signing_keys).verification_keys())
        allowed: set[str] = set()
        #: Key ids of our own signing keys: tokens this deployment issued.
        self._own_kids: frozenset[str] = frozenset(
            SigningKeys.load(settings.jwt_signing_keys).verification_keys()
            if settings.jwt_signing_keys
            else ()
        )
        if self._secret:
            allowed.update(_HMAC)
        allowed.update(self._public_algs)
        allowed.update(k.algorithm_name for k in self._jwks.values())
        if settings.jwt_algorithms:
            allowed &= set(settings.jwt_algorithms)
        allowed.discard("none")
        if not allowed:
            raise ValueError(
                "no usable JWT key: set JWT_SECRET, JWT_PUBLIC_KEY or JWT_JWKS_FILE "
                "(and JWT_ALGORITHMS, if set, must admit one of their algorithms)"
            )
        self.algorithms = frozenset(allowed)

    def _key_for(self, header: Mapping[str, Any]) -> Any:
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.algorithms:
            raise AuthError("algorithm", "token algorithm not accepted")
        if alg in _HMAC:
            return self._secret
        kid = header.get("kid")
        if isinstance(kid, str) and kid in self._jwks:
            key = self._jwks[kid]
            if key.algorithm_name != alg:
                raise AuthError("algorithm", "token algorithm does not match its key")
            return key.key
        if alg in self._public_algs:
            return self._public
        raise AuthError("unknown_key", "no key for this token")

    @property
    def revoked(self) -> Container[str]:
        """The revoked login sessions (``sid`` claims)."""
        return self._revoked

    def verify(self, token: str, now: float | None = None) -> Identity:
        """The identity in ``token``, or `AuthError`.

        Verified tokens are remembered (bounded, least recently verified out
        first) until their ``exp``: clients send one token many times, and a
        signature check costs more than the rest of a small REST request.
        """
        if token.startswith(API_KEY_PREFIX):
            found = self.api_keys.get(hashlib.sha256(token.encode()).digest())
            if found is None:
                raise AuthError("unknown_key", "unknown or revoked API key")
            return found
        now = time.time() if now is None else now
        identity = self._cache.get(token)
        if identity is None or (identity.exp is not None and now >= identity.exp):
            self._cache.pop(token, None)
            identity = self._verify(token, now)
            if len(self._cache) >= self.CACHE_SIZE:
                del self._cache[next(iter(self._cache))]
            self._cache[token] = identity
        if identity.sid is not None and identity.sid in self._revoked:
            raise AuthError("revoked", "session revoked")
        return identity

    def _verify(self, token: str, now: float) -> Identity:
        if not token:
            raise AuthError("missing", "missing token")
        if len(token) > self._max_bytes:
            raise AuthError("too_large", "token too large")
        try:
            header = jwt.get_unverified_header(token)
            key = self._key_for(header)
            claims = jwt.decode(
                token,
                key,
                algorithms=[header["alg"]],
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
                # exp is checked below against `now`, as the cache checks it.
                options={
                    "require": ["sub"],
                    "verify_aud": self._audience is not None,
                    "verify_exp": False,
                },
            )
        except AuthError:
            raise
        except jwt.ExpiredSignatureError:
            raise AuthError("expired", "token expired") from None
        except jwt.ImmatureSignatureError:
            raise AuthError("not_yet_valid", "token not yet valid") from None
        except (jwt.InvalidAudienceError, jwt.InvalidIssuerError):
            raise AuthError(
                "wrong_audience_or_issuer", "token audience or issuer refused"
            ) from None
        except jwt.InvalidSignatureError:
            raise AuthError("bad_signature", "token signature invalid") from None
        except (jwt.PyJWTError, ValueError, TypeError, KeyError):
            raise AuthError("invalid", "invalid token") from None
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub:
            raise AuthError("bad_claims", "claim 'sub' must be a non-empty string")
        try:
            grants = Grants.from_claims(claims, reserved=self._reserved_channels)
        except InvalidGrants as exc:
            raise AuthError("bad_claims", str(exc)) from None
        exp = claims.get("exp")
        if exp is not None and (not isinstance(exp, int | float) or isinstance(exp, bool)):
            raise AuthError("invalid", "invalid token")
        # The socket is closed when exp passes, with the same leeway as here.
        expires = None if exp is None else float(exp) + self._leeway
        if expires is not None and now >= expires:
            raise AuthError("expired", "token expired")
        sid = claims.get("sid")
        role = claims.get("role", "user")
        if (sid is not None and not isinstance(sid, str)) or role not in ("user", "admin"):
            raise AuthError("bad_claims", "claims 'sid' or 'role' have the wrong shape")
        identity = Identity(sub, grants, expires, sid, role)
        alg, kid = header.get("alg"), header.get("kid")
        identity.local = alg in _HMAC or (isinstance(kid, str) and kid in self._own_kids)
        info = claims.get("info")
        if info is not None:
            # Shown to others in presence: an object, small.
            encoded = msgspec.json.encode(info) if isinstance(info, dict) else b""
            if not encoded or len(encoded) > MAX_INFO_BYTES:
                raise AuthError(
                    "bad_claims",
                    f"claim 'info' must be an object of at most {MAX_INFO_BYTES} bytes",
                )
            identity.info = encoded
        return identity


def ensure_key_material(settings: Settings) -> Settings:
    """Settings with a JWT secret: the configured keys, or a generated one.

    With no key configured, a random secret is created once under
    ``DATA_DIR`` (mode 0600) and reused, so that ``python -m gateway token``
    mints tokens the running gateway accepts.
    """
    if (
        settings.jwt_secret
        or settings.jwt_public_key
        or settings.jwt_jwks_file
        or settings.jwt_signing_keys
    ):
        return settings
    path = Path(settings.data_dir) / "jwt-secret"
    if path.exists():
        secret = path.read_text().strip()
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        secret = secrets.token_urlsafe(48)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secret + "\n")
    log.warning(
        "JWT_SECRET is not set: using the generated secret in %s (embedded mode; "
        "set JWT_SECRET or a public key in production)",
        path,
    )
    return settings.replace(jwt_secret=secret)


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


def token_from_header(value: str | None) -> str | None:
    """The token of an ``Authorization: Bearer ...`` header."""
    if not value:
        return None
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None
