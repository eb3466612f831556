"""Protocol v1 with no event loop: codecs, errors, grants, state, frames."""

from __future__ import annotations

import json

import msgspec
import pytest

from proto import (
    APP_CLOSES,
    APP_ERRORS,
    JSON_CODEC,
    MSGPACK_CODEC,
    TRANSITIONS,
    Call,
    CloseCode,
    Connection,
    ErrorCode,
    Grants,
    InvalidGrants,
    Ping,
    ProtocolError,
    Pub,
    State,
    StateError,
    Sub,
    Unsub,
    is_temporary,
    select_codec,
    should_reconnect,
)
from proto.codes import CLOSE_REASON_MAX_BYTES, close_reason
from proto.wsframe import OP_BINARY, OP_TEXT, frame, parse_header

ALL = Grants.from_claims({"channels": ["*"]})


def conn(codec=JSON_CODEC, grants=ALL, **kw) -> Connection:
    return Connection(codec, grants, **kw)


def reply(raw: bytes, codec=JSON_CODEC) -> dict:
    return json.loads(raw) if codec is JSON_CODEC else msgspec.msgpack.decode(raw)


# -- codecs -----------------------------------------------------------------


@pytest.mark.parametrize(
    "frame_obj, expected",
    [
        ({"id": 1, "op": "sub", "ch": "room:1"}, Sub(id=1, ch="room:1")),
        ({"id": 2, "op": "unsub", "ch": "room:1"}, Unsub(id=2, ch="room:1")),
        ({"id": 4, "op": "ping"}, Ping(id=4)),
    ],
)
@pytest.mark.parametrize("codec", [JSON_CODEC, MSGPACK_CODEC])
def test_commands_decode_in_both_codecs(codec, frame_obj, expected):
    raw = json.dumps(frame_obj) if codec is JSON_CODEC else msgspec.msgpack.encode(frame_obj)
    assert codec.decode(raw) == expected


def test_json_pub_keeps_the_publishers_bytes():
    cmd = JSON_CODEC.decode(
        '{"id": 3, "op": "pub", "ch": "room:1", "data": {"b": [1, 2.50], "a": null}}'
    )
    assert isinstance(cmd, Pub)
    assert JSON_CODEC.data_to_json(cmd.data) == b'{"b": [1, 2.50], "a": null}'


def test_msgpack_pub_becomes_json_for_the_broker():
    raw = msgspec.msgpack.encode({"id": 3, "op": "pub", "ch": "c", "data": {"n": 1, "s": "é"}})
    cmd = MSGPACK_CODEC.decode(raw)
    assert json.loads(MSGPACK_CODEC.data_to_json(cmd.data)) == {"n": 1, "s": "é"}


@pytest.mark.parametrize("codec", [JSON_CODEC, MSGPACK_CODEC])
def test_push_round_trips_what_was_published(codec):
    data = b'{"any":"json","n":[1,2,3]}'
    payload = codec.encode_push("room:1", data)
    decoded = reply(payload, codec)
    assert decoded == {"op": "msg", "ch": "room:1", "data": {"any": "json", "n": [1, 2, 3]}}


def test_json_push_embeds_data_verbatim():
    assert (
        JSON_CODEC.encode_push('we"ird', b"[1, 2]") == b'{"op":"msg","ch":"we\\"ird","data":[1, 2]}'
    )


