"""The residual vector quantizer in training mode, as audiocraft 1.3.0 trains it.

audiocraft's `ResidualVectorQuantizer` (`quantization/vq.py`, `core_vq.py`) updates its codebooks
during the forward pass: k-means initialisation on the first batch a codebook sees, then
exponential moving averages (EMA) of the code counts and of the sums of the vectors assigned to
each code. Here that is one pure function, `quantize`, from an explicit state to a new state.

Layouts: inputs and quantized outputs are channels-last `[B, T, D]` like the codec; codes are
`[B, n_q, T]`; the state stacks the codebooks, `embed [n_q, bins, D]` (see `QuantizerState`).
Vectors are flattened batch-major, `[B * T, D]` (row `b * T + t`), as the reference flattens them.

Every codebook runs every step (a `lax.scan` over the codebooks) and is masked when it is beyond
the step's number of codebooks, so that this number may be a traced value (quantizer dropout)
without a recompile: a masked codebook gets no k-means, no EMA update and contributes nothing to
the output or the penalty, exactly as if the reference had skipped it.

Data parallelism (`axis_name`, inside `jax.shard_map` with the batch split over the axis and the
state replicated): every statistic that updates a codebook (EMA counts and sums, k-means counts
and sums, the vectors sampled to start k-means or to replace expired codes) is reduced over the
axis, so N devices compute the codebooks that one device computes for the same global batch. The
sampled rows are indices into the global batch, drawn from the same key on every device, and
each device contributes the rows it holds. Pass the same `key` to every device.
audiocraft on several GPUs does otherwise: each worker runs k-means on its own shard and rank
0's result is broadcast, and after each step `flashy.distrib.sync_model` averages the buffers
over the workers, so its counts are per worker (the global count / workers, which shifts what
`threshold_ema_dead_code` means) and the next step codes with the average of the workers'
`embed` rather than `embed_avg / n` of the global statistics.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from .. import ops

EXPIRY_MODES = ("faithful", "reset")
AxisName = str | tuple[str, ...] | None


@dataclasses.dataclass(frozen=True)
class QuantizerConfig:
    """Static settings of the training-mode RVQ (hashable: static under `jax.jit`).

    Defaults are audiocraft's `config/model/encodec/default.yaml` (`rvq:` and `seanet.dimension`).

    Attributes:
        dim: size D of the vectors and codebook entries.
        bins: entries per codebook.
        n_q: number of codebooks (the maximum when `q_dropout` is on).
        q_dropout: draw the number of codebooks of each batch uniformly from 1..n_q.
        decay: EMA decay of the code counts and sums.
        kmeans_init: start each codebook with k-means on the first batch it sees; otherwise
            `init_state` draws it as torch's `kaiming_uniform_` would, and marks it initialised.
        kmeans_iters: Lloyd iterations of that k-means.
        threshold_ema_dead_code: a code whose EMA count is below this is expired (0: never). It
            is an absolute count per batch, as in audiocraft: see `expiry`.
        epsilon: Laplace smoothing of the counts that divide the sums.
        commitment_weight: weight of the commitment penalty.
        expiry: "faithful" reproduces audiocraft, where expiry has no effect (it writes
            replacement vectors into `embed`, which the EMA step then overwrites from
            `embed_avg`; encodec issue 61). "reset" makes it take effect: each expired code gets a
            random vector `v` of the batch (that codebook's input): `cluster_size = r` and
            `embed_avg = r * v`, where `r` is the mean of `cluster_size` over the codebook
            before the reset (kyutai moshi's rule, its `replaced_usage_ratio` = 1), so that the
            EMA update that follows in the same step sets `embed` to `v` (up to the Laplace
            smoothing, when no vector was assigned to the code in this step, which is what
            makes a code expire). With
            `threshold_ema_dead_code` above the mean count per code (frames per global batch /
            bins; 3200 / 2048 = 1.56 for MusicGen's 32 kHz codec at batch 64), most codes are
            below it at any time and "reset" would replace them every step: lower it.
    """

    dim: int = 128
    bins: int = 1024
    n_q: int = 8
    q_dropout: bool = False
    decay: float = 0.99
    kmeans_init: bool = True
    kmeans_iters: int = 50
    threshold_ema_dead_code: float = 2
    epsilon: float = 1e-5
    commitment_weight: float = 1.0
    expiry: str = "faithful"

    def __post_init__(self) -> None:
        def fail(msg: str) -> None:
            raise ValueError(f"Invalid QuantizerConfig: {msg}")

        if self.dim < 1 or self.bins < 1 or self.n_q < 1:
            fail(f"dim, bins and n_q must be positive, got {self.dim}, {self.bins}, {self.n_q}")
        if self.expiry not in EXPIRY_MODES:
            fail(f"expiry must be one of {EXPIRY_MODES}, got {self.expiry!r}")
        if self.kmeans_init and self.kmeans_iters < 1:
            # audiocraft's kmeans returns the counts of its last iteration: with none it fails.
            fail("kmeans_iters must be at least 1 with kmeans_init")
        if not 0.0 <= self.decay <= 1.0:
            fail(f"decay must be in [0, 1], got {self.decay}")

    @classmethod
    def for_model(cls, config: Any, **overrides: Any) -> QuantizerConfig:
        """The settings for an `EncodecConfig` (its codebook size and dim, its largest n_q)."""
        sizes = dict(dim=config.codebook_dim, bins=config.codebook_size, n_q=config.num_quantizers)
        return cls(**{**sizes, **overrides})


class QuantizerState(NamedTuple):
    """The codebooks and their EMA statistics, stacked over the codebooks (audiocraft's buffers).

    Attributes:
        embed: `[n_q, bins, D]` the codebooks used for coding.
        embed_avg: `[n_q, bins, D]` EMA of the sum of the vectors assigned to each code.
        cluster_size: `[n_q, bins]` EMA of the number of vectors assigned to each code.
        inited: `[n_q]` 1.0 once a codebook is initialised (k-means ran), else 0.0.
    """

    embed: jax.Array
    embed_avg: jax.Array
    cluster_size: jax.Array
    inited: jax.Array


class QuantizerOutput(NamedTuple):
    """What one training step of the quantizer returns.

    Attributes:
        quantized: `[B, T, D]` the quantized vectors with the straight-through gradient: the
            value of the quantization, the gradient of the identity.
        codes: `[B, n_q, T]` int32, -1 for the codebooks beyond this step's n_q.
        penalty: `[]` commitment penalty times its weight, averaged over the codebooks used (on
            this device's batch under `axis_name`, as each audiocraft worker computes it).
        state: the updated `QuantizerState`.
        metrics: `n_q` `[]` int32, the codebooks used; `usage` `[n_q, bins]` how many vectors of
            the (global) batch each code got, 0 for unused codebooks; `perplexity` `[n_q]`
            exp(entropy) of that usage (0 for unused codebooks, `bins` at best); `dead_codes`
            `[n_q]` the codes expired in this step (EMA count below the threshold before the
            update; in "faithful" mode they are counted but, as in audiocraft, not replaced).
    """

    quantized: jax.Array
    codes: jax.Array
    penalty: jax.Array
    state: QuantizerState
    metrics: dict[str, jax.Array]


# ---- state ----
def init_state(config: QuantizerConfig, key: jax.Array | None = None) -> QuantizerState:
    """A fresh state, as audiocraft's `EuclideanCodebook.__init__` makes it.

    With `kmeans_init`, zeros and `inited = 0` (k-means fills the codebooks on their first
    batch). Without, each codebook is drawn as torch's `kaiming_uniform_` does for a
    `[bins, D]` tensor, `U(-sqrt(6 / D), sqrt(6 / D))` (distribution only: torch's random
    numbers cannot be reproduced), `embed_avg` is a copy of it and `inited = 1`.

    Args:
        config: the quantizer settings.
        key: PRNG key, needed only without `kmeans_init`.

    Returns:
        `QuantizerState` with `embed [n_q, bins, D]`, `embed_avg` likewise, `cluster_size
        [n_q, bins]` zeros, `inited [n_q]`.
    """
    shape = (config.n_q, config.bins, config.dim)
    if config.kmeans_init:
        embed = jnp.zeros(shape, jnp.float32)
    else:
        if key is None:
            raise ValueError("init_state needs a key when kmeans_init is off")
        bound = (6.0 / config.dim) ** 0.5  # gain sqrt(2) (a = 0) times sqrt(3 / fan_in)
        embed = jax.random.uniform(key, shape, jnp.float32, -bound, bound)
    return QuantizerState(
        embed=embed,
        embed_avg=embed,
        cluster_size=jnp.zeros(shape[:2], jnp.float32),
        inited=jnp.full((config.n_q,), 0.0 if config.kmeans_init else 1.0, jnp.float32),
    )


def state_from_codebooks(codebooks: Sequence[Any]) -> QuantizerState:
    """The state stacked from the model's codebooks (`EncodecCodebook`s, e.g.
    `[layer.codebook for layer in model.quantizer.layers]`), whose buffers are `embed
    [bins, D]`, `embed_avg [bins, D]`, `cluster_size [bins]` and `inited [1]`."""
    if not codebooks:
        raise ValueError("state_from_codebooks needs at least one codebook")
    return QuantizerState(
        embed=jnp.stack([cb.embed[...] for cb in codebooks]),
        embed_avg=jnp.stack([cb.embed_avg[...] for cb in codebooks]),
        cluster_size=jnp.stack([cb.cluster_size[...] for cb in codebooks]),
        inited=jnp.stack([jnp.reshape(cb.inited[...], ()) for cb in codebooks]),
    )


def state_to_codebooks(state: QuantizerState, codebooks: Sequence[Any]) -> None:
    """Write the state back into the model's codebooks, in place (NNX modules are mutable).

    Raises:
        ValueError: when the number of codebooks or a buffer's shape does not match.
    """
    if len(codebooks) != state.embed.shape[0]:
        raise ValueError(f"{len(codebooks)} codebooks for a state of {state.embed.shape[0]}")
    for i, cb in enumerate(codebooks):
        values = dict(
            embed=state.embed[i],
            embed_avg=state.embed_avg[i],
            cluster_size=state.cluster_size[i],
            inited=jnp.reshape(state.inited[i], (1,)),
        )
        for name, value in values.items():
            buffer = getattr(cb, name)
            if buffer[...].shape != value.shape:
                raise ValueError(
                    f"codebook {i}: {name} is {buffer[...].shape} in the model, "
                    f"{value.shape} in the state"
                )
            buffer[...] = value.astype(buffer[...].dtype)


# ---- sampling, k-means ----
def sample_indices(key: jax.Array, num_samples: int, num: int) -> jax.Array:
    """`num` random row indices out of `num_samples`, as audiocraft's `sample_vectors` picks
    them: without replacement (a random permutation's head) when there are enough rows, with
    replacement otherwise. Returns `[num]` int32."""
    if num_samples >= num:
        return jax.random.permutation(key, num_samples)[:num].astype(jnp.int32)
    return jax.random.randint(key, (num,), 0, num_samples, jnp.int32)


def _axis_size(axis_name: AxisName) -> int:
    return 1 if axis_name is None else lax.axis_size(axis_name)


def _psum(x: jax.Array, axis_name: AxisName) -> jax.Array:
    return x if axis_name is None else lax.psum(x, axis_name)


def take_global_rows(samples: jax.Array, indices: jax.Array, axis_name: AxisName) -> jax.Array:
    """Rows `indices` of the global batch, the same on every device.

    Args:
        samples: `[N, D]` this device's rows; device i along `axis_name` holds global rows
            `[i * N, (i + 1) * N)` (a batch split over the axis, as `shard_map` splits it).
        indices: `[K]` indices into the global `[N * devices, D]` rows.
        axis_name: the data-parallel axis, or None (one device: a plain gather).

    Returns:
        `[K, D]`: each row comes from the device that holds it, zeros from the others, summed.
    """
    if axis_name is None:
        return samples[indices]
    n = samples.shape[0]
    local = indices - lax.axis_index(axis_name) * n
    mine = (local >= 0) & (local < n)
    rows = jnp.where(mine[:, None], samples[jnp.clip(local, 0, n - 1)], 0.0)
    return lax.psum(rows, axis_name)


def kmeans(
    samples: jax.Array, means: jax.Array, num_iters: int, axis_name: AxisName = None
) -> tuple[jax.Array, jax.Array]:
    """Lloyd's algorithm from the given starting means, as audiocraft's `kmeans` runs it.

    The distance is `sum((x - m)^2)` written out (audiocraft's k-means does not use the expanded
    form of `quantize`), ties go to the first mean, and a mean that gets no vector keeps its
    value. Sums and counts are reduced over `axis_name`.

    Args:
        samples: `[N, D]` this device's vectors.
        means: `[C, D]` starting means (the same on every device).
        num_iters: iterations, at least 1.
        axis_name: the data-parallel axis, or None.

    Returns:
        means `[C, D]` and int32 counts `[C]`; the counts are those of the last assignment,
        made with the means before their last update (what audiocraft returns).
    """
    num_clusters = means.shape[0]

    def step(_, carry):
        means, _ = carry
        # XLA fuses the difference into the reduction: no [N, C, D] array is materialised.
        dists = -jnp.sum(jnp.square(samples[:, None, :] - means[None, :, :]), axis=-1)
        buckets = jnp.argmax(dists, axis=-1)
        counts = jax.ops.segment_sum(
            jnp.ones_like(buckets, jnp.int32), buckets, num_segments=num_clusters
        )
        sums = jax.ops.segment_sum(samples, buckets, num_segments=num_clusters)
        counts, sums = _psum(counts, axis_name), _psum(sums, axis_name)
        empty = counts == 0
        new_means = sums / jnp.where(empty, 1, counts)[:, None].astype(sums.dtype)
        return jnp.where(empty[:, None], means, new_means), counts

    init = (means, jnp.zeros((num_clusters,), jnp.int32))
    return lax.fori_loop(0, num_iters, step, init)


def draw_n_q(key: jax.Array, max_n_q: int) -> jax.Array:
    """Quantizer dropout: one number of codebooks, uniform in 1..max_n_q. Returns `[]` int32."""
    return jax.random.randint(key, (), 1, max_n_q + 1, jnp.int32)


# ---- one training step ----
def _ema(moving: jax.Array, new: jax.Array, decay: float) -> jax.Array:
    # audiocraft's ema_inplace: mul_(decay) then add_(new, alpha=1 - decay).
    return moving * decay + new * (1 - decay)


def _laplace_counts(cluster_size: jax.Array, bins: int, epsilon: float) -> jax.Array:
    # Written as audiocraft writes it: (n + eps) / (sum + bins * eps), times the sum.
    total = jnp.sum(cluster_size)
    return (cluster_size + epsilon) / (total + bins * epsilon) * total


def _perplexity(usage: jax.Array) -> jax.Array:
    total = jnp.sum(usage)
    p = usage / jnp.where(total > 0, total, 1.0)
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
    return jnp.where(total > 0, jnp.exp(entropy), 0.0)


def quantize(
    config: QuantizerConfig,
    state: QuantizerState,
    x: jax.Array,
    key: jax.Array,
    *,
    n_q: int | jax.Array | None = None,
    kmeans_indices: jax.Array | None = None,
    axis_name: AxisName = None,
) -> QuantizerOutput:
    """One training-mode forward of the RVQ, updating the codebooks (audiocraft's
    `ResidualVectorQuantizer.forward` with the model in training mode).

    For each codebook in turn, on the residual `r` left by the codebooks before it: k-means
    initialisation if it is not initialised yet; codes and quantized vectors `q` with the
    codebook as it was before this step's update; expiry of codes whose EMA count is below the
    threshold; the EMA update `cluster_size <- decay * cluster_size + (1 - decay) * counts`,
    `embed_avg` likewise with the sums of the vectors per code, `embed <- embed_avg / n` with
    Laplace-smoothed counts `n`; the commitment term `mse(stop_gradient(q'), r)` with
    `q' = r + stop_gradient(q - r)`, and the next residual `r - q'`. The output is
    `x + stop_gradient(sum(q') - x)`: the gradient reaches `x` through the identity only, and
    through the penalty.

    Args:
        config: static settings.
        state: the codebooks, replicated across `axis_name`.
        x: `[B, T, D]` the encoder's output (this device's share of the batch).
        key: PRNG key, the same on every device: quantizer dropout, the k-means starting vectors
            and the replacement vectors of "reset" expiry.
        n_q: codebooks to use this step, 1..config.n_q (may be traced; clipped to that range).
            Default: drawn from `key` with `q_dropout`, else `config.n_q`.
        kmeans_indices: `[n_q, bins]` int, rows of the flattened global batch (`b * T + t`)
            that start the k-means of each codebook initialised in this step, instead of the
            ones drawn from `key` (so that a test can start from the reference's vectors).
        axis_name: the data-parallel axis name inside `shard_map` (or a tuple of names, as
            `lax.psum` takes them, the batch split over them in that order), or None.

    Returns:
        `QuantizerOutput(quantized [B, T, D], codes [B, n_q, T], penalty [], state, metrics)`.
    """
    batch, frames, dim = x.shape
    if dim != config.dim:
        raise ValueError(f"x has {dim} channels, the quantizer {config.dim}")
    num_local = batch * frames
    num_global = num_local * _axis_size(axis_name)
    bins, max_n_q = config.bins, config.n_q

    dropout_key, layers_key = jax.random.split(key)
    if n_q is None:
        n_q = draw_n_q(dropout_key, max_n_q) if config.q_dropout else max_n_q
    n_q = jnp.clip(jnp.asarray(n_q, jnp.int32), 1, max_n_q)
    if kmeans_indices is None:
        start_indices = None
    else:
        start_indices = jnp.asarray(kmeans_indices, jnp.int32)
        if start_indices.shape != (max_n_q, bins):
            raise ValueError(f"kmeans_indices must be {(max_n_q, bins)}, got {start_indices.shape}")

    flat = x.reshape(num_local, dim)

    def init_codebook(samples, layer_key, indices):
        if indices is None:
            indices = sample_indices(layer_key, num_global, bins)
        start = take_global_rows(samples, indices, axis_name)
        means, counts = kmeans(samples, start, config.kmeans_iters, axis_name)
        # audiocraft sets embed_avg to the means themselves (not means * counts).
        return means, means, counts.astype(jnp.float32), jnp.ones((), jnp.float32)

    def layer(carry, inputs):
        residual, total = carry
        (embed, embed_avg, cluster_size, inited), index, layer_key, indices = inputs
        active = index < n_q
        samples = lax.stop_gradient(residual)  # statistics never carry gradients
        init_key, reset_key = jax.random.split(layer_key)

        # audiocraft runs k-means whenever `inited` is 0, whatever kmeans_init says. A cond, not a
        # mask: only the step that initialises a codebook pays for its k-means.
        codebook = (embed, embed_avg, cluster_size, inited)
        embed, embed_avg, cluster_size, inited = lax.cond(
            active & (inited == 0),
            lambda: init_codebook(samples, init_key, indices),
            lambda: codebook,
        )

        codes = ops.nearest_code(residual, embed)  # with the codebook before its update
        q = embed[codes]

        if config.threshold_ema_dead_code > 0:
            expired = active & (cluster_size < config.threshold_ema_dead_code)
        else:
            expired = jnp.zeros((bins,), bool)
        if config.expiry == "reset":
            picked = sample_indices(reset_key, num_global, bins)
            vectors = take_global_rows(samples, picked, axis_name)
            usage = jnp.mean(cluster_size)
            # embed itself follows from these in the EMA step right below: ~= vectors.
            embed_avg = jnp.where(expired[:, None], usage * vectors, embed_avg)
            cluster_size = jnp.where(expired, usage, cluster_size)
        # "faithful": audiocraft's replacement is overwritten below, before anything reads it.

        onehot = jax.nn.one_hot(codes, bins, dtype=samples.dtype)  # [N, bins]
        counts = _psum(jnp.sum(onehot, axis=0), axis_name)
        # A one-hot matmul as in the reference; HIGHEST keeps it float32 on TF32 hardware.
        sums = jnp.matmul(onehot.T, samples, precision=lax.Precision.HIGHEST)
        sums = _psum(sums, axis_name)
        new_cluster_size = _ema(cluster_size, counts, config.decay)
        new_embed_avg = _ema(embed_avg, sums, config.decay)
        smoothed = _laplace_counts(new_cluster_size, bins, config.epsilon)
        new_embed = new_embed_avg / smoothed[:, None]

        def keep_if_unused(new, old):
            return jnp.where(active, new, old)

        new_codebook = (
            keep_if_unused(new_embed, embed),
            keep_if_unused(new_embed_avg, embed_avg),
            keep_if_unused(new_cluster_size, cluster_size),
            inited,
        )

        q_st = residual + lax.stop_gradient(q - residual)
        q_out = lax.stop_gradient(q_st)
        if config.commitment_weight > 0:
            loss = jnp.mean(jnp.square(q_out - residual)) * config.commitment_weight
        else:
            loss = jnp.zeros((), residual.dtype)
        used = jnp.where(active, q_out, 0.0)
        outputs = dict(
            codebook=new_codebook,
            codes=jnp.where(active, codes, -1),
            loss=jnp.where(active, loss, 0.0),
            usage=jnp.where(active, counts, 0.0),
            dead=jnp.sum(expired).astype(jnp.int32),
        )
        return (residual - used, total + used), outputs

    per_layer_keys = jax.random.split(layers_key, max_n_q)
    xs = (tuple(state), jnp.arange(max_n_q), per_layer_keys, start_indices)
    zeros = jnp.zeros_like(flat)
    (_, total), out = lax.scan(layer, (flat, zeros), xs)

    quantized = flat + lax.stop_gradient(total - flat)
    penalty = jnp.sum(out["loss"]) / n_q
    codes = out["codes"].reshape(max_n_q, batch, frames).transpose(1, 0, 2)
    metrics = dict(
        n_q=n_q,
        usage=out["usage"],
        perplexity=jax.vmap(_perplexity)(out["usage"]),
        dead_codes=out["dead"],
    )
    return QuantizerOutput(
        quantized=quantized.reshape(batch, frames, dim),
        codes=codes,
        penalty=penalty,
        state=QuantizerState(*out["codebook"]),
        metrics=metrics,
    )
