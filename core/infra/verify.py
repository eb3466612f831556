"""JWT and API-key verification: `Verifier` turns a token into an `Identity`.

Keys decide the algorithms, never the token: an HMAC secret admits HS*, a
public key admits the algorithms of its type (RSA: RS*/PS*, EC: the ES* of
its curve, Ed25519: EdDSA), a JWKS file admits what each key declares.
``alg: none`` is never accepted, and a token is always verified with the key
of its algorithm's family, so an RS256 public key can never be used as an
HMAC secret (algorithm confusion).

An HMAC token with a plain header (``alg``, ``typ``, ``kid`` only) has its
signature checked here, with the secret prepared once, and its claims are
read by `core.infra.jwtclaims.plain_claims` when they are of the plain form
PyJWT accepts, or else by PyJWT with ``verify_signature`` off (every
``verify_*`` claim option still on), which then decides: PyJWT re-prepares
and re-checks the secret on every call (a third of a WebSocket handshake's
CPU). Any other token, and any token this check cannot read, goes through
PyJWT alone.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import time
from collections.abc import Container, Mapping
from pathlib import Path
from typing import Any, TypeGuard

import jwt
import msgspec
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from jwt.algorithms import HMACAlgorithm

from core.infra.identity import API_KEY_PREFIX, AuthError, Identity
from core.infra.jwtclaims import plain_claims, segment
from core.infra.keys import HMAC_ALGORITHMS, SigningKeys
from core.infra.settings import Settings
from proto import ADMIN_CHANNEL, Grants, InvalidData, InvalidGrants
from proto.publication import check_info

__all__ = [
    "MAX_INFO_BYTES",
    "Verifier",
    "algorithms_for",
    "is_pem",
    "read_keyset",
    "read_public_key",
]

MAX_INFO_BYTES = 1024
_EC_ALGS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
_HMAC_HASHES = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}
#: The header fields of a token whose HMAC signature `Verifier` checks itself.
_PLAIN_HEADER = frozenset({"alg", "typ", "kid"})


def algorithms_for(key: Any) -> tuple[str, ...]:
    """The JWT algorithms a public ``key`` verifies; `ValueError` for a type none does."""
    if isinstance(key, rsa.RSAPublicKey):
        return ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
    if isinstance(key, ec.EllipticCurvePublicKey):
        alg = _EC_ALGS.get(key.curve.name)
        return (alg,) if alg else ()
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return ("EdDSA",)
    raise ValueError(f"unsupported public key type {type(key).__name__}")


def is_pem(value: str) -> bool:
    """Whether a key setting holds PEM text itself, not the path of a file of it."""
    return value.lstrip().startswith("-----BEGIN")


def read_public_key(value: str) -> Any:
    """``JWT_PUBLIC_KEY``'s key: PEM text, or the path of a file of it."""
    pem = value if is_pem(value) else Path(value).read_text()
    return load_pem_public_key(pem.encode())


