"""The claims of an HMAC token `Verifier` has checked the signature of, read without PyJWT.

After `Verifier` checked an HMAC token's signature itself, PyJWT still
decoded it again to validate its claims: a strict base64 check in a
generator per character, ``json.loads`` twice, its options merged per call
(8% of a WebSocket handshake's CPU under a burst). `plain_claims` reads a
token that PyJWT would accept, and only such a token: it answers the claims
when every check below passes, and None otherwise, for PyJWT to decide
(and refuse, or accept) as before. So a refusal, and its reason, is always
PyJWT's; an acceptance here is one PyJWT makes too, with the same claims
(``tests/test_auth.py::test_the_secrets_own_check_decides_as_pyjwt_alone``
compares both over hostile tokens and settings).

Answered only when:

* the token is three segments of unpadded base64url, each canonical (the
  encoding of what it decodes to, as PyJWT requires: `segment`; the
  verifier has read the header and the signature so before it checked the
  signature, this module reads the payload);
* its header's ``kid``, if any, is a string (PyJWT's header check);
* its payload is a JSON object that msgspec reads (stricter than
  ``json.loads``: it refuses ``NaN``, lone surrogates, a BOM, which
  ``json.loads`` takes; where both read a document they read the same
  values), nested at most `MAX_NESTING` deep;
* ``sub`` is a string; ``jti``, if any, a string; ``iat`` and ``nbf``, if
  any, integers (not floats, not booleans: left to PyJWT), ``nbf`` no later
  than now plus the leeway (``iat`` is not compared with the clock: `Verifier`
  has PyJWT leave it alone too, and checks only that it is a number);
* ``iss`` is the configured issuer when there is one (PyJWT: exact match);
* with an audience configured, ``aud`` is it or a list of strings holding
  it (without one, `Verifier` has PyJWT leave ``aud`` alone, as here).

``exp`` is not looked at: `Verifier` checks it itself, after (PyJWT runs
with ``verify_exp`` off).
"""

from __future__ import annotations

import base64
import binascii
import re
import time
from collections.abc import Mapping
from typing import Any

import msgspec

__all__ = ["MAX_NESTING", "plain_claims", "segment"]

#: Opening brackets in a payload past which PyJWT reads it (``json.loads``'s depth is its own).
MAX_NESTING = 32
_SEGMENT = re.compile(r"[A-Za-z0-9_-]*")


def segment(text: str) -> bytes | None:
    """The bytes of a canonical unpadded base64url segment; None for any other."""
    if len(text) % 4 == 1 or not _SEGMENT.fullmatch(text):
        return None
    raw = text.encode("ascii")
    try:
        data = base64.urlsafe_b64decode(raw + b"=" * (-len(raw) % 4))
    except (binascii.Error, ValueError):
        return None
    if base64.urlsafe_b64encode(data).rstrip(b"=") != raw:
        return None  # leftover bits set: PyJWT refuses it
    return data


def plain_claims(
    token: str,
    header: Mapping[str, Any],
    *,
    audience: str | None,
    issuer: str | None,
    leeway: float,
) -> dict[str, Any] | None:
    """The claims of ``token`` (its signature already checked, ``header`` read), or None for PyJWT.

    Its header and signature segments were read with `segment`.
    """
    parts = token.split(".")
    if len(parts) != 3:
        return None
    payload = segment(parts[1])
    if payload is None or not payload.startswith(b"{"):
        return None
    if payload.count(b"{") + payload.count(b"[") > MAX_NESTING:
        return None
    kid = header.get("kid")
    if kid is not None and not isinstance(kid, str):
        return None
    try:
        claims = msgspec.json.decode(payload)
    except msgspec.DecodeError:
        return None
    if not isinstance(claims, dict):
        return None
    if not isinstance(claims.get("sub"), str):
        return None
    if "jti" in claims and not isinstance(claims["jti"], str):
        return None
    if "iat" in claims and type(claims["iat"]) is not int:
        return None
    if "nbf" in claims:
        nbf = claims["nbf"]
        if type(nbf) is not int or nbf > time.time() + leeway:  # as PyJWT reads the clock
            return None
    if issuer is not None and claims.get("iss") != issuer:
        return None
    if audience is not None:  # else PyJWT does not look at aud (verify_aud off)
        aud = claims.get("aud")
        if not aud or not (
            aud == audience
            or (isinstance(aud, list) and audience in aud and all(isinstance(a, str) for a in aud))
        ):
            return None
    return claims