@pytest.mark.parametrize(
    "raw, code, id",
    [
        ("not json", ErrorCode.BAD_FRAME, None),
        ("[1, 2]", ErrorCode.BAD_FRAME, None),
        ("", ErrorCode.BAD_FRAME, None),
        ('{"id": 7, "op": "dance"}', ErrorCode.UNKNOWN_OP, 7),
        ('{"id": 7}', ErrorCode.BAD_FRAME, 7),
        ('{"op": "ping"}', ErrorCode.BAD_FRAME, None),
        ('{"id": -1, "op": "ping"}', ErrorCode.BAD_FRAME, None),
        ('{"id": 9007199254740992, "op": "ping"}', ErrorCode.BAD_FRAME, None),
        ('{"id": "1", "op": "ping"}', ErrorCode.BAD_FRAME, None),
        ('{"id": 8, "op": "sub"}', ErrorCode.BAD_FRAME, 8),
        ('{"id": 8, "op": "sub", "ch": ""}', ErrorCode.INVALID_CHANNEL, 8),
        ('{"id": 8, "op": "sub", "ch": "a b"}', ErrorCode.INVALID_CHANNEL, 8),
        ('{"id": 8, "op": "sub", "ch": "room:*"}', ErrorCode.INVALID_CHANNEL, 8),
        ('{"id": 8, "op": "sub", "ch": "' + "x" * 201 + '"}', ErrorCode.INVALID_CHANNEL, 8),
        ('{"id": 8, "op": "sub", "ch": "a", "extra": 1}', ErrorCode.BAD_FRAME, 8),
        ('{"id": 8, "op": "pub", "ch": "a"}', ErrorCode.BAD_FRAME, 8),
        ('{"id": 8, "op": "pub", "ch": "a", "data": }', ErrorCode.BAD_FRAME, None),
        # A lone surrogate escape (a browser's JSON.stringify of a sliced emoji) is JSON no
        # codec carries: the sender is told which command failed, not left to its timeout.
        ('{"id": 9, "op": "pub", "ch": "a", "data": {"t": "\\ud83d"}}', ErrorCode.BAD_FRAME, 9),
        ('{"id": 9, "op": "pub", "ch": "a", "data": "\\ude00!"}', ErrorCode.BAD_FRAME, 9),
        ('{"id": 9, "op": "sub", "ch": "a\\udbff"}', ErrorCode.BAD_FRAME, 9),
        ('{"id": 9, "op": "sub", "ch": "a\\uDBFF\\\\ud800"}', ErrorCode.BAD_FRAME, 9),
        (
            '{"id": 9, "op": "pub", "ch": "a", "data": NaN, "t": "\\ud83d"}',
            ErrorCode.BAD_FRAME,
            None,
        ),
        ('{"id": "9", "op": "pub", "ch": "a", "data": "\\ud83d"}', ErrorCode.BAD_FRAME, None),
    ],
)
def test_bad_frames_become_error_replies_with_the_id_when_known(raw, code, id):
    c = conn()
    with pytest.raises(ProtocolError) as info:
        c.receive(raw)
    assert info.value.code == code
    body = reply(c.error(info.value))
    assert body["id"] == id and body["ok"] is False
    assert body["error"]["code"] == int(code)
    assert body["error"]["temporary"] is False
    assert c.state is State.OPEN  # the connection survives


def test_msgpack_connection_refuses_text_frames_and_garbage():
    c = conn(MSGPACK_CODEC)
    for raw in ('{"id": 1, "op": "ping"}', b"\xc1\xc1", msgspec.msgpack.encode([1])):
        with pytest.raises(ProtocolError) as info:
            c.receive(raw)
        assert info.value.code == ErrorCode.BAD_FRAME
        assert reply(c.error(info.value), MSGPACK_CODEC)["ok"] is False


def test_select_codec_follows_the_clients_first_supported_offer():
    assert select_codec([]) == (JSON_CODEC, None)
    assert select_codec(["chat", "gw.v1.msgpack", "gw.v1.json"]) == (MSGPACK_CODEC, "gw.v1.msgpack")
    assert select_codec(["gw.v1.json"]) == (JSON_CODEC, "gw.v1.json")
    assert select_codec(["other"]) == (JSON_CODEC, None)


# -- connection state ------------------------------------------------------


def test_subscription_rules():
    c = conn(grants=Grants.from_claims({"channels": ["room:*"]}), max_subscriptions=2)
    assert c.receive('{"id": 1, "op": "sub", "ch": "room:1"}') == Sub(1, "room:1")
    c.subscribed("room:1")
    for raw, code in [
        ('{"id": 2, "op": "sub", "ch": "room:1"}', ErrorCode.ALREADY_SUBSCRIBED),
        ('{"id": 3, "op": "sub", "ch": "user:bob"}', ErrorCode.PERMISSION_DENIED),
        ('{"id": 4, "op": "unsub", "ch": "room:2"}', ErrorCode.NOT_SUBSCRIBED),
        ('{"id": 5, "op": "pub", "ch": "user:bob", "data": 1}', ErrorCode.PERMISSION_DENIED),
    ]:
        with pytest.raises(ProtocolError) as info:
            c.receive(raw)
        assert info.value.code == code, raw
    c.receive('{"id": 6, "op": "sub", "ch": "room:2"}')
    c.subscribed("room:2")
    with pytest.raises(ProtocolError) as info:
        c.receive('{"id": 7, "op": "sub", "ch": "room:3"}')
    assert info.value.code == ErrorCode.LIMIT_EXCEEDED
    assert c.receive('{"id": 8, "op": "unsub", "ch": "room:2"}') == Unsub(8, "room:2")


def test_publish_size_limit():
    c = conn(max_publish_bytes=10)
    c.receive('{"id": 1, "op": "pub", "ch": "a", "data": "12345678"}')
    with pytest.raises(ProtocolError) as info:
        c.receive('{"id": 2, "op": "pub", "ch": "a", "data": "123456789"}')
    assert info.value.code == ErrorCode.PAYLOAD_TOO_LARGE


