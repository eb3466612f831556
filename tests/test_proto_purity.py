"""proto/ is sans-I/O: it imports no event loop, network or Redis library."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

FORBIDDEN = {"tornado", "asyncio", "redis", "asyncpg", "socket", "selectors", "uvloop"}
PROTO = Path(__file__).resolve().parent.parent / "proto"


def test_proto_sources_import_no_io_library():
    offenders = []
    for path in sorted(PROTO.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            else:
                continue
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in FORBIDDEN]
    assert offenders == []


def test_importing_proto_loads_no_io_library():
    code = (
        "import sys, proto; bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        f"{FORBIDDEN!r}); print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
