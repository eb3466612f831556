"""JWT verification: every way a token can be wrong is refused, with a reason."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from core.infra.identity import AuthError, token_from_header
from core.infra.keys import ensure_key_material
from core.infra.mint import mint_token
from core.infra.settings import Settings
from core.infra.verify import Verifier

SECRET = "s3cret-for-tests-only-" + "0123456789abcdef" * 4
OTHER = "another-secret-" + "fedcba9876543210" * 4


@pytest.fixture(scope="module")
def rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key():
    return ec.generate_private_key(ec.SECP256R1())


def pem(private_key) -> str:
    return (
        private_key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def hs(claims: dict, secret: str = SECRET, **kw) -> str:
    return jwt.encode(claims, secret, algorithm=kw.pop("algorithm", "HS256"), **kw)


def base_claims(**extra) -> dict:
    return {"sub": "alice", "channels": ["room:*"], "exp": int(time.time()) + 60, **extra}


def refused(verifier: Verifier, token: str) -> str:
    with pytest.raises(AuthError) as info:
        verifier.verify(token)
    return info.value.reason


def test_valid_hs256_token_gives_identity():
    v = Verifier(Settings(jwt_secret=SECRET))
    ident = v.verify(hs(base_claims()))
    assert ident.sub == "alice" and ident.grants.can_subscribe("room:1")
    assert ident.exp is not None and ident.exp > time.time()


def test_minted_token_verifies_and_carries_pub():
    s = Settings(jwt_secret=SECRET, jwt_issuer="gw", jwt_audience="clients")
    token = mint_token(s, "bob", ["user:bob"], pub=False, ttl=30)
    ident = Verifier(s).verify(token)
    assert ident.sub == "bob" and ident.grants.can_subscribe("user:bob")
    assert not ident.grants.can_publish("user:bob")


@pytest.mark.parametrize(
    "claims, reason",
    [
        (base_claims(exp=int(time.time()) - 5), "expired"),
        # Built at collection: an hour ahead, still ahead when a long run reaches this test.
        (base_claims(nbf=int(time.time()) + 3600, exp=int(time.time()) + 7200), "not_yet_valid"),
        ({"channels": ["a"]}, "invalid"),  # sub is required
        (base_claims(sub=""), "bad_claims"),
        (base_claims(channels="room:*"), "bad_claims"),
        (base_claims(pub="sometimes"), "bad_claims"),
    ],
)
def test_bad_claims_are_refused(claims, reason):
    assert refused(Verifier(Settings(jwt_secret=SECRET)), hs(claims)) == reason


def test_wrong_signature_is_refused():
    assert (
        refused(Verifier(Settings(jwt_secret=SECRET)), hs(base_claims(), OTHER)) == "bad_signature"
    )


def test_tampered_payload_is_refused():
    token = hs(base_claims())
    head, body, sig = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=="))
    claims["channels"] = ["*"]
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    assert (
        refused(Verifier(Settings(jwt_secret=SECRET)), f"{head}.{forged}.{sig}") == "bad_signature"
    )


def test_alg_none_is_refused():
    header = base64.urlsafe_b64encode(b'{"alg":"none","typ":"JWT"}').rstrip(b"=").decode()
    body = base64.urlsafe_b64encode(json.dumps(base_claims()).encode()).rstrip(b"=").decode()
    assert refused(Verifier(Settings(jwt_secret=SECRET)), f"{header}.{body}.") == "algorithm"


def test_issuer_and_audience_are_checked_when_configured():
    v = Verifier(Settings(jwt_secret=SECRET, jwt_issuer="gw", jwt_audience="clients"))
    assert v.verify(hs(base_claims(iss="gw", aud="clients"))).sub == "alice"
    assert refused(v, hs(base_claims(iss="evil", aud="clients"))) == "wrong_audience_or_issuer"
    assert refused(v, hs(base_claims(iss="gw", aud="others"))) == "wrong_audience_or_issuer"
    assert refused(v, hs(base_claims(aud="clients"))) == "invalid"  # iss missing


def test_oversized_and_garbage_tokens_are_refused():
    v = Verifier(Settings(jwt_secret=SECRET, max_token_bytes=300))
    assert refused(v, hs(base_claims(pad="x" * 400))) == "too_large"
    assert refused(v, "") == "missing"
    for junk in ("a.b.c", "not-a-token", "....", "eyJ.eyJ.x"):
        assert refused(v, junk) in ("invalid", "algorithm")


@pytest.mark.parametrize("part", ["header", "payload"])
def test_deeply_nested_segments_are_refused_not_raised(part, rsa_key):
    # 1,000 brackets: far under MAX_TOKEN_BYTES; a RecursionError from the header was a
    # 500. The payload is signed, so that it is read (after its signature is checked).
    def b64(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    nested, plain = b64(b"[" * 1000 + b"]" * 1000), b64(b'{"alg":"HS256"}')
    if part == "header":
        token = f"{nested}.{b64(b'{}')}.AAAA"
    else:
        signature = hmac.new(SECRET.encode(), f"{plain}.{nested}".encode(), hashlib.sha256)
        token = f"{plain}.{nested}.{b64(signature.digest())}"
    for settings in (Settings(jwt_secret=SECRET), Settings(jwt_public_key=pem(rsa_key))):
        assert refused(Verifier(settings), token) in ("invalid", "algorithm", "bad_signature")


def test_rs256_with_public_key(rsa_key):
    v = Verifier(Settings(jwt_public_key=pem(rsa_key)))
    token = jwt.encode(base_claims(), rsa_key, algorithm="RS256")
    assert v.verify(token).sub == "alice"
    assert "HS256" not in v.algorithms


def test_hs256_signed_with_the_public_key_is_refused(rsa_key):
    """Algorithm confusion: the public key must never act as an HMAC secret."""
    public_pem = pem(rsa_key)
    header = base64.urlsafe_b64encode(b'{"alg":"HS256","typ":"JWT"}').rstrip(b"=")
    body = base64.urlsafe_b64encode(json.dumps(base_claims()).encode()).rstrip(b"=")
    signing_input = header + b"." + body
    sig = base64.urlsafe_b64encode(
        hmac.new(public_pem.encode(), signing_input, hashlib.sha256).digest()
    ).rstrip(b"=")
    token = signing_input.decode() + "." + sig.decode()
    assert refused(Verifier(Settings(jwt_public_key=public_pem)), token) == "algorithm"
    # Even with a secret configured as well, the HS256 token is checked with the secret only.
    both = Verifier(Settings(jwt_public_key=public_pem, jwt_secret=SECRET))
    assert refused(both, token) == "bad_signature"


def test_es256_key_admits_only_es256(ec_key, rsa_key, tmp_path):
    path = tmp_path / "ec.pem"
    path.write_text(pem(ec_key))
    v = Verifier(Settings(jwt_public_key=str(path)))  # a file path works too
    assert v.algorithms == {"ES256"}
    assert v.verify(jwt.encode(base_claims(), ec_key, algorithm="ES256")).sub == "alice"
    assert refused(v, jwt.encode(base_claims(), rsa_key, algorithm="RS256")) == "algorithm"


def test_jwks_file_selects_key_by_kid(rsa_key, ec_key, tmp_path):
    rsa_jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key.public_key()))
    rsa_jwk.update(kid="r1", alg="RS256")
    ec_jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(ec_key.public_key()))
    ec_jwk.update(kid="e1", alg="ES256")
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [rsa_jwk, ec_jwk]}))
    v = Verifier(Settings(jwt_jwks_file=str(path)))
    assert (
        v.verify(jwt.encode(base_claims(), rsa_key, "RS256", headers={"kid": "r1"})).sub == "alice"
    )
    assert (
        v.verify(jwt.encode(base_claims(), ec_key, "ES256", headers={"kid": "e1"})).sub == "alice"
    )
    # A kid pointing at a key of another algorithm is refused.
    assert (
        refused(v, jwt.encode(base_claims(), ec_key, "ES256", headers={"kid": "r1"})) == "algorithm"
    )
    assert (
        refused(v, jwt.encode(base_claims(), rsa_key, "RS256", headers={"kid": "nope"}))
        == "unknown_key"
    )


def test_leeway_admits_recent_expiry_and_extends_the_socket_deadline():
    exp = int(time.time()) - 5
    v = Verifier(Settings(jwt_secret=SECRET, jwt_leeway=30))
    assert v.verify(hs(base_claims(exp=exp))).exp == exp + 30
    assert refused(Verifier(Settings(jwt_secret=SECRET)), hs(base_claims(exp=exp))) == "expired"


def test_configured_algorithms_narrow_what_keys_allow():
    v = Verifier(Settings(jwt_secret=SECRET, jwt_algorithms=("HS512",)))
    assert refused(v, hs(base_claims())) == "algorithm"
    assert v.verify(hs(base_claims(), algorithm="HS512")).sub == "alice"
    with pytest.raises(ValueError):
        Verifier(Settings(jwt_secret=SECRET, jwt_algorithms=("none",)))


def test_no_key_material_is_a_startup_error():
    with pytest.raises(ValueError, match="no usable JWT key"):
        Verifier(Settings())


def test_embedded_secret_is_generated_once_and_reused(tmp_path, caplog):
    s = Settings(data_dir=str(tmp_path))
    first = ensure_key_material(s)
    second = ensure_key_material(s)
    assert first.jwt_secret and first.jwt_secret == second.jwt_secret
    assert (tmp_path / "jwt-secret").stat().st_mode & 0o777 == 0o600
    assert "JWT_SECRET is not set" in caplog.text
    assert first.jwt_secret not in caplog.text
    configured = Settings(jwt_secret="x" * 32, data_dir=str(tmp_path / "other"))
    assert ensure_key_material(configured) is configured


def test_bearer_header_parsing():
    assert token_from_header("Bearer abc") == "abc"
    assert token_from_header("bearer  abc ") == "abc"
    assert token_from_header("Basic abc") is None
    assert token_from_header("Bearer") is None
    assert token_from_header(None) is None


def test_a_remembered_token_still_expires_at_exp():
    v = Verifier(Settings(jwt_secret=SECRET))
    exp = int(time.time()) + 60
    token = hs(base_claims(exp=exp))
    assert v.verify(token, now=exp - 30).exp == exp  # verified, then remembered
    assert v.verify(token, now=exp - 1).exp == exp
    with pytest.raises(AuthError) as info:
        v.verify(token, now=exp)
    assert info.value.reason == "expired"


def test_remembered_tokens_are_bounded(monkeypatch):
    monkeypatch.setattr(Verifier, "CACHE_SIZE", 3)
    v = Verifier(Settings(jwt_secret=SECRET))
    tokens = [hs(base_claims(sub=f"u{i}")) for i in range(5)]
    for t in tokens:
        v.verify(t)
    assert len(v._cache) == 3 and tokens[-1] in v._cache and tokens[0] not in v._cache


def test_non_numeric_exp_is_refused():
    assert refused(Verifier(Settings(jwt_secret=SECRET)), hs(base_claims(exp="soon"))) == "invalid"


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _forge(header: object, claims: object, secret: str = SECRET, alg=hashlib.sha256) -> str:
    """A token with exactly this header and payload JSON (or these bytes), signed with ``secret``."""
    head = _b64(json.dumps(header).encode())
    body = _b64(claims if isinstance(claims, bytes) else json.dumps(claims).encode())
    sig = hmac.new(secret.encode(), f"{head}.{body}".encode(), alg).digest()
    return f"{head}.{body}.{_b64(sig)}"


def _outcome(v: Verifier, token: str) -> str:
    try:
        ident = v.verify(token)
    except AuthError as exc:
        return exc.reason
    return f"ok {ident.sub} {ident.exp} {ident.grants!r} {ident.sid} {ident.role} {ident.info!r}"


def test_a_token_issued_by_a_clock_a_little_ahead_is_taken(rsa_key):
    """With ``JWT_LEEWAY`` at 0 (the default), a token whose ``iat`` was ahead of the
    verifier's clock was refused as "not yet valid": a gateway 0.5 s behind the host that
    logged the user in refused 20 of 40 fresh tokens, 2 s behind all 40. ``iat`` says when
    it was issued, not from when it holds (``nbf`` does, and still is checked)."""
    ahead = int(time.time()) + 2
    assert Verifier(Settings(jwt_secret=SECRET)).verify(hs(base_claims(iat=ahead))).sub == "alice"
    rs = jwt.encode(base_claims(iat=ahead), rsa_key, algorithm="RS256")
    assert Verifier(Settings(jwt_public_key=pem(rsa_key))).verify(rs).sub == "alice"
    for iat in ("yesterday", True, None, [1]):
        assert refused(Verifier(Settings(jwt_secret=SECRET)), hs(base_claims(iat=iat))) == (
            "invalid"
        ), iat
    assert refused(Verifier(Settings(jwt_secret=SECRET)), hs(base_claims(nbf=ahead))) == (
        "not_yet_valid"
    )


@pytest.mark.parametrize("exp", [b"NaN", b"Infinity", b"1e999", str(10**400).encode()])
def test_an_exp_no_clock_reaches_is_refused(exp):
    """PyJWT reads ``NaN``, ``Infinity`` and ``1e999`` (``json.loads``): such a token was taken,
    for ever, and its socket upgraded and left hanging (the hub's expiry wheel cannot file
    it, so neither connect nor disconnect finished); ``10**400`` was a 500."""
    token = _forge({"alg": "HS256", "typ": "JWT"}, b'{"sub": "alice", "exp": %s}' % exp)
    assert refused(Verifier(Settings(jwt_secret=SECRET)), token) == "invalid"
    big = _forge({"alg": "HS256", "typ": "JWT"}, b'{"sub": "alice", "exp": 1e308}')
    assert Verifier(Settings(jwt_secret=SECRET)).verify(big).exp == 1e308  # far, but a time


def test_the_secrets_own_check_decides_as_pyjwt_alone():
    """HMAC tokens whose signature the verifier checks itself are judged as PyJWT judges them."""
    now = int(time.time())
    plain = {"alg": "HS256", "typ": "JWT"}
    good = base_claims()
    valid = _forge(plain, good)
    head, body, sig = valid.split(".")
    tokens = [
        valid,
        _forge({"alg": "HS256"}, good),
        _forge({"alg": "HS256", "kid": "k1"}, good),
        _forge({"alg": "HS384", "typ": "JWT"}, good, alg=hashlib.sha384),
        _forge({"alg": "HS512"}, good, alg=hashlib.sha512),
        _forge({"alg": "HS384"}, good),  # the HS256 MAC under an HS384 header
        _forge(plain, good, OTHER),
        _forge({"alg": "none"}, good),
        _forge({"alg": "HS256", "crit": ["b64"], "b64": False}, good),
        _forge({"alg": "HS256", "x": 1}, good),
        _forge({"alg": 256}, good),
        _forge(["HS256"], good),
        _forge(plain, [1, 2]),
        _forge(plain, {**good, "iat": now + 3600}),
        _forge(plain, {**good, "iat": "yesterday"}),
        _forge(plain, {**good, "nbf": now + 3600}),
        _forge(plain, {**good, "nbf": "x"}),
        _forge(plain, {**good, "exp": now - 10}),
        _forge(plain, {**good, "exp": "never"}),
        _forge(plain, {**good, "jti": 5}),
        _forge(plain, {**good, "sub": 7}),
        _forge(plain, {**good, "sub": ""}),
        _forge(plain, {k: v for k, v in good.items() if k != "sub"}),
        _forge(plain, {**good, "aud": "clients", "iss": "gw"}),
        f"{head}.{body}.{sig}=",  # padding
        f"{head}.{body}.{sig[:-1]}*",  # a character outside base64url
        f"{head}.{body}.{sig}.x",
        f"{head}.{body}",
        f"{head}..{sig}",
        f"{head}.{body}!.{sig}",
        f"{head}.{body}.",
        "é" + valid,
        valid + "é",
        # The claims core/infra/jwtclaims.py reads itself, or leaves to PyJWT:
        _forge(plain, {**good, "iat": now - 10, "nbf": now - 10, "jti": "j", "sid": "s1"}),
        _forge(plain, {**good, "iat": now + 0.5}),  # a float: PyJWT truncates it
        _forge(plain, {**good, "iat": float(now + 3600)}),
        _forge(plain, {**good, "iat": True}),
        _forge(plain, {**good, "nbf": 10**40}),
        _forge(plain, {**good, "nbf": -(10**40)}),
        _forge(plain, {**good, "jti": None}),
        _forge(plain, {**good, "sub": None}),
        _forge(plain, {**good, "aud": "clients"}),
        _forge(plain, {**good, "aud": ["x", "clients"], "iss": "gw"}),
        _forge(plain, {**good, "aud": ["clients", 5], "iss": "gw"}),
        _forge(plain, {**good, "aud": "", "iss": "gw"}),
        _forge(plain, {**good, "aud": [], "iss": "gw"}),
        _forge(plain, {**good, "aud": {"clients": 1}, "iss": "gw"}),
        _forge(plain, {**good, "aud": "clients", "iss": 7}),
        _forge(plain, {**good, "aud": "clients", "iss": ["gw"]}),
        _forge(plain, {**good, "role": "admin", "info": {"name": "a"}}),
        _forge({"alg": "HS256", "kid": 5}, good),
        _forge({"alg": "HS256", "typ": 5}, good),
        _forge(plain, b'{"sub": "alice", "sub": "bob", "channels": ["room:*"]}'),
        _forge(plain, b'{"sub": "alice", "n": NaN}'),
        _forge(plain, b'{"sub": "alice", "x": "\\ud800"}'),
        _forge(plain, b'\xef\xbb\xbf{"sub": "alice"}'),
        _forge(plain, b' {"sub": "alice"}'),
        _forge(plain, b'{"sub": "alice", "n": 123456789012345678901234567890}'),
        _forge(plain, b'{"sub": "alice", "x": ' + b"[" * 40 + b"]" * 40 + b"}"),
        _forge(plain, b'{"sub": "alice", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
        _forge(plain, b'{"sub": "alice"} x'),
        f"{head}.{body[:-1]}{chr(ord(body[-1]) + 1)}.{sig}",  # leftover bits: not canonical
        f"{head}.{body}=.{sig}",
    ]
    for settings in (Settings(jwt_secret=SECRET),
                     Settings(jwt_secret=SECRET, jwt_issuer="gw", jwt_audience="clients"),
                     Settings(jwt_secret=SECRET, jwt_leeway=7200),
                     Settings(jwt_secret=SECRET, jwt_algorithms=("HS384",))):  # fmt: skip
        for token in tokens:
            fast, slow = Verifier(settings), Verifier(settings)
            slow._hmac_key = None  # PyJWT alone
            assert _outcome(fast, token) == _outcome(slow, token), token


def test_plain_claims_are_read_without_pyjwt(monkeypatch):
    """A plain HMAC token's claims are read by core/infra/jwtclaims.py: PyJWT is not called."""
    valid = _forge({"alg": "HS256", "typ": "JWT"}, base_claims(iat=int(time.time())))
    monkeypatch.setattr(jwt, "decode", lambda *a, **k: pytest.fail("PyJWT decoded a plain token"))
    assert Verifier(Settings(jwt_secret=SECRET)).verify(valid).sub == "alice"
