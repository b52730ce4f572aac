"""Encode and decode many items of different lengths: length buckets, fixed batch shapes,
data parallelism over local devices, and one share of the work per process.

Items are padded (with a padding mask) to the smallest bucket that holds them and run in
batches of a fixed size, so a dataset of any mix of lengths compiles one program per bucket;
each item's codes are then cut back to its own frames. Padding is not free for non-causal
models: see `docs` in README ("Batched encoding") for which frames can differ from encoding the
item alone, and `exact=True` for the mode that groups equal lengths only and matches it exactly.
Decoding always batches only items of the same frame layout, and matches single-item decoding.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from . import ops
from .config import EncodecConfig
from .model import EncodecModel


@dataclasses.dataclass(frozen=True)
class EncodedItem:
    """One item's codes.

    Attributes:
        audio_codes: `[chunks, n_q, frames]` int32 (frames of the longest chunk; shorter chunks
            are padded with 0, as in `EncodecModel.encode`).
        audio_scales: `[chunks]` float32, or None for models that do not normalise.
        num_samples: the item's length in samples.
        chunk_frames: real frame count of each chunk.
    """

    audio_codes: np.ndarray
    audio_scales: np.ndarray | None
    num_samples: int
    chunk_frames: tuple[int, ...]


def default_buckets(config: EncodecConfig) -> tuple[int, ...]:
    """Bucket lengths in samples: 1 s doubling up to 256 s, rounded to whole chunks/frames.

    Longer items get a bucket of their own length rounded up to a multiple of the largest one,
    so the number of programs grows with the log of the length range only.
    """
    return tuple(round_bucket(config, config.sampling_rate * 2**i) for i in range(9))


def round_bucket(config: EncodecConfig, length: int) -> int:
    """`length` rounded up to whole frames (whole chunk strides for chunked models)."""
    if config.chunk_length is not None:
        # whole chunk strides, so that no item of the bucket has a short trailing chunk of
        # its own that the padded batch would not have.
        stride = config.chunk_stride
        return max(0, math.ceil((length - config.chunk_length) / stride)) * stride + (
            config.chunk_length
        )
    return math.ceil(length / config.hop_length) * config.hop_length


def bucket_for(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket holding `length` (beyond the largest: its next multiple)."""
    for bucket in sorted(buckets):
        if length <= bucket:
            return bucket
    largest = max(buckets)
    return math.ceil(length / largest) * largest


def process_share(num_items: int) -> list[int]:
    """Indices of the items this process handles under `jax.distributed` (round robin)."""
    return list(range(jax.process_index(), num_items, jax.process_count()))


def local_mesh() -> Mesh:
    """A 1-D data-parallel mesh over this process's devices."""
    return Mesh(np.array(jax.local_devices()), ("data",))


