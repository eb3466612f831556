"""The strict recogniser of a kept-alive connection's polls (gateway/transport/pollrequest.py)."""

from __future__ import annotations

import pytest
from tornado.httputil import HTTPHeaders

from gateway.transport.pollrequest import (
    INCOMPLETE,
    OTHER,
    HeadFields,
    PollRequest,
    cursor_of,
    parse,
    token_of,
)

POLL = b"GET /lp/abc_DEF-1?cursor=7 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t.o.k\r\n\r\n"


def test_a_plain_poll_is_recognised_with_what_the_poll_needs():
    request = parse(POLL + b"GET /next", 65536)
    assert isinstance(request, PollRequest)
    assert (request.sid, request.query, request.authorization, request.close) == (
        "abc_DEF-1",
        "cursor=7",
        "Bearer t.o.k",
        False,
    )
    assert request.target == b"/lp/abc_DEF-1?cursor=7"
    assert request.size == len(POLL)  # the next request starts there


def test_connection_close_and_an_empty_body_are_understood():
    request = parse(POLL[:-2] + b"Connection: Close\r\nContent-Length: 0\r\n\r\n", 65536)
    assert isinstance(request, PollRequest) and request.close
    request = parse(POLL[:-2] + b"connection: keep-alive\r\n\r\n", 65536)
    assert isinstance(request, PollRequest) and not request.close
    request = parse(b"GET /lp/s HTTP/1.1\r\nHost: x\r\n\r\n", 65536)  # no query
    assert (
        isinstance(request, PollRequest) and request.query == "" and request.authorization is None
    )


def test_a_head_not_yet_complete_is_read_on_until_it_is_over_the_limit():
    for cut in range(len(POLL) - 1):
        assert parse(POLL[:cut], 65536) == INCOMPLETE
    assert parse(POLL[:-1], len(POLL) - 2) == OTHER
    assert parse(POLL, len(POLL) - 5) == OTHER  # complete, but over the limit (Tornado's 431)
    assert isinstance(parse(POLL, len(POLL)), PollRequest)  # Tornado counts the blank line
    assert parse(POLL, len(POLL) - 1) == OTHER


@pytest.mark.parametrize(
    "data",
    [POLL, POLL.replace(b"Host: x", b"X: a\r"), POLL.replace(b"\r\n\r\n", b"\r\n\n")],
)
def test_a_head_read_in_pieces_is_read_as_a_head_read_whole(data):
    # Each call searches only what came since the last (less three bytes): wherever the
    # pieces are cut, the outcome is the one reading it whole gives.
    whole = parse(data, 65536)
    for cut in range(1, len(data)):
        first = parse(data[:cut], 65536)
        if first != INCOMPLETE:
            assert first == whole == OTHER
            continue
        again = parse(data, 65536, cut)
        assert type(again) is type(whole)
        if isinstance(whole, PollRequest):
            assert isinstance(again, PollRequest)
            assert (again.sid, again.size, again.head) == (whole.sid, whole.size, whole.head)
        else:
            assert again == whole


