"""Fixtures shared by several test modules."""

import importlib.util
import os
import tempfile

import jax
import pytest

import encodec_jax

# One persistent compilation cache for the session and every process it starts (the command
# line, notebooks, workers): programs compiled by one test (the training step, say) are loaded,
# not compiled again, by the next. A fresh folder, so no run sees another's.
os.environ.setdefault(
    "ENCODEC_JAX_COMPILATION_CACHE", tempfile.mkdtemp(prefix="encodec-jax-test-xla-")
)
# Every program, however quick to compile: the many small ones of a model's initialisation add
# up to seconds in each process the tests start.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
jax.config.update(
    "jax_persistent_cache_min_compile_time_secs",
    float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]),
)
encodec_jax.enable_compilation_cache()

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


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs(request):
    """Drop JAX's in-memory compiled programs after each test module. XLA's CPU backend maps
    each executable's code into its own memory regions (about six per program), and the whole
    suite compiles thousands of programs in one process: kept alive, they approach the kernel's
    limit on mappings (vm.max_map_count, 65530 by default), and the suite crashed inside XLA
    while serialising a program near the end. Later modules load what they need again from the
    persistent cache."""
    yield
    log = os.environ.get("ENCODEC_JAX_TEST_MAPS_LOG")
    if log:  # for diagnosing: the mapping count each module leaves behind
        with open("/proc/self/maps") as f, open(log, "a") as out:
            out.write(f"{request.module.__name__} {sum(1 for _ in f)}\n")
    jax.clear_caches()
