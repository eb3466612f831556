"""Dependencies point one way: proto <- core.infra <- core <- gateway.

Read from the sources (every import, also inside functions and under
TYPE_CHECKING), with no allow-list; and checked in a fresh interpreter for
what the Lambda handler and the lower layer actually load.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: Each layer, and the first-party layers it may import (itself included).
LAYERS = {
    "proto": {"proto"},
    "core.infra": {"proto", "core.infra"},
    "core": {"proto", "core.infra", "core"},
    "gateway": {"proto", "core.infra", "core", "gateway"},
}
FIRST_PARTY = ("proto", "core", "gateway")


def layer_of(module: str) -> str | None:
    """The layer ``module`` belongs to: the longest layer name it starts with."""
    found = [name for name in LAYERS if module == name or module.startswith(name + ".")]
    return max(found, key=len) if found else None


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in ``path``, relative ones resolved."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((node.lineno, module))
            # ``from core import infra`` imports the module core.infra.
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return found


def upward_imports() -> list[str]:
    offenders = []
    for top in FIRST_PARTY:
        for path in sorted((ROOT / top).rglob("*.py")):
            own = layer_of(module_name(path))
            assert own is not None
            seen = set()
            for line, module in imports_of(path):
                target = layer_of(module)
                if target is None or target in LAYERS[own] or line in seen:
                    continue
                seen.add(line)  # one report per statement
                offenders.append(f"{path.relative_to(ROOT)}:{line} ({own}) imports {module}")
    return offenders


def test_no_module_imports_a_layer_above_its_own():
    assert upward_imports() == []


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
    """The walk above would catch one: a core.infra module importing the gateway."""
    fake = tmp_path / "core" / "infra"
    fake.mkdir(parents=True)
    (tmp_path / "gateway").mkdir()
    (tmp_path / "proto").mkdir()
    (fake / "bad.py").write_text("def f():\n    from gateway.hub import Hub\n")
    (tmp_path / "core" / "ok.py").write_text("from . import infra\nfrom .infra import bad\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert upward_imports() == ["core/infra/bad.py:2 (core.infra) imports gateway.hub"]


def _loaded_by(statement: str, tops: tuple[str, ...] = FIRST_PARTY) -> list[str]:
    """The modules under ``tops`` that ``statement`` loads in a fresh interpreter."""
    code = (
        f"import sys; {statement}; "
        f"print('\\n'.join(sorted(m for m in sys.modules if m.split('.')[0] in {tops!r})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return out.stdout.split()


@pytest.mark.parametrize(
    ("statement", "forbidden"),
    [
        ("import core.lambda_handler", ("gateway",)),
        ("import core.server", ("gateway",)),
        ("import core.infra.settings", ("gateway", "redis", "asyncpg")),
    ],
)
def test_what_a_module_loads_in_a_fresh_interpreter(statement, forbidden):
    assert _loaded_by(statement, forbidden) == []


def test_the_lambda_handler_loads_the_core_and_not_the_socket_tier():
    loaded = _loaded_by("import core.lambda_handler")
    assert {"core.service", "core.infra.settings"} <= set(loaded)
    assert [m for m in loaded if m.startswith("gateway")] == []
