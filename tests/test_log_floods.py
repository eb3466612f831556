"""What one client can put in the operators' logs: how many warnings, and which bytes.

Found by the logs-and-metrics review of the fourteenth session (2026-12-03):

* every 4xx was an access line at ``WARNING`` (the server API's refusals too,
  twice), so one client with no token made about 2,250 warnings a second
  on one connection (10,000 pipelined 401s and 404s in 4.4 s), and
  ``LOG_LEVEL=WARNING``, meant to keep per-request lines out, kept all of
  them. A 4xx is now an ``INFO`` line: still one per bad request.
* ``LOG_FORMAT=text`` (what ``make run`` shows on a terminal) wrote what a
  client sent as it came: a path's C1 bytes (``\\x85`` NEL, ``\\x9b`` CSI, which
  Tornado lets through) and a token's ``sub`` with line breaks and ANSI
  escapes forged lines and acted on the operator's terminal. They are
  written escaped now. (JSON lines always escaped them.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Iterator

from core.infra.logs import JsonFormatter, TextFormatter
from tests.harness import running_gateway, token_for, ws_client
from tests.servers import UNIT

ACCESS = ("gateway.access", "tornado.access", "gateway.serverapi")


def _request(method: str, path: str, extra: str = "") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}\r\n".encode()


_UPGRADE = (
    "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
)
#: Requests any client with no token can send, each refused with a 4xx where it is
#: answered: Tornado's handlers, the REST delegate and, pipelined behind a first REST
#: request, the kept-alive REST path (core/fastrest.py), the listener's refusals at the
#: headers, the socket handshake, long-poll polls and the server API. (name, request,
#: pipelined on one connection or one connection each)
BAD = [
    ("unknown path", _request("GET", "/no/such/page"), True),
    ("wrong method", _request("DELETE", "/healthz"), True),
    ("REST without a token", _request("GET", "/api/projects"), True),
    ("REST with a bad token", _request("GET", "/api/projects", "Authorization: Bearer x\r\n"), True),
    ("a body for no route", _request("POST", "/no/such/page", "Content-Length: 5\r\n") + b"hello",
     False),
    ("a socket without a token", _request("GET", "/ws", _UPGRADE), False),
    ("a poll without a token", _request("GET", "/lp/abc?cursor=1"), True),
    ("the server API without a token",
     _request("POST", "/api/server/info", "Content-Length: 2\r\n") + b"{}", False),
]  # fmt: skip
TIMES = 12


async def _answers(port: int, data: bytes, count: int) -> list[int]:
    """Send ``data`` on a new connection; the statuses of the first ``count`` answers."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    statuses: list[int] = []
    try:
        writer.write(data)
        while len(statuses) < count:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5 * UNIT)
            statuses.append(int(head.split(b" ", 2)[1]))
            length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
            if length:
                await asyncio.wait_for(reader.readexactly(int(length[1])), 5 * UNIT)
    finally:
        writer.close()
    return statuses


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def _logged() -> Iterator[_Records]:
    """Every record logged at INFO or above meanwhile, as the process logs it."""
    root = logging.getLogger()
    kept = _Records()
    level = root.level
    root.addHandler(kept)
    root.setLevel(logging.INFO)
    try:
        yield kept
    finally:
        root.removeHandler(kept)
        root.setLevel(level)


async def test_a_client_s_bad_requests_are_info_lines_one_each_never_warnings(clean_db):
    with _logged() as kept:
        async with running_gateway(**clean_db) as gw:
            kept.records.clear()  # what the start logged (the open /metrics warning)
            for name, request, pipelined in BAD:
                if pipelined:
                    statuses = await _answers(gw.port, request * TIMES, TIMES)
                else:
                    statuses = [(await _answers(gw.port, request, 1))[0] for _ in range(TIMES)]
                assert all(400 <= s < 500 for s in statuses), (name, statuses)
    loud = [(r.name, r.levelname, r.getMessage()) for r in kept.records if r.levelno >= 30]
    assert loud == [], loud[:5]
    access = [r for r in kept.records if r.name in ACCESS and r.levelno == logging.INFO]
    assert len(access) >= TIMES * len(BAD), [r.getMessage() for r in access]


#: A path Tornado takes (its bytes \x80-\xff are read as Latin-1: C1 controls) and a
#: ``sub`` an identity provider may put in a token.
C1_PATH = b"/x\x85\x9b31mRED"
FORGED_SUB = "eve\n2026-12-03 10:00:00,000 INFO    gateway.websocket: socket closed\x1b[2K\r"
_CONTROLS = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")


async def test_text_logs_escape_what_a_client_sent():
    with _logged() as kept:
        async with running_gateway() as gw:
            request = b"GET " + C1_PATH + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
            assert await _answers(gw.port, request, 1) == [404]
            async with ws_client(gw.port, token_for(gw, sub=FORGED_SUB)) as c:
                assert (await c.request("ping"))["ok"]
    path = C1_PATH.decode("latin-1")
    shown = [r for r in kept.records if path in r.getMessage()]
    shown += [r for r in kept.records if getattr(r, "user", None) == FORGED_SUB]
    assert len(shown) >= 3, [r.getMessage() for r in kept.records]  # 404, socket open, closed
    text, json = TextFormatter(), JsonFormatter()
    for record in shown:
        for line in (text.format(record), json.format(record)):
            assert _CONTROLS.search(line) is None, line
    assert "\\x85\\x9b31mRED" in text.format(shown[0])
    assert "user=eve\\n2026-12-03" in text.format(shown[-1])


def test_a_traceback_keeps_its_lines_but_not_a_client_s_escapes():
    try:
        raise ValueError("no route for /x\x1b[2K")
    except ValueError as exc:
        record = logging.LogRecord(
            "x", logging.ERROR, __file__, 1, "failed", (), (ValueError, exc, None)
        )
    text = TextFormatter().format(record)
    assert "\nValueError: no route for /x\\x1b[2K" in text
    assert "\x1b" not in text
