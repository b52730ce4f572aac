"""Running the convolutional stacks over long audio in overlapping time tiles.

SEANet's convolutions are local in time; only the LSTM (and time_group_norm) see the whole
sequence. So the conv stack before the encoder's LSTM and after the decoder's can run on tiles
of a long input, each widened by a margin at least as wide as the stack's receptive field (each
layer knows its own: `modules.ReceptiveField`) and cut back after, while the LSTM runs once over
all frames. Interior frames then see exactly the inputs they see untiled, and tiles that touch
an end of the signal see that end as it is, so the result equals the untiled one (up to how XLA
blocks sums for other shapes: embeddings of the published architectures are bit-identical,
audio within float32 rounding) while memory stays bounded by the tile size.

Each stage is its own compiled program, reused for every tile of the same shape.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp

from . import functional
from .config import EncodecConfig

if TYPE_CHECKING:
    from .model import EncodecModel


class Tile(NamedTuple):
    """Input window [start, stop) and the part of its output to keep, [keep_start, keep_stop)."""

    start: int
    stop: int
    keep_start: int
    keep_stop: int


def can_tile(config: EncodecConfig) -> bool:
    """time_group_norm normalises over the whole sequence, so those models cannot be tiled."""
    return config.norm_type != "time_group_norm"


def encoder_margin_frames(model: EncodecModel) -> int:
    """Frames of context each side that cover the receptive field of the encoder's convs."""
    field = model.encoder.convs_receptive_field  # in samples; stride = hop
    return math.ceil(max(field.left, field.right) / field.stride) + 1


def decoder_margin_frames(model: EncodecModel) -> int:
    """Frames of context each side that cover the receptive field of the decoder's convs."""
    field = model.decoder.convs_receptive_field  # in frames
    return math.ceil(max(field.left, field.right)) + 1


def plan_tiles(num_frames: int, tile_frames: int, margin: int, scale: int, length: int) -> list:
    """Tiles over `num_frames` frames whose inputs are `scale` units per frame, `length` in all.

    Each tile keeps `tile_frames` frames (the last keeps the rest) and reads `margin` frames
    more on each side, clipped at the ends. Window bounds are whole frames, so every strided
    layer sees the same grid as untiled, except the last window, which ends where the input does.
    """
    tiles = []
    for first in range(0, num_frames, tile_frames):
        last = min(first + tile_frames, num_frames)
        lo, hi = max(0, first - margin), min(num_frames, last + margin)
        stop = length if hi == num_frames else hi * scale
        tiles.append(Tile(lo * scale, stop, (first - lo), (last - lo)))
    return tiles


def wants_tiles(model: EncodecModel, frames: int) -> bool:
    """Whether an input of `frames` frames runs in tiles under the model's settings."""
    tile = model.settings.tile_frames
    return tile is not None and frames > 2 * tile and can_tile(model.config)


def embed_tiled(
    model: EncodecModel, audio: jax.Array, padding_mask: jax.Array | None
) -> tuple[jax.Array, jax.Array | None]:
    """`functional.embed` with the encoder's conv stack run tile by tile."""
    frames = math.ceil(audio.shape[-1] / model.config.hop_length)
    x, scale = _prepare(model, audio, padding_mask)
    plan = plan_tiles(
        frames,
        model.settings.tile_frames,
        encoder_margin_frames(model),
        model.config.hop_length,
        x.shape[1],
    )
    parts = [
        _encoder_convs(model, x[:, t.start : t.stop])[:, t.keep_start : t.keep_stop] for t in plan
    ]
    embeddings = _encoder_after_convs(model, jnp.concatenate(parts, axis=1))
    return embeddings.astype(jnp.float32), scale


def decode_tiled(model: EncodecModel, embeddings: jax.Array, scale: jax.Array | None) -> jax.Array:
    """`functional.decode_embeddings` with the decoder's conv stack run tile by tile."""
    frames = embeddings.shape[1]
    h = _decoder_before_convs(model, embeddings)
    hop = model.config.hop_length
    plan = plan_tiles(frames, model.settings.tile_frames, decoder_margin_frames(model), 1, frames)
    parts = [
        _decoder_convs(model, h[:, t.start : t.stop])[:, t.keep_start * hop : t.keep_stop * hop]
        for t in plan
    ]
    return _finish_audio(jnp.concatenate(parts, axis=1), scale)


# ---- the stages, each compiled once per shape ----
def _stage(network: str, part: str):
    """`model.<network>.<part>(x)` in the model's compute dtype and matmul precision, jitted
    with the model as an argument."""

    def run(model: EncodecModel, x: jax.Array) -> jax.Array:
        with jax.default_matmul_precision(model.settings.matmul_precision):
            net, x = functional.in_compute_dtype(model, getattr(model, network), x)
            return getattr(net, part)(x)

    return jax.jit(run)


_prepare = jax.jit(functional.prepare_audio)
_finish_audio = jax.jit(functional.finish_audio)
_encoder_convs = _stage("encoder", "convs")
_encoder_after_convs = _stage("encoder", "after_convs")
_decoder_before_convs = _stage("decoder", "before_convs")
_decoder_convs = _stage("decoder", "convs")
