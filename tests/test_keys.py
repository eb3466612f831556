"""Signing keys for issued tokens: kid, JWKS publication, rotation with two live keys."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import subprocess
import sys
from pathlib import Path

import jwt
import pytest

from core.infra.identity import AuthError
from core.infra.keys import SigningKeys, generate_jwk
from core.infra.mint import mint_token
from core.infra.settings import Settings
from core.infra.verify import Verifier
from tests.harness import ApiClient, running_gateway
from tests.test_accounts import ADA, login, register

ROOT = Path(__file__).resolve().parent.parent


def keygen(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "keygen", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_keygen_rotates_a_key_file(tmp_path):
    path = tmp_path / "keys.json"
    assert keygen("--alg", "ES256", "--kid", "old", "--add-to", str(path)).returncode == 0
    out = keygen("--alg", "RS256", "--kid", "new", "--add-to", str(path))
    assert out.returncode == 0 and "new (RS256) now signs; 1 older key(s) kept" in out.stdout
    keys = json.loads(path.read_text())["keys"]
    assert [k["kid"] for k in keys] == ["new", "old"] and all("d" in k for k in keys)
    assert path.stat().st_mode & 0o077 == 0  # private keys: owner only


def test_public_jwks_holds_no_private_part():
    keys = SigningKeys(
        [generate_jwk("ES256", "a"), generate_jwk("RS256", "b"), generate_jwk("EdDSA", "c")]
    )
    published = keys.jwks()["keys"]
    assert [k["kid"] for k in published] == ["a", "b", "c"]
    for k in published:
        assert not {"d", "p", "q", "dp", "dq", "qi"} & set(k) and k["use"] == "sig"


def test_rotation_keeps_tokens_of_the_old_key_valid(tmp_path):
    old, new = generate_jwk("ES256", "old"), generate_jwk("ES256", "new")
    before = tmp_path / "before.json"
    before.write_text(json.dumps({"keys": [old]}))
    after = tmp_path / "after.json"
    after.write_text(json.dumps({"keys": [new, old]}))
    issued_before = mint_token(Settings(jwt_signing_keys=str(before)), "alice", ["room:*"])
    settings = Settings(jwt_signing_keys=str(after))
    issued_after = mint_token(settings, "alice", ["room:*"])
    assert jwt.get_unverified_header(issued_after)["kid"] == "new"
    verifier = Verifier(settings)
    assert verifier.verify(issued_before).sub == "alice"  # old key still live
    assert verifier.verify(issued_after).sub == "alice"
    # Once the old key is dropped, its tokens stop working.
    only_new = tmp_path / "only-new.json"
    only_new.write_text(json.dumps({"keys": [new]}))
    with pytest.raises(AuthError):
        Verifier(Settings(jwt_signing_keys=str(only_new))).verify(issued_before)


def test_hs256_token_keyed_with_the_public_key_is_refused(tmp_path):
    key = generate_jwk("RS256", "k")
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"keys": [key]}))
    public = json.dumps(SigningKeys([key]).jwks()["keys"][0]).encode()

    # pyjwt will not make this token (it refuses a JWK as an HMAC secret): forge it.
    def b64(raw: bytes) -> bytes:
        return base64.urlsafe_b64encode(raw).rstrip(b"=")

    head = b64(json.dumps({"alg": "HS256", "kid": "k", "typ": "JWT"}).encode())
    body = b64(json.dumps({"sub": "mallory", "channels": ["*"]}).encode())
    signature = b64(hmac.new(public, head + b"." + body, hashlib.sha256).digest())
    forged = (head + b"." + body + b"." + signature).decode()
    with pytest.raises(AuthError):
        Verifier(Settings(jwt_signing_keys=str(path))).verify(forged)


async def test_gateway_issues_with_the_first_key_and_publishes_the_set(clean_db, tmp_path):
    path = tmp_path / "keys.json"
    path.write_text(
        json.dumps({"keys": [generate_jwk("ES256", "k2"), generate_jwk("EdDSA", "k1")]})
    )
    async with running_gateway(**clean_db, jwt_secret=None, jwt_signing_keys=str(path)) as gw:
        anon = ApiClient(gw.port, None)
        try:
            await register(anon)
            status, tokens = await login(anon, ADA["email"], ADA["password"])
            assert status == 200, tokens
            assert jwt.get_unverified_header(tokens["access_token"]) == {
                "alg": "ES256", "kid": "k2", "typ": "JWT"
            }  # fmt: skip
            status, _, jwks = await anon.call("GET", "/.well-known/jwks.json")
            assert status == 200 and [k["kid"] for k in jwks["keys"]] == ["k2", "k1"]
            me = ApiClient(gw.port, tokens["access_token"])
            try:
                assert (await me.call("GET", "/api/projects"))[0] == 200
            finally:
                me.close()
        finally:
            anon.close()


def test_a_gateway_verifies_the_core_s_tokens_with_public_keys_only(tmp_path):
    """JWT_ISSUED_KEYS (keygen --public-of): a CORE_URL gateway holds no private key and still
    knows the core's tokens for its own (an admin's reach the console), and no one else's."""
    signing = tmp_path / "signing.jwks"
    assert keygen("--alg", "ES256", "--kid", "k1", "--add-to", str(signing)).returncode == 0
    out = keygen("--public-of", str(signing))
    assert out.returncode == 0
    public = json.loads(out.stdout)
    assert [k["kid"] for k in public["keys"]] == ["k1"] and "d" not in public["keys"][0]
    issued = tmp_path / "issued.jwks"
    issued.write_text(out.stdout)
    core = Settings(jwt_signing_keys=str(signing))
    token = mint_token(core, "7", ["room:*"], extra={"role": "admin"})
    gateway = Verifier(Settings(jwt_issued_keys=str(issued)))
    with_keys = Verifier(core).verify(token)
    assert gateway.verify(token).grants == with_keys.grants  # the console channel included
    outsider = Settings(jwt_signing_keys=str(tmp_path / "other.jwks"))
    assert (
        keygen("--alg", "ES256", "--kid", "x", "--add-to", outsider.jwt_signing_keys).returncode
        == 0
    )
    with pytest.raises(AuthError):
        gateway.verify(mint_token(outsider, "7", ["room:*"]))
    assert keygen("--public-of", str(tmp_path / "missing.jwks")).returncode == 2
