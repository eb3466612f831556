"""``/api/keys``: API keys for backend services, made and revoked by admins.

A key (``gwk_`` and 43 random characters) is shown once, when created; only
its SHA-256 is stored. It is scoped: ``channels`` are the patterns it may
publish on (``POST /api/publish``, or a socket's ``pub``), ``rest`` says
whether it may call the REST API, and ``server`` whether it may call the
server API (``/api/server/``: disconnect, subscribe, list connections… of
anyone, on every gateway; docs/security.md). Every process keeps the active keys in
memory (the verifier looks a key up without a query); creating or revoking
one reloads them here and broadcasts ``{"type": "api_keys_changed"}`` on the
control channel so every other process reloads too, and each process also
reloads on its periodic sync. A key that disappears from the active set on a
reload is revoked: ``on_revoked`` closes its open sockets on this process
(close code 4510), so a revoked key stops publishing everywhere.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections.abc import Callable, MutableMapping
from typing import Annotated

import asyncpg
import msgspec
from msgspec import Meta

from core.access import Access, user_id
from core.db import one
from core.infra import control
from core.infra.broker.base import Broker, BrokerUnavailable, Publisher
from core.infra.errors import NotFound
from core.infra.identity import API_KEY_PREFIX, Identity
from core.infra.keyring import SNAPSHOT_KEY, KeyEntry, KeyRing, encode_snapshot
from core.infra.tasks import TaskSet
from core.request import Request, Response
from core.routing import UUID_ID, Route, uuid_param

__all__ = ["ApiKeys"]

log = logging.getLogger("core.apikeys")

#: White space, spelled out: ``\s`` means other characters in Python than in ECMA-262,
#: the dialect of the document's patterns, and both must refuse the same channels.
_SPACE = r"\t\n\v\f\r \x1c-\x1f\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff"
KEY_CHANNEL_PATTERN = rf"^[^\x00{_SPACE}]+(?![\s\S])"
Pattern = Annotated[str, Meta(min_length=1, max_length=200, pattern=KEY_CHANNEL_PATTERN)]


class ApiKeyIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: Annotated[str, Meta(min_length=1, max_length=100, pattern=r"^[^\x00]*(?![\s\S])")]
    channels: Annotated[list[Pattern], Meta(max_length=50)] = []
    rest: bool = False
    server: bool = False


class ApiKeyOut(msgspec.Struct, kw_only=True):
    id: str
    name: str
    hint: str
    channels: list[str]
    rest: bool
    server: bool
    created_at: str


class ApiKeyCreated(ApiKeyOut, kw_only=True):
    """As listed, plus the key itself: shown this once, never again."""

    key: str


class ApiKeyList(msgspec.Struct):
    items: list[ApiKeyOut]


_FIELDS = (
    "'id', id, 'name', name, 'hint', hint, 'channels', channels, 'rest', rest, "
    "'server', server, 'created_at', created_at"
)
_CREATE = f"""
insert into api_keys (name, key_hash, hint, channels, rest, server, created_by)
values ($1, $2, $3, $4, $5, $6, $7) returning json_build_object({_FIELDS})::text
"""
_LIST = f"""
select coalesce(json_agg(json_build_object({_FIELDS}) order by created_at), '[]')::text
from api_keys where revoked_at is null
"""
_REVOKE = (
    "update api_keys set revoked_at = now() where id = $1::uuid and revoked_at is null returning id"
)
_ACTIVE = "select id::text, key_hash, channels, rest, server from api_keys where revoked_at is null"


class ApiKeys:
    def __init__(
        self,
        pool: asyncpg.Pool,
        ring: MutableMapping[bytes, Identity],
        publisher: Publisher | None,
        reserved: tuple[str, ...] = (),
        on_revoked: Callable[[str], object] | None = None,
        store: Broker | None = None,
    ) -> None:
        self._pool = pool
        self._ring = KeyRing(ring, reserved, on_revoked)
        self._publisher = publisher
        self._store = store  # where gateways without a database read the keys (keyring.py)
        self._reloads = TaskSet(log)

    def routes(self) -> list[Route]:
        tag = "keys"
        return [
            Route("POST", "/api/keys", self.create, "Create an API key (admin)", "createApiKey",
                  tag, responses={201: ApiKeyCreated}, body=ApiKeyIn, access=Access.ADMIN),
            Route("GET", "/api/keys", self.list, "List API keys (admin)", "listApiKeys", tag,
                  responses={200: ApiKeyList}, access=Access.ADMIN),
            Route("DELETE", "/api/keys/{id}", self.revoke, "Revoke an API key (admin)",
                  "revokeApiKey", tag, responses={204: None}, access=Access.ADMIN,
                  params={"id": UUID_ID}),
        ]  # fmt: skip

    async def create(self, req: Request) -> Response:
        data: ApiKeyIn = req.data
        key = API_KEY_PREFIX + secrets.token_urlsafe(32)
        digest = hashlib.sha256(key.encode()).digest()
        creator = user_id(req.caller)  # a user of this deployment, or None
        (body,) = await one(
            self._pool,
            _CREATE,
            data.name,
            digest,
            key[:10],
            data.channels,
            data.rest,
            data.server,
            creator,
        )
        await self._changed()
        out = body.encode()
        return Response(201, out[:-1] + b',"key":' + msgspec.json.encode(key) + b"}")

    async def list(self, req: Request) -> Response:
        return Response(200, b'{"items":' + (await self._pool.fetchval(_LIST)).encode() + b"}")

    async def revoke(self, req: Request) -> Response:
        target = uuid_param(req)
        if target is None or await self._pool.fetchval(_REVOKE, target) is None:
            raise NotFound("no such API key")
        await self._changed()
        return Response(204)

    async def reload(self) -> None:
        """Replace the in-memory keys with the active ones in the database.

        With a store, the snapshot for gateways without a database is
        written too (a failure is logged: they keep the last one until the
        next sync).
        """
        entries = [
            KeyEntry(bytes(digest).hex(), str(id), list(channels), rest, server)
            for id, digest, channels, rest, server in await self._pool.fetch(_ACTIVE)
        ]
        self._ring.replace(entries)
        if self._store is not None:
            try:
                await self._store.put_value(SNAPSHOT_KEY, encode_snapshot(entries))
            except BrokerUnavailable as exc:
                log.warning("API key snapshot not stored (gateways keep the last one): %s", exc)

    def on_control(self, message: control.ControlMessage) -> None:
        if isinstance(message, control.ApiKeysChanged):
            self._reloads.spawn(self._reload_logged(), "api-keys-reload")

    async def _reload_logged(self) -> None:
        try:
            await self.reload()
        except Exception as exc:  # the periodic sync will try again
            log.warning("reloading API keys failed: %s", exc)

    async def _changed(self) -> None:
        await self.reload()
        if self._publisher is not None:
            try:
                await control.broadcast(self._publisher, control.ApiKeysChanged())
            except Exception as exc:
                log.warning("API key change not broadcast (others reload within a sync): %s", exc)
