"""Keeping freed CPU memory for reuse, which the command line turns on.

XLA's CPU runtime allocates every compiled call's outputs and temporaries with malloc. glibc
serves a buffer larger than its mmap threshold (32 MiB at most) as a fresh mapping and unmaps it
on free, so each call page-faults once per 4 KiB page of every large buffer it writes: on CI's
CPU, an elementwise pass over a 328 MB activation (the 32 kHz encoder's first one at 4 x 10 s)
took 106 ms that way and 19 ms once its pages stayed mapped. ONNX Runtime sidesteps the same
cost with its own memory arena; XLA's CPU client has no such option.

`reuse_freed_memory()` asks glibc to serve every allocation from its main heap and never hand
freed memory back to the system, so later calls find their pages mapped. The price is memory:
the process keeps its peak until it exits (`malloc_trim(0)` from libc gives it back), and the
gaps aligned allocations leave add to it (a loop over a 64 MiB array settled at 969 MiB resident
instead of 329; the 48 kHz benchmark process peaked at 7.0 GiB instead of 5.7). It changes no
number, only where memory comes from. `import encodec_jax` changes nothing: the
`encodec-jax` command turns it on unless `ENCODEC_JAX_REUSE_MEMORY=off`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import sys

ENV_VAR = "ENCODEC_JAX_REUSE_MEMORY"
_OFF = ("0", "off", "false", "no", "none")

# mallopt parameters from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


class JaxAlreadyRunningError(RuntimeError):
    """Raised when JAX's backend started before `reuse_freed_memory()` was called."""


def reuse_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse. Returns False where there is nothing to do.

    Call it before JAX's first computation: each thread keeps the malloc arena it first
    allocated from, and XLA's threads allocate as soon as the backend starts, from arenas that
    still map and unmap large buffers. Raises `JaxAlreadyRunningError` when that has happened.
    Returns False, changing nothing, where the C library is not glibc (macOS, musl), whose
    allocators behave differently, or when `$ENCODEC_JAX_REUSE_MEMORY` is `off`.
    """
    if os.environ.get(ENV_VAR, "").strip().lower() in _OFF:
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if _jax_backend_started():
        raise JaxAlreadyRunningError(
            "reuse_freed_memory() must run before JAX's first computation: XLA's threads "
            "already allocate from their own malloc arenas"
        )
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    # One arena, so XLA's threads allocate from the main heap too: other arenas fall back to
    # mmap for any buffer larger than their 64 MiB heaps, even with mmap turned off below.
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))  # -1: never trim
    for parameter, value in settings:
        if libc.mallopt(parameter, value) != 1:
            raise OSError(f"glibc's mallopt({parameter}, {value}) failed")
    return True


def _jax_backend_started() -> bool:
    """Whether JAX has created a backend in this process (False before `import jax`)."""
    if "jax" not in sys.modules:
        return False
    from jax._src import xla_bridge  # no public API says whether a backend exists yet

    return xla_bridge.backends_are_initialized()
