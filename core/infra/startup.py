"""What the settings name outside the process, checked before anything starts.

`Settings.from_env` checks each value by itself. What it names elsewhere
(the key files, the address to listen on) is checked here, by the same code
that later uses it, before a broker, a pool or a worker is started: a key
file that is missing, unreadable or holds no usable key, or a ``HOST`` that
does not resolve to an address of this machine, used to end the process
with a traceback once it had connected to Redis and PostgreSQL (in every
worker, again and again). `check_keys` and `check_listen` raise
`SettingsError` naming the variable instead; ``python -m gateway`` and
``python -m core`` print it as one line and exit 2.
"""

from __future__ import annotations

import errno
import json
import socket
from collections.abc import Callable
from typing import Any

from tornado.netutil import bind_sockets

from core.infra.keys import SigningKeys
from core.infra.settings import Settings, SettingsError
from core.infra.verify import Verifier, algorithms_for, is_pem, read_keyset, read_public_key

__all__ = ["check_keys", "check_listen"]


def check_keys(settings: Settings) -> None:
    """Every key file the settings name is readable and holds usable keys; `SettingsError` if not."""
    checks: list[tuple[str, str | None, Callable[[str], object]]] = [
        ("JWT_PUBLIC_KEY", settings.jwt_public_key, _public_key),
        ("JWT_JWKS_FILE", settings.jwt_jwks_file, _public_keys),
        ("JWT_SIGNING_KEYS", settings.jwt_signing_keys, SigningKeys.load),
        ("JWT_ISSUED_KEYS", settings.jwt_issued_keys, _public_keys),
    ]
    for env, path, load in checks:
        if path is not None:
            try:
                load(path)
            except Exception as exc:  # whatever the loader meets, the file is of no use
                where = "the PEM text" if is_pem(path) else path
                raise SettingsError(f"{env}: {where}: {_reason(exc)}") from None
    if settings.jwt_algorithms:
        keyed = settings.jwt_secret or settings.jwt_public_key or settings.jwt_jwks_file
        if not (keyed or settings.jwt_signing_keys or settings.jwt_issued_keys):
            settings = settings.replace(jwt_secret="x" * 32)  # as `ensure_key_material` makes one
        try:
            Verifier(settings)
        except ValueError as exc:
            raise SettingsError(f"JWT_ALGORITHMS: {_reason(exc)}") from None


def check_listen(settings: Settings) -> None:
    """``HOST`` resolves to addresses of this machine, and ``PORT`` is free on them.

    Bound as Tornado binds them (`bind_sockets`), then closed at once.
    """
    try:
        sockets = bind_sockets(settings.port, settings.host)
    except socket.gaierror as exc:
        raise SettingsError(f"HOST: cannot resolve {settings.host!r}: {exc.strerror}") from None
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise SettingsError(
                f"PORT: {settings.port} is in use on {settings.host!r}: {exc.strerror}"
            ) from None
        raise SettingsError(f"HOST: cannot listen on {settings.host!r}: {exc.strerror}") from None
    for sock in sockets:
        sock.close()


def _public_key(value: str) -> tuple[str, ...]:
    """The algorithms of ``JWT_PUBLIC_KEY`` (PEM text, or a file of it), as `Verifier` reads it."""
    try:
        key = read_public_key(value)
    except ValueError:
        raise ValueError("not a PEM public key") from None
    return algorithms_for(key)


def _public_keys(path: str) -> dict[str, Any]:
    """The keys of a JWKS file that a token can name, as `Verifier` reads them."""
    keys = read_keyset(path)
    if not keys:
        raise ValueError("no key in it has a kid")
    return keys


def _reason(exc: BaseException) -> str:
    """One line saying why, with no traceback."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    if isinstance(exc, json.JSONDecodeError):
        return f"not JSON ({exc.msg})"
    if isinstance(exc, KeyError):
        return f"no {exc} member"
    text = " ".join(str(exc).split())
    return text or type(exc).__name__
