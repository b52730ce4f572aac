"""Markers for tests that need a PyTorch reference: the rest run on an install without torch."""

import importlib.util

import pytest


def _installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


needs_torch = pytest.mark.skipif(not _installed("torch"), reason="needs PyTorch (a reference)")
needs_transformers = pytest.mark.skipif(
    not (_installed("torch") and _installed("transformers")),
    reason="needs transformers with PyTorch (a reference)",
)
