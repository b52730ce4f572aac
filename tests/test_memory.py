"""`encodec_jax.reuse_freed_memory` (glibc's malloc told to keep freed memory): measured by the
page faults a repeated jitted call takes in a fresh process, with and without it."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import jax.numpy as jnp
import pytest

import encodec_jax
from encodec_jax import memory

glibc_only = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="the setting is glibc's; elsewhere the function changes nothing and returns False",
)

# A 64 MiB input doubled 60 times; the page faults of the last 20 calls, per call.
_FAULTS = """
import json, resource, sys
import encodec_jax
applied = encodec_jax.reuse_freed_memory() if sys.argv[1] == "on" else None
import jax, jax.numpy as jnp
x = jnp.ones((16 * 1024 * 1024,), jnp.float32)
double = jax.jit(lambda x: x * 2)
for _ in range(40):
    double(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    double(x).block_until_ready()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20
print(json.dumps({"applied": applied, "faults": faults}))
"""
_PAGES = 64 * 1024 * 1024 // 4096


def _faults_per_call(setting: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", _FAULTS, setting], capture_output=True, text=True, check=True
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


@glibc_only
def test_freed_buffers_stay_mapped():
    """Without it every call faults in each 4 KiB page of its 64 MiB output (glibc maps a fresh
    buffer and unmaps it on free); with it, once warm, the pages are reused: no faults."""
    default = _faults_per_call("off")
    reused = _faults_per_call("on")
    assert default["faults"] >= 0.9 * _PAGES, default
    assert reused["applied"] is True
    # Measured: 0 per call after the first ~40 calls (16,384 without).
    assert reused["faults"] <= 0.05 * _PAGES, reused


@glibc_only
def test_too_late_once_jax_runs():
    """XLA's threads keep the malloc arenas they started with, so the call must come first; this
    process has run JAX already."""
    jnp.ones(3).block_until_ready()
    with pytest.raises(memory.JaxAlreadyRunningError, match="before JAX's first computation"):
        encodec_jax.reuse_freed_memory()


def test_switched_off_by_the_environment(monkeypatch):
    for off in ("off", "0", "False"):
        monkeypatch.setenv(memory.ENV_VAR, off)
        assert encodec_jax.reuse_freed_memory() is False
