"""Settings a process cannot use: one line at start naming the variable, exit 2, nothing started.

Found by the operations review of 2026-12-02: ``JWT_LEEWAY=nan`` (or ``inf``)
was taken, and every expired token was valid; ``HEADER_TIMEOUT=inf`` turned
the header deadline off; a bad ``LOG_LEVEL``, ``DB_POOL_MIN`` above
``DB_POOL_MAX`` or a ``DATABASE_URL``/``REDIS_URL`` of another scheme started
the process and ended it with a traceback (in every worker, for the URLs).
"""

from __future__ import annotations

import dataclasses

import pytest

import core.__main__
import gateway.__main__
from core.infra.settings import Settings, SettingsError

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
