"""OpenAPI 3.1 from the route table and the msgspec types, nothing written by hand twice.

msgspec emits JSON Schema 2020-12, which OpenAPI 3.1 uses as is. Two things
msgspec cannot say are added here: the bounds of Decimal fields (the
budget), and that decimals travel as JSON numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec

from core.infra.errors import ErrorResponse
from core.routing import Route
from core.schemas import BUDGET_MAX

__all__ = ["document"]

_REF = "#/components/schemas/{name}"
_DECIMAL = {
    "type": "number",
    "minimum": 0,
    "maximum": int(BUDGET_MAX),
    "description": "Amount with at most two decimal places, 0 to 1,000,000,000.",
    "examples": [12500.5],
}
_ERRORS = {
    400: "Malformed JSON, or a body where none is taken; `invalid_grant` for a refused login.",
    401: "Missing or invalid bearer token.",
    403: "Not allowed for this caller.",
    404: "No such resource.",
    405: "Method not allowed (see the Allow header).",
    409: "Conflict with the current state (e.g. a duplicate), or a key still in use.",
    412: "If-Match does not match the current version.",
    413: "Body too large.",
    422: "Validation failed: `details` lists every bad field.",
    429: "Rate limited: retry after `Retry-After` seconds.",
    503: "A dependency is unavailable; retry after Retry-After seconds.",
}


def _polish(node: Any) -> Any:
    """What msgspec's schemas leave unsaid.

    Decimal is written as a string with format decimal; ours are bounded
    numbers. String enums carry no ``type``, which viewers show as "any".
    """
    if isinstance(node, dict):
        if node.get("format") == "decimal":
            described = {"description": node["description"]} if "description" in node else {}
            return {**_DECIMAL, **described}
        out = {k: _polish(v) for k, v in node.items()}
        enum = out.get("enum")
        if enum and "type" not in out and all(isinstance(v, str) for v in enum):
            out["type"] = "string"
        return out
    if isinstance(node, list):
        return [_polish(v) for v in node]
    return node


def _error_response(status: int) -> dict[str, Any]:
    return {
        "description": _ERRORS[status],
        "content": {"application/json": {"schema": {"$ref": _REF.format(name="ErrorResponse")}}},
    }


def _operation(route: Route, query_params: list[dict[str, Any]]) -> dict[str, Any]:
    op: dict[str, Any] = {
        "operationId": route.operation_id,
        "summary": route.summary,
        "tags": [route.tag],
    }
    if route.description:
        op["description"] = route.description
    params = [
        {"name": name, "in": "path", "required": True,
         "schema": {"type": "integer", "minimum": 1, "maximum": 2**62}}
        for name in route.path_params()
    ]  # fmt: skip
    params += query_params
    params += [
        {"name": h.name, "in": "header", "required": False, "description": h.description,
         "schema": dict(h.schema)}
        for h in route.headers
    ]  # fmt: skip
    if params:
        op["parameters"] = params
    for media, body in (("application/json", route.body),
                        ("application/x-www-form-urlencoded", route.form)):  # fmt: skip
        if body is not None:
            ref = {"$ref": _REF.format(name=body.__name__)}
            op["requestBody"] = {"required": True, "content": {media: {"schema": ref}}}
    responses: dict[str, Any] = {}
    for status, tp in route.responses.items():
        resp: dict[str, Any] = {"description": _describe(status)}
        if tp is not None:
            name = tp.__name__  # type: ignore[attr-defined]
            resp["content"] = {"application/json": {"schema": {"$ref": _REF.format(name=name)}}}
        headers = {}
        if status == 201:
            headers["Location"] = {"schema": {"type": "string"}, "description": "The new resource."}
        if any(h.name in ("If-Match", "If-None-Match") for h in route.headers) or status == 201:
            headers["ETag"] = {"schema": {"type": "string"}, "description": "The version, quoted."}
        if headers:
            resp["headers"] = headers
        responses[str(status)] = resp
    errors = {400, 405, 429, 503, *route.errors}
    if route.auth:
        # 403: the route's access rule (core/access.py), or an API key without `rest`.
        errors.update((401, 403))
    if route.body or route.form or route.query or route.idempotent:
        errors.add(422)
    if route.body is not None or route.form is not None:
        errors.add(413)
    if route.idempotent:
        errors.add(409)
    for status in sorted(errors):
        responses[str(status)] = _error_response(status)
    op["responses"] = responses
    if route.auth:
        op["security"] = [{"bearerAuth": []}, {"password": []}]
    return op


def _describe(status: int) -> str:
    return {200: "OK", 201: "Created", 204: "No content", 304: "Not modified"}.get(status, "OK")


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
        paths.setdefault(r.path, {})[r.method.lower()] = _operation(r, query_params)
    for name in query_names:
        del components[name]
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version, "description": description},
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
