"""Flax NNX modules of SEANet and the residual vector quantizer.

The module tree and attribute names mirror transformers' `EncodecModel`, so that a checkpoint key
such as `encoder.layers.1.block.1.conv.weight_g` is the path of the parameter here too. Modules
only hold parameters and static settings; the math lives in `encodec_jax.ops`. Activations are
channels-last `[B, T, C]`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from fractions import Fraction
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from . import ops
from .config import EncodecConfig


@dataclasses.dataclass(frozen=True)
class ReceptiveField:
    """Which inputs an output step of a layer (or a stack of layers) depends on.

    Output step t depends on the input steps from `t * stride - left` to `t * stride + right`,
    counted in input steps, before any padding at the ends of the signal. `stride` is input
    steps per output step: an integer for a strided convolution, 1/s for a transposed one that
    upsamples by s. Exact fractions, so that composing layers never rounds.

    Tiling widens each tile by this much, and streaming keeps this much state per layer.
    """

    left: Fraction = Fraction(0)
    right: Fraction = Fraction(0)
    stride: Fraction = Fraction(1)

    def then(self, after: ReceptiveField) -> ReceptiveField:
        """The field of this layer followed by `after`, in this layer's input steps."""
        return ReceptiveField(
            self.left + after.left * self.stride,
            self.right + after.right * self.stride,
            self.stride * after.stride,
        )

    def union(self, other: ReceptiveField) -> ReceptiveField:
        """Two branches over the same input summed (a residual block and its shortcut)."""
        if self.stride != other.stride:
            raise ValueError("branches with different strides cannot be summed")
        return ReceptiveField(max(self.left, other.left), max(self.right, other.right), self.stride)


def stack_receptive_field(layers: Iterable[nnx.Module]) -> ReceptiveField:
    """The field of layers applied one after the other (each must have `receptive_field`)."""
    field = ReceptiveField()
    for layer in layers:
        field = field.then(layer.receptive_field)
    return field


class Buffer(nnx.Variable):
    """A checkpoint tensor that is state but not a trainable parameter: the codebooks and their
    EMA statistics, which training updates by exponential moving averages, never by gradients
    (PyTorch registers them as buffers too)."""


def _uniform(rngs: nnx.Rngs, shape: tuple[int, ...], bound: float) -> jax.Array:
    """PyTorch's default initialisation, U(-bound, bound)."""
    return _uniform_jit(rngs.params(), shape) * bound


