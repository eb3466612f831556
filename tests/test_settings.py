"""Settings a process cannot use: one line at start naming the variable, exit 2, nothing started.

Found by the operations review of 2026-12-02: ``JWT_LEEWAY=nan`` (or ``inf``)
was taken, and every expired token was valid; ``HEADER_TIMEOUT=inf`` turned
the header deadline off; a bad ``LOG_LEVEL``, ``DB_POOL_MIN`` above
``DB_POOL_MAX`` or a ``DATABASE_URL``/``REDIS_URL`` of another scheme started
the process and ended it with a traceback (in every worker, for the URLs).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import core.__main__
import gateway.__main__
from core.infra.keys import generate_jwk
from core.infra.settings import Settings, SettingsError
from tests.servers import UNIT

ROOT = Path(__file__).resolve().parent.parent

#: Every setting read as a number of seconds (or any float).
FLOAT_SETTINGS = [f.metadata["env"] for f in dataclasses.fields(Settings) if f.type == "float"]


def test_the_float_settings_are_found():
    assert {"JWT_LEEWAY", "HEADER_TIMEOUT", "SHUTDOWN_TIMEOUT", "DRAIN_SECONDS"} <= set(
        FLOAT_SETTINGS
    )


@pytest.mark.parametrize("env", FLOAT_SETTINGS)
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e999", "NaN"])
def test_a_number_of_seconds_is_finite(env, value):
    with pytest.raises(SettingsError, match=f"^{env}: expected a finite number"):
        Settings.from_env({env: value})


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"LOG_LEVEL": "bogus"}, "LOG_LEVEL: expected DEBUG, INFO, WARNING, ERROR or CRITICAL"),
        ({"DB_POOL_MIN": "20", "DB_POOL_MAX": "5"}, "DB_POOL_MIN: 20 is more than DB_POOL_MAX"),
        ({"DATABASE_URL": "notaurl"}, "DATABASE_URL: expected a postgresql:// or postgres://"),
        ({"DATABASE_URL": "mysql://db/app"}, "DATABASE_URL: expected a postgresql://"),
        ({"REDIS_URL": "foo://x"}, "REDIS_URL: expected a redis:// or rediss:// or unix://"),
        ({"REDIS_URL": "127.0.0.1:6379"}, "REDIS_URL: expected a redis://"),
        ({"JWT_LEEWAY": "nan"}, "JWT_LEEWAY: expected a finite number"),
    ],
)
@pytest.mark.parametrize("program", [gateway.__main__, core.__main__])
def test_a_value_no_process_can_use_stops_it_with_one_line(
    program, env, message, monkeypatch, capsys
):
    monkeypatch.setenv("DATABASE_URL", "postgresql://127.0.0.1:1/none")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert program.main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"configuration error: {message}") and err.count("\n") == 1, err


def test_sensible_values_are_taken():
    settings = Settings.from_env({
        "LOG_LEVEL": "warning", "JWT_LEEWAY": "30", "DRAIN_SECONDS": "0",
        "DB_POOL_MIN": "10", "DB_POOL_MAX": "10", "DATABASE_URL": "postgres://db/app",
        "REDIS_URL": "rediss://cache:6380/0",
    })  # fmt: skip
    assert settings.log_level == "WARNING" and settings.jwt_leeway == 30.0
    assert settings.database_url == "postgres://db/app"
    assert Settings.from_env({"REDIS_URL": "unix:///run/redis.sock"}).redis_url
    assert Settings.from_env({"REDIS_URL": "", "DATABASE_URL": ""}).redis_url is None


def _start(program: str, env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """``python -m <program>`` from this checkout with only ``env`` set (and what it needs)."""
    environ = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(tmp_path),
        "DATA_DIR": str(tmp_path / "data"),
        "PORT": "0",
        "LOG_FORMAT": "text",
        **env,
    }
    if program == "core":
        environ.setdefault("DATABASE_URL", "postgresql://127.0.0.1:1/none")
    else:
        environ.setdefault("CORE_URL", "http://127.0.0.1:9")  # no database, embedded or other
    return subprocess.run(
        [sys.executable, "-m", program], cwd=ROOT, env=environ, capture_output=True,
        text=True, timeout=60 * UNIT,
    )  # fmt: skip


def _files(tmp_path: Path) -> dict[str, str]:
    """Key files an operator could name by mistake, by what is wrong with them."""
    public = generate_jwk("ES256", "k1")
    public = {k: v for k, v in public.items() if k != "d"}
    made = {
        "garbage.pem": "not a key\n",
        "empty.json": '{"keys": []}',
        "not-json.json": "{keys",
        "public-only.json": json.dumps({"keys": [public]}),
        "no-kid.json": json.dumps({"keys": [{k: v for k, v in public.items() if k != "kid"}]}),
    }
    for name, text in made.items():
        (tmp_path / name).write_text(text)
    return {name: str(tmp_path / name) for name in made} | {
        "missing": str(tmp_path / "missing.pem"),
        "a folder": str(tmp_path),
    }


#: (variable, which file, what the line says after ``configuration error: VARIABLE: <file>: ``)
KEY_FILES = [
    ("JWT_PUBLIC_KEY", "missing", "No such file or directory"),
    ("JWT_PUBLIC_KEY", "a folder", "Is a directory"),
    ("JWT_PUBLIC_KEY", "garbage.pem", "not a PEM public key"),
    ("JWT_JWKS_FILE", "missing", "No such file or directory"),
    ("JWT_JWKS_FILE", "not-json.json", "not JSON"),
    ("JWT_JWKS_FILE", "empty.json", "The JWK Set did not contain any keys"),
    ("JWT_JWKS_FILE", "no-kid.json", "no key in it has a kid"),
    ("JWT_SIGNING_KEYS", "missing", "No such file or directory"),
    ("JWT_SIGNING_KEYS", "empty.json", "the signing key file holds no key"),
    ("JWT_SIGNING_KEYS", "public-only.json", "every signing key needs"),
    ("JWT_ISSUED_KEYS", "a folder", "Is a directory"),
    ("JWT_ISSUED_KEYS", "garbage.pem", "not JSON"),
]


def _one_line(result: subprocess.CompletedProcess[str], message: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    err = result.stderr
    assert err.startswith(f"configuration error: {message}"), err[-2000:]
    assert err.count("\n") == 1 and "Traceback" not in err, err[-2000:]


@pytest.mark.parametrize(("env", "which", "message"), KEY_FILES)
@pytest.mark.parametrize("program", ["gateway", "core"])
def test_a_key_file_no_process_can_use_stops_it_with_one_line(
    program, env, which, message, tmp_path
):
    """Found by the operations review of 2026-12-02: a key file named by the settings that was
    missing, unreadable or held no usable key started the process, which then ended with a
    traceback (once connected to Redis and PostgreSQL; in every worker)."""
    path = _files(tmp_path)[which]
    _one_line(_start(program, {env: path}, tmp_path), f"{env}: {path}: {message}")


@pytest.mark.parametrize(
    ("host", "message"),
    [
        ("0.0.0.0:8888", "HOST: cannot resolve '0.0.0.0:8888'"),
        ("http://0.0.0.0", "HOST: cannot resolve 'http://0.0.0.0'"),
        ("999.0.0.1", "HOST: cannot resolve '999.0.0.1'"),
        ("no-such-host.invalid", "HOST: cannot resolve 'no-such-host.invalid'"),
        ("192.0.2.1", "HOST: cannot listen on '192.0.2.1'"),  # TEST-NET-1: not this machine's
    ],
)
@pytest.mark.parametrize("program", ["gateway", "core"])
def test_a_host_no_process_can_listen_on_stops_it_with_one_line(program, host, message, tmp_path):
    """Found by the same review: a malformed ``HOST``, or one not of this machine, ended the
    process with a traceback after it had started everything else."""
    _one_line(_start(program, {"HOST": host}, tmp_path), message)


def test_algorithms_no_key_allows_stop_it_with_one_line(tmp_path):
    env = {"JWT_SECRET": "s" * 32, "JWT_ALGORITHMS": "RS256"}
    _one_line(_start("gateway", env, tmp_path), "JWT_ALGORITHMS: no usable JWT key")


def test_usable_key_files_and_host_start(tmp_path):
    """The checks refuse nothing usable: the process starts, and stops on SIGTERM."""
    jwk = generate_jwk("ES256", "k1")
    signing = tmp_path / "signing.json"
    signing.write_text(json.dumps({"keys": [jwk]}))
    issued = tmp_path / "issued.json"
    issued.write_text(json.dumps({"keys": [{k: v for k, v in jwk.items() if k != "d"}]}))
    env = {"JWT_SIGNING_KEYS": str(signing), "JWT_JWKS_FILE": str(issued), "HOST": "localhost"}
    environ = {**os.environ, "DATA_DIR": str(tmp_path), "PORT": "0", "LOG_FORMAT": "text",
               "CORE_URL": "http://127.0.0.1:9", **env}  # fmt: skip
    with subprocess.Popen(
        [sys.executable, "-m", "gateway"], cwd=ROOT, env=environ,
        stderr=subprocess.PIPE, text=True,
    ) as process:  # fmt: skip
        try:
            assert process.stderr is not None
            line = ""
            while "listening" not in line:
                line = process.stderr.readline()
                assert line, "the gateway ended before it listened"
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(30 * UNIT)


@pytest.mark.parametrize("program", ["gateway", "core"])
@pytest.mark.parametrize("secret", ["hunter2", "s" * 31, "é" * 15 + "s"])
def test_a_weak_jwt_secret_stops_the_process_with_one_line(program, secret, tmp_path):
    """Found by the operations review of 2026-12-02: any ``JWT_SECRET`` was taken, ``secret``
    too. An HS256 key needs 256 bits (RFC 7518 section 3.2): a short one is found offline from
    one token a user holds, and then every token of anyone (an admin's) can be forged."""
    result = _start(program, {"JWT_SECRET": secret}, tmp_path)
    size = len(secret.encode())
    _one_line(result, f"JWT_SECRET: {size} bytes is too short for an HMAC key: use 32 bytes")
    assert secret not in result.stderr  # the line never shows the secret


def test_a_secret_of_32_bytes_is_taken_wherever_settings_are_made():
    assert Settings(jwt_secret="é" * 16).jwt_secret == "é" * 16  # 32 bytes, 16 characters
    with pytest.raises(SettingsError, match=r"^JWT_SECRET: 31 bytes is too short"):
        Settings(jwt_secret="s" * 31)  # the Lambda handler and tests make Settings directly
    with pytest.raises(SettingsError, match=r"^JWT_SECRET: 6 bytes is too short"):
        Settings.from_env({"JWT_SECRET": "secret"})