@pytest.mark.parametrize(
    "data",
    [
        b"POST /lp/abc HTTP/1.1\r\nContent-Length: 2\r\n\r\n[]",
        b"get /lp/abc HTTP/1.1\r\n\r\n",
        b"GET /lp/abc HTTP/1.0\r\n\r\n",
        b"GET /lp/abc HTTP/1.1 \r\n\r\n",
        b"GET  /lp/abc HTTP/1.1\r\n\r\n",
        b"GET /lp/abc/x HTTP/1.1\r\n\r\n",
        b"GET /lp/a%2Fb HTTP/1.1\r\n\r\n",
        b"GET /lp/" + b"a" * 65 + b" HTTP/1.1\r\n\r\n",
        b"GET /lp HTTP/1.1\r\n\r\n",
        b"GET /ws HTTP/1.1\r\n\r\n",
        b"GET http://x/lp/abc HTTP/1.1\r\n\r\n",
        b"GET /lp/abc?c=\xff HTTP/1.1\r\n\r\n",
        b"\r\nGET /lp/abc HTTP/1.1\r\n\r\n",
        b"GET /lp/abc HTTP/1.1\nHost: x\n\n",
        b"GET /lp/abc HTTP/1.1\r\nHost: x\n\r\n",
        b"GET /lp/abc HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n",
        b"GET /lp/abc HTTP/1.1\r\nHost : x\r\n\r\n",
        b"GET /lp/abc HTTP/1.1\r\nNo colon\r\n\r\n",
        b"GET /lp/abc HTTP/1.1\r\n: empty name\r\n\r\n",
        b"GET /lp/abc HTTP/1.1\r\nX: a\x00b\r\n\r\n",
        b"GET /lp/abc HTTP/1.1\r\nX: caf\xc3\xa9\r\n\r\n",
        b"GET /lp/abc HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
        b"GET /lp/abc HTTP/1.1\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n",
        b"GET /lp/abc HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"GET /lp/abc HTTP/1.1\r\nExpect: 100-continue\r\n\r\n",
        b"GET /lp/abc HTTP/1.1\r\nUpgrade: websocket\r\n\r\n",
        b"GET /lp/abc HTTP/1.1\r\nAuthorization: Bearer a\r\nAuthorization: Bearer b\r\n\r\n",
        b"GET /lp/abc HTTP/1.1\r\nConnection: close\r\nConnection: keep-alive\r\n\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\nGET /lp/abc HTTP/1.1\r\n\r\n",
        # Tornado's router refuses these Hosts (400): a missing, a repeated, a malformed one
        b"GET /lp/abc HTTP/1.1\r\nAuthorization: Bearer t\r\n\r\n",
        b"GET /lp/abc HTTP/1.1\r\nHost: x\r\nhost: y\r\n\r\n",
        b"GET /lp/abc HTTP/1.1\r\nHost: a b/c\r\n\r\n",
        b"GET /lp/abc HTTP/1.1\r\nHost:\r\n\r\n",
    ],
)
def test_anything_else_goes_back_to_tornado(data):
    assert parse(data, 65536) == OTHER


def test_cursor_and_token_are_read_as_on_tornados_path():
    assert cursor_of("") == 0 and cursor_of("cursor=12") == 12
    assert cursor_of("cursor=1&cursor=5") == 5
    assert cursor_of("cursor=x") is None and cursor_of("cursor=") is None
    assert token_of("Bearer abc", "token=zzz") == "abc"
    assert token_of(None, "cursor=1&token=zzz") == "zzz"
    assert token_of("Basic abc", "token=zzz") == "zzz"
    assert token_of(None, "") == "" and token_of("Bearer ", "") == ""


@pytest.mark.parametrize(
    "fields",
    [
        b"X-Forwarded-For: 203.0.113.9",
        b"x-forwarded-for:203.0.113.9, 10.0.0.1 \t",
        b"X-Forwarded-For: 198.51.100.7\r\nAccept: */*\r\nX-FORWARDED-FOR: 203.0.113.9",
        b'Forwarded: for=203.0.113.9;proto=https\r\nforwarded: for="[2001:db8::1]"',
        b"X-Forwarded-For-Not: 192.0.2.1\r\nX-Forwarded: 192.0.2.2",
        b"Accept: */*",
    ],
)
def test_a_polls_forwarding_header_reads_as_tornado_reads_it(fields):
    # Behind a trusted proxy each poll names its client (the answer budget groups by it):
    # read off the head as Tornado's HTTPHeaders would, without building one per poll.
    request = parse(POLL[:-2] + fields + b"\r\n\r\n", 65536)
    assert isinstance(request, PollRequest)
    tornado = HTTPHeaders.parse(request.head.decode("latin-1").partition("\r\n")[2])
    for name in ("X-Forwarded-For", "Forwarded"):
        assert HeadFields(request.head).get_list(name) == tornado.get_list(name), name
