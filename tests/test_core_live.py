"""The REST core over the socket (rpc frames) and its change events."""

from __future__ import annotations

import pytest

from core.infra.broker import RedisBroker
from proto import ErrorCode
from tests.harness import ApiClient, running_gateway, token_for, unique_prefix, ws_client
from tests.test_core_rest import PROJECT, project


@pytest.fixture
async def gw(clean_db):
    async with running_gateway(**clean_db) as gateway:
        yield gateway


@pytest.mark.parametrize("msgpack", [False, True])
async def test_rpc_runs_the_same_route_table_as_http(gw, msgpack):
    admin = token_for(gw, channels=("projects*",), extra={"role": "admin"})
    async with ws_client(gw.port, admin, msgpack=msgpack) as c:
        created = await c.request("rpc", method="POST", path="/api/projects", body=PROJECT)
        assert created["ok"] is True and created["status"] == 201
        body = created["body"]
        assert body["name"] == PROJECT["name"] and body["version"] == 1
        assert created["headers"]["Location"] == f"/api/projects/{body['id']}"
        got = await c.request("rpc", method="GET", path=f"/api/projects/{body['id']}")
        assert got["status"] == 200 and got["body"] == body
        page = await c.request("rpc", method="GET", path="/api/projects?limit=1")
        assert page["body"]["items"] == [body]
        patched = await c.request(
            "rpc",
            method="PATCH",
            path=f"/api/projects/{body['id']}",
            body={"status": "done"},
            headers={"If-Match": '"1"'},
        )
        assert patched["status"] == 200 and patched["body"]["version"] == 2
        deleted = await c.request("rpc", method="DELETE", path=f"/api/projects/{body['id']}")
        assert deleted["status"] == 204 and "body" not in deleted
    api = ApiClient(gw.port, token_for(gw))
    try:
        assert (await api.call("GET", f"/api/projects/{body['id']}"))[0] == 404
    finally:
        api.close()


async def test_rpc_errors_have_the_http_shape(gw):
    async with ws_client(gw.port, token_for(gw)) as c:
        bad = await c.request("rpc", method="POST", path="/api/projects", body=project(name=""))
        assert bad["ok"] is True and bad["status"] == 422
        assert bad["body"]["error"]["details"][0]["path"] == "$.name"
        missing = await c.request("rpc", method="GET", path="/api/projects/12345")
        assert missing["status"] == 404 and missing["body"]["error"]["code"] == "not_found"
        wrong = await c.request("rpc", method="DELETE", path="/api/projects")
        assert wrong["status"] == 405 and wrong["headers"]["Allow"] == "GET, POST"
        # Protocol-level mistakes are error replies, and the socket lives on.
        for frame in (
            {"method": "GET", "path": "/not-api"},
            {"method": "BREW", "path": "/api/projects"},
            {"method": "GET"},
        ):
            reply = await c.request("rpc", **frame)
            assert reply["ok"] is False and reply["error"]["code"] == ErrorCode.BAD_FRAME
        assert (await c.request("ping"))["ok"]


async def test_rpc_idempotency_key_in_headers(gw):
    async with ws_client(gw.port, token_for(gw)) as c:
        frames = [
            await c.request(
                "rpc",
                method="POST",
                path="/api/projects",
                body=PROJECT,
                headers={"Idempotency-Key": "k1"},
            )
            for _ in range(2)
        ]
    assert frames[0]["body"] == frames[1]["body"]
    assert frames[1]["headers"]["Idempotent-Replayed"] == "true"


async def test_rpc_without_database_is_unavailable():
    async with running_gateway() as gw, ws_client(gw.port, token_for(gw)) as c:
        reply = await c.request("rpc", method="GET", path="/api/projects")
    assert reply["ok"] is True and reply["status"] == 503


async def test_writes_publish_change_events_to_both_channels(gw):
    api = ApiClient(gw.port, token_for(gw, extra={"role": "admin"}))
    token = token_for(gw, "watcher", channels=("projects", "projects:*"))
    try:
        async with ws_client(gw.port, token) as all_, ws_client(gw.port, token) as one:
            assert (await all_.request("sub", ch="projects"))["ok"]
            _, _, p = await api.call("POST", "/api/projects", PROJECT)
            created = await all_.next_push()
            # Live resources keep history: every push says where it stands.
            assert created.pop("offset") == 1 and created.pop("epoch")
            assert created == {
                "op": "msg",
                "ch": "projects",
                "data": {"type": "created", "id": p["id"], "version": 1, "data": p},
            }
            assert (await one.request("sub", ch=f"projects:{p['id']}"))["ok"]
            url = f"/api/projects/{p['id']}"
            _, _, updated = await api.call("PATCH", url, {"name": "renamed"})
            for c, ch, offset in ((all_, "projects", 2), (one, f"projects:{p['id']}", 2)):
                push = await c.next_push()
                assert push["ch"] == ch and push["data"]["type"] == "updated"
                assert push["offset"] == offset
                assert push["data"]["version"] == 2 and push["data"]["data"] == updated
            assert (await api.call("DELETE", url))[0] == 204
            for c in (all_, one):
                event = (await c.next_push())["data"]
                assert event == {"type": "deleted", "id": p["id"], "version": 2, "data": None}
            # A refused write publishes nothing.
            assert (await api.call("POST", "/api/projects", project(name="")))[0] == 422
            assert (await all_.request("ping"))["ok"] and all_.pushes == []
    finally:
        api.close()


async def test_change_events_reach_sockets_on_another_gateway(clean_db, redis_url):
    prefix = unique_prefix()
    async with (
        running_gateway(RedisBroker(redis_url, prefix), **clean_db) as a,
        running_gateway(RedisBroker(redis_url, prefix), **clean_db) as b,
    ):
        api = ApiClient(a.port, token_for(a, extra={"role": "admin"}))
        try:
            async with ws_client(b.port, token_for(b, channels=("projects",))) as c:
                assert (await c.request("sub", ch="projects"))["ok"]
                _, _, p = await api.call("POST", "/api/projects", PROJECT)
                push = await c.next_push()
        finally:
            api.close()
    assert push["data"]["type"] == "created" and push["data"]["id"] == p["id"]
