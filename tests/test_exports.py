"""Every public module lists its API in __all__, and every listed name exists."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

PACKAGES = ["proto", "gateway", "core"]


def _modules():
    for name in PACKAGES:
        pkg = importlib.import_module(name)
        yield name
        for info in pkgutil.walk_packages(pkg.__path__, prefix=name + "."):
            if not info.name.endswith("__main__"):
                yield info.name


@pytest.mark.parametrize("name", sorted(_modules()))
def test_all_is_declared_and_resolves(name):
    module = importlib.import_module(name)
    if name in PACKAGES and not hasattr(module, "__all__"):
        pytest.fail(f"{name} has no __all__")
    exported = getattr(module, "__all__", None)
    if name not in PACKAGES:
        assert exported is not None, f"{name} has no __all__"
    for attr in exported or ():
        assert hasattr(module, attr), f"{name}.__all__ names missing {attr}"


def test_proto_exports_the_protocol_surface():
    import proto

    for name in ("Connection", "JSON_CODEC", "MSGPACK_CODEC", "ErrorCode", "CloseCode", "Grants"):
        assert name in proto.__all__
