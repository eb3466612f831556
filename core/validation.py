"""Request validation: one fast decode when the input is good, every problem when not.

msgspec stops at the first bad field. Good requests take that fast path
only; a bad one is examined again field by field (recursing into lists of
objects) so the 422 lists every bad field as ``{path, message}``, up to
`MAX_DETAILS` of them: a body of a million bad items is refused as cheaply as
one of a hundred. A list longer than its limit is one problem, its items
are not examined.

Rules msgspec cannot express (a Decimal's range, one field against
another) live in a Struct's ``problems()`` classmethod, which takes a getter
and returns details; both paths run it, and its ``rules`` say them in words
for the document.

A field type with a ``from_json`` classmethod (`core.schemas.Amount`) gets
the raw JSON value: numbers arrive as exact `Decimal`, never binary floats.
"""

from __future__ import annotations

import functools
import re
import typing
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any, ClassVar, TypeVar
from urllib.parse import parse_qs

import msgspec

from core.infra.errors import ApiError, ErrorDetail, ValidationFailed

__all__ = ["Checked", "decode_body", "parse_form", "parse_query", "too_deep", "validate"]

T = TypeVar("T")

_AT = re.compile(r"^(.*) - at `\$(.*)`$")

#: The most problems one 422 lists (the rest are left out).
MAX_DETAILS = 100


class Checked(msgspec.Struct):
    """A Struct with rules beyond its field types."""

    #: `problems`' rules in words (Markdown), for the document
    rules: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def problems(cls, get: Callable[[str], Any]) -> list[ErrorDetail]:
        """Problems of the values ``get(field)`` returns (None for absent or bad)."""
        return []


def _from_json(tp: type, value: Any) -> Any:
    """msgspec's ``dec_hook``: a type's own ``from_json`` (TypeError/ValueError: a 422)."""
    convert = getattr(tp, "from_json", None)
    if convert is None:
        raise NotImplementedError(f"no decoder for {tp!r}")
    return convert(value)


#: Untyped JSON, numbers exact: what `validate` examines after a failed fast decode.
_untyped = msgspec.json.Decoder(dec_hook=_from_json, float_hook=Decimal)


def _split(message: str, path: str) -> ErrorDetail:
    """msgspec's ``"Expected int - at `$[1].x`"`` as a detail under ``path``."""
    m = _AT.match(message)
    if m is None:
        return ErrorDetail(path, message)
    return ErrorDetail(path + m.group(2), m.group(1))


def _unwrap(tp: Any) -> Any:
    while typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    return tp


def _struct_items(tp: Any) -> type[msgspec.Struct] | None:
    """The item type of ``list[SomeStruct]`` (annotated or not), else None."""
    tp = _unwrap(tp)
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp)
        item = _unwrap(item)
        if isinstance(item, type) and issubclass(item, msgspec.Struct):
            return item
    return None


def _max_length(tp: Any) -> float:
    """The ``max_length`` of an annotated list type (infinity without one)."""
    while typing.get_origin(tp) is typing.Annotated:
        for meta in typing.get_args(tp)[1:]:
            if isinstance(meta, msgspec.Meta) and meta.max_length is not None:
                return meta.max_length
        tp = typing.get_args(tp)[0]
    return float("inf")


@functools.cache
def _fields(
    tp: type[msgspec.Struct],
) -> tuple[tuple[msgspec.structs.FieldInfo, ...], frozenset[str]]:
    """``tp``'s fields and their JSON names (msgspec evaluates the annotations on each call)."""
    fields = msgspec.structs.fields(tp)
    return fields, frozenset(f.encode_name for f in fields)


def _collect(tp: type[msgspec.Struct], value: Any, path: str, problems: list[ErrorDetail]) -> None:
    """Add the problems of ``value`` (decoded JSON) as an instance of ``tp`` to
    ``problems``, until it holds `MAX_DETAILS`."""
    if not isinstance(value, dict):
        problems.append(
            ErrorDetail(path or "$", f"Expected `object`, got `{type(value).__name__}`")
        )
        return
    good: dict[str, Any] = {}
    fields, known = _fields(tp)
    for name in value:
        if name not in known:
            if len(problems) >= MAX_DETAILS:
                return
            problems.append(ErrorDetail(f"{path}.{name}", "unknown field"))
    for f in fields:
        if len(problems) >= MAX_DETAILS:
            return
        where = f"{path}.{f.encode_name}"
        if f.encode_name not in value:
            if f.required:
                problems.append(ErrorDetail(where, "required field is missing"))
            continue
        raw = value[f.encode_name]
        try:
            good[f.name] = msgspec.convert(raw, f.type, dec_hook=_from_json)
            continue
        except msgspec.ValidationError as exc:
            first = _split(str(exc), where)
        item = _struct_items(f.type)
        before = len(problems)
        if item is not None and isinstance(raw, list) and len(raw) <= _max_length(f.type):
            for i, element in enumerate(raw):
                if len(problems) >= MAX_DETAILS:
                    return
                _collect(item, element, f"{where}[{i}]", problems)
        if len(problems) == before:
            problems.append(first)
    if issubclass(tp, Checked):
        problems += [ErrorDetail(path + d.path[1:], d.message) for d in tp.problems(good.get)]


