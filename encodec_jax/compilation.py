"""JAX's persistent compilation cache, which the command line and the notebooks turn on.

Compiling the SEANet programs takes seconds per input shape; caching them on disk makes every
later process (a notebook restart, each worker of a tokenization job) start warm. `import
encodec_jax` changes no JAX setting: a library user turns the cache on with
`encodec_jax.enable_compilation_cache()` (or JAX's own `jax_compilation_cache_dir`).
"""

from __future__ import annotations

import os

import jax

ENV_VAR = "ENCODEC_JAX_COMPILATION_CACHE"
_OFF = ("0", "off", "false", "no", "none")


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "encodec-jax", "xla")


def enable_compilation_cache(directory: str | os.PathLike | None = None) -> str | None:
    """Point JAX's persistent compilation cache at `directory` and return it.

    Without an argument: `$ENCODEC_JAX_COMPILATION_CACHE` (a directory, or "off" to leave the
    cache alone), else a cache directory the user already gave JAX, else
    `~/.cache/encodec-jax/xla` (under `$XDG_CACHE_HOME` when set). Returns None when off.
    """
    if directory is None:
        setting = os.environ.get(ENV_VAR, "").strip()
        if setting.lower() in _OFF:
            return None
        if not setting and jax.config.jax_compilation_cache_dir:
            return jax.config.jax_compilation_cache_dir  # the user's own choice wins
        directory = setting or default_cache_dir()
    directory = os.fspath(os.path.expanduser(directory))
    jax.config.update("jax_compilation_cache_dir", directory)
    return directory