class BatchCodec:
    """Batched encode/decode of lists of items of any lengths.

    Args:
        model: the codec.
        bandwidth: as in `EncodecModel.encode`.
        batch_size: items per compiled call (rounded up to a multiple of the mesh size).
        buckets: padded lengths in samples; default `default_buckets(model.config)`.
        exact: group only items of identical length and never pad, so every item's codes and
            audio equal what encoding it alone gives (more programs to compile).
        mesh: a 1-D mesh whose single axis splits the batch; default: all local devices.
    """

    def __init__(
        self,
        model: EncodecModel,
        *,
        bandwidth: float | None = None,
        batch_size: int = 8,
        buckets: Sequence[int] | None = None,
        exact: bool = False,
        mesh: Mesh | None = None,
    ):
        self.config = model.config
        self.num_quantizers = self.config.num_quantizers_for_bandwidth(bandwidth)
        self.bandwidth = bandwidth
        self.mesh = mesh if mesh is not None else local_mesh()
        if len(self.mesh.axis_names) != 1:
            raise ValueError(f"mesh must have one (data) axis, got {self.mesh.axis_names}")
        devices = self.mesh.devices.size
        self.batch_size = math.ceil(max(1, batch_size) / devices) * devices
        self.buckets = tuple(buckets) if buckets is not None else default_buckets(self.config)
        if not self.buckets or not all(
            isinstance(b, (int, np.integer)) and not isinstance(b, bool) and b >= 1
            for b in self.buckets
        ):
            raise ValueError(f"buckets must be positive integer lengths, got {self.buckets}")
        self.exact = exact
        self._batch_sharding = NamedSharding(self.mesh, PartitionSpec("data"))
        self.model = jax.device_put(model, NamedSharding(self.mesh, PartitionSpec()))

    # ---- encode ----
    def encode(self, audios: Sequence[np.ndarray]) -> list[EncodedItem]:
        """Encode items `[channels, samples]` (or `[samples]` for mono models)."""
        items = [self._check_item(i, a) for i, a in enumerate(audios)]
        results: list[EncodedItem | None] = [None] * len(items)
        for length, indices in self._batches([a.shape[-1] for a in items]):
            batch = np.zeros((self.batch_size, self.config.audio_channels, length), np.float32)
            mask = np.zeros((self.batch_size, length), np.int32)
            for row, i in enumerate(indices):
                batch[row, :, : items[i].shape[-1]] = items[i]
                mask[row, : items[i].shape[-1]] = 1
            out = self.model.encode(
                jax.device_put(batch, self._batch_sharding),
                jax.device_put(mask, self._batch_sharding),
                self.bandwidth,
            )
            codes = np.asarray(out.audio_codes)  # [chunks, batch, n_q, frames]
            scales = None
            if out.audio_scales[0] is not None:
                scales = np.stack([np.asarray(s)[:, 0] for s in out.audio_scales])  # [chunks, B]
            for row, i in enumerate(indices):
                results[i] = self._cut(
                    codes[:, row], None if scales is None else scales[:, row], items[i].shape[-1]
                )
        return results  # type: ignore[return-value]

    def _cut(self, codes: np.ndarray, scales: np.ndarray | None, length: int) -> EncodedItem:
        bounds = ops.chunk_bounds(length, self.config.chunk_length, self.config.chunk_stride)
        frames = tuple(ops.num_frames(n, self.config.hop_length) for _, n in bounds)
        width = max(frames)
        kept = codes[: len(frames), :, :width].copy()
        for c, f in enumerate(frames):
            kept[c, :, f:] = 0  # as EncodecModel.encode pads a short chunk
        return EncodedItem(
            audio_codes=kept,
            audio_scales=None if scales is None else scales[: len(frames)].copy(),
            num_samples=length,
            chunk_frames=frames,
        )

    # ---- decode ----
    def decode(self, items: Sequence[EncodedItem]) -> list[np.ndarray]:
        """Decode items back to audio `[channels, num_samples]` each.

        Items are batched only with items of the same chunk layout (frames per chunk): codes
        cannot be padded without changing what a non-causal decoder makes of the real ones, so
        every item decodes exactly as `EncodecModel.decode` decodes it alone.
        """
        results: list[np.ndarray | None] = [None] * len(items)
        groups: dict[tuple[tuple[int, ...], int], list[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault((item.chunk_frames, item.audio_codes.shape[1]), []).append(i)
        for (frames, n_q), indices in sorted(groups.items()):
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start : start + self.batch_size]
                codes = np.zeros((len(frames), self.batch_size, n_q, max(frames)), np.int32)
                scales = np.ones((len(frames), self.batch_size), np.float32)
                for row, i in enumerate(batch):
                    codes[:, row] = items[i].audio_codes
                    if items[i].audio_scales is not None:
                        scales[:, row] = items[i].audio_scales
                audio = self.model.decode(
                    jax.device_put(codes, NamedSharding(self.mesh, PartitionSpec(None, "data"))),
                    scales[:, :, None] if self.config.normalize else None,
                    chunk_frames=frames,
                ).audio_values
                audio = np.asarray(audio)
                for row, i in enumerate(batch):
                    results[i] = audio[row, :, : items[i].num_samples]
        return results  # type: ignore[return-value]

    # ---- helpers ----
    def padded_length(self, length: int) -> int:
        """The length an item of `length` samples is run at: its bucket (its own when exact)."""
        if self.exact:
            return length
        return bucket_for(round_bucket(self.config, length), self.buckets)

    def _batches(self, lengths: Sequence[int]) -> Iterator[tuple[int, list[int]]]:
        """(padded length, item indices) for each compiled call, at most batch_size items."""
        groups: dict[int, list[int]] = {}
        for i, n in enumerate(lengths):
            groups.setdefault(self.padded_length(n), []).append(i)
        for length in sorted(groups):
            indices = groups[length]
            for start in range(0, len(indices), self.batch_size):
                yield length, indices[start : start + self.batch_size]

    def _check_item(self, index: int, audio) -> np.ndarray:
        a = np.asarray(audio)
        if a.ndim == 1 and self.config.audio_channels == 1:
            a = a[None]
        if a.ndim != 2 or a.shape[0] != self.config.audio_channels:
            raise ValueError(
                f"item {index}: expected [{self.config.audio_channels}, samples] audio, got "
                f"shape {a.shape}"
            )
        if a.shape[1] == 0:
            raise ValueError(f"item {index} is empty")
        if not np.issubdtype(a.dtype, np.floating):
            raise ValueError(f"item {index}: expected floating-point audio, got {a.dtype}")
        if not np.isfinite(a).all():
            raise ValueError(f"item {index} contains NaN or Inf")
        return a.astype(np.float32, copy=False)


def encode_batch(model: EncodecModel, audios: Sequence[np.ndarray], **kwargs) -> list[EncodedItem]:
    """`BatchCodec(model, **kwargs).encode(audios)`."""
    return BatchCodec(model, **kwargs).encode(audios)


def decode_batch(model: EncodecModel, items: Sequence[EncodedItem], **kwargs) -> list[np.ndarray]:
    """`BatchCodec(model, **kwargs).decode(items)`."""
    return BatchCodec(model, **kwargs).decode(items)