def validate(tp: type[T], value: Any) -> T:
    """``value`` (decoded JSON) as ``tp``, or `ValidationFailed` with every problem."""
    try:
        obj = msgspec.convert(value, tp, dec_hook=_from_json)
    except msgspec.ValidationError:
        obj = None
    if obj is not None:
        _check(obj)
        return obj
    details: list[ErrorDetail] = []
    if issubclass(tp, msgspec.Struct):
        _collect(tp, value, "$", details)
    raise ValidationFailed(details[:MAX_DETAILS] or [ErrorDetail("$", "invalid value")])


def _check(obj: object) -> None:
    if isinstance(obj, Checked):
        details = type(obj).problems(lambda name: getattr(obj, name, None))
        if details:
            raise ValidationFailed(details)


_decoders: dict[type, msgspec.json.Decoder[Any]] = {}


def too_deep() -> ApiError:
    """The 400 for JSON nested beyond what the decoder follows (about 1000 levels)."""
    return ApiError(400, "malformed_json", "request body is nested too deeply")


def decode_body(tp: type[T], body: bytes) -> T:
    """The JSON ``body`` as ``tp``: 400 if it is not JSON, 422 listing every problem.

    Numbers beyond a float's range (``1e999``) are a 422 at their path, and
    nesting deeper than the decoder follows a 400, never a 500.
    """
    decoder = _decoders.get(tp)
    if decoder is None:
        decoder = _decoders[tp] = msgspec.json.Decoder(tp, dec_hook=_from_json, float_hook=Decimal)
    try:
        obj: T = decoder.decode(body)
    except msgspec.ValidationError:
        pass  # examined again below, for every problem
    except msgspec.DecodeError as exc:
        raise ApiError(400, "malformed_json", f"request body is not JSON: {exc}") from None
    except RecursionError:
        raise too_deep() from None
    else:
        _check(obj)
        return obj
    try:
        value = _untyped.decode(body)
    except msgspec.ValidationError as exc:  # "Number out of range": not a float, not an int64
        raise ValidationFailed([_split(str(exc), "$")]) from None
    except msgspec.DecodeError as exc:
        raise ApiError(400, "malformed_json", f"request body is not JSON: {exc}") from None
    except RecursionError:
        raise too_deep() from None
    try:
        return validate(tp, value)
    except RecursionError:  # an Any field holding what the decoder barely followed
        raise too_deep() from None


_names: dict[type, frozenset[str]] = {}


def _field_names(tp: type) -> frozenset[str]:
    # msgspec.structs.fields evaluates annotations on every call: cache per type.
    names = _names.get(tp)
    if names is None:
        names = _names[tp] = frozenset(f.encode_name for f in msgspec.structs.fields(tp))
    return names


def parse_query(
    tp: type[T], query: Mapping[str, list[str]], where: str = "query", strict: bool = True
) -> T:
    """Query parameters as ``tp`` (last value wins; numbers parsed from text).

    ``strict``: unknown parameters are errors (query strings); forms ignore them.
    """
    names = _field_names(tp)
    flat = {k: v[-1] for k, v in query.items() if v and (strict or k in names)}
    unknown = sorted(set(flat) - names)
    if unknown:
        raise ValidationFailed(
            [ErrorDetail(f"{where}.{n}", f"unknown {where} parameter") for n in unknown]
        )
    try:
        return msgspec.convert(flat, tp, strict=False)
    except msgspec.ValidationError as exc:
        detail = _split(str(exc), where)
        raise ValidationFailed([detail]) from None


def parse_form(tp: type[T], body: bytes) -> T:
    """An ``application/x-www-form-urlencoded`` body as ``tp``; unknown fields ignored."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, "malformed_form", "form body is not UTF-8") from None
    return parse_query(tp, parse_qs(text, keep_blank_values=True), "form", strict=False)
