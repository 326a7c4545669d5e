"""Each package's ``__all__`` is a sorted tuple of names that exist."""

from __future__ import annotations

import importlib

import pytest

PARTS = ("actors", "cache", "harness", "sidecar", "storage")
PACKAGES = ["graphcache", *(f"graphcache.{part}" for part in PARTS)]


@pytest.mark.parametrize("name", PACKAGES)
def test_all_is_a_sorted_tuple_of_existing_names(name: str) -> None:
    """Every public name is exported, sorted, and resolvable."""
    module = importlib.import_module(name)
    exported = module.__all__
    assert isinstance(exported, tuple)
    assert list(exported) == sorted(exported)
    for attr in exported:
        assert hasattr(module, attr), f"{name}.{attr} is in __all__ but missing"
