"""The AsyncAPI 3.0 document: generated from proto's types, served, and valid.

The structural checks always run; the official ``@asyncapi/parser`` runs too
when ``node`` and ``npm`` are on PATH (installed once into a cache outside
the repository).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import msgspec
import pytest
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

import proto.frames
from core import __version__
from core.infra.broker import BrokerUnavailable
from core.infra.identity import AuthError, Identity
from core.infra.metrics import Metrics
from core.infra.rate import Rate
from gateway.asyncapi import COMMANDS, PUSHES, Documents, document
from gateway.hub import Hub
from gateway.node import Node
from gateway.session import Session
from proto import (
    ANY_COMMAND_ERRORS,
    COMMAND_CLOSES,
    COMMAND_ERRORS,
    JSON_CODEC,
    SERVER_CLOSES,
    Call,
    CloseCode,
    Connection,
    ErrorBody,
    ErrorCode,
    Expiring,
    Gap,
    Grants,
    History,
    Join,
    Leave,
    Ping,
    Position,
    PresenceInfo,
    PresenceQuery,
    PresenceStats,
    Pub,
    Push,
    Refresh,
    Reply,
    Rpc,
    State,
    Sub,
    Subscribed,
    Unsub,
    Unsubscribed,
)
from tests.harness import ApiClient, running_gateway
from tests.servers import UNIT
from tests.test_session import RecordingBroker, RecordingTransport

PARSER_DIR = Path(
    os.environ.get(
        "ASYNCAPI_PARSER_DIR", Path.home() / ".cache" / "gateway-tests" / "asyncapi-parser"
    )
)
INFO = PresenceInfo(user="bob", client="c1", info={"name": "Bob"})
#: One instance of every frame type, as the gateway or a client encodes it.
EXAMPLES: list[msgspec.Struct] = [
    Sub(id=1, ch="projects", since=Position(offset=4, epoch="9f3a")),
    Unsub(id=2, ch="room:1"),
    Pub(id=3, ch="room:1", data=msgspec.Raw(b'{"text":"hi"}')),
    Ping(id=4),
    Rpc(
        id=5,
        method="POST",
        path="/api/projects",
        body=msgspec.Raw(b"{}"),
        headers={"If-Match": '"1"'},
    ),
    Refresh(id=6, token="a.b.c"),
    Call(id=11, method="orders.quote", data=msgspec.Raw(b'{"items":3}')),
    Sub(id=12, ch="private:ada", data=msgspec.Raw(b'{"invite":"x1"}')),
    History(id=7, ch="projects", since=40, limit=20),
    PresenceQuery(id=8, ch="room:1"),
    PresenceStats(id=9, ch="room:1"),
    Reply(id=1, ok=True, recovered=True, offset=45, epoch="9f3a"),
    Reply(id=None, ok=False, error=ErrorBody(code=100, message="malformed frame")),
    Reply(id=5, ok=True, status=201, headers={"ETag": '"1"'}, body=msgspec.Raw(b'{"id":7}')),
    Reply(id=10, ok=True, presence=[INFO], num_clients=1, num_users=1),
    Reply(id=11, ok=True, data=msgspec.Raw(b'{"total":12.5}')),
    Reply(id=11, ok=False, error=ErrorBody(code=404, message="no method x")),
    Push(ch="projects", data={"type": "created"}, offset=46, epoch="9f3a"),
    Expiring(exp=1795600000),
    Gap(ch="projects"),
    Subscribed(ch="room:7"),
    Subscribed(ch="projects:7", offset=42, epoch="9f3a"),
    Unsubscribed(ch="user:42", code=103, message="the refreshed token does not allow this channel"),
    Unsubscribed(ch="room:7", code=118, message="unsubscribed by the server"),
    Join(ch="room:1", info=INFO),
    Leave(ch="room:1", info=INFO),
]


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    return document("1.0.0")


def resolve(doc: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = doc
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for v in node.values() for r in refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in refs(v)]
    return []


def payload_schema(doc: dict[str, Any], message: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    ref = message["payload"]["$ref"]
    return ref.rsplit("/", 1)[1], resolve(doc, ref)


def validator(doc: dict[str, Any], name: str) -> Draft202012Validator:
    resource = Resource.from_contents(doc, default_specification=DRAFT202012)
    registry = Registry().with_resource("urn:asyncapi", resource)
    schema = {"$ref": f"urn:asyncapi#/components/schemas/{name}"}
    return Draft202012Validator(schema, registry=registry)


def test_structure_and_every_reference_resolves(doc):
    assert doc["asyncapi"] == "3.0.0"
    assert doc["info"]["version"] == "1.0.0" and doc["info"]["title"]
    assert {c["address"] for c in doc["channels"].values()} == {
        "/ws",
        "/sse",
        "/lp",
        "/lp/{session}",
    }
    all_refs = refs(doc)
    assert len(all_refs) > 50
    for ref in all_refs:
        resolve(doc, ref)  # raises KeyError when dangling
    for name, op in doc["operations"].items():
        assert op["action"] in ("send", "receive"), name
        channel = op["channel"]["$ref"]
        for message in op.get("messages", []):
            assert message["$ref"].startswith(channel + "/messages/"), (name, message)


def test_every_message_payload_is_a_proto_struct(doc):
    frame_types = {
        t.__name__: t
        for t in vars(proto.frames).values()
        if isinstance(t, type) and issubclass(t, msgspec.Struct)
    }
    checked = set()
    for message in doc["components"]["messages"].values():
        name, schema = payload_schema(doc, message)
        if name not in frame_types:
            continue
        t = frame_types[name]
        config = t.__struct_config__
        expected = ([config.tag_field] if config.tag_field else []) + [
            f.encode_name for f in msgspec.structs.fields(t)
        ]
        assert list(schema["properties"]) == expected, name
        required = [f.encode_name for f in msgspec.structs.fields(t) if f.required]
        assert (
            schema.get("required", [])
            == ([config.tag_field] if config.tag_field else []) + required
        )
        checked.add(name)
    assert checked >= {t.__name__ for t in (*COMMANDS, Reply, *PUSHES)}


def test_every_command_and_push_is_a_socket_message(doc):
    socket = doc["channels"]["socket"]["messages"]
    on_socket = {payload_schema(doc, resolve(doc, m["$ref"]))[0] for m in socket.values()}
    tagged = {
        t.__name__
        for t in vars(proto.frames).values()
        if isinstance(t, type) and issubclass(t, msgspec.Struct) and t.__struct_config__.tag
    }
    assert tagged == {t.__name__ for t in (*COMMANDS, *PUSHES)}
    assert on_socket == tagged | {"Reply"}
    commands = {op["messages"][0]["$ref"] for op in doc["operations"].values()
                if op["action"] == "receive" and op["channel"]["$ref"] == "#/channels/socket"}  # fmt: skip
    assert len(commands) == len(COMMANDS)
    close_codes = resolve(doc, "#/components/schemas/CloseCode")["enum"]
    assert 4000 in close_codes and 4502 in close_codes
    assert "| 4501 | `FORBIDDEN` | no |" in doc["channels"]["socket"]["description"]


@pytest.mark.parametrize("frame", EXAMPLES, ids=lambda f: type(f).__name__)
def test_what_proto_encodes_validates_against_the_document(doc, frame):
    instance = json.loads(JSON_CODEC.encode(frame))
    validator(doc, type(frame).__name__).validate(instance)


def test_the_schemas_refuse_what_proto_refuses(doc):
    assert not validator(doc, "Sub").is_valid({"op": "sub", "id": 1, "ch": "room 1"})
    assert not validator(doc, "Sub").is_valid({"op": "sub", "id": 1, "ch": "x", "extra": 1})
    assert not validator(doc, "Rpc").is_valid({"op": "rpc", "id": 1, "method": "GET", "path": "/x"})
    batch = {"messages": [{"id": 1, "ok": True}, {"op": "gap", "ch": "projects"}], "cursor": 2}
    assert validator(doc, "LongPollBatch").is_valid(batch)


async def test_served_and_linked_from_the_rest_docs():
    async with running_gateway() as gw:
        api = ApiClient(gw.port, None)
        try:
            status, headers, served = await api.call("GET", "/asyncapi.json")
            _, _, openapi = await api.call("GET", "/openapi.json")
        finally:
            api.close()
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert served == document(__version__, f"127.0.0.1:{gw.port}")  # the host asked
    # It names the Host it was asked with: a shared cache whose key leaves Host out (nginx's
    # proxy_cache_key is $scheme$proxy_host$request_uri) must not give it to another client.
    assert headers["Vary"] == "Host"
    assert "(/asyncapi.json)" in openapi["info"]["description"]


async def _served_host(port: int, host: bytes | None) -> Any:
    """The servers' ``host`` default of ``/asyncapi.json`` asked with ``Host: host``."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        field = b"" if host is None else b"Host: " + host + b"\r\n"
        version = b"HTTP/1.0" if host is None else b"HTTP/1.1"
        writer.write(
            b"GET /asyncapi.json " + version + b"\r\n" + field + b"Connection: close\r\n\r\n"
        )
        answer = await asyncio.wait_for(reader.read(), 5 * UNIT)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200")), head
    servers = json.loads(body)["servers"]
    hosts = {s["variables"]["host"]["default"] for s in servers.values()}
    assert len(hosts) == 1, hosts
    return hosts.pop()


