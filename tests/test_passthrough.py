"""Answers passed through as they came (gateway/passthrough.py, `VerbatimReader`).

The claim to hold: an answer the reader passes on verbatim is, byte for
byte, what the task path would write after reading it (`ResponseReader`,
`response_of`, `answer_bytes`), but for the ``Date`` (the core's clock);
anything else is read and written anew. The core's side is made the way
the core makes it (`answer_bytes`), and then bent the ways a core, a
version skew or a broken peer could bend it.
"""

from __future__ import annotations

import random
import re

import pytest

from core.fastrest import answer_bytes
from core.request import Response
from gateway.corepool import Answer, ProtocolError, ResponseReader
from gateway.passthrough import Verbatim, VerbatimReader
from gateway.upstream import response_of

RID = "a1b2c3d4e5f60718"
DATE = "Tue, 01 Dec 2026 03:40:00 GMT"


def _core_writes(status: int, body: bytes | None, headers: dict[str, str]) -> bytes:
    """An answer as the core writes it to the gateway (which sent ``RID``)."""
    return answer_bytes(
        Response(status, body, {**headers, "X-Request-Id": RID}), "GET", DATE, False
    )


def _gateway_writes(raw: bytes) -> bytes:
    """What the task path writes to the client for the core's ``raw`` answer."""
    answer = ResponseReader().feed(raw)
    assert isinstance(answer, Answer)
    resp = response_of(answer)
    resp.headers["X-Request-Id"] = RID
    return answer_bytes(resp, "GET", DATE, False)


def _read(raw: bytes, pieces: int = 1) -> object:
    reader = VerbatimReader(RID)
    cut = sorted(random.Random(len(raw)).sample(range(1, len(raw)), pieces - 1))
    results = [reader.feed(raw[a:b]) for a, b in zip([0, *cut], [*cut, len(raw)], strict=True)]
    assert all(r is None for r in results[:-1])
    return results[-1]


SHAPES = [
    (200, b'{"items": [], "next": null}', {}),
    (201, b'{"id": 7}', {"Location": "/api/projects/7", "ETag": '"1"'}),
    (200, b'{"id": 7}', {"ETag": 'W/"2"', "Idempotent-Replayed": "true"}),
    (401, b'{"error": {}}', {"WWW-Authenticate": 'Bearer error="invalid_token"'}),
    (429, b'{"error": {}}', {"Retry-After": "3"}),
    (503, b'{"error": {}}', {"Retry-After": "1"}),
    (200, b"", {}),
    (200, b"x" * 70000, {"Cache-Control": "no-store"}),
]


@pytest.mark.parametrize(("status", "body", "headers"), SHAPES)
def test_the_core_s_answers_pass_through_as_the_gateway_would_write_them(status, body, headers):
    raw = _core_writes(status, body, headers)
    for pieces in (1, 2, 5):
        got = _read(raw, pieces)
        assert isinstance(got, Verbatim), raw[:200]
        assert got.status == status and got.data == raw == _gateway_writes(raw)


BENT = [
    # Written anew (and so still right): what the gateway adds, drops or spells its own way.
    lambda raw: raw.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1),
    lambda raw: raw.replace(b"\r\n", b"\r\nServer: TornadoServer/6.5\r\n", 1),
    lambda raw: raw.replace(b"\r\n", b"\r\nVary: Origin\r\n", 1),
    lambda raw: raw.replace(b"\r\n", b"\r\nAccess-Control-Allow-Origin: *\r\n", 1),
    lambda raw: raw.replace(b"\r\n", b'\r\nETag: "1"\r\n', 1),  # the gateway spells it Etag
    lambda raw: raw.replace(b"\r\n", b'\r\nEtag: "1"\r\nEtag: "2"\r\n', 1),  # once only
    lambda raw: raw.replace(b"\r\n", b'\r\nEtag:  "1" \r\n', 1),  # spaces are trimmed
    lambda raw: raw.replace(b"X-Request-Id: " + RID.encode(), b"X-Request-Id: someone-else"),
    lambda raw: raw.replace(b" OK\r\n", b" Fine\r\n"),
    lambda raw: raw.replace(b"HTTP/1.1", b"HTTP/1.0"),
    lambda raw: raw.replace(b"Content-Type: application/json\r\n", b""),
    lambda raw: b"HTTP/1.1 100 Continue\r\n\r\n" + raw,
]


@pytest.mark.parametrize("bend", range(len(BENT)))
def test_any_other_answer_is_read_and_written_anew(bend):
    raw = BENT[bend](_core_writes(200, b'{"id": 7}', {}))
    got = _read(raw)
    assert isinstance(got, Answer), raw
    assert got.body == b'{"id": 7}'


def test_malformed_answers_are_refused_as_the_answer_reader_refuses_them():
    good = _core_writes(200, b'{"id": 7}', {})
    reader = VerbatimReader(RID)
    with pytest.raises(ProtocolError):
        reader.feed(good + b"HTTP/1.1 200 OK\r\n")  # bytes past the answer
    reader = VerbatimReader(RID)
    assert reader.feed(good[:-3]) is None and reader.started
    with pytest.raises(ProtocolError):
        reader.feed_eof()  # cut short
    with pytest.raises(ProtocolError):
        VerbatimReader(RID).feed(b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 20000)
    huge = good.replace(b"Content-Length: 9", b"Content-Length: 9999999999")
    with pytest.raises(ProtocolError):
        VerbatimReader(RID).feed(huge)  # too long for the answer reader as well


def test_random_heads_pass_through_only_when_they_are_the_gateway_s_bytes():
    """Differential: random fields in random spellings; whatever comes out verbatim must equal
    the task path's bytes (Date aside, which both take from the core here)."""
    rng = random.Random(16)
    names = ["ETag", "Etag", "Location", "Retry-After", "X-Custom", "x-custom", "Server", "Vary",
             "Cache-Control", "Content-Encoding", "Keep-Alive", "WWW-Authenticate"]  # fmt: skip
    values = ['"1"', " padded ", "two  ", "x  y", "a, b", "", "http://x:80/y", "\tx"]
    verbatim = 0
    for _ in range(3000):
        fields = b"".join(
            f"{rng.choice(names)}:{rng.choice([' ', '', '  '])}{rng.choice(values)}\r\n".encode()
            for _ in range(rng.randint(0, 3))
        )
        raw = _core_writes(rng.choice([200, 201, 404, 503]), b'{"n": 1}', {})
        raw = raw.replace(b"X-Request-Id", fields + b"X-Request-Id", 1)
        got = _read(raw, rng.randint(1, 3))
        if isinstance(got, Verbatim):
            verbatim += 1
            assert got.data == raw == _gateway_writes(raw), raw
        else:
            assert isinstance(got, Answer)
    assert verbatim > 300  # the common shapes do pass through


def test_the_reason_phrase_and_request_id_are_checked_not_assumed():
    raw = _core_writes(404, b"{}", {})
    assert re.search(rb"^HTTP/1\.1 404 Not Found\r\n", raw)
    assert isinstance(_read(raw), Verbatim)
    assert isinstance(_read(raw.replace(b"404 Not Found", b"404 Gone")), Answer)