def test_draining_refuses_new_subscriptions_but_not_pings():
    c = conn()
    c.transition(State.DRAINING)
    with pytest.raises(ProtocolError) as info:
        c.receive('{"id": 1, "op": "sub", "ch": "a"}')
    assert info.value.code == ErrorCode.CLOSING and is_temporary(ErrorCode.CLOSING)
    assert c.receive('{"id": 2, "op": "ping"}') == Ping(2)


def test_closed_refuses_everything():
    c = conn()
    c.transition(State.CLOSED)
    with pytest.raises(ProtocolError) as info:
        c.receive('{"id": 2, "op": "ping"}')
    assert info.value.code == ErrorCode.CLOSING


def test_transition_table_is_enforced():
    for src, targets in TRANSITIONS.items():
        for dst in State:
            c = conn()
            c.state = src
            if dst in targets:
                c.transition(dst)
                assert c.state is dst
            else:
                with pytest.raises(StateError):
                    c.transition(dst)


# -- grants ------------------------------------------------------------------


def test_grant_globs():
    g = Grants.from_claims({"channels": ["room:*", "user:alice", "t?p"]})
    assert g.can_subscribe("room:1") and g.can_subscribe("room:a:b")
    assert g.can_subscribe("user:alice") and not g.can_subscribe("user:alice2")
    assert g.can_subscribe("top") and not g.can_subscribe("toop")
    assert not g.can_subscribe("Room:1")  # case-sensitive
    assert g.can_publish("room:1")  # pub absent: publish where subscribe is allowed


def test_pub_claim_restricts_publishing():
    assert not Grants.from_claims({"channels": ["*"], "pub": False}).can_publish("a")
    g = Grants.from_claims({"channels": ["room:*", "news"], "pub": ["room:*", "elsewhere"]})
    assert g.can_publish("room:1")
    assert not g.can_publish("news")  # subscribable but not in pub
    assert not g.can_publish("elsewhere")  # in pub but not subscribable


def test_no_channels_claim_grants_nothing():
    g = Grants.from_claims({})
    assert not g.can_subscribe("a") and not g.can_publish("a")


@pytest.mark.parametrize(
    "claims",
    [{"channels": "room:*"}, {"channels": [1]}, {"channels": ["a"], "pub": "yes"}, {"pub": [2]}],
)
def test_malformed_grant_claims_are_refused(claims):
    with pytest.raises(InvalidGrants):
        Grants.from_claims(claims)


def test_identical_claims_share_one_grants_object():
    a = Grants.from_claims({"channels": ["room:*"], "pub": False})
    b = Grants.from_claims({"channels": ["room:*"], "pub": False})
    assert a is b


# -- codes -------------------------------------------------------------------


def test_close_code_ranges_tell_clients_whether_to_reconnect():
    for code in CloseCode:
        if 4000 <= code < 4500:
            assert should_reconnect(code)
        elif 4500 <= code < 5000:
            assert not should_reconnect(code)
        assert len(close_reason(code).encode()) <= CLOSE_REASON_MAX_BYTES
    assert should_reconnect(1006) and not should_reconnect(1009)


def test_every_error_code_has_a_message():
    for code in ErrorCode:
        body = json.loads(JSON_CODEC.error(1, code))
        assert body["error"]["message"] and body["error"]["code"] == int(code)


# -- frames ------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 70000])
@pytest.mark.parametrize("binary", [False, True])
def test_server_frames_have_rfc6455_headers(size, binary):
    payload = b"x" * size
    data = frame(payload, binary)
    opcode, fin, header, length = parse_header(data)
    assert fin and length == size and opcode == (OP_BINARY if binary else OP_TEXT)
    assert data[1] & 0x80 == 0  # unmasked
    assert data[header:] == payload


# -- call, and what a hook's backend may answer -----------------------------------


@pytest.mark.parametrize("codec", [JSON_CODEC, MSGPACK_CODEC])
def test_call_decodes_with_and_without_data(codec):
    def encode(obj: dict) -> bytes | str:
        return json.dumps(obj) if codec is JSON_CODEC else msgspec.msgpack.encode(obj)

    bare = conn(codec).receive(encode({"id": 7, "op": "call", "method": "orders.quote"}))
    assert bare == Call(id=7, method="orders.quote") and not bare.data
    full = conn(codec).receive(encode({"id": 8, "op": "call", "method": "a/b-c:d_e", "data": [1]}))
    assert isinstance(full, Call) and json.loads(codec.data_to_json(full.data)) == [1]