async def test_the_document_names_the_host_the_client_reached():
    """Found by the operations review of 2026-12-02: the servers' ``host`` was the bind address,
    ``0.0.0.0:8888`` with ``HOST=0.0.0.0`` (every container), of no use to a reader or a
    generated client. It is the request's ``Host`` when that is a valid host[:port]; anything
    else (which Tornado lets through) puts nothing of its own in the document."""
    async with running_gateway(host="0.0.0.0") as gw:
        configured = f"{gw.settings.host}:{gw.settings.port}"  # 0.0.0.0:0: as configured
        for asked in (b"gw.example.com", b"gw.example.com:443", b"10.1.2.3:8888", b"[::1]:8888"):
            assert await _served_host(gw.port, asked) == asked.decode()
        crafted = [b"evil(1)", b"a%20b", b"x*y", b"it's", b"a_b.example", b"gw:99999", b"[::zz]"]
        for asked in crafted:
            assert await _served_host(gw.port, asked) == configured, asked
        assert await _served_host(gw.port, None) == configured  # HTTP/1.0, no Host


def test_documents_are_cached_per_host_and_bounded():
    documents = Documents("1.0.0", "127.0.0.1:8888")
    first = documents.body("gw.example.com")
    assert documents.body("gw.example.com") is first  # built once per host
    for i in range(5 * Documents.LIMIT):
        documents.body(f"h{i}.example")
    assert len(documents) == Documents.LIMIT
    assert json.loads(documents.body("h0.example")) == document("1.0.0", "h0.example")


