"""The one request a kept-alive long-poll connection serves itself, recognised strictly.

After its first poll, a long-poll connection is served by `PollConnection`
(gateway/transport/pollconn.py) instead of Tornado. `parse` reads the head of
the next request from the bytes received and says what it is:

* `INCOMPLETE`: no complete head yet, and not over ``max_bytes``: read on;
* a `PollRequest`: a poll in exactly the shape this path serves;
* `OTHER`: anything else, malformed or merely unusual. The connection goes
  back to Tornado with every byte still unread, and the request is answered
  there as any other (400, 405, 414, 431, 401, 404, 422...). This parser
  answers nothing itself: it accepts a subset of what Tornado accepts, and
  Tornado keeps the last word on everything outside it.

The subset: ``GET /lp/<session>[?query] HTTP/1.1``, CRLF line endings, header
names that are RFC 9110 tokens followed directly by ``:``, values of visible
ASCII, spaces and tabs; exactly one Host, as Tornado's router takes it; at
most one each of Authorization, Connection and Content-Length, the last only
``0``; no Transfer-Encoding, Expect or Upgrade; the request line, headers
and blank line within ``max_bytes``, as Tornado counts them. No I/O.
"""

from __future__ import annotations

import re
from typing import Final
from urllib.parse import parse_qs

from core.infra.identity import token_from_header

__all__ = ["INCOMPLETE", "OTHER", "HeadFields", "PollRequest", "cursor_of", "parse", "token_of"]

INCOMPLETE: Final = "incomplete"
OTHER: Final = "other"

_END = re.compile(rb"\r?\n\r?\n")
_HEAD = re.compile(
    rb"GET (/lp/([A-Za-z0-9_-]{1,64})(?:\?([\x21-\x7e]*))?) HTTP/1\.1"
    rb"((?:\r\n[!#$%&'*+.^_`|~0-9A-Za-z-]+:[\t\x20-\x7e]*)*)"
)
#: A Host Tornado takes (core/infra/requesthead.py's): a name or an IPv6 literal, a port.
_HOST = re.compile(rb"(?:[A-Za-z0-9.\-_~]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")
#: Headers a poll must not carry on this path (Tornado serves them).
_REFUSED = frozenset((b"transfer-encoding", b"expect", b"upgrade"))


class PollRequest:
    """One ``GET /lp/<session>`` request head, ``size`` bytes of the input."""

    __slots__ = ("authorization", "close", "head", "query", "sid", "size", "target")

    def __init__(
        self,
        sid: str,
        query: str,
        target: bytes,
        authorization: str | None,
        close: bool,
        head: bytes,
        size: int,
    ) -> None:
        self.sid = sid
        self.query = query
        #: The request target, path and query (for the access log).
        self.target = target
        #: The Authorization header's value, if any.
        self.authorization = authorization
        #: ``Connection: close``: the connection ends after this answer.
        self.close = close
        #: Request line and headers, without the final CRLF (client address, logs).
        self.head = head
        self.size = size


class HeadFields:
    """A poll's head as `core.infra.clientip.HeaderLists` reads it: one field's values, in
    order, as Tornado's ``HTTPHeaders.get_list`` gives them (`parse` took only lines of a
    name, a colon and a value). A trusted proxy's forwarding header is found without
    parsing every field: ``HTTPHeaders.parse`` of a poll's head took 26 us a poll."""

    __slots__ = ("_head",)

    def __init__(self, head: bytes) -> None:
        self._head = head

    def get_list(self, name: str) -> list[str]:
        key = name.lower().encode("ascii")
        values = []
        for line in self._head.split(b"\r\n")[1:]:
            field, _, value = line.partition(b":")
            if field.lower() == key:
                values.append(value.strip(b" \t").decode("latin-1"))
        return values


def parse(data: bytes, max_bytes: int, searched: int = 0) -> PollRequest | str:
    """The request at the start of ``data``: a `PollRequest`, `INCOMPLETE` or `OTHER`.

    ``searched``: how many bytes of ``data`` an earlier call found `INCOMPLETE`;
    the search for the head's end resumes there (less the 3 bytes a match can
    start before), so a head sent a byte at a time costs time in its size.
    """
    end = _END.search(data, max(0, searched - 3))
    if end is None:
        return INCOMPLETE if len(data) <= max_bytes else OTHER
    if end.end() - end.start() != 4 or end.end() > max_bytes:
        return OTHER  # bare LFs, or over the limit as Tornado's: its answer (431...)
    head = data[: end.start()]
    match = _HEAD.fullmatch(head)
    if match is None:
        return OTHER
    authorization: str | None = None
    connection: bytes | None = None
    host: bytes | None = None
    length_seen = False
    for line in match.group(4).split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        key = name.lower()
        if key == b"host":
            if host is not None:
                return OTHER
            host = value.strip(b" \t")
        elif key == b"authorization":
            if authorization is not None:
                return OTHER
            authorization = value.strip(b" \t").decode("ascii")
        elif key == b"connection":
            if connection is not None:
                return OTHER
            connection = value.strip(b" \t").lower()
        elif key == b"content-length":
            if length_seen or value.strip(b" \t") != b"0":
                return OTHER
            length_seen = True
        elif key in _REFUSED:
            return OTHER
    if host is None or _HOST.fullmatch(host) is None:
        return OTHER  # Tornado refuses a missing, repeated or malformed Host (400)
    query = match.group(3)
    return PollRequest(
        match.group(2).decode("ascii"),
        query.decode("ascii") if query else "",
        match.group(1),
        authorization,
        connection == b"close",  # as Tornado decides keep-alive for HTTP/1.1
        head,
        end.end(),
    )


def cursor_of(query: str) -> int | None:
    """The poll's ``cursor`` (its last occurrence; 0 when absent), None when not an integer."""
    value = "0"
    for part in query.split("&"):
        name, _, found = part.partition("=")
        if name == "cursor":
            value = found
    try:
        return int(value)
    except ValueError:
        return None


def token_of(authorization: str | None, query: str) -> str:
    """The poll's token: ``Authorization: Bearer``, else the ``token`` query parameter, else ""."""
    token = token_from_header(authorization)
    if token is None and query:
        token = parse_qs(query).get("token", [""])[0]
    return token or ""
