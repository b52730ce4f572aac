"""Running the convolutional stacks over long audio in overlapping time tiles.

SEANet's convolutions are local in time; only the LSTM (and time_group_norm) see the whole
sequence. So the conv stack before the encoder's LSTM and after the decoder's can run on tiles
of a long input, each widened by a margin at least as wide as the stack's receptive field and
cut back after, while the LSTM runs once over all frames. Interior frames then see exactly the
inputs they see untiled, and tiles that touch an end of the signal see that end as it is, so
the result equals the untiled one (up to how XLA blocks sums for other shapes: embeddings of the
published architectures are bit-identical, audio within float32 rounding) while memory stays
bounded by the tile size.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from .config import EncodecConfig


class Tile(NamedTuple):
    """Input window [start, stop) and the part of its output to keep, [keep_start, keep_stop)."""

    start: int
    stop: int
    keep_start: int
    keep_stop: int


def encoder_margin_frames(config: EncodecConfig) -> int:
    """Frames of context each side that cover the receptive field of the encoder's convs."""
    reach, step = config.kernel_size - 1, 1  # reach in samples, step: samples per position
    for ratio in reversed(config.upsampling_ratios):
        for j in range(config.num_residual_layers):
            reach += (config.residual_kernel_size - 1) * config.dilation_growth_rate**j * step
        reach += (2 * ratio - 1) * step
        step *= ratio
    return math.ceil(reach / config.hop_length) + 1


def decoder_margin_frames(config: EncodecConfig) -> int:
    """Frames of context each side that cover the receptive field of the decoder's convs."""
    reach, step = 0, config.hop_length
    for ratio in config.upsampling_ratios:
        reach += 2 * step  # a transposed conv of kernel 2 * stride spans two input steps
        step //= ratio
        for j in range(config.num_residual_layers):
            reach += (config.residual_kernel_size - 1) * config.dilation_growth_rate**j * step
    reach += config.last_kernel_size - 1
    return math.ceil(reach / config.hop_length) + 1


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


def can_tile(config: EncodecConfig) -> bool:
    """time_group_norm normalises over the whole sequence, so those models cannot be tiled."""
    return config.norm_type != "time_group_norm"
