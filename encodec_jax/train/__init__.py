"""Training EnCodec in JAX, part for part as audiocraft 1.3.0 trains it.

Pure functions with explicit state and explicit PRNG keys, so each part jit-compiles, runs under
data parallelism and composes with the user's own training loop.
"""
