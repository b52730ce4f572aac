"""How good is a reconstruction, and how are the codes used: the metrics that the trainer's
validation and `encodec-jax eval` report, as pure JAX functions of the audio and the codes.

Audio metrics compare a reconstruction with its reference item by item, `[B, C, T]` -> `[B]`:
- `si_snr`: scale-invariant signal-to-noise ratio in dB over the whole item (channels
  concatenated), higher is better;
- `mel_distance`: audiocraft's multi-scale mel-spectrogram distance (`msspec`, n_fft 64 to 1024),
  lower is better;
- `stft_distance`: audiocraft's multi-resolution STFT distance (`mrstft`), lower is better;
- `l1`: mean absolute difference of the samples.
The spectral distances are those of `encodec_jax.train.losses`, so a validation number and a
training loss of the same name mean the same thing.

Code statistics count how often each entry of each codebook is used (`code_counts`) and give
per codebook the perplexity (exp of the entropy, `bins` at best), the entropy in bits per code
(the rate an ideal entropy coder would reach), and the share of entries in use.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .train import losses


def si_snr(pred: jax.Array, target: jax.Array, eps: float = 1e-8) -> jax.Array:
    """Scale-invariant SNR in dB of each item: `[B, C, T]` -> `[B]`.

    Both signals are made zero-mean; `s = <pred, t> t / |t|^2` is the part of the prediction
    along the target `t`, `e = pred - s` the rest, and the result is `10 log10(|s|^2 / |e|^2)`
    (each energy plus `eps`, so silence against silence gives 0 dB rather than a NaN).
    """
    pred = pred.reshape(pred.shape[0], -1)
    target = target.reshape(target.shape[0], -1)
    pred = pred - jnp.mean(pred, axis=-1, keepdims=True)
    target = target - jnp.mean(target, axis=-1, keepdims=True)
    dot = jnp.sum(pred * target, axis=-1, keepdims=True)
    energy = jnp.sum(target * target, axis=-1, keepdims=True)
    s = dot / (energy + eps) * target
    e = pred - s
    return 10 * jnp.log10((jnp.sum(s * s, axis=-1) + eps) / (jnp.sum(e * e, axis=-1) + eps))


def mel_distance(pred: jax.Array, target: jax.Array, sample_rate: int) -> jax.Array:
    """audiocraft's multi-scale mel distance (`msspec` with its defaults) of each item `[B]`."""
    return jax.vmap(lambda p, t: losses.msspec_loss(p[None], t[None], sample_rate))(pred, target)


def stft_distance(pred: jax.Array, target: jax.Array) -> jax.Array:
    """audiocraft's multi-resolution STFT distance (`mrstft` with its defaults) of each item."""
    return jax.vmap(lambda p, t: losses.mrstft_loss(p[None], t[None]))(pred, target)


def l1(pred: jax.Array, target: jax.Array) -> jax.Array:
    """Mean absolute sample difference of each item `[B]`."""
    return jnp.mean(jnp.abs(pred - target).reshape(pred.shape[0], -1), axis=-1)


def code_counts(codes: jax.Array, bins: int, valid: jax.Array | None = None) -> jax.Array:
    """How often each entry of each codebook occurs: codes `[B, n_q, T]` -> `[n_q, bins]`.

    Args:
        codes: integer codes; negative values (unused codebooks) are not counted.
        bins: entries per codebook.
        valid: optional `[B, T]` mask of the frames to count (padding excluded).
    """
    n_q = codes.shape[1]
    weights = jnp.ones(codes.shape, jnp.float32)
    if valid is not None:
        weights = weights * valid[:, None, :].astype(jnp.float32)
    weights = jnp.where(codes >= 0, weights, 0.0)
    flat = jnp.clip(codes, 0, bins - 1).transpose(1, 0, 2).reshape(n_q, -1)
    flat_w = weights.transpose(1, 0, 2).reshape(n_q, -1)
    return jax.vmap(lambda c, w: jnp.zeros(bins, jnp.float32).at[c].add(w))(flat, flat_w)


def entropy_bits(counts: jax.Array) -> jax.Array:
    """Entropy in bits per code of each codebook's empirical distribution `[n_q, bins]` ->
    `[n_q]` (0 for a codebook with no counts)."""
    total = jnp.sum(counts, axis=-1, keepdims=True)
    p = counts / jnp.where(total > 0, total, 1.0)
    safe = jnp.where(p > 0, p, 1.0)
    return -jnp.sum(jnp.where(p > 0, p * jnp.log2(safe), 0.0), axis=-1)


def perplexity(counts: jax.Array) -> jax.Array:
    """exp(entropy) of each codebook's usage `[n_q, bins]` -> `[n_q]`: the number of equally used
    entries that would give the same entropy (`bins` when all are used equally)."""
    return jnp.where(jnp.sum(counts, axis=-1) > 0, 2.0 ** entropy_bits(counts), 0.0)


def usage(counts: jax.Array) -> jax.Array:
    """Share of each codebook's entries that occur at least once `[n_q, bins]` -> `[n_q]`."""
    return jnp.mean(counts > 0, axis=-1)
