"""OpenAPI links between operations, derived from the route table.

A link says how the answer of one operation feeds the next, so clients (and
stateful testers such as schemathesis) can follow a resource through its
life: created, read, replaced, patched, deleted. They follow from what the
routes declare:

* a creation (``201``) leads to every operation on the item it made, at its
  ``location`` (or the collection's path + ``/{id}``), with ``id`` from the
  body and, where the route sends an ``ETag`` and the target takes
  ``If-Match`` or ``If-None-Match``, that ETag;
* an item's answer that carries an ``ETag`` leads to the other operations on
  the same item, with the same ``id`` and that ETag;
* a route's own ``links`` (login after registration, refresh after login).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from core.routing import Route

__all__ = ["route_links"]

_CONDITIONAL = ("If-Match", "If-None-Match")


def _to(target: Route, id_from: str, etag: bool) -> dict[str, Any]:
    params: dict[str, str] = {"path.id": id_from}
    if etag:
        for h in target.headers:
            if h.name in _CONDITIONAL:
                params[f"header.{h.name}"] = "$response.header.ETag"
    return {"operationId": target.operation_id, "parameters": params}


def _item_path(route: Route, paths: dict[str, list[Route]]) -> str | None:
    path = route.location or f"{route.path}/{{id}}"
    return path if path in paths else None


def route_links(routes: Sequence[Route]) -> dict[tuple[str, int], dict[str, Any]]:
    """(operation id, status) -> the links of that answer, by name."""
    paths: dict[str, list[Route]] = {}
    for r in routes:
        paths.setdefault(r.path, []).append(r)
    out: dict[tuple[str, int], dict[str, Any]] = {}
    for r in routes:
        if 201 in r.responses:
            item = _item_path(r, paths)
            for target in paths.get(item, []) if item else []:
                made = _to(target, "$response.body#/id", r.etag)
                out.setdefault((r.operation_id, 201), {})[target.operation_id] = made
        if r.etag and r.path_params() == ["id"] and 200 in r.responses:
            for target in paths[r.path]:
                if target is not r and any(h.name in _CONDITIONAL for h in target.headers):
                    same = _to(target, "$request.path.id", True)
                    out.setdefault((r.operation_id, 200), {})[target.operation_id] = same
        for name, link in r.links.items():
            status = min(s for s in r.responses if 200 <= s < 300)
            out.setdefault((r.operation_id, status), {})[name] = dict(link)
    return out
