"""OpenAPI 3.1 from the route table and the msgspec types, nothing written by hand twice.

msgspec emits JSON Schema 2020-12, which OpenAPI 3.1 uses as is; the types
that validate requests (core/schemas.py) carry their own patterns, ranges
and lengths, and the routes say which headers, path parameters and answers
an operation has. From those this module writes, per operation:

* every status it can answer, each error status with the codes it may carry
  (core/errorcodes.py), an example of each, and the headers that come with
  them (``WWW-Authenticate``, ``Retry-After``, ``ETag``, ``Location``);
* rules JSON Schema cannot state (one field against another) in words, from
  the body type's ``rules``, in the description of the operation and its 422;
* links from each answer to the operations that take it further
  (core/openapilinks.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec

from core.errorcodes import BEFORE_ROUTING, ERRORS, route_errors
from core.infra.errors import ErrorResponse
from core.openapilinks import route_links
from core.paging import ETAG_SCHEMA
from core.routing import Route

__all__ = ["document"]

_REF = "#/components/schemas/{name}"
_SUCCESS = {200: "OK", 201: "Created", 204: "No content", 304: "Not modified"}
_RETRY_AFTER = {"type": "integer", "minimum": 1}
_HEADERS: dict[str, dict[str, Any]] = {
    "Location": {"description": "Where the new resource is.",
                 "schema": {"type": "string", "format": "uri-reference"}},
    "ETag": {"description": "The resource's version, quoted: `If-Match` takes it.",
             "schema": ETAG_SCHEMA},
    "Idempotent-Replayed": {"description": "`true` when this is the stored answer to an earlier "
                            "request with the same `Idempotency-Key`.",
                            "schema": {"type": "string", "enum": ["true"]}},
    "WWW-Authenticate": {"description": "The scheme to authenticate with.",
                         "schema": {"type": "string", "enum": ["Bearer"]}},
}  # fmt: skip


def _polish(node: Any) -> Any:
    """What msgspec's schemas leave unsaid, or say in a way viewers misread.

    msgspec writes a Decimal as a string of ``format: decimal`` whatever its
    ``extra_json_schema`` says; one that declares ``multipleOf``
    (`core.schemas.StoredBudget`) travels as a number. String enums carry no
    ``type``, which viewers show as "any".
    """
    if isinstance(node, dict):
        out = {k: _polish(v) for k, v in node.items()}
        if out.get("format") == "decimal" and "multipleOf" in out:
            del out["format"]
            out["type"] = "number"
        enum = out.get("enum")
        if enum and "type" not in out and all(isinstance(v, str) for v in enum):
            out["type"] = "string"
        return out
    if isinstance(node, list):
        return [_polish(v) for v in node]
    return node


def _header(name: str, required: bool = True) -> dict[str, Any]:
    return {**_HEADERS[name], "required": required}


def _rules(route: Route) -> tuple[str, ...]:
    rules: tuple[str, ...] = getattr(route.body, "rules", ())
    return rules


def _example(route: Route, code: str) -> dict[str, Any]:
    doc = ERRORS[code]
    error: dict[str, Any] = {"status": doc.status, "code": code, "message": doc.example}
    where, tp = next(
        ((w, t) for w, t in (("$", route.body), ("form", route.form), ("query", route.query))
         if t is not None),
        ("header", None),
    )  # fmt: skip
    if code == "validation_error":
        first = msgspec.structs.fields(tp)[0].encode_name if tp is not None else "Idempotency-Key"
        error["details"] = [{"path": f"{where}.{first}", "message": "invalid value"}]
    return {"summary": code, "value": {"error": error}}


def _error_response(route: Route, status: int, codes: list[str]) -> dict[str, Any]:
    lines = [f"* `{c}`: {ERRORS[c].when}" for c in codes]
    if status == 422:
        lines += [f"* `validation_error`: {rule}" for rule in _rules(route)]
    only = {"properties": {"error": {"properties": {"status": {"const": status},
                                                    "code": {"enum": codes}}}}}  # fmt: skip
    resp: dict[str, Any] = {
        "description": "\n".join(lines),
        "content": {
            "application/json": {
                "schema": {"allOf": [{"$ref": _REF.format(name="ErrorResponse")}, only]},
                "examples": {c: _example(route, c) for c in codes},
            }
        },
    }
    retry = {ERRORS[c].retry_after for c in codes}
    headers: dict[str, Any] = {}
    if retry != {"never"}:
        headers["Retry-After"] = {
            "description": "Seconds to wait before retrying.",
            "schema": _RETRY_AFTER,
            "required": retry == {"always"},
        }
    if status == 401:
        headers["WWW-Authenticate"] = _header("WWW-Authenticate")
    if headers:
        resp["headers"] = headers
    return resp


def _success_response(
    route: Route, status: int, tp: object, links: dict[str, Any] | None
) -> dict[str, Any]:
    resp: dict[str, Any] = {"description": _SUCCESS.get(status, "OK")}
    if tp is not None:
        name = tp.__name__  # type: ignore[attr-defined]
        resp["content"] = {"application/json": {"schema": {"$ref": _REF.format(name=name)}}}
    headers: dict[str, Any] = {}
    if status == 201 and route.location:
        headers["Location"] = _header("Location")
    if route.etag:
        headers["ETag"] = _header("ETag")
    if route.idempotent:
        headers["Idempotent-Replayed"] = _header("Idempotent-Replayed", required=False)
    if headers:
        resp["headers"] = headers
    if links:
        resp["links"] = links
    return resp


def _parameters(route: Route, query_params: list[dict[str, Any]]) -> list[dict[str, Any]]:
    params = [
        {"name": name, "in": "path", "required": True, "schema": dict(route.param_schema(name))}
        for name in route.path_params()
    ]
    params += query_params
    params += [
        {"name": h.name, "in": "header", "required": False, "description": h.description,
         "schema": dict(h.schema)}
        for h in route.headers
    ]  # fmt: skip
    return params


def _operation(
    route: Route, query_params: list[dict[str, Any]], links: dict[tuple[str, int], Any]
) -> dict[str, Any]:
    op: dict[str, Any] = {
        "operationId": route.operation_id,
        "summary": route.summary,
        "tags": [route.tag],
    }
    description = [route.description] if route.description else []
    description += [f"Rule: {rule}" for rule in _rules(route)]
    if description:
        op["description"] = "\n\n".join(description)
    params = _parameters(route, query_params)
    if params:
        op["parameters"] = params
    for media, body in (("application/json", route.body),
                        ("application/x-www-form-urlencoded", route.form)):  # fmt: skip
        if body is not None:
            ref = {"$ref": _REF.format(name=body.__name__)}
            op["requestBody"] = {"required": True, "content": {media: {"schema": ref}}}
    responses = {
        str(status): _success_response(route, status, tp, links.get((route.operation_id, status)))
        for status, tp in route.responses.items()
    }
    by_status: dict[int, list[str]] = {}
    for code in route_errors(route):
        by_status.setdefault(ERRORS[code].status, []).append(code)
    for status, codes in by_status.items():
        responses[str(status)] = _error_response(route, status, codes)
    op["responses"] = responses
    if route.auth:
        op["security"] = [{"bearerAuth": []}, {"password": []}]
    return op


def _before_routing() -> str:
    rows = [f"`{ERRORS[c].status} {c}` ({ERRORS[c].when.rstrip('.')})" for c in BEFORE_ROUTING]
    return "Answered before any operation: " + "; ".join(rows) + "."


def document(
    routes: Sequence[Route], *, title: str, version: str, description: str = ""
) -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``routes``."""
    types: list[Any] = [ErrorResponse]
    for r in routes:
        types += [t for t in (r.body, r.form, r.query, *r.responses.values()) if t is not None]
    unique = list(dict.fromkeys(types))
    _, components = msgspec.json.schema_components(unique, ref_template=_REF)
    components = _polish(components)
    query_names = {r.query.__name__ for r in routes if r.query is not None}
    links = route_links(routes)
    paths: dict[str, dict[str, Any]] = {}
    for r in routes:
        query_params = []
        if r.query is not None:
            schema = components[r.query.__name__]
            required = set(schema.get("required", ()))
            for name, prop in schema["properties"].items():
                query_params.append(
                    {"name": name, "in": "query", "required": name in required, "schema": prop}
                )
        paths.setdefault(r.path, {})[r.method.lower()] = _operation(r, query_params, links)
    for name in query_names:
        del components[name]
    return {
        "openapi": "3.1.0",
        "info": {
            "title": title,
            "version": version,
            "description": "\n\n".join(d for d in (description, _before_routing()) if d),
        },
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": "JWT",
                    "description": "An access token from /api/auth/token, or any JWT the "
                    "gateway is configured to verify.",
                },
                "password": {
                    "type": "oauth2",
                    "description": "Log in with e-mail and password (Swagger UI: Authorize).",
                    "flows": {"password": {"tokenUrl": "/api/auth/token", "scopes": {}}},
                },
            },
        },
    }
