"""API keys: made by admins, stored hashed, scoped, revoked everywhere."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import asyncpg
import pytest

from core.infra.broker import RedisBroker
from tests.harness import ApiClient, running_gateway, token_for, unique_prefix, ws_client
from tests.servers import UNIT
from tests.test_accounts import ADA, login, register
from tests.test_core_rest import PROJECT


def promote(clean_db: dict, email: str) -> None:
    """The documented bootstrap: ``python -m core promote EMAIL``."""
    env = {
        "DATABASE_URL": clean_db["database_url"],
        "DATABASE_SCHEMA": clean_db["database_schema"],
        "PATH": "/usr/bin:/bin",
    }
    out = subprocess.run(
        [sys.executable, "-m", "core", "promote", email],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "is now admin" in out.stdout


async def admin_client(gw, clean_db) -> ApiClient:
    anon = ApiClient(gw.port, None)
    try:
        await register(anon)
        promote(clean_db, ADA["email"])
        status, tokens = await login(anon)
        assert status == 200
    finally:
        anon.close()
    return ApiClient(gw.port, tokens["access_token"])


@pytest.fixture
async def gw(clean_db):
    async with running_gateway(**clean_db) as gateway:
        yield gateway


@pytest.fixture
async def admin(gw, clean_db):
    client = await admin_client(gw, clean_db)
    yield client
    client.close()


async def new_key(admin: ApiClient, **body) -> dict:
    status, _, created = await admin.call("POST", "/api/keys", {"name": "orders", **body})
    assert status == 201, created
    return created


async def test_admin_creates_a_key_shown_once_and_stored_hashed(admin, clean_db):
    created = await new_key(admin, channels=["orders:*"])
    key = created["key"]
    assert key.startswith("gwk_") and created["hint"] == key[:10]
    assert created["channels"] == ["orders:*"] and created["rest"] is False
    status, _, listed = await admin.call("GET", "/api/keys")
    assert status == 200 and [k["id"] for k in listed["items"]] == [created["id"]]
    assert "key" not in listed["items"][0]
    conn = await asyncpg.connect(clean_db["database_url"])
    try:
        stored = await conn.fetchrow(f'select * from "{clean_db["database_schema"]}".api_keys')
    finally:
        await conn.close()
    assert key not in str(dict(stored)) and len(stored["key_hash"]) == 32


async def test_only_admins_manage_keys(gw, admin):
    user = ApiClient(gw.port, token_for(gw, "someone"))
    try:
        status, _, body = await user.call("POST", "/api/keys", {"name": "x"})
        assert status == 403 and body["error"]["message"] == "admins only"
        assert (await user.call("GET", "/api/keys"))[0] == 403
    finally:
        user.close()


async def test_a_key_publishes_within_its_scope_only(gw, admin):
    key = (await new_key(admin, channels=["orders:*"]))["key"]
    service = ApiClient(gw.port, key)
    try:
        async with ws_client(gw.port, token_for(gw, channels=("orders:*",))) as c:
            assert (await c.request("sub", ch="orders:7"))["ok"]
            status, _, _ = await service.call(
                "POST", "/api/publish", {"ch": "orders:7", "data": {"paid": True}}
            )
            assert status == 200
            assert (await c.next_push())["data"] == {"paid": True}
        status, _, _ = await service.call("POST", "/api/publish", {"ch": "billing:1", "data": 1})
        assert status == 403
        status, _, body = await service.call("GET", "/api/projects")
        assert status == 403 and "REST API" in body["error"]["message"]
    finally:
        service.close()


async def test_a_key_with_rest_scope_calls_the_api(gw, admin):
    key = (await new_key(admin, rest=True))["key"]
    service = ApiClient(gw.port, key)
    try:
        assert (await service.call("POST", "/api/projects", PROJECT))[0] == 201
        assert (await service.call("GET", "/api/keys"))[0] == 403  # a key is no admin
    finally:
        service.close()


async def test_revoked_and_unknown_keys_are_refused(gw, admin):
    created = await new_key(admin, channels=["orders:*"])
    service = ApiClient(gw.port, created["key"])
    bogus = ApiClient(gw.port, "gwk_" + "x" * 43)
    try:
        body = {"ch": "orders:1", "data": 1}
        assert (await service.call("POST", "/api/publish", body))[0] == 200
        assert (await admin.call("DELETE", f"/api/keys/{created['id']}"))[0] == 204
        status, _, err = await service.call("POST", "/api/publish", body)
        assert status == 401 and err["error"]["message"] == "unknown or revoked API key"
        assert (await bogus.call("POST", "/api/publish", body))[0] == 401
        assert (await admin.call("DELETE", f"/api/keys/{created['id']}"))[0] == 404
    finally:
        service.close()
        bogus.close()


async def test_keys_made_on_one_process_work_and_die_on_another(clean_db, redis_url):
    prefix = unique_prefix()
    async with (
        running_gateway(RedisBroker(redis_url, prefix), **clean_db) as a,
        running_gateway(RedisBroker(redis_url, prefix), **clean_db) as b,
    ):
        admin = await admin_client(a, clean_db)
        try:
            created = await new_key(admin, channels=["orders:*"])
            on_b = ApiClient(b.port, created["key"])
            try:
                body = {"ch": "orders:1", "data": 1}
                for _ in range(50):  # the broadcast is asynchronous: allow it to land
                    if (await on_b.call("POST", "/api/publish", body))[0] == 200:
                        break
                    await asyncio.sleep(0.05 * UNIT)
                else:
                    pytest.fail("the key never worked on the other process")
                assert (await admin.call("DELETE", f"/api/keys/{created['id']}"))[0] == 204
                for _ in range(50):
                    if (await on_b.call("POST", "/api/publish", body))[0] == 401:
                        break
                    await asyncio.sleep(0.05 * UNIT)
                else:
                    pytest.fail("the revoked key kept working on the other process")
            finally:
                on_b.close()
        finally:
            admin.close()


def test_promote_unknown_account_fails_clearly(clean_db):
    env = {"DATABASE_URL": clean_db["database_url"], "DATABASE_SCHEMA": clean_db["database_schema"],
           "PATH": "/usr/bin:/bin"}  # fmt: skip
    out = subprocess.run([sys.executable, "-m", "core", "promote", "ghost@example.com"],
                         env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 1 and "no account for ghost@example.com" in out.stderr
