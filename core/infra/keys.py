"""Signing keys for the tokens this system issues, and their public JWKS.

``JWT_SIGNING_KEYS`` names a JWKS file of *private* keys (RSA, P-256/384/521
or Ed25519). The first key signs; every key's public half is published at
``/.well-known/jwks.json`` and accepted by `core.infra.verify.Verifier`. Rotating
is two restarts apart: put a new key first (``python -m gateway keygen
--alg ES256 --add-to keys.json`` does it) and keep the old one second until
tokens signed with it have expired, then drop it. Without the file, tokens
are signed with ``JWT_SECRET`` (HS256) and no JWKS is published;
`ensure_key_material` makes one up (embedded mode) when no key is set.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from core.infra.settings import Settings

__all__ = [
    "HMAC_ALGORITHMS",
    "SigningKeys",
    "ensure_key_material",
    "generate_jwk",
    "write_key_file",
]

log = logging.getLogger("core.infra.keys")

#: The algorithms a shared secret (JWT_SECRET) signs and verifies.
HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")

_PUBLIC_FIELDS = {
    "RSA": ("kty", "n", "e"),
    "EC": ("kty", "crv", "x", "y"),
    "OKP": ("kty", "crv", "x"),
}


class SigningKeys:
    def __init__(self, keys: list[dict[str, Any]]) -> None:
        if not keys:
            raise ValueError("the signing key file holds no key")
        self._private: list[jwt.PyJWK] = []
        self.public: list[dict[str, Any]] = []
        for jwk in keys:
            if "d" not in jwk or not jwk.get("kid") or not jwk.get("alg"):
                raise ValueError("every signing key needs 'kid', 'alg' and its private part")
            self._private.append(jwt.PyJWK(jwk))
            public = {k: jwk[k] for k in _PUBLIC_FIELDS[jwk["kty"]]}
            public.update(kid=jwk["kid"], alg=jwk["alg"], use="sig")
            self.public.append(public)
        if len({k["kid"] for k in keys}) != len(keys):
            raise ValueError("signing key ids must be unique")

    @classmethod
    def load(cls, path: str) -> SigningKeys:
        return cls(json.loads(Path(path).read_text())["keys"])

    @property
    def kid(self) -> str:
        return str(self.public[0]["kid"])

    @property
    def algorithm(self) -> str:
        return str(self.public[0]["alg"])

    def jwks(self) -> dict[str, Any]:
        """The public key set, as served at /.well-known/jwks.json."""
        return {"keys": self.public}

    def verification_keys(self) -> dict[str, jwt.PyJWK]:
        """kid -> public key, for the verifier."""
        return {k["kid"]: jwt.PyJWK(k) for k in self.public}

    def sign(self, claims: dict[str, Any]) -> str:
        key = self._private[0]
        return jwt.encode(claims, key.key, algorithm=self.algorithm, headers={"kid": self.kid})


def generate_jwk(alg: str, kid: str | None = None) -> dict[str, Any]:
    """A new private JWK for ``alg`` (RS256, ES256, ES384, EdDSA)."""
    key: Any
    if alg == "RS256":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        jwk = jwt.algorithms.RSAAlgorithm.to_jwk(key, as_dict=True)
    elif alg in ("ES256", "ES384"):
        curve = ec.SECP256R1() if alg == "ES256" else ec.SECP384R1()
        jwk = jwt.algorithms.ECAlgorithm.to_jwk(ec.generate_private_key(curve), as_dict=True)
    elif alg == "EdDSA":
        key = ed25519.Ed25519PrivateKey.generate()
        jwk = jwt.algorithms.OKPAlgorithm.to_jwk(key, as_dict=True)
    else:
        raise ValueError(f"unsupported algorithm {alg!r}")
    stamp = time.strftime("%Y%m%d", time.gmtime())
    jwk.update(kid=kid or f"{stamp}-{secrets.token_hex(4)}", alg=alg, use="sig")
    return dict(jwk)


def write_key_file(path: Path, keys: list[dict[str, Any]]) -> None:
    """Replace ``path`` with a JWKS of ``keys``, readable by its owner only from the first byte.

    The keys go to a new file beside it, created 0600 (whatever the umask),
    then renamed over ``path``: no moment where another user could read a
    private key, and a crash midway leaves the old file whole.
    """
    data = (json.dumps({"keys": keys}, indent=2) + "\n").encode()
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)  # the mode os.open was given, even if the umask took more off
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
        or settings.jwt_issued_keys
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
