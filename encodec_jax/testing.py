"""Small models and signals for tests: ours, and those of programs built on encodec-jax.

A freshly initialised EnCodec has random codebooks that the encoder's outputs rarely come near,
so a handful of codes would cover everything. `random_model` fills each codebook from the
residuals the model itself produces (real residual frames plus a little noise), so codes vary
and near-ties are as common as in a trained model. Needs no PyTorch.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from . import functional, ops
from .config import EncodecConfig, RuntimeSettings
from .model import EncodecModel

# A tiny model for fast tests. hop 4 at 8 kHz: 2000 frames/s x 4 bits = 8 kbps per codebook,
# so 1, 2 and 3 codebooks.
TINY_CONFIG = EncodecConfig(
    num_filters=4,
    hidden_size=8,
    upsampling_ratios=(2, 2),
    codebook_size=16,
    target_bandwidths=(8.0, 16.0, 24.0),
    sampling_rate=8000,
)
# The 48 kHz layout in miniature: stereo, normalised, chunks of 80 samples (20 frames).
TINY_CHUNKED_CONFIG = dataclasses.replace(
    TINY_CONFIG,
    target_bandwidths=(8.0, 16.0),
    audio_channels=2,
    normalize=True,
    chunk_length_s=0.01,
    overlap=0.0,
)
# Non-causal with symmetric padding, like the 32 kHz model, in miniature.
TINY_NONCAUSAL_CONFIG = dataclasses.replace(TINY_CONFIG, use_causal_conv=False)


def random_audio(batch: int, channels: int, length: int, seed: int) -> np.ndarray:
    """`[batch, channels, length]` float32: a few sines plus noise, peak around 0.5."""
    rng = np.random.default_rng(seed)
    t = np.arange(length)[None, None, :]
    freqs = rng.uniform(0.001, 0.1, size=(batch, channels, 3, 1))
    sines = np.sin(2 * np.pi * freqs * t[:, :, None, :]).sum(axis=2) / 6
    noise = rng.normal(0.0, 0.05, size=(batch, channels, length))
    return (sines + noise).astype(np.float32)


def near_tie_gaps(
    model: EncodecModel, audio: np.ndarray, codes: np.ndarray, expected: np.ndarray
) -> list[tuple[int, int, int, float]]:
    """Where codes `[B, n_q, T]` of `audio` `[B, C, L]` (one chunk) differ from `expected`:
    (item, frame, level, gap) for each differing frame, at its first differing level. `gap` is
    the relative difference of the two chosen entries' float64 squared distances to the residual
    that `expected`'s earlier levels leave: float32 rounding flips codes only where it is around
    1e-6 or less, so a larger gap is a real disagreement."""
    differ = codes != expected
    if not differ.any():
        return []
    embeddings, _ = jax.jit(functional.embed)(model, jnp.asarray(audio))
    embeddings = np.asarray(embeddings, np.float64)  # [B, T, D]
    codebooks = np.asarray(model.quantizer.embeds(expected.shape[1]), np.float64)
    gaps = []
    for b, t in zip(*np.nonzero(differ.any(axis=1)), strict=True):
        level = int(np.argmax(differ[b, :, t]))
        residual = embeddings[b, t] - sum(codebooks[q, expected[b, q, t]] for q in range(level))
        ours, theirs = (
            ((residual - codebooks[level, c[b, level, t]]) ** 2).sum() for c in (codes, expected)
        )
        gaps.append((int(b), int(t), level, float(abs(ours - theirs) / theirs)))
    return gaps


def fill_codebooks(embeds: np.ndarray, residual: np.ndarray, seed: int) -> np.ndarray:
    """Codebooks `[n_q, bins, D]` drawn from residual frames `[N, D]`, level after level.

    Each level takes `bins` of the residual frames left by the levels before it (without
    replacement when there are enough) plus noise of a tenth of their spread, then quantizes
    them with the reference's distance formula to get the next level's residuals.
    """
    rng = np.random.default_rng(seed)
    out = np.empty_like(embeds)
    for level in range(embeds.shape[0]):
        bins = embeds.shape[1]
        n = residual.shape[0]
        idx = rng.permutation(n)[:bins] if n >= bins else rng.integers(0, n, bins)
        noise = rng.standard_normal(embeds.shape[1:]) * residual.std() * 0.1
        out[level] = residual[idx] + noise
        codes = np.asarray(ops.nearest_code(jnp.asarray(residual), jnp.asarray(out[level])))
        residual = residual - out[level][codes]
    return out


def random_model(
    config: EncodecConfig, seed: int = 0, settings: RuntimeSettings | None = None
) -> EncodecModel:
    """An `EncodecModel` for `config` with random weights and codebooks filled from its own
    residuals (see the module docstring). Deterministic for a seed."""
    model = EncodecModel(config, rngs=nnx.Rngs(seed), settings=settings)
    frames = min(config.codebook_size, 512)  # with replacement beyond that: noise keeps them apart
    length = math.ceil(frames / 4) * config.hop_length
    if config.chunk_length is not None:
        length = min(length, config.chunk_length)
    audio = random_audio(4, config.audio_channels, length, seed)
    embeddings, _ = jax.jit(functional.embed)(model, jnp.asarray(audio))
    pool = np.asarray(embeddings).reshape(-1, config.hidden_size).astype(np.float64)
    layers = model.quantizer.layers
    embeds = np.stack([np.asarray(layer.codebook.embed[...]) for layer in layers])
    filled = fill_codebooks(embeds, pool, seed).astype(np.float32)
    for layer, embed in zip(layers, filled, strict=True):
        layer.codebook.embed[...] = jnp.asarray(embed)
    return model