# One compiled program per shape: run eagerly, `jax.random.uniform` compiles each of its
# primitives separately, which made building a model take ~10 s the first time in a process.
@partial(jax.jit, static_argnums=1)
def _uniform_jit(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return jax.random.uniform(key, shape, jnp.float32, -1.0, 1.0)


@partial(jax.jit, static_argnums=1)
def _normal_jit(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return jax.random.normal(key, shape, jnp.float32)


class ConvWeights(nnx.Module):
    """The weights of a PyTorch `Conv1d` (`[out, in, k]`) or `ConvTranspose1d` (`[in, out, k]`).

    With weight norm they are stored as PyTorch stores them, `weight_g` (magnitude along dim 0) and
    `weight_v` (direction), and combined on every call, so fine-tuning trains the same
    parametrisation as the reference and exports back unchanged.
    """

    def __init__(self, shape: tuple[int, int, int], bias_size: int, weight_norm: bool, *, rngs):
        bound = 1.0 / math.sqrt(shape[1] * shape[2])
        weight = _uniform(rngs, shape, bound)
        self.weight_norm = weight_norm
        if weight_norm:
            self.weight_g = nnx.Param(jnp.sqrt(jnp.sum(weight**2, axis=(1, 2), keepdims=True)))
            self.weight_v = nnx.Param(weight)
        else:
            self.weight = nnx.Param(weight)
        self.bias = nnx.Param(_uniform(rngs, (bias_size,), bound))

    def kernel(self) -> jax.Array:
        if self.weight_norm:
            return ops.weight_norm(self.weight_v[...], self.weight_g[...])
        return self.weight[...]


class GroupNorm(nnx.Module):
    """Single-group GroupNorm over time and channels (the `time_group_norm` of EnCodec)."""

    def __init__(self, channels: int):
        self.weight = nnx.Param(jnp.ones((channels,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        return ops.group_norm(x, self.weight[...], self.bias[...])


class ELU(nnx.Module):
    """Parameter-free; kept as a module so layer indices match the PyTorch ModuleList."""

    receptive_field = ReceptiveField()

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.elu(x)


class Identity(nnx.Module):
    receptive_field = ReceptiveField()

    def __call__(self, x: jax.Array) -> jax.Array:
        return x


class EncodecConv1d(nnx.Module):
    """Conv1d that pads its input (causal or centred) so it yields ceil(T / stride) frames."""

    def __init__(
        self,
        config: EncodecConfig,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        dilation: int = 1,
        *,
        rngs: nnx.Rngs,
    ):
        self.kernel_size, self.stride, self.dilation = kernel_size, stride, dilation
        self.causal = config.use_causal_conv
        self.pad_mode = config.pad_mode
        use_weight_norm = config.norm_type == "weight_norm"
        self.conv = ConvWeights(
            (out_channels, in_channels, kernel_size), out_channels, use_weight_norm, rngs=rngs
        )
        self.norm = GroupNorm(out_channels) if config.norm_type == "time_group_norm" else None

    @property
    def receptive_field(self) -> ReceptiveField:
        # Output t reads the padded input from t * stride over the effective kernel; the left
        # padding is the same for every length (only the right end gets `extra`).
        left, _ = ops.conv_padding(0, self.kernel_size, self.stride, self.dilation, self.causal)
        span = (self.kernel_size - 1) * self.dilation
        return ReceptiveField(Fraction(left), Fraction(span - left), Fraction(self.stride))

    def __call__(self, x: jax.Array) -> jax.Array:
        left, right = ops.conv_padding(
            x.shape[1], self.kernel_size, self.stride, self.dilation, self.causal
        )
        x = ops.pad1d(x, left, right, self.pad_mode)
        x = ops.conv1d(x, self.conv.kernel(), self.conv.bias[...], self.stride, self.dilation)
        return x if self.norm is None else self.norm(x)


class EncodecConvTranspose1d(nnx.Module):
    """ConvTranspose1d whose fixed padding (kernel - stride) is trimmed from the output.

    Only the fixed padding is trimmed; the extra right padding the encoder added to reach whole
    frames stays, and the caller cuts the audio to the input length at the very end.
    """

    def __init__(
        self,
        config: EncodecConfig,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int,
        *,
        rngs: nnx.Rngs,
    ):
        self.kernel_size, self.stride = kernel_size, stride
        self.causal = config.use_causal_conv
        self.trim_right_ratio = config.trim_right_ratio
        use_weight_norm = config.norm_type == "weight_norm"
        self.conv = ConvWeights(
            (in_channels, out_channels, kernel_size), out_channels, use_weight_norm, rngs=rngs
        )
        self.norm = GroupNorm(out_channels) if config.norm_type == "time_group_norm" else None

    def trim(self) -> tuple[int, int]:
        """Samples cut from the left and right of the full transposed convolution."""
        padding_total = self.kernel_size - self.stride
        if self.causal:
            right = math.ceil(padding_total * self.trim_right_ratio)
        else:
            right = padding_total // 2
        return padding_total - right, right

    @property
    def receptive_field(self) -> ReceptiveField:
        # Full output sample j' = i * stride + k (k < kernel) comes from input i, so trimmed
        # output j = j' - left reads inputs (j + left - kernel + 1) / stride to (j + left) / stride.
        left, _ = self.trim()
        s = Fraction(self.stride)
        return ReceptiveField((self.kernel_size - 1 - left) / s, left / s, 1 / s)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = ops.conv_transpose1d(x, self.conv.kernel(), self.conv.bias[...], self.stride)
        if self.norm is not None:
            x = self.norm(x)  # the reference normalises before trimming
        left, right = self.trim()
        return x[:, left : x.shape[1] - right]


class LSTMWeights(nnx.Module):
    """PyTorch `nn.LSTM` parameters under PyTorch's names (`weight_ih_l0`, `bias_hh_l1`, ...)."""

    def __init__(self, dim: int, num_layers: int, *, rngs: nnx.Rngs):
        self.num_layers = num_layers
        bound = 1.0 / math.sqrt(dim)
        for layer in range(num_layers):
            setattr(self, f"weight_ih_l{layer}", nnx.Param(_uniform(rngs, (4 * dim, dim), bound)))
            setattr(self, f"weight_hh_l{layer}", nnx.Param(_uniform(rngs, (4 * dim, dim), bound)))
            setattr(self, f"bias_ih_l{layer}", nnx.Param(_uniform(rngs, (4 * dim,), bound)))
            setattr(self, f"bias_hh_l{layer}", nnx.Param(_uniform(rngs, (4 * dim,), bound)))

    def layer(self, i: int) -> tuple[jax.Array, ...]:
        names = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
        return tuple(getattr(self, f"{name}_l{i}")[...] for name in names)


class EncodecLSTM(nnx.Module):
    """Stacked LSTM with a skip connection around it: `lstm(x) + x`."""

    def __init__(self, config: EncodecConfig, dim: int, *, rngs: nnx.Rngs):
        self.lstm = LSTMWeights(dim, config.num_lstm_layers, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x
        for i in range(self.lstm.num_layers):
            h = ops.lstm_layer(h, *self.lstm.layer(i))
        return h + x


class EncodecResnetBlock(nnx.Module):
    """ELU -> conv(k, dilation) -> ELU -> conv(1), plus a 1x1-conv or identity shortcut."""

    def __init__(self, config: EncodecConfig, dim: int, dilation: int, *, rngs: nnx.Rngs):
        hidden = dim // config.compress
        self.block = nnx.List(
            [
                ELU(),
                EncodecConv1d(
                    config, dim, hidden, config.residual_kernel_size, dilation=dilation, rngs=rngs
                ),
                ELU(),
                EncodecConv1d(config, hidden, dim, 1, rngs=rngs),
            ]
        )
        if config.use_conv_shortcut:
            self.shortcut = EncodecConv1d(config, dim, dim, 1, rngs=rngs)
        else:
            self.shortcut = Identity()

    @property
    def receptive_field(self) -> ReceptiveField:
        return stack_receptive_field(self.block).union(self.shortcut.receptive_field)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x
        for layer in self.block:
            h = layer(h)
        return self.shortcut(x) + h


class EncodecEncoder(nnx.Module):
    """SEANet encoder: audio `[B, T, channels]` -> embeddings `[B, frames, hidden_size]`."""

    def __init__(self, config: EncodecConfig, *, rngs: nnx.Rngs):
        c = config
        layers: list[nnx.Module] = [
            EncodecConv1d(c, c.audio_channels, c.num_filters, c.kernel_size, rngs=rngs)
        ]
        dim = c.num_filters
        for ratio in reversed(c.upsampling_ratios):
            for j in range(c.num_residual_layers):
                layers.append(EncodecResnetBlock(c, dim, c.dilation_growth_rate**j, rngs=rngs))
            layers.append(ELU())
            layers.append(EncodecConv1d(c, dim, dim * 2, ratio * 2, stride=ratio, rngs=rngs))
            dim *= 2
        layers.append(EncodecLSTM(c, dim, rngs=rngs))
        layers.append(ELU())
        layers.append(EncodecConv1d(c, dim, c.hidden_size, c.last_kernel_size, rngs=rngs))
        self.layers = nnx.List(layers)
        self.lstm_index = len(layers) - 3

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.after_convs(self.convs(x))

    def convs(self, x: jax.Array) -> jax.Array:
        """The convolutional stack before the LSTM: local in time, so it can run in tiles."""
        for layer in self.layers[: self.lstm_index]:
            x = layer(x)
        return x

    @property
    def convs_receptive_field(self) -> ReceptiveField:
        """Of `convs`, in audio samples per frame."""
        return stack_receptive_field(self.layers[: self.lstm_index])

    def after_convs(self, x: jax.Array) -> jax.Array:
        """LSTM, ELU and the last conv, at the frame rate."""
        for layer in self.layers[self.lstm_index :]:
            x = layer(x)
        return x


class EncodecDecoder(nnx.Module):
    """SEANet decoder: embeddings `[B, frames, hidden]` -> audio `[B, frames * hop, channels]`."""

    def __init__(self, config: EncodecConfig, *, rngs: nnx.Rngs):
        c = config
        dim = c.num_filters * 2 ** len(c.upsampling_ratios)
        layers: list[nnx.Module] = [
            EncodecConv1d(c, c.hidden_size, dim, c.kernel_size, rngs=rngs),
            EncodecLSTM(c, dim, rngs=rngs),
        ]
        for ratio in c.upsampling_ratios:
            layers.append(ELU())
            layers.append(EncodecConvTranspose1d(c, dim, dim // 2, ratio * 2, ratio, rngs=rngs))
            for j in range(c.num_residual_layers):
                layers.append(EncodecResnetBlock(c, dim // 2, c.dilation_growth_rate**j, rngs=rngs))
            dim //= 2
        layers.append(ELU())
        layers.append(EncodecConv1d(c, dim, c.audio_channels, c.last_kernel_size, rngs=rngs))
        self.layers = nnx.List(layers)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.convs(self.before_convs(x))

    def before_convs(self, x: jax.Array) -> jax.Array:
        """The first conv and the LSTM, at the frame rate."""
        for layer in self.layers[:2]:
            x = layer(x)
        return x

    def convs(self, x: jax.Array) -> jax.Array:
        """The upsampling stack after the LSTM: local in time, so it can run in tiles."""
        for layer in self.layers[2:]:
            x = layer(x)
        return x

    @property
    def convs_receptive_field(self) -> ReceptiveField:
        """Of `convs`, in frames per audio sample."""
        return stack_receptive_field(self.layers[2:])


class EncodecCodebook(nnx.Module):
    """One codebook. Only `embed` is used for coding; the rest are the reference's EMA statistics,
    kept so that checkpoints round-trip and k-means/EMA training can resume."""

    def __init__(self, config: EncodecConfig, *, rngs: nnx.Rngs):
        shape = (config.codebook_size, config.codebook_dim)
        self.embed = Buffer(_normal_jit(rngs.params(), shape))
        self.inited = Buffer(jnp.ones((1,), jnp.float32))
        self.cluster_size = Buffer(jnp.zeros((config.codebook_size,), jnp.float32))
        self.embed_avg = Buffer(jnp.zeros(shape, jnp.float32))


class EncodecVectorQuantization(nnx.Module):
    def __init__(self, config: EncodecConfig, *, rngs: nnx.Rngs):
        self.codebook = EncodecCodebook(config, rngs=rngs)


class EncodecResidualVectorQuantizer(nnx.Module):
    """Residual vector quantizer: `num_quantizers` codebooks applied one after the other."""

    def __init__(self, config: EncodecConfig, *, rngs: nnx.Rngs):
        self.layers = nnx.List(
            [EncodecVectorQuantization(config, rngs=rngs) for _ in range(config.num_quantizers)]
        )

    def embeds(self, num_quantizers: int) -> jax.Array:
        """The first `num_quantizers` codebooks stacked, `[n_q, bins, dim]`."""
        return jnp.stack([layer.codebook.embed[...] for layer in self.layers[:num_quantizers]])

    def encode(self, embeddings: jax.Array, num_quantizers: int) -> jax.Array:
        """`[B, T, D]` -> codes `[B, n_q, T]` (int32)."""
        return ops.rvq_encode(embeddings, self.embeds(num_quantizers))

    def decode(self, codes: jax.Array) -> jax.Array:
        """codes `[B, n_q, T]` -> quantized embeddings `[B, T, D]`."""
        return ops.rvq_decode(codes, self.embeds(codes.shape[1]))


def fold_weight_norm(module: nnx.Module) -> nnx.Module:
    """A copy of `module` whose weight-normed convolutions hold their combined kernel `weight`
    instead of `weight_g`/`weight_v`: the same outputs (to float32 rounding) without recomputing
    every kernel on every call. Worth it where calls are small and many (streaming, where it
    otherwise dominates a one-frame step); not for training or exporting, which need the
    parametrisation."""
    module = nnx.clone(module)
    combine = jax.jit(ops.weight_norm)
    for _, sub in nnx.iter_modules(module):
        if isinstance(sub, ConvWeights) and sub.weight_norm:
            kernel = combine(sub.weight_v[...], sub.weight_g[...])
            del sub.weight_g, sub.weight_v
            sub.weight = nnx.Param(kernel)
            sub.weight_norm = False
    return module
