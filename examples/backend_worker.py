"""A backend service on the gateway: follows ``projects`` and reacts over REST.

Every write of the REST core is pushed to ``projects`` as a change event,
``{"type": "created" | "updated" | "deleted", "id", "version", "data"}``.
This worker tags every project ``triaged`` with a conditional PATCH sent over
the same socket (``rpc``: no second connection, no second authentication).
A PATCH that loses a race (412) needs nothing more: the other write's
``updated`` event brings the project back. When the subscription reports a
`Gap` (events missed and not recovered), the worker re-reads every project.

Run it against a gateway (``make run``)::

    export GATEWAY_TOKEN=$(.venv/bin/python -m gateway token --sub worker --channels projects --role admin)

(``--role admin``: the worker changes projects it does not own; an API key
with ``rest``, made by an admin, serves as well.)
    GATEWAY_URL=ws://127.0.0.1:8888/ws .venv/bin/python examples/backend_worker.py

A real worker would also store ``sub.position`` and pass it as ``since``
when it starts again, to pick up what happened while it was down.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from gateway.client import Client, Gap, Publication

__all__ = ["TAG", "catch_up", "main", "triage"]

log = logging.getLogger("backend_worker")

TAG = "triaged"


async def triage(gw: Client, project: dict[str, Any]) -> None:
    """Tag ``project`` unless it already is; If-Match makes the write conditional."""
    if TAG in project["tags"]:
        return
    status, _, _ = await gw.rpc(
        "PATCH",
        f"/api/projects/{project['id']}",
        {"tags": [*project["tags"], TAG]},
        headers={"If-Match": f'"{project["version"]}"'},
    )
    if status == 200:
        log.info("project %d triaged", project["id"])
    elif status not in (404, 412):  # deleted, or changed meanwhile: its own event follows
        log.warning("could not triage project %d: HTTP %d", project["id"], status)


async def catch_up(gw: Client) -> None:
    """Re-read every project (keyset pages) after events may have been missed."""
    cursor: str | None = None
    while True:
        query = "?limit=100" + (f"&cursor={cursor}" if cursor else "")
        status, _, page = await gw.rpc("GET", "/api/projects" + query)
        if status != 200:
            log.warning("cannot list projects: HTTP %d", status)
            return
        for project in page["items"]:
            await triage(gw, project)
        cursor = page["next_cursor"]
        if cursor is None:
            return


async def main(url: str, token: str) -> None:
    async with Client(url, token=token) as gw:
        changes = await gw.subscribe("projects")
        log.info("following projects from %s", changes.position)
        async for event in changes:
            if isinstance(event, Gap):
                log.warning("missed events (%s): catching up", event.reason)
                await catch_up(gw)
            elif isinstance(event, Publication) and event.data["type"] != "deleted":
                await triage(gw, event.data["data"])


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    url = os.environ.get("GATEWAY_URL", "ws://127.0.0.1:8888/ws")
    asyncio.run(main(url, os.environ["GATEWAY_TOKEN"]))