_PARSE = """
const { Parser } = require('@asyncapi/parser');
const fs = require('fs');
(async () => {
  const { document, diagnostics } = await new Parser().parse(fs.readFileSync(process.argv[2], 'utf8'));
  for (const d of diagnostics) {
    console.log(JSON.stringify({ severity: d.severity, code: d.code, message: d.message, path: d.path }));
  }
  const errors = diagnostics.filter((d) => d.severity === 0);
  process.exit(errors.length === 0 && document ? 0 : 1);
})().catch((e) => { console.error(e); process.exit(2); });
"""


def official_parser() -> Path:
    """The directory holding ``@asyncapi/parser``, installed on first use."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node and npm are not on PATH: the official AsyncAPI parser cannot run")
    if not (PARSER_DIR / "node_modules" / "@asyncapi" / "parser" / "package.json").exists():
        PARSER_DIR.mkdir(parents=True, exist_ok=True)
        try:
            done = subprocess.run(
                [npm, "install", "--prefix", str(PARSER_DIR), "--no-audit", "--no-fund",
                 "@asyncapi/parser@3"],
                capture_output=True, text=True, timeout=540,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            pytest.skip("npm install @asyncapi/parser@3 timed out")
        if done.returncode != 0:
            pytest.skip(f"npm install @asyncapi/parser@3 failed: {done.stderr.strip()[-500:]}")
    return PARSER_DIR


@pytest.mark.timeout(600)
def test_the_official_asyncapi_parser_accepts_the_document(doc, tmp_path):
    directory = official_parser()
    script = directory / "parse.cjs"
    script.write_text(_PARSE)
    spec = tmp_path / "asyncapi.json"
    node = shutil.which("node")
    assert node is not None

    def parse(document: dict[str, Any]) -> subprocess.CompletedProcess[str]:
        spec.write_text(json.dumps(document))
        return subprocess.run([node, str(script), str(spec)], capture_output=True, text=True,
                              timeout=120, cwd=directory)  # fmt: skip

    done = parse(doc)
    assert done.returncode == 0, done.stdout + done.stderr
    # The parser does find errors: an operation's message from another channel.
    broken = json.loads(json.dumps(doc))
    broken["operations"]["ws_sub"]["messages"] = [{"$ref": "#/channels/events/messages/SSE_msg"}]
    refused = parse(broken)
    assert refused.returncode == 1 and "asyncapi3-operation-messages" in refused.stdout


# -- every code the gateway sends is in the document, per operation ----------------------

ROOT = Path(__file__).resolve().parent.parent


def _documented(doc: dict[str, Any], key: str) -> set[int]:
    found = set(doc["channels"]["socket"].get(key, []))
    for op in doc["operations"].values():
        found |= set(op.get(key, []))
    return found


def _sources() -> list[Path]:
    """The modules that answer clients: the gateway (not its client or load tool) and proto."""
    gateway = [p for p in (ROOT / "gateway").rglob("*.py")
               if not {"client", "loadtest"} & set(p.parts) and p.name != "asyncapi.py"]  # fmt: skip
    return gateway + [p for p in (ROOT / "proto").rglob("*.py") if p.name != "codes.py"]


def test_every_error_and_close_code_in_the_code_is_documented(doc):
    text = "\n".join(p.read_text() for p in _sources())
    errors = {ErrorCode[n] for n in re.findall(r"ErrorCode\.([A-Z_]+)", text)}
    closes = {CloseCode[n] for n in re.findall(r"CloseCode\.([A-Z_]+)", text)}
    assert len(errors) >= 15 and {CloseCode.PROTOCOL_ERROR, CloseCode.INVALID_DATA} <= closes
    assert {int(e) for e in errors} <= _documented(doc, "x-errors")
    assert {int(c) for c in closes} <= _documented(doc, "x-close-codes")


def test_each_command_operation_lists_its_errors_and_closes(doc):
    assert set(COMMAND_ERRORS) == {t.__struct_config__.tag for t in COMMANDS}
    for op, specific in COMMAND_ERRORS.items():
        documented = doc["operations"][f"ws_{op}"]
        assert documented["x-errors"] == sorted({*ANY_COMMAND_ERRORS, *specific})
        assert documented["x-close-codes"] == sorted(COMMAND_CLOSES)
        for code in documented["x-errors"]:
            assert f"`{code}` {ErrorCode(code).name}" in documented["description"]
    assert doc["operations"]["ws_pushes"]["x-close-codes"] == sorted(SERVER_CLOSES)


async def test_what_each_command_is_answered_is_in_its_operation(doc):
    """Commands that fail every way they can, through a session: each error reply's code is
    one its operation lists, and the close after too many refusals one it lists too."""
    broker = RecordingBroker()
    node = Node(Hub(Metrics()), broker, Metrics())
    await node.start()
    grants = Grants.from_claims({"channels": ["room:*"], "pub": True})

    def refuse(token: str) -> Identity:
        if token == "other":
            return Identity("bob", grants, None)
        raise AuthError("invalid", "token refused")

    transport = RecordingTransport()
    conn = Connection(JSON_CODEC, grants, max_subscriptions=2, max_publish_bytes=64)
    s = Session(transport, conn, Identity("alice", grants, None), node, Metrics(), verify=refuse)
    s.open()
    frames: list[dict[str, Any]] = [
        {"op": "sub", "ch": "room 1"}, {"op": "sub", "ch": "secret"}, {"op": "sub"},
        {"op": "sub", "ch": "room:1"}, {"op": "sub", "ch": "room:1"}, {"op": "sub", "ch": "room:2"},
        {"op": "sub", "ch": "room:3"}, {"op": "unsub", "ch": "room:9"},
        {"op": "unsub", "ch": "room 9"}, {"op": "pub", "ch": "secret", "data": 1},
        {"op": "pub", "ch": "room:1", "data": "x" * 100}, {"op": "pub", "ch": "room:1", "data": 2**70},
        {"op": "history", "ch": "room:1"}, {"op": "history", "ch": "secret"},
        {"op": "presence", "ch": "room:1"}, {"op": "presence_stats", "ch": "room:1"},
        {"op": "refresh", "token": "bad"}, {"op": "refresh", "token": "other"},
        {"op": "rpc", "method": "GET", "path": "/api/projects"}, {"op": "ping", "extra": 1},
        {"op": "nope"},
    ]  # fmt: skip
    ops = {}
    try:
        for n, frame in enumerate(frames, 1):
            ops[n] = frame["op"]
            await s.handle(json.dumps({"id": n, **frame}))
        broker.fail_subscribe = broker.fail_publish = BrokerUnavailable("down")
        for n, frame in enumerate([{"op": "sub", "ch": "room:5"},
                                   {"op": "pub", "ch": "room:1", "data": 1}], 100):  # fmt: skip
            ops[n] = frame["op"]
            await s.handle(json.dumps({"id": n, **frame}))
        broker.fail_subscribe = broker.fail_publish = None
        conn.transition(State.DRAINING)
        ops[200] = "sub"
        await s.handle(json.dumps({"id": 200, "op": "sub", "ch": "room:6"}))
    finally:
        s.closed()
        await node.close()
    seen = set()
    for reply in transport.replies():
        if reply["ok"]:
            continue
        code, op = reply["error"]["code"], ops.get(reply["id"])
        where = doc["operations"].get(f"ws_{op}", doc["channels"]["socket"])
        assert code in where["x-errors"], (op, code, reply)
        seen.add(code)
    assert seen >= {100, 101, 102, 103, 104, 105, 106, 107, 110, 113, 114, 115, 116, 117}


async def test_a_client_that_keeps_going_while_limited_gets_a_documented_close(doc):
    node = Node(Hub(Metrics()), RecordingBroker(), Metrics())
    await node.start()
    grants = Grants.from_claims({"channels": ["room:*"]})
    transport = RecordingTransport()
    s = Session(transport, Connection(JSON_CODEC, grants), Identity("alice", grants, None),
                node, Metrics(), commands=Rate(1, 60.0))  # fmt: skip
    s.open()
    try:
        for n in range(1, 4):  # one allowed, one refused, one too many
            await s.handle(json.dumps({"id": n, "op": "ping"}))
    finally:
        s.closed()
        await node.close()
    refused = [r["error"]["code"] for r in transport.replies() if not r["ok"]]
    assert refused and set(refused) <= set(doc["operations"]["ws_ping"]["x-errors"])
    assert transport.closed_with == [CloseCode.RATE_LIMITED]
    assert int(CloseCode.RATE_LIMITED) in doc["operations"]["ws_ping"]["x-close-codes"]
