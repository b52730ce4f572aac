"""Fixtures shared by several test modules."""

import pytest

from .reference import one_torch_thread


@pytest.fixture(scope="module")
def torch_single_thread():
    """The tiny references run fastest on one thread: torch's OpenMP workers, spinning beside
    XLA's, make each of their LSTM calls take up to a second on a small machine."""
    with one_torch_thread():
        yield
