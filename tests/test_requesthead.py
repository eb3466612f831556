"""core/infra/requesthead.py: the strict parser decides as Tornado's, or leaves the head to it.

For every head here (plain handshakes, then hostile ones, then random
mutations of a handshake), whenever the strict parser answers, Tornado's
parser and router checks accept the same head and give the same start line
and the same headers; and `parse_head` raises Tornado's error exactly when
Tornado refuses the head.
"""

from __future__ import annotations

import random

import pytest
from tornado import httputil

from core.infra.listener import _oversized
from core.infra.requesthead import MAX_QUERY_FIELDS, _plain, parse_head, within

_HANDSHAKE = (
    b"GET /ws?token=abc.def.ghi HTTP/1.1\r\n"
    b"Host: 127.0.0.1:8888\r\n"
    b"Upgrade: websocket\r\n"
    b"Connection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n"
    b"Sec-WebSocket-Protocol: gateway.v1.json, gateway.v1.msgpack\r\n"
    b"\r\n"
)


def _tornado(data: bytes) -> tuple[httputil.RequestStartLine, list[tuple[str, str]]] | None:
    """What Tornado reads from the head, None when it refuses it."""
    end = data.find(b"\r\n\r\n")
    text = data[: end + 4].decode("latin-1")
    eol = text.find("\n")
    try:
        start = httputil.parse_request_start_line(text[:eol].rstrip("\r"))
        headers = httputil.HTTPHeaders.parse(text[eol:])
        httputil.HTTPServerRequest(headers=headers, start_line=start)
    except httputil.HTTPInputError:
        return None
    return start, list(headers.get_all())


def _check(data: bytes) -> bool:
    """Assert the strict parser agrees with Tornado on ``data``; whether it answered."""
    end = data.find(b"\r\n\r\n")
    assert end >= 0
    expected = _tornado(data)
    plain = _plain(data, end)
    if plain is not None:
        assert expected is not None, data
        assert (plain[0], list(plain[1].get_all())) == expected, data
    try:
        start, headers = parse_head(data, end)
    except httputil.HTTPInputError:
        assert expected is None, data
    else:
        assert (start, list(headers.get_all())) == expected, data
    return plain is not None


def _with(*lines: bytes, start: bytes = b"GET /ws HTTP/1.1") -> bytes:
    return start + b"\r\n" + b"".join(line + b"\r\n" for line in lines) + b"\r\n"


PLAIN = [
    _HANDSHAKE,
    _with(b"Host: example.com"),
    _with(b"host:example.com", b"UPGRADE:  websocket \t"),
    _with(b"Host: [::1]:8888", b"X-Empty:", b"X-Spaces:   "),
    _with(b"Host: a", b"X-Tab: a\tb", b"Authorization: Bearer x.y.z"),
    _with(b"Host: a", start=b"GET /ws?a=1&b=2;c HTTP/1.1"),
]

HOSTILE = [
    _with(b"Upgrade: websocket"),  # no Host
    _with(b"Host: a", b"Host: b"),  # two
    _with(b"Host: a,b"),
    _with(b"Host: a", b"host: a"),
    _with(b"Host:"),
    _with(b"Host: a b"),
    _with(b"Host: a:port"),
    _with(b"Host: %41"),
    _with(b"Host: a", b" folded"),
    _with(b"Host: a", b"\tfolded"),
    _with(b"Host: a", b"Bad Name: x"),
    _with(b"Host: a", b"Bad\x00Name: x"),
    _with(b"Host: a", b": empty name"),
    _with(b"Host: a", b"No-Colon"),
    _with(b"Host: a", b"X: a\x00b"),
    _with(b"Host: a", b"X: a\x7fb"),
    _with(b"Host: a", b"X: caf\xe9"),
    _with(b"Host: a", b"X: a\rb"),
    _with(b"Host: a", b"X: a\nb"),
    _with(b"Host: a", b"X: a\x0bb"),
    _with(b"Host: a", b"Set-Cookie: a", b"Set-Cookie: b"),
    _with(b"Host: a", b"Sec-WebSocket-Protocol: a", b"sec-websocket-protocol: b"),
    _with(b"Host: a", start=b"GET /ws HTTP/1.0"),
    _with(b"Host: a", start=b"GET /ws HTTP/2.0"),
    _with(b"Host: a", start=b"GET /ws HTTP/1.1 extra"),
    _with(b"Host: a", start=b"GET  /ws HTTP/1.1"),
    _with(b"Host: a", start=b"get /ws HTTP/1.1"),
    _with(b"Host: a", start=b"POST /ws HTTP/1.1"),
    _with(b"Host: a", start=b"GET /w\xffs HTTP/1.1"),
    _with(b"Host: a", start=b"GET /w\x01s HTTP/1.1"),
    _with(b"Host: a", start=b"GET /ws?" + b"&".join([b"a=1"] * 2000) + b" HTTP/1.1"),
    _with(
        b"Host: a", start=b"GET /ws?" + b"&".join([b"a=1"] * (MAX_QUERY_FIELDS + 1)) + b" HTTP/1.1"
    ),
    b"GET /ws HTTP/1.1\nHost: a\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nHost: a\nX: b\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nHost: a\rX: b\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nHost: a\r\r\n\r\n",
]


@pytest.mark.parametrize("data", PLAIN)
def test_plain_heads_are_parsed_here_as_tornado_parses_them(data: bytes) -> None:
    assert _check(data)


@pytest.mark.parametrize("data", HOSTILE)
def test_hostile_heads_are_left_to_tornado(data: bytes) -> None:
    assert not _check(data)


def test_random_mutations_of_a_handshake_decide_as_tornado() -> None:
    rng = random.Random(21)
    alphabet = b" \t\r\n:,;\x00\x7f\xe9\xff[]%-_Hh" + bytes(range(0x21, 0x7F, 7))
    answered = 0
    for _ in range(4000):
        data = bytearray(_HANDSHAKE[:-4])
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(len(data))
            byte = alphabet[rng.randrange(len(alphabet))]
            if rng.random() < 0.5:
                data[at] = byte
            else:
                data.insert(at, byte)
        head = bytes(data) + b"\r\n\r\n"
        if head.find(b"\r\n\r\n") < len(head) - 4:
            continue  # the head ends earlier: another head
        answered += _check(head)
    assert answered > 500  # the strict parser still takes most small changes


def test_a_head_said_within_the_limit_is_not_oversized():
    """`within` spares the listener its measure only where the measure would pass."""
    rng = random.Random(7)
    spared = 0
    for _ in range(3000):
        lines = [f"X-{i}:{'v' * rng.randrange(0, 40)}" for i in range(rng.randrange(0, 30))]
        path = "/ws?" + "t" * rng.randrange(0, 300)
        data = _with(
            b"Host: a", *(line.encode() for line in lines), start=f"GET {path} HTTP/1.1".encode()
        )
        end = data.find(b"\r\n\r\n")
        start, headers = parse_head(data, end)
        for limit in (end - 50, end - 10, end, end + 10, end + 100):
            if within(data, end, limit):
                spared += 1
                assert _oversized(start, headers, limit) is None, (data, limit)
    assert spared > 3000
