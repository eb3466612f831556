"""The gateway's first routing step sends the core's paths, and only those, to the core."""

from __future__ import annotations

import pytest

from gateway.router import is_core_path


@pytest.mark.parametrize(
    ("path", "core"),
    [
        ("/api/projects", True),
        ("/api/projects/7/members", True),
        ("/api/", True),
        ("/api/publish", False),  # the gateway's own
        ("/api/publish/x", True),  # as Tornado's rule (/api/(?!publish$).*) had it
        ("/api/server/connections", False),  # the server API
        ("/api", False),
        ("/ws", False),
        ("/lp/abc", False),
        ("/metrics", False),
        ("/docs", False),
    ],
)
def test_core_paths(path, core):
    assert is_core_path(path) is core
