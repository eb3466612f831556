"""What may be published: one definition, checked wherever data enters.

A publication's data is a JSON value that every codec and every client can
carry, so that encoding it for one subscriber can never fail, and no frame
built from it can make a conformant client fail its connection:

* its JSON text is valid UTF-8 (strings hold no lone surrogates);
* integers lie in ``[-2**63, 2**64 - 1]`` (what MessagePack can carry);
  floats are finite (JSON has no NaN or infinity; ``1e400`` is refused);
* it nests at most `MAX_DEPTH` arrays and objects deep;
* it is at most a configured number of bytes of JSON.

Data that a MessagePack client publishes is turned into JSON first: ``bin``
values become base64 strings, map keys must be strings, ``ext`` values and
non-finite floats are refused.

Plain text that a backend ``PUBLISH``es without being JSON is delivered as a
JSON string of that text (`from_broker`), when it is valid UTF-8.

Every check raises `InvalidData`; the entry point turns it into an error
reply or a 4xx, and a broker reader drops and counts the publication.
"""

from __future__ import annotations

import math
from typing import Any, Final

import msgspec

__all__ = [
    "DEFAULT_MAX_BYTES",
    "MAX_DEPTH",
    "InvalidData",
    "check_info",
    "check_json",
    "from_broker",
    "from_msgpack",
]

#: Arrays and objects nested deeper than this are refused.
MAX_DEPTH: Final = 64
#: The size bound of a publication from any source (clients have a lower one).
DEFAULT_MAX_BYTES: Final = 1 << 20

_INT_MIN: Final = -(2**63)
_INT_MAX: Final = 2**64 - 1
_JSON_SPACE: Final = b" \t\n\r"

_json_decode = msgspec.json.Decoder().decode
_json_encode = msgspec.json.Encoder().encode
_msgpack_decode = msgspec.msgpack.Decoder().decode
_msgpack_encode = msgspec.msgpack.Encoder().encode


class InvalidData(ValueError):
    """Data that not every codec or client can carry; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def check_json(data: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """``data`` (JSON bytes, surrounding white space trimmed) if publishable.

    Raises `InvalidData` otherwise. The bytes are not re-encoded: what a
    publisher sent reaches JSON subscribers byte for byte.
    """
    data = data.strip(_JSON_SPACE)
    if len(data) > max_bytes:
        raise InvalidData(f"data over {max_bytes} bytes")
    try:
        value = _json_decode(data)
    except msgspec.DecodeError as exc:  # ValidationError too: 1e400, huge integers
        raise InvalidData(f"not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidData(f"nested deeper than {MAX_DEPTH} levels") from None
    try:
        _msgpack_encode(value)  # the integer range of every codec
    except OverflowError:
        raise InvalidData("an integer is outside [-2**63, 2**64-1]") from None
    if data.count(b"[") + data.count(b"{") > MAX_DEPTH:
        _check_depth(value, 0)
    return data


def check_info(info: object, max_bytes: int) -> bytes:
    """The JSON bytes of presence ``info``: an object that is publishable data of at
    most ``max_bytes``. Raises `InvalidData` otherwise.

    Every subscriber of a presence channel reads it (in ``presence``, ``join`` and
    ``leave``), in its own codec: held to less, one party's info would fail them all.
    """
    if not isinstance(info, dict):
        raise InvalidData("not an object")
    try:
        encoded: bytes = _json_encode(info)
    except (TypeError, ValueError, RecursionError) as exc:  # lone surrogates, nesting
        raise InvalidData(f"not valid JSON: {exc}") from None
    return check_json(encoded, max_bytes)


def from_msgpack(data: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """The JSON bytes of MessagePack ``data``; raises `InvalidData`."""
    try:
        value = _msgpack_decode(data)
    except msgspec.DecodeError as exc:
        raise InvalidData(f"not valid MessagePack: {exc}") from None
    except RecursionError:
        raise InvalidData(f"nested deeper than {MAX_DEPTH} levels") from None
    _check_value(value, 0)
    out: bytes = _json_encode(value)  # bytes become base64 strings
    if len(out) > max_bytes:
        raise InvalidData(f"data over {max_bytes} bytes")
    return out


def from_broker(data: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[bytes, bool]:
    """A publication read from the broker as JSON bytes, and whether it was JSON.

    Backends may ``PUBLISH`` plain text: valid UTF-8 that is not JSON is
    delivered as a JSON string of that text. Raises `InvalidData` for
    anything else that is not publishable.
    """
    try:
        return check_json(data, max_bytes), True
    except InvalidData:
        stripped = data.strip(_JSON_SPACE)
        if stripped and stripped[:1] in b'{["-0123456789':
            raise  # meant as JSON, and broken: not text to wrap
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidData("neither JSON nor UTF-8 text") from None
    out: bytes = _json_encode(text)
    if len(out) > max_bytes:
        raise InvalidData(f"data over {max_bytes} bytes")
    return out, False


def _check_depth(value: Any, depth: int) -> None:
    if depth >= MAX_DEPTH:
        raise InvalidData(f"nested deeper than {MAX_DEPTH} levels")
    if type(value) is dict:
        for item in value.values():
            if type(item) is dict or type(item) is list:
                _check_depth(item, depth + 1)
    elif type(value) is list:
        for item in value:
            if type(item) is dict or type(item) is list:
                _check_depth(item, depth + 1)


def _check_value(value: Any, depth: int) -> None:
    """Every rule, for a value decoded from MessagePack (any type may appear)."""
    kind = type(value)
    if kind is str or kind is bool or value is None or kind is bytes:
        return
    if kind is int:
        if not _INT_MIN <= value <= _INT_MAX:
            raise InvalidData("an integer is outside [-2**63, 2**64-1]")
        return
    if kind is float:
        if not math.isfinite(value):
            raise InvalidData("numbers must be finite")
        return
    if kind is list or kind is dict:
        if depth >= MAX_DEPTH:
            raise InvalidData(f"nested deeper than {MAX_DEPTH} levels")
        if kind is dict:
            for key in value:
                if type(key) is not str:
                    raise InvalidData("map keys must be strings")
            value = value.values()
        for item in value:
            _check_value(item, depth + 1)
        return
    raise InvalidData(f"{kind.__name__} values cannot be published")
