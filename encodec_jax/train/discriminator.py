"""audiocraft's multi-scale STFT discriminator (MS-STFT-D) as a Flax NNX module.

The module tree and parameter names are audiocraft's (`discriminators.0.convs.1.conv.weight_g`,
`discriminators.0.spec_transform.window`, ...), with weights in PyTorch's layout (`[out, in, kh,
kw]`, weight norm as `weight_g`/`weight_v`), so a state dict of audiocraft's
`MultiScaleSTFTDiscriminator` loads through `encodec_jax.checkpoint.module_from_state_dict` and
`state_dict_from_module` gives it back. Activations are channels-last: the STFT of each scale is
`[B, frames, freq, 2 * C]` (real parts of the C channels, then imaginary parts, as audiocraft
stacks them) and every feature map is `[B, frames, freq', filters]`, i.e. audiocraft's
`[B, ch, frames, freq']` transposed.

Defaults are `config/solver/compression/default.yaml`'s `msstftd` (five scales, LeakyReLU 0.3),
not the constructor defaults of audiocraft's class (three scales, slope 0.2).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from .. import ops
from ..checkpoint import rename_hf_key
from ..modules import Buffer
from .spectral import hann_window, stft


@partial(jax.jit, static_argnames="shape")
def _init_conv2d(key: jax.Array, shape: tuple[int, int, int, int]):
    """Weight, bias and the weight's norm per output channel, from the distributions torch's
    Conv2d draws from (not its values). Jitted although it is not the forward pass: one compiled
    program per shape (a discriminator has a handful), where op by op the first construction
    spends seconds compiling every random and reduction op for every shape."""
    bound = 1.0 / math.sqrt(shape[1] * shape[2] * shape[3])
    weight_key, bias_key = jax.random.split(key)
    weight = jax.random.uniform(weight_key, shape, jnp.float32, -bound, bound)
    bias = jax.random.uniform(bias_key, (shape[0],), jnp.float32, -bound, bound)
    return weight, bias, jnp.sqrt(jnp.sum(weight**2, axis=(1, 2, 3), keepdims=True))


class Conv2dWeights(nnx.Module):
    """The weights of a PyTorch `Conv2d`, `[out, in, kh, kw]`, optionally weight-normed.

    Initialised as torch initialises `Conv2d`: weight and bias uniform in `+-1/sqrt(fan_in)`,
    `fan_in = in * kh * kw` (Kaiming-uniform with `a = sqrt(5)`); weight norm starts from
    `weight_g = ||weight_v||` per output channel, as `torch.nn.utils.weight_norm` does, so the
    effective weight is the drawn one.
    """

    def __init__(
        self, shape: tuple[int, int, int, int], weight_norm: bool, *, rngs: nnx.Rngs
    ) -> None:
        weight, bias, norm = _init_conv2d(rngs.params(), shape)
        self.weight_norm = weight_norm
        if weight_norm:
            self.weight_g = nnx.Param(norm)
            self.weight_v = nnx.Param(weight)
        else:
            self.weight = nnx.Param(weight)
        self.bias = nnx.Param(bias)

    def kernel(self) -> jax.Array:
        if self.weight_norm:
            return ops.weight_norm(self.weight_v[...], self.weight_g[...])
        return self.weight[...]


class NormConv2d(nnx.Module):
    """audiocraft's `NormConv2d` (a `Conv2d` in `.conv`, weight norm or none) on `[B, H, W, C]`."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: tuple[int, int],
        stride: tuple[int, int] = (1, 1),
        dilation: tuple[int, int] = (1, 1),
        norm: str = "none",
        *,
        rngs: nnx.Rngs,
    ) -> None:
        if norm not in ("none", "weight_norm"):
            raise ValueError(f"norm must be 'none' or 'weight_norm', not {norm!r}")
        self.stride, self.dilation = tuple(stride), tuple(dilation)
        # audiocraft's get_2d_padding: "same" for odd kernels at stride 1.
        self.padding = tuple(((k - 1) * d) // 2 for k, d in zip(kernel_size, dilation, strict=True))
        shape = (out_channels, in_channels, *kernel_size)
        self.conv = Conv2dWeights(shape, norm == "weight_norm", rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = lax.conv_general_dilated(
            x,
            self.conv.kernel(),  # OIHW, PyTorch's layout, read as is
            window_strides=self.stride,
            padding=[(p, p) for p in self.padding],
            rhs_dilation=self.dilation,
            dimension_numbers=("NHWC", "OIHW", "NHWC"),
        )
        return y + self.conv.bias[...]


class Spectrogram(nnx.Module):
    """Where torchaudio's `Spectrogram` keeps its window, `[win_length]`.

    The window is carried as a (non-trainable) buffer rather than rebuilt: audiocraft's state
    dict holds it, PyTorch's `load_state_dict(strict=True)` wants it back, and using the
    checkpoint's own tensor makes the STFT exactly the one torch computed with.
    """

    def __init__(self, win_length: int) -> None:
        self.window = Buffer(jnp.asarray(hann_window(win_length)))


class DiscriminatorSTFT(nnx.Module):
    """One scale: a complex STFT, `len(dilations) + 2` convolutions (five by default), each
    followed by a LeakyReLU whose output is a feature map, and a final convolution to the
    logits.

    Layers, as audiocraft builds them: `convs.0` (kernel `kernel_size`, no weight norm whatever
    `norm` says), `convs.1..len(dilations)` (stride `stride`, dilation `(d, 1)` along time,
    `norm`), `convs.-1` and `conv_post` (kernel `(kh, kh)`, `norm`).
    """

    def __init__(
        self,
        filters: int,
        in_channels: int = 1,
        out_channels: int = 1,
        n_fft: int = 1024,
        hop_length: int = 256,
        win_length: int = 1024,
        max_filters: int = 1024,
        filters_scale: int = 1,
        kernel_size: tuple[int, int] = (3, 9),
        dilations: Sequence[int] = (1, 2, 4),
        stride: tuple[int, int] = (1, 2),
        normalized: bool = True,
        norm: str = "weight_norm",
        negative_slope: float = 0.3,
        *,
        rngs: nnx.Rngs,
    ) -> None:
        self.n_fft, self.hop_length, self.win_length = n_fft, hop_length, win_length
        self.normalized = normalized
        self.negative_slope = negative_slope
        self.spec_transform = Spectrogram(win_length)
        kh = kernel_size[0]
        convs = [NormConv2d(2 * in_channels, filters, kernel_size, rngs=rngs)]
        # Mirrors audiocraft, including that convs.1 expects min(filters_scale * filters,
        # max_filters) inputs while convs.0 makes `filters` (equal for filters_scale = 1).
        in_chs = min(filters_scale * filters, max_filters)
        for i, dilation in enumerate(dilations):
            out_chs = min(filters_scale ** (i + 1) * filters, max_filters)
            convs.append(
                NormConv2d(
                    in_chs, out_chs, kernel_size, stride, (dilation, 1), norm=norm, rngs=rngs
                )
            )
            in_chs = out_chs
        out_chs = min(filters_scale ** (len(dilations) + 1) * filters, max_filters)
        convs.append(NormConv2d(in_chs, out_chs, (kh, kh), norm=norm, rngs=rngs))
        self.convs = nnx.List(convs)
        self.conv_post = NormConv2d(out_chs, out_channels, (kh, kh), norm=norm, rngs=rngs)

    def spectrogram(self, x: jax.Array) -> jax.Array:
        """`[B, C, T]` -> `[B, frames, n_fft // 2 + 1, 2C]`: torchaudio's `Spectrogram(center=
        False, power=None, normalized)` with real and imaginary parts as channels."""
        spec = stft(
            x,
            self.n_fft,
            self.hop_length,
            self.win_length,
            window=self.spec_transform.window[...],
            center=False,
            normalized=self.normalized,
        )  # [B, C, frames, freq]
        z = jnp.concatenate([jnp.real(spec), jnp.imag(spec)], axis=1)
        return jnp.transpose(z, (0, 2, 3, 1))

    def __call__(self, x: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
        """`[B, C, T]` -> logits `[B, frames, freq', out_channels]` and the feature maps after
        each activation, `[B, frames, freq_i, channels_i]`."""
        z = self.spectrogram(x)
        fmaps = []
        for conv in self.convs:
            z = conv(z)
            # LeakyReLU as torch writes it: slope 1 only for z > 0 (also in the gradient at 0).
            z = jnp.where(z > 0, z, self.negative_slope * z)
            fmaps.append(z)
        return self.conv_post(z), fmaps


class MultiScaleSTFTDiscriminator(nnx.Module):
    """audiocraft's `MultiScaleSTFTDiscriminator`: one `DiscriminatorSTFT` per
    `(n_fft, hop_length, win_length)`.

    Args:
        filters: channels of every convolution (32 in default.yaml).
        in_channels: audio channels; each scale sees `2 * in_channels` (real, imaginary).
        out_channels: logit channels.
        n_ffts, hop_lengths, win_lengths: one scale per entry; `win_lengths=None` is `n_ffts`.
        max_filters, filters_scale, kernel_size, dilations, stride, normalized, norm: as
            audiocraft's `DiscriminatorSTFT` (`norm`: "weight_norm" or "none").
        negative_slope: the LeakyReLU's (`activation_params.negative_slope`, 0.3).
        rngs: for the initial weights.

    audiocraft's `sep_channels` is not offered: its forward never uses it.
    """

    def __init__(
        self,
        filters: int = 32,
        in_channels: int = 1,
        out_channels: int = 1,
        n_ffts: Sequence[int] = (1024, 2048, 512, 256, 128),
        hop_lengths: Sequence[int] = (256, 512, 128, 64, 32),
        win_lengths: Sequence[int] | None = None,
        max_filters: int = 1024,
        filters_scale: int = 1,
        kernel_size: tuple[int, int] = (3, 9),
        dilations: Sequence[int] = (1, 2, 4),
        stride: tuple[int, int] = (1, 2),
        normalized: bool = True,
        norm: str = "weight_norm",
        negative_slope: float = 0.3,
        *,
        rngs: nnx.Rngs,
    ) -> None:
        win_lengths = n_ffts if win_lengths is None else win_lengths
        if not len(n_ffts) == len(hop_lengths) == len(win_lengths):
            raise ValueError("n_ffts, hop_lengths and win_lengths must have one entry per scale")
        self.discriminators = nnx.List(
            [
                DiscriminatorSTFT(
                    filters,
                    in_channels,
                    out_channels,
                    n_fft,
                    hop,
                    win,
                    max_filters,
                    filters_scale,
                    tuple(kernel_size),
                    tuple(dilations),
                    tuple(stride),
                    normalized,
                    norm,
                    negative_slope,
                    rngs=rngs,
                )
                for n_fft, hop, win in zip(n_ffts, hop_lengths, win_lengths, strict=True)
            ]
        )

    def __call__(self, x: jax.Array) -> tuple[list[jax.Array], list[list[jax.Array]]]:
        """Args:
            x: audio `[B, C, T]`, `T >= max(n_ffts)`.

        Returns:
            `(logits, fmaps)` like audiocraft's forward: per scale the logits
            `[B, frames, freq', out_channels]`, and per scale the list of its
            `len(dilations) + 2` feature maps, channels-last.
        """
        logits, fmaps = [], []
        for disc in self.discriminators:
            logit, fmap = disc(x)
            logits.append(logit)
            fmaps.append(fmap)
        return logits, fmaps


def rename_discriminator_key(key: str) -> str:
    """audiocraft key -> encodec-jax key: the same up to weight norm's spelling, and without the
    `adversary.` prefix an `AdversarialLoss` state dict (e.g. a solver's `adv_losses.msstftd`)
    puts in front."""
    return rename_hf_key(key.removeprefix("adversary."))