def read_keyset(path: str) -> dict[str, jwt.PyJWK]:
    """The keys of a JWKS file that a token can name (those with a ``kid``), by ``kid``."""
    keyset = jwt.PyJWKSet.from_json(Path(path).read_text())
    return {k.key_id: k for k in keyset.keys if k.key_id}


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
        self._hmac_key: bytes | None = None
        if self._secret:
            try:  # as PyJWT prepares it for each token (refusing a PEM key as a secret)
                self._hmac_key = HMACAlgorithm(HMACAlgorithm.SHA256).prepare_key(self._secret)
            except jwt.InvalidKeyError:
                pass  # PyJWT refuses each such token itself
        #: What PyJWT checks after `_signed_by_secret` (claims; every verify_* but the signature).
        self._claim_options: dict[str, Any] = {
            "verify_signature": False, "verify_exp": False, "verify_nbf": True,
            "verify_iat": False, "verify_aud": self._audience is not None, "verify_iss": True,
            "verify_sub": True, "verify_jti": True, "require": ["sub"],
        }  # fmt: skip
        self._public: Any = None
        self._public_algs: tuple[str, ...] = ()
        self._jwks: dict[str, jwt.PyJWK] = {}
        if settings.jwt_public_key:
            self._public = read_public_key(settings.jwt_public_key)
            self._public_algs = algorithms_for(self._public)
        if settings.jwt_jwks_file:
            self._jwks = read_keyset(settings.jwt_jwks_file)
        if settings.jwt_signing_keys:
            # Tokens we issue verify with the public halves of our signing keys.
            self._jwks.update(SigningKeys.load(settings.jwt_signing_keys).verification_keys())
        allowed: set[str] = set()
        issued: dict[str, jwt.PyJWK] = {}
        if settings.jwt_issued_keys:  # the public halves only (a gateway with CORE_URL)
            issued = read_keyset(settings.jwt_issued_keys)
            self._jwks.update(issued)
        #: Key ids of our own signing keys: tokens this deployment issued.
        self._own_kids: frozenset[str] = frozenset(
            SigningKeys.load(settings.jwt_signing_keys).verification_keys()
            if settings.jwt_signing_keys
            else ()
        ) | frozenset(issued)
        if self._secret:
            allowed.update(HMAC_ALGORITHMS)
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
        if alg in HMAC_ALGORITHMS:
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
            found.token = token  # one key, one identity: the digest is the key's
            return found
        now = time.time() if now is None else now
        identity = self._cache.get(token)
        if identity is None or (identity.exp is not None and now >= identity.exp):
            self._cache.pop(token, None)
            identity = self._verify(token, now)
            identity.token = token
            if len(self._cache) >= self.CACHE_SIZE:
                del self._cache[next(iter(self._cache))]
            self._cache[token] = identity
        if identity.sid is not None and identity.sid in self._revoked:
            raise AuthError("revoked", "session revoked")
        return identity

    def _signed_by_secret(self, token: str) -> dict[str, Any] | None:
        """The header of an HMAC token with a plain header signed with the secret.

        None when the token is not such a token, is not signed so, or cannot
        be read here: PyJWT alone then decides.
        The token is split as PyJWT splits it (the signature after the last
        dot, the header before the first), and both segments are read as
        strictly as PyJWT reads them (`core.infra.jwtclaims.segment`).
        """
        key = self._hmac_key
        if key is None:
            return None
        signing_input, dot, crypto = token.rpartition(".")
        header_segment, dot2, _ = signing_input.partition(".")
        if not dot or not dot2:
            return None
        header_json, signature = segment(header_segment), segment(crypto)
        if header_json is None or signature is None:
            return None  # not canonical base64url: PyJWT refuses it
        try:
            header = msgspec.json.decode(header_json)
        except (msgspec.DecodeError, RecursionError):  # too deep: PyJWT refuses it too
            return None
        if not isinstance(header, dict) or not header.keys() <= _PLAIN_HEADER:
            return None
        alg = header.get("alg")
        digest = _HMAC_HASHES.get(alg) if isinstance(alg, str) else None
        if digest is None or alg not in self.algorithms:
            return None  # PyJWT refuses it (or verifies it with a public key)
        expected = hmac.new(key, signing_input.encode(), digest).digest()
        # A wrong signature is PyJWT's to refuse, with the reason it gives (a
        # malformed segment is "invalid" before any signature is checked).
        return header if hmac.compare_digest(expected, signature) else None

    def _verify(self, token: str, now: float) -> Identity:
        if not token:
            raise AuthError("missing", "missing token")
        if len(token) > self._max_bytes:
            raise AuthError("too_large", "token too large")
        try:
            signed = self._signed_by_secret(token)
            if signed is not None:
                header = signed
                claims = plain_claims(
                    token,
                    signed,
                    audience=self._audience,
                    issuer=self._issuer,
                    leeway=self._leeway,
                )
                if claims is None:  # PyJWT decides
                    claims = jwt.decode(
                        token,
                        options=self._claim_options,  # type: ignore[arg-type]
                        audience=self._audience,
                        issuer=self._issuer,
                        leeway=self._leeway,
                    )
            else:
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
                        "verify_iat": False,  # checked below, with no clock
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
        except (jwt.PyJWTError, ValueError, TypeError, KeyError, RecursionError):
            raise AuthError("invalid", "invalid token") from None
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub:
            raise AuthError("bad_claims", "claim 'sub' must be a non-empty string")
        sid = claims.get("sid")
        role = claims.get("role", "user")
        if (sid is not None and not isinstance(sid, str)) or role not in ("user", "admin"):
            raise AuthError("bad_claims", "claims 'sid' or 'role' have the wrong shape")
        alg, kid = header.get("alg"), header.get("kid")
        local = alg in HMAC_ALGORITHMS or (isinstance(kid, str) and kid in self._own_kids)
        # Only an admin of this deployment watches the console's channel.
        system = (ADMIN_CHANNEL,) if role == "admin" and local else ()
        try:
            grants = Grants.from_claims(claims, reserved=self._reserved_channels, system=system)
        except InvalidGrants as exc:
            raise AuthError("bad_claims", str(exc)) from None
        # The socket is closed when exp passes, with the same leeway as here.
        expires = _expires(claims.get("exp"), self._leeway)
        if "iat" in claims and not _is_time(claims["iat"]):
            raise AuthError("invalid", "invalid token: claim 'iat' must be a number")
        if expires is not None and now >= expires:
            raise AuthError("expired", "token expired")
        identity = Identity(sub, grants, expires, sid, role)
        identity.local = local
        info = claims.get("info")
        if info is not None:
            # Shown to others in presence: an object, small, that every codec carries.
            try:
                identity.info = check_info(info, MAX_INFO_BYTES)
            except InvalidData as exc:
                raise AuthError(
                    "bad_claims",
                    f"claim 'info' must be an object of at most {MAX_INFO_BYTES} bytes of "
                    f"publishable data ({exc.reason})",
                ) from None
        return identity


def _is_time(value: object) -> TypeGuard[int | float]:
    """Whether ``value`` is a number of seconds (an int or a float; not a boolean)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def _expires(exp: object, leeway: float) -> float | None:
    """When a token with claim ``exp`` expires (None: never); `AuthError` for an ``exp`` no
    clock reaches: not a number, or ``NaN``, ``Infinity`` or ``1e999`` (which PyJWT's
    ``json.loads`` reads, and which no expiry wheel can file: such a socket was upgraded,
    then left hanging in the hub) or an integer too big for a float."""
    if exp is None:
        return None
    if not _is_time(exp):
        raise AuthError("invalid", "invalid token")
    try:
        expires = float(exp) + leeway
    except OverflowError:
        expires = math.inf
    if not math.isfinite(expires):
        raise AuthError("invalid", "invalid token: claim 'exp' must be a finite number")
    return expires
