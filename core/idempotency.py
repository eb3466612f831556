"""``Idempotency-Key`` on POST: a retry replays the first response.

The first request with a key claims a row (owner, key) before it runs; its
response is stored there unless it was a server error (5xx: the row is
dropped so a retry runs again). A later request with the same key:

* same method, path and body, first one finished: its stored response is
  replayed, with ``Idempotent-Replayed: true``;
* same key, different request: 422 ``idempotency_key_reused``;
* first one still running: 409 ``idempotency_in_progress`` with Retry-After.

Keys belong to the caller (JWT ``sub``), expire after ``IDEMPOTENCY_TTL``
seconds, and expired rows are purged periodically. A key is 1 to 255
printable ASCII characters (`IDEMPOTENCY_KEY_SCHEMA`, which the document
states); any other is 422.
"""

from __future__ import annotations

import hashlib
import logging
import re

import asyncpg
import msgspec

from core.infra.errors import ApiError, ErrorDetail, ValidationFailed
from core.infra.identity import principal
from core.request import Request, Response
from core.routing import Handler

__all__ = ["IDEMPOTENCY_KEY_SCHEMA", "IdempotencyStore", "checked_key"]

log = logging.getLogger("core.idempotency")

MAX_KEY_LENGTH = 255
#: Printable ASCII, no space at either end (HTTP drops it before the server sees the key).
_KEY_PATTERN = rf"^[!-~](?:[ -~]{{0,{MAX_KEY_LENGTH - 2}}}[!-~])?(?![\s\S])"
IDEMPOTENCY_KEY_SCHEMA = {
    "type": "string",
    "minLength": 1,
    "maxLength": MAX_KEY_LENGTH,
    "pattern": _KEY_PATTERN,
    "examples": ["3f2b8c1e-7d4a-4e8b-9c2d-5a6f7e8d9c0b"],
}

_CLAIM = """
insert into idempotency_keys (owner, key, method, path, request_hash, expires_at)
values ($1, $2, $3, $4, $5, now() + make_interval(secs => $6))
on conflict (owner, key) do nothing
returning true
"""
_EXISTING = """
select method, path, request_hash, status, headers, body, expires_at < now() as expired
from idempotency_keys where owner = $1 and key = $2
"""
_STORE = """
update idempotency_keys set status = $3, headers = $4::jsonb, body = $5
where owner = $1 and key = $2
"""
_RELEASE = "delete from idempotency_keys where owner = $1 and key = $2 and status is null"
_DROP_EXPIRED = "delete from idempotency_keys where owner = $1 and key = $2 and expires_at < now()"
_PURGE = "delete from idempotency_keys where expires_at < now()"

_headers = msgspec.json.Decoder(dict[str, str])


def checked_key(key: str) -> str:
    """``key`` when it is a valid ``Idempotency-Key``; else a 422 naming the header."""
    if not re.match(_KEY_PATTERN, key):
        detail = ErrorDetail(
            "header.Idempotency-Key", f"1 to {MAX_KEY_LENGTH} printable ASCII characters"
        )
        raise ValidationFailed([detail])
    return key


class IdempotencyStore:
    def __init__(self, pool: asyncpg.Pool, ttl: float) -> None:
        self._pool = pool
        self._ttl = ttl

    async def run(self, req: Request, handler: Handler) -> Response:
        key = req.header("idempotency-key")
        if key is None or req.caller is None:
            return await handler(req)
        checked_key(key)
        owner = principal(req.caller)
        digest = hashlib.sha256(b"%s %s\n%s" % (req.method.encode(), req.path.encode(), req.body))
        request_hash = digest.digest()
        for _ in range(2):  # a second pass only after dropping an expired row
            claimed = await self._pool.fetchval(
                _CLAIM, owner, key, req.method, req.path, request_hash, self._ttl
            )
            if claimed:
                return await self._first(req, handler, owner, key)
            row = await self._pool.fetchrow(_EXISTING, owner, key)
            if row is None:
                continue  # released meanwhile: claim again
            if row["expired"]:
                await self._pool.execute(_DROP_EXPIRED, owner, key)
                continue
            if row["request_hash"] != request_hash:
                raise ApiError(
                    422,
                    "idempotency_key_reused",
                    "this Idempotency-Key was used for a different request",
                )
            if row["status"] is None:
                raise ApiError(
                    409,
                    "idempotency_in_progress",
                    "a request with this Idempotency-Key is still running",
                    headers={"Retry-After": "1"},
                )
            headers = _headers.decode(row["headers"]) if row["headers"] else {}
            headers["Idempotent-Replayed"] = "true"
            return Response(row["status"], row["body"], headers)
        raise ApiError(409, "idempotency_in_progress", "Idempotency-Key is contended; retry")

    async def _first(self, req: Request, handler: Handler, owner: str, key: str) -> Response:
        try:
            response = await handler(req)
        except ApiError as exc:
            if exc.status >= 500:
                await self._pool.execute(_RELEASE, owner, key)
            else:
                await self._store(owner, key, Response.error(exc))
            raise
        except BaseException:
            await self._pool.execute(_RELEASE, owner, key)
            raise
        await self._store(owner, key, response)
        return response

    async def _store(self, owner: str, key: str, response: Response) -> None:
        headers = msgspec.json.encode(response.headers).decode()
        await self._pool.execute(_STORE, owner, key, response.status, headers, response.body)

    async def purge(self) -> int:
        """Drop expired keys; returns how many."""
        status = await self._pool.execute(_PURGE)
        return int(status.rsplit(" ", 1)[-1])
