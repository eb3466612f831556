"""Keyset pagination cursors, ETags and the page body, shared by resources."""

from __future__ import annotations

import base64
import binascii
import re

import msgspec
from msgspec import UNSET, UnsetType

from core.infra.errors import ApiError, ErrorDetail, ValidationFailed

__all__ = [
    "ANY",
    "ETAG_PATTERN",
    "decode_cursor",
    "encode_cursor",
    "etag",
    "if_match",
    "none_match",
    "page_body",
]

_cursor_decoder = msgspec.json.Decoder(tuple[int])
ANY = -1  # If-Match: * (any current version)
#: What an If-Match header may hold: ``*`` or one of our ETags, weak or strong.
ETAG_PATTERN = r'^(\*|(W/)?"[0-9]{1,9}")(?![\s\S])'


def encode_cursor(last_id: int) -> str:
    return base64.urlsafe_b64encode(msgspec.json.encode((last_id,))).rstrip(b"=").decode()


def decode_cursor(cursor: str | UnsetType) -> int:
    """The last id of the previous page (0 for the first page), or 422."""
    if cursor is UNSET:
        return 0
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        (last_id,) = _cursor_decoder.decode(raw)
    except (binascii.Error, ValueError, msgspec.DecodeError, RecursionError):
        raise ValidationFailed([ErrorDetail("query.cursor", "invalid cursor")]) from None
    return last_id


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
    if not re.fullmatch(ETAG_PATTERN, value):
        raise ApiError(400, "invalid_header", 'If-Match must be "*" or an ETag like "3"')
    return int(value.removeprefix("W/").strip('"'))


def none_match(header: str | None, version: int) -> bool:
    """True when ``If-None-Match`` names ``version`` (the client's copy is current)."""
    if header is None:
        return False
    tags = {t.strip().removeprefix("W/") for t in header.split(",")}
    return "*" in tags or etag(version) in tags
