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

Header names are spelled (``Http-Header-Case``) from a memory of the names
met, here and in Tornado (`tornado.httputil._normalize_header`, an LRU of
1,000 names). A name can be as long as ``MAX_HEADER_BYTES``, so both
remember only names of at most `REMEMBERED_NAME` characters (the longest
header a browser sends has 30): before, 1,000 requests from a client with no
token, each with one made-up 60 KB name, left ~90 MB in a process for good
(this module's memory) and ~120 MB more until other names pushed them out
(Tornado's); longer names are spelled each time, as Tornado spells them.
"""

from __future__ import annotations

import re

from tornado import httputil

__all__ = ["MAX_QUERY_FIELDS", "REMEMBERED_NAME", "parse_head", "within"]

#: Query fields past which `_plain` leaves the head to Tornado (its limit is larger).
MAX_QUERY_FIELDS = 64
#: Printable ASCII, spaces, tabs and line breaks (bare CR or LF are counted apart).
_PRINTABLE = re.compile(rb"[\t\n\r\x20-\x7e]*")
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_HOST = re.compile(r"(?:[A-Za-z0-9.\-_~]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")
_WHITESPACE = " \t"
#: Valid header names met, as Tornado normalizes them (``Http-Header-Case``).
_NAMES: dict[str, str] = {}
_MAX_NAMES = 512
#: The longest header name remembered, here and by Tornado (see the module's doc).
REMEMBERED_NAME = 64


def _spelled(name: str) -> str:
    """``name`` in ``Http-Header-Case``, as Tornado spells it."""
    return "-".join(w.capitalize() for w in name.split("-"))


_tornado_spelling = httputil._normalize_header  # its LRU of 1,000 names


def _normalize_header(name: str) -> str:
    """Tornado's spelling of a header name, remembered only for names of a header's length."""
    return _tornado_spelling(name) if len(name) <= REMEMBERED_NAME else _spelled(name)


# Tornado's HTTPHeaders looks the function up in its module at each call.
setattr(httputil, "_normalize_header", _normalize_header)  # noqa: B010 (its type is an LRU wrapper)


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


def within(data: bytes, end: int, limit: int) -> bool:
    """Whether the head ``data[:end]`` is sure to be within ``limit`` as the listener measures it.

    The listener's measure (`core.infra.listener._oversized`) is the method,
    the target, and each header's name and stripped value plus 4. The head
    holds the request line (method, target, two spaces and an 8-byte
    version) and, for each header, a CRLF, its name, a colon and at least
    its value: ``end >= measure - lines + 10`` with ``lines`` its CRLFs. So
    a head with ``end + lines <= limit + 10`` is within it, and its
    measure need not be taken (a tenth of the fast route's own work).
    """
    lines, crlfs = data.count(b"\n", 0, end), data.count(b"\r\n", 0, end)
    # A line ended by a bare LF has a byte less of head for the same measure: counted twice.
    return end + crlfs + 2 * (lines - crlfs) <= limit + 10


def _plain(data: bytes, end: int) -> tuple[httputil.RequestStartLine, httputil.HTTPHeaders] | None:
    """The head parsed, when it is of the plain form above; None to leave it to Tornado."""
    head = data[:end]
    if not _PRINTABLE.fullmatch(head):
        return None
    text = head.decode("ascii")
    lines = text.split("\r\n")
    breaks = len(lines) - 1
    if text.count("\n") != breaks or text.count("\r") != breaks:
        return None  # a bare CR or LF
    method, _, rest = lines[0].partition(" ")
    target, _, version = rest.partition(" ")
    if method != "GET" or version != "HTTP/1.1" or not target.startswith("/"):
        return None
    if " " in target or "\t" in target or target.count("&") >= MAX_QUERY_FIELDS:
        return None
    headers = httputil.HTTPHeaders()
    seen: set[str] = set()
    host = None
    for line in lines[1:]:
        raw, colon, value = line.partition(":")
        if not colon:
            return None
        name = _NAMES.get(raw)
        if name is None:
            if not _TOKEN.fullmatch(raw):
                return None
            name = _spelled(raw)
            if len(_NAMES) < _MAX_NAMES and len(raw) <= REMEMBERED_NAME:
                _NAMES[raw] = name
        if name in seen:
            return None  # Tornado joins repeated values
        seen.add(name)
        value = value.strip(_WHITESPACE)
        if name == "Host":
            host = value
        headers[name] = value
    if host is None or not _HOST.fullmatch(host):
        return None
    return httputil.RequestStartLine("GET", target, "HTTP/1.1"), headers
