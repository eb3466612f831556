"""Keyset pagination cursors, ETags and the page body, shared by resources.

A cursor is the last id of the page before, as 8 big-endian bytes in
unpadded base64url: 11 characters, which `CURSOR_PATTERN` describes exactly
(the first character keeps the top bit clear, the last one's two spare bits
are zero), so every string the document allows is a cursor the server takes.
"""

from __future__ import annotations

import base64
import re

from msgspec import UNSET, UnsetType

from core.infra.errors import ApiError, ErrorDetail, ValidationFailed

__all__ = [
    "ANY",
    "CURSOR_PATTERN",
    "ETAG_PATTERN",
    "ETAG_SCHEMA",
    "IF_MATCH_SCHEMA",
    "decode_cursor",
    "encode_cursor",
    "etag",
    "if_match",
    "none_match",
    "page_body",
]

ANY = -1  # If-Match: * (any current version)
#: One of our ETags in an If-Match header, weak or strong (``*`` is the other choice).
ETAG_PATTERN = r'^(W/)?"[0-9]{1,9}"(?![\s\S])'
#: What an If-Match header may hold: `if_match` takes exactly this.
IF_MATCH_SCHEMA = {
    "anyOf": [
        {"type": "string", "const": "*", "description": "Any current version."},
        {"type": "string", "pattern": ETAG_PATTERN},
    ]
}
#: The ETag the server sends: the version, quoted.
ETAG_SCHEMA = {"type": "string", "pattern": r'^"[0-9]+"(?![\s\S])', "examples": ['"3"']}
CURSOR_PATTERN = r"^[A-Za-f][A-Za-z0-9_-]{9}[AEIMQUYcgkosw048](?![\s\S])"
_CURSOR = re.compile(CURSOR_PATTERN)


def encode_cursor(last_id: int) -> str:
    return base64.urlsafe_b64encode(last_id.to_bytes(8, "big")).rstrip(b"=").decode()


def decode_cursor(cursor: str | UnsetType) -> int:
    """The last id of the previous page (0 for the first page), or 422."""
    if cursor is UNSET:
        return 0
    if not _CURSOR.match(cursor):
        raise ValidationFailed([ErrorDetail("query.cursor", "invalid cursor")])
    return int.from_bytes(base64.urlsafe_b64decode(cursor + "="), "big")


def page_body(items_json: str, next_id: int | None) -> bytes:
    """``{"items": [...], "next_cursor": ...}`` around PostgreSQL's JSON array."""
    cursor = b"null" if next_id is None else b'"' + encode_cursor(next_id).encode() + b'"'
    return b'{"items":' + items_json.encode() + b',"next_cursor":' + cursor + b"}"


def etag(version: int) -> str:
    return f'"{version}"'


def if_match(header: str | None) -> int | None:
    """The version an ``If-Match`` header demands: None (no header), `ANY`, or 400.

    A well-formed ETag that is not current is the caller's 412; a header that
    cannot be one of ours at all is a malformed request.
    """
    if header is None:
        return None
    value = header.strip()
    if value == "*":
        return ANY
    if not re.match(ETAG_PATTERN, value):
        raise ApiError(400, "invalid_header", 'If-Match must be "*" or an ETag like "3"')
    return int(value.removeprefix("W/").strip('"'))


def none_match(header: str | None, version: int) -> bool:
    """True when ``If-None-Match`` names ``version`` (the client's copy is current)."""
    if header is None:
        return False
    tags = {t.strip().removeprefix("W/") for t in header.split(",")}
    return "*" in tags or etag(version) in tags
