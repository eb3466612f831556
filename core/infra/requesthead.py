"""A request head read at accept: a strict parser for the plain case, Tornado's for the rest.

The listener's fast routes (core/infra/listener.py) parse a ``GET`` head
that came whole with its accept. Tornado's `HTTPHeaders.parse` checks each
line with its ABNF regular expressions and normalizes each name, then the
router's `HTTPServerRequest` checks ``Host``: 15% of a WebSocket
handshake's CPU under a burst. `parse_head` first tries `_plain`, which
accepts only a head whose every byte is of the plainest form:

* the request line is exactly ``GET <target> HTTP/1.1``, the target
  printable ASCII, its query at most `MAX_QUERY_FIELDS` fields;
* every line ends with CRLF (no bare CR or LF), every header line is
  ``name:value`` with a token name, the value printable ASCII, spaces and
  tabs (Tornado strips spaces and tabs around it, as here);
* no header name repeats (Tornado joins repeated values), none starts with
  whitespace (a folded line);
* exactly one ``Host``, of letters, digits, ``.-_~`` and an optional
  ``:port`` or an IPv6 literal in brackets.

Such a head is one Tornado parses without error into the same start line
and headers (``tests/test_requesthead.py`` compares both over hostile
heads). Anything else — another method or version, a byte outside printable
ASCII, a repeated header, an odd ``Host`` — is Tornado's to parse and
judge, exactly as before: `parse_head` then calls Tornado's own functions
and raises its `HTTPInputError` for a head it refuses.
"""

from __future__ import annotations

import re

from tornado import httputil

__all__ = ["MAX_QUERY_FIELDS", "parse_head"]

#: Query fields past which `_plain` leaves the head to Tornado (its limit is larger).
MAX_QUERY_FIELDS = 64
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TARGET = re.compile(rb"/[\x21-\x7e]*")
_VALUE = re.compile(rb"[\x20-\x7e\t]*")
_HOST = re.compile(rb"(?:[A-Za-z0-9.\-_~]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")
_WHITESPACE = b" \t"
#: Header names as Tornado normalizes them (``Http-Header-Case``), filled as met.
_NAMES: dict[bytes, str] = {}
_MAX_NAMES = 512


def parse_head(data: bytes, end: int) -> tuple[httputil.RequestStartLine, httputil.HTTPHeaders]:
    """The start line and headers of ``data[:end]`` (the head without its closing CRLF CRLF).

    Raises Tornado's `HTTPInputError` for a head Tornado refuses (a 400),
    including the ``Host`` checks of its router.
    """
    plain = _plain(data, end)
    if plain is not None:
        return plain
    # As HTTP1Connection._parse_headers reads a head.
    text = data[: end + 4].decode("latin-1")
    eol = text.find("\n")
    start = httputil.parse_request_start_line(text[:eol].rstrip("\r"))
    headers = httputil.HTTPHeaders.parse(text[eol:])
    # As Tornado's router checks each request (a missing, malformed or repeated Host)
    httputil.HTTPServerRequest(headers=headers, start_line=start)
    return start, headers


def _plain(data: bytes, end: int) -> tuple[httputil.RequestStartLine, httputil.HTTPHeaders] | None:
    """The head parsed, when it is of the plain form above; None to leave it to Tornado."""
    head = data[:end]
    lines = head.split(b"\r\n")
    breaks = len(lines) - 1
    if head.count(b"\n") != breaks or head.count(b"\r") != breaks:
        return None  # a bare CR or LF
    method, _, rest = lines[0].partition(b" ")
    target, _, version = rest.partition(b" ")
    if method != b"GET" or version != b"HTTP/1.1" or not _TARGET.fullmatch(target):
        return None
    if target.count(b"&") >= MAX_QUERY_FIELDS:
        return None
    headers = httputil.HTTPHeaders()
    seen: set[str] = set()
    host = None
    for line in lines[1:]:
        raw, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(raw) or not _VALUE.fullmatch(value):
            return None
        name = _NAMES.get(raw)
        if name is None:
            name = "-".join(w.capitalize() for w in raw.decode("ascii").split("-"))
            if len(_NAMES) < _MAX_NAMES:
                _NAMES[raw] = name
        if name in seen:
            return None  # Tornado joins repeated values
        seen.add(name)
        value = value.strip(_WHITESPACE)
        if name == "Host":
            host = value
        text = value.decode("ascii")
        headers[name] = text
    if host is None or not _HOST.fullmatch(host):
        return None
    return httputil.RequestStartLine("GET", target.decode("ascii"), "HTTP/1.1"), headers
