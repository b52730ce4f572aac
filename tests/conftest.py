"""Fixtures shared by several test modules."""

import importlib.util

import pytest

# Modules that compare against the PyTorch references from top to bottom; without torch they are
# not collected, and the rest of the suite runs (the other modules mark their few torch tests).
collect_ignore = (
    []
    if importlib.util.find_spec("torch")
    else ["test_parity.py", "test_original_parity.py", "test_convert.py"]
)


@pytest.fixture(scope="module")
def torch_single_thread():
    """The tiny references run fastest on one thread: torch's OpenMP workers, spinning beside
    XLA's, make each of their LSTM calls take up to a second on a small machine."""
    if importlib.util.find_spec("torch") is None:
        yield  # nothing to tune
        return
    from .reference import one_torch_thread

    with one_torch_thread():
        yield
