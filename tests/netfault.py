"""The figures of tests/test_netfault.py: each scenario writes them here; print them with::

    .venv/bin/python -m tests.netfault            # the last run's figures, one block a scenario
    .venv/bin/python -m tests.netfault --json     # the file itself

They live in ``$NETFAULT_FIGURES``, by default ``<temp dir>/gw-netfault-figures.json``, one
entry per scenario, replaced by each run of it. docs/operations.md quotes them.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["figures_path", "load", "record"]


def figures_path() -> Path:
    default = Path(tempfile.gettempdir()) / "gw-netfault-figures.json"
    return Path(os.environ.get("NETFAULT_FIGURES") or default)


def load() -> dict[str, dict[str, Any]]:
    try:
        data: dict[str, dict[str, Any]] = json.loads(figures_path().read_text())
    except (OSError, ValueError):
        return {}
    return data


def record(scenario: str, **figures: Any) -> None:
    """Keep ``figures`` (JSON values; seconds rounded to ms) as ``scenario``'s latest."""
    rounded = {k: round(v, 3) if isinstance(v, float) else v for k, v in figures.items()}
    data = load()
    data[scenario] = {"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **rounded}
    path = figures_path()
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def main(argv: list[str]) -> None:
    data = load()
    if "--json" in argv:
        print(json.dumps(data, indent=2, sort_keys=True))
        return
    if not data:
        print(f"no figures in {figures_path()}: run `make test` or pytest -m netfault first")
        return
    print(f"# {figures_path()}")
    for scenario, figures in sorted(data.items()):
        print(f"\n{scenario}")
        for key, value in figures.items():
            print(f"  {key:<34} {value}")


if __name__ == "__main__":
    main(sys.argv[1:])
