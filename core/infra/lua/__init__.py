"""The Redis Lua scripts, each in a file of its own (``<name>.lua`` here).

Kept as files so that they read as Lua, diff as Lua, and can be loaded by
backends in other languages (EVALSHA) from the same source.
"""

from __future__ import annotations

import functools
from pathlib import Path

__all__ = ["script"]

_HERE = Path(__file__).resolve().parent


@functools.cache
def script(name: str) -> str:
    """The text of ``<name>.lua``."""
    return (_HERE / f"{name}.lua").read_text(encoding="utf-8")