@pytest.mark.parametrize("method", ["", "has space", "new\nline", "é", "x" * 201])
def test_a_call_method_is_short_and_plain(method):
    with pytest.raises(ProtocolError) as refused:
        conn().receive(json.dumps({"id": 1, "op": "call", "method": method}))
    assert refused.value.code is ErrorCode.BAD_FRAME and refused.value.id == 1


def test_call_and_sub_data_are_bounded_as_a_publication_is():
    c = conn(max_publish_bytes=10)
    for frame_obj in (
        {"id": 1, "op": "call", "method": "m", "data": "x" * 20},
        {"id": 2, "op": "sub", "ch": "room:1", "data": "x" * 20},
    ):
        with pytest.raises(ProtocolError) as refused:
            c.receive(json.dumps(frame_obj))
        assert refused.value.code is ErrorCode.PAYLOAD_TOO_LARGE
    assert c.receive('{"id": 3, "op": "sub", "ch": "room:1", "data": {"a": 1}}').ch == "room:1"


def test_a_draining_connection_still_calls():
    c = conn()
    c.transition(State.DRAINING)
    assert isinstance(c.receive('{"id": 1, "op": "call", "method": "m"}'), Call)


@pytest.mark.parametrize("codec", [JSON_CODEC, MSGPACK_CODEC])
def test_data_replies_and_application_errors(codec):
    assert reply(codec.data_reply(3, b'{"total": 2}'), codec) == {
        "id": 3,
        "ok": True,
        "data": {"total": 2},
    }
    assert reply(codec.data_reply(4, None), codec) == {"id": 4, "ok": True}
    assert reply(codec.app_error(5, 404, "no such order", False), codec) == {
        "id": 5,
        "ok": False,
        "error": {"code": 404, "message": "no such order", "temporary": False},
    }
    assert 400 in APP_ERRORS and 1999 in APP_ERRORS and 100 not in APP_ERRORS
    assert 4000 in APP_CLOSES and 4999 in APP_CLOSES and 1000 not in APP_CLOSES


def test_sub_written_by_a_client_leaves_out_what_it_does_not_carry():
    assert JSON_CODEC.encode(Sub(id=1, ch="room:1")) == b'{"op":"sub","id":1,"ch":"room:1"}'
    assert JSON_CODEC.encode(Call(id=2, method="m")) == b'{"op":"call","id":2,"method":"m"}'


def test_a_regrant_keeps_the_channels_the_server_subscribed():
    c = conn(grants=Grants.from_claims({"channels": ["room:*", "user:ada"]}))
    for ch in ("room:1", "user:ada"):
        c.subscribed(ch)
    assert c.regrant(Grants.from_claims({"channels": []}), keep={"user:ada"}) == ["room:1"]
    assert c.subscriptions == {"user:ada"}


def test_a_regrant_asks_for_a_system_channel_as_a_sub_does():
    """The admin console's channel is held by the grants' system channels, not by their
    patterns: a refresh to a token that is no admin's ended it only if no pattern matched
    it (``*`` did), and a refresh that kept the admin ended it if none did."""
    admin = Grants.from_claims({"channels": ["*"]}, system=("__admin",))
    c = conn(grants=admin)
    c.subscribed("__admin")
    assert c.regrant(Grants.from_claims({"channels": []}, system=("__admin",))) == []
    assert c.regrant(Grants.from_claims({"channels": ["*"]})) == ["__admin"]
    assert c.subscriptions == set()


def test_a_channel_the_server_subscribed_is_readable_without_a_grant():
    # The history of a connect hook's channel is how a client back from a reconnect reads
    # what it missed there: a channel the connection holds needs no grant to read.
    c = conn(grants=Grants.from_claims({"channels": ["room:*"]}))
    c.subscribed("user:ada")  # made by the server, not by a `sub`
    for frame_obj in (
        {"id": 1, "op": "history", "ch": "user:ada", "since": 2},
        {"id": 2, "op": "presence", "ch": "user:ada"},
    ):
        assert c.receive(json.dumps(frame_obj)).ch == "user:ada"
    with pytest.raises(ProtocolError) as held:  # held already: 104, whatever the grants
        c.receive('{"id": 3, "op": "sub", "ch": "user:ada"}')
    assert held.value.code == 104
    with pytest.raises(ProtocolError) as other:  # another user's: no grant, no reading
        c.receive('{"id": 4, "op": "history", "ch": "user:bob"}')
    assert other.value.code == 103
    c.unsubscribed("user:ada")
    with pytest.raises(ProtocolError) as left:
        c.receive('{"id": 5, "op": "history", "ch": "user:ada"}')
    assert left.value.code == 103
