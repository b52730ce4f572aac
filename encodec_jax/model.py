"""`EncodecModel`: the codec with transformers' public API (`encode`, `decode`, `__call__`).

The public methods validate their input on the host, cut it into the reference's chunks and call
the pure functions of `encodec_jax.functional`, jitted with the model itself as an argument (NNX
modules are pytrees), so one compiled program serves every set of weights of the same
architecture. The SEANet networks and the quantizer compile separately: the networks' programs,
the expensive ones to compile, are shared by every bandwidth.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from . import checkpoint, functional, ops, tiling
from .config import EncodecConfig, RuntimeSettings
from .feature_extraction import EncodecFeatureExtractor
from .modules import EncodecDecoder, EncodecEncoder, EncodecResidualVectorQuantizer

Array = jax.Array | np.ndarray


class _Output:
    """Dataclass outputs that also index like transformers' `ModelOutput` (`out[0]`,
    `out["audio_values"]`); as there, fields that are None are left out of the tuple."""

    def to_tuple(self) -> tuple[Any, ...]:
        values = (getattr(self, f.name) for f in dataclasses.fields(self))
        return tuple(v for v in values if v is not None)

    def __getitem__(self, key: int | str) -> Any:
        if isinstance(key, str):
            if key not in {f.name for f in dataclasses.fields(self)}:
                raise KeyError(key)
            return getattr(self, key)
        return self.to_tuple()[key]


@dataclasses.dataclass
class EncodecEncoderOutput(_Output):
    """What `encode` returns.

    Attributes:
        audio_codes: `[chunks, batch, n_q, frames]` int32; a short last chunk is padded with 0.
        audio_scales: one entry per chunk, each `[batch, 1]` (models that normalise) or None.
        last_frame_pad_length: frames of padding at the end of the last chunk.
        chunk_frames: the real frame count of every chunk. It equals what `last_frame_pad_length`
            says except for inputs whose last two chunks are both short (possible with chunked
            models, which transformers cannot encode at all); `decode` uses it when given.
    """

    audio_codes: jax.Array
    audio_scales: list[jax.Array | None]
    last_frame_pad_length: int = 0
    chunk_frames: tuple[int, ...] | None = None


@dataclasses.dataclass
class EncodecDecoderOutput(_Output):
    """What `decode` returns. audio_values: `[batch, channels, samples]` float32."""

    audio_values: jax.Array


@dataclasses.dataclass
class EncodecOutput(_Output):
    """What `__call__` returns: the codes and the decoded audio `[batch, channels, samples]`."""

    audio_codes: jax.Array
    audio_values: jax.Array


class EncodecModel(nnx.Module):
    """EnCodec: SEANet encoder, residual vector quantizer, SEANet decoder.

    Build one from a checkpoint with `EncodecModel.from_pretrained(...)`, or with random weights
    for training with `EncodecModel(config, rngs=nnx.Rngs(0))`.
    """

    def __init__(
        self,
        config: EncodecConfig,
        *,
        rngs: nnx.Rngs,
        settings: RuntimeSettings | None = None,
    ):
        self.config = config
        # Numerics and memory bounds (`config.RuntimeSettings`); static under jit.
        self.settings = settings if settings is not None else RuntimeSettings()
        self.encoder = EncodecEncoder(config, rngs=rngs)
        self.decoder = EncodecDecoder(config, rngs=rngs)
        self.quantizer = EncodecResidualVectorQuantizer(config, rngs=rngs)

    # ---- loading and saving ----
    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike,
        *,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
    ) -> EncodecModel:
        """Load a local directory (config.json + model.safetensors or pytorch_model.bin) or a
        Hugging Face Hub id such as "facebook/encodec_24khz" (downloaded into the Hub cache, or
        found there when offline)."""
        directory = checkpoint.resolve_pretrained(
            path_or_repo_id,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            token=token,
        )
        config = EncodecConfig.from_json_file(directory / checkpoint.CONFIG_NAME)
        return cls.from_state_dict(config, checkpoint.read_state_dict(directory))

    @classmethod
    def from_state_dict(
        cls,
        config: EncodecConfig,
        state_dict: Mapping[str, np.ndarray],
        rename: Callable[[str], str] = checkpoint.rename_hf_key,
    ) -> EncodecModel:
        """A model for `config` holding exactly the tensors of a PyTorch state dict.

        Args:
            config: the architecture.
            state_dict: tensors under transformers' names (either weight-norm spelling), or
                under another source's names with the matching `rename`
                (`checkpoint.rename_original_key` for the `encodec` package and audiocraft).
            rename: checkpoint key -> this model's key.

        Raises:
            ValueError: naming every missing, unexpected or mis-shaped tensor.
        """
        return checkpoint.module_from_state_dict(
            lambda: cls(config, rngs=nnx.Rngs(0)), state_dict, rename
        )

    def state_dict(self, weight_norm: str = "legacy") -> dict[str, np.ndarray]:
        """The tensors under PyTorch's names: weight norm as the Hub's files name it
        (`weight_g`/`weight_v`, `weight_norm="legacy"`) or as current transformers saves it
        (`"parametrizations"`)."""
        tensors = checkpoint.state_dict_from_module(self)
        if weight_norm == "parametrizations":
            return {checkpoint.to_parametrization_key(k): v for k, v in tensors.items()}
        if weight_norm != "legacy":
            raise ValueError(
                f"weight_norm must be 'legacy' or 'parametrizations', got {weight_norm!r}"
            )
        return tensors

    def save_pretrained(self, directory: str | os.PathLike, weight_norm: str = "legacy") -> None:
        """Write config.json, model.safetensors and preprocessor_config.json in the Hub's layout;
        transformers and `from_pretrained` load the result. Each file appears complete or not at
        all. `weight_norm`: see `state_dict`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        checkpoint.write_safetensors(
            directory / checkpoint.SAFETENSORS_NAME, self.state_dict(weight_norm)
        )
        self.config.to_json_file(directory / checkpoint.CONFIG_NAME)
        EncodecFeatureExtractor.from_config(self.config).save_pretrained(directory)

    # ---- the public API ----
    def encode(
        self,
        input_values: Array,
        padding_mask: Array | None = None,
        bandwidth: float | None = None,
    ) -> EncodecEncoderOutput:
        """Encode audio into codes.

        Args:
            input_values: `[batch, channels, samples]` float audio (NumPy or JAX).
            padding_mask: `[batch, samples]` (or `[batch, 1|channels, samples]`), 1 = real sample.
                Padded samples are zeroed before encoding, as in transformers.
            bandwidth: one of `config.target_bandwidths` (kbps); None picks the smallest, as in
                transformers.

        Returns:
            EncodecEncoderOutput with `audio_codes` `[chunks, batch, n_q, frames]`.
        """
        num_quantizers = self.config.num_quantizers_for_bandwidth(bandwidth)
        x = _check_audio(input_values, self.config.audio_channels)
        mask = _check_padding_mask(padding_mask, x.shape)
        bounds = ops.chunk_bounds(x.shape[-1], self.config.chunk_length, self.config.chunk_stride)
        frames = [ops.num_frames(length, self.config.hop_length) for _, length in bounds]
        codes_by_chunk: list[jax.Array] = [None] * len(bounds)  # type: ignore[list-item]
        scales_by_chunk: list[jax.Array | None] = [None] * len(bounds)
        batch = x.shape[0]
        calls = ops.group_chunks(bounds, batch, self.settings.chunk_rows_per_call)
        for length, indices in calls:
            starts = np.array([bounds[i][0] for i in indices])
            windows = starts[:, None] + np.arange(length)  # [k, length]
            chunks = _gather_chunks(x, windows)
            chunk_mask = None if mask is None else _gather_chunks(mask, windows)
            embeddings, scales = _embed(self, chunks, chunk_mask)
            codes = _quantize(self, embeddings, num_quantizers)
            codes = codes.reshape(len(indices), batch, *codes.shape[1:])
            for j, i in enumerate(indices):
                codes_by_chunk[i] = codes[j]
                scales_by_chunk[i] = None if scales is None else scales[j * batch : (j + 1) * batch]
        max_frames = max(frames)
        audio_codes = jnp.stack(
            [jnp.pad(c, ((0, 0), (0, 0), (0, max_frames - c.shape[-1]))) for c in codes_by_chunk]
        )
        return EncodecEncoderOutput(
            audio_codes=audio_codes,
            audio_scales=scales_by_chunk,
            last_frame_pad_length=max_frames - frames[-1],
            chunk_frames=tuple(frames),
        )

    def decode(
        self,
        audio_codes: Array,
        audio_scales: Sequence[Array | None] | Array | None,
        padding_mask: Array | None = None,
        last_frame_pad_length: int = 0,
        chunk_frames: Sequence[int] | None = None,
    ) -> EncodecDecoderOutput:
        """Decode codes into audio.

        Args:
            audio_codes: `[chunks, batch, n_q, frames]` integer codes from `encode`.
            audio_scales: `encode`'s `audio_scales` (a list per chunk, or an array
                `[chunks, batch, 1]`); None for models that do not normalise.
            padding_mask: if given, the output is cut to its length (the input's length).
            last_frame_pad_length: padding frames to drop from the last chunk, from `encode`.
            chunk_frames: real frame count of every chunk, from `encode`; overrides
                `last_frame_pad_length` (only needed when the last two chunks are both short).

        Returns:
            EncodecDecoderOutput with `audio_values` `[batch, channels, samples]`.
        """
        codes = _check_codes(audio_codes, self.config)
        n_chunks, batch = codes.shape[:2]
        scales = _check_scales(audio_scales, n_chunks, batch, self.config)
        frames = _chunk_frames(codes.shape, last_frame_pad_length, chunk_frames)
        decoded: list[jax.Array] = [None] * n_chunks  # type: ignore[list-item]
        calls = ops.group_chunks(list(enumerate(frames)), batch, self.settings.chunk_rows_per_call)
        for n_frames, indices in calls:
            chunk_codes = codes[np.array(indices), :, :, :n_frames]
            chunk_codes = chunk_codes.reshape(-1, *chunk_codes.shape[2:])
            chunk_scales = None if scales is None else scales[np.array(indices)].reshape(-1, 1)
            embeddings = _dequantize(self, chunk_codes)
            audio = _decode(self, embeddings, chunk_scales)
            audio = audio.reshape(len(indices), batch, *audio.shape[1:])
            for j, i in enumerate(indices):
                decoded[i] = audio[j]
        if self.config.chunk_length is None:
            if n_chunks != 1:
                raise ValueError(
                    f"This model encodes audio as one chunk, but audio_codes has {n_chunks}"
                )
            audio_values = decoded[0]
        else:
            lengths = [a.shape[-1] for a in decoded]
            width = max(lengths)
            stacked = jnp.stack(
                [jnp.pad(a, ((0, 0), (0, 0), (0, width - a.shape[-1]))) for a in decoded]
            )
            audio_values = _overlap_add(stacked, tuple(lengths), self.config.chunk_stride)
        if padding_mask is not None:
            length = np.shape(padding_mask)[-1]
            audio_values = audio_values[..., :length]
        return EncodecDecoderOutput(audio_values=audio_values)

    def __call__(
        self,
        input_values: Array,
        padding_mask: Array | None = None,
        bandwidth: float | None = None,
        audio_codes: Array | None = None,
        audio_scales: Sequence[Array | None] | Array | None = None,
        last_frame_pad_length: int = 0,
    ) -> EncodecOutput:
        """Encode (unless codes are given) and decode; the audio is cut to the input's length
        when a padding mask is given, as in transformers."""
        chunk_frames = None
        if audio_codes is None:
            if audio_scales is not None:
                raise ValueError("audio_scales were given without audio_codes")
            enc = self.encode(input_values, padding_mask, bandwidth)
            audio_codes, audio_scales = enc.audio_codes, enc.audio_scales
            last_frame_pad_length, chunk_frames = enc.last_frame_pad_length, enc.chunk_frames
        dec = self.decode(
            audio_codes, audio_scales, padding_mask, last_frame_pad_length, chunk_frames
        )
        return EncodecOutput(audio_codes=jnp.asarray(audio_codes), audio_values=dec.audio_values)


# ---- the compiled core: the model is an argument; shapes and n_q are static ----
_embed_jit = jax.jit(functional.embed)
_quantize = jax.jit(functional.quantize, static_argnames=("num_quantizers",))
_dequantize = jax.jit(functional.dequantize)
_decode_embeddings_jit = jax.jit(functional.decode_embeddings)


def _embed(model: EncodecModel, x: jax.Array, mask: jax.Array | None):
    """`functional.embed`, with the conv stack in tiles for long inputs (same codes)."""
    if tiling.wants_tiles(model, ops.num_frames(x.shape[-1], model.config.hop_length)):
        return tiling.embed_tiled(model, x, mask)
    return _embed_jit(model, x, mask)


def _decode(model: EncodecModel, embeddings: jax.Array, scales: jax.Array | None) -> jax.Array:
    """`functional.decode_embeddings`, with the conv stack in tiles for long inputs."""
    if tiling.wants_tiles(model, embeddings.shape[1]):
        return tiling.decode_tiled(model, embeddings, scales)
    return _decode_embeddings_jit(model, embeddings, scales)


@partial(jax.jit, static_argnames=("lengths", "stride"))
def _overlap_add(frames: jax.Array, lengths: tuple[int, ...], stride: int) -> jax.Array:
    return ops.overlap_add(frames, lengths, stride)


def _gather_chunks(x: jax.Array, windows: np.ndarray) -> jax.Array:
    """`[B, C, T]` and window indices `[k, L]` -> `[k * B, C, L]` (chunk-major)."""
    if windows.shape[0] == 1 and windows[0, 0] == 0 and windows.shape[1] == x.shape[-1]:
        return x
    gathered = jnp.take(x, jnp.asarray(windows), axis=-1)  # [B, C, k, L]
    return gathered.transpose(2, 0, 1, 3).reshape(-1, x.shape[1], windows.shape[1])


# ---- input checks: a clear ValueError for anything the model cannot take ----
def _check_audio(values: Array, channels: int) -> jax.Array:
    if not hasattr(values, "dtype"):
        values = np.asarray(values)
    if not jnp.issubdtype(values.dtype, jnp.floating):
        raise ValueError(
            f"input_values must be floating-point audio (e.g. float32 in [-1, 1]), got dtype "
            f"{values.dtype}; convert integer PCM with x / 32768.0 first"
        )
    if values.ndim != 3:
        raise ValueError(
            f"input_values must have shape [batch, channels, samples], got {tuple(values.shape)}"
        )
    if values.shape[1] != channels:
        raise ValueError(
            f"This model takes {channels}-channel audio, got {values.shape[1]} channels "
            f"(input shape {tuple(values.shape)})"
        )
    if values.shape[0] == 0 or values.shape[2] == 0:
        raise ValueError(f"input_values is empty: shape {tuple(values.shape)}")
    xp = np if isinstance(values, np.ndarray) else jnp  # NumPy input is checked on the host
    if not bool(xp.isfinite(values).all()):
        raise ValueError("input_values contains NaN or Inf")
    return jnp.asarray(values, jnp.float32)


def _check_padding_mask(mask: Array | None, shape: tuple[int, ...]) -> jax.Array | None:
    if mask is None:
        return None
    batch, channels, samples = shape
    mask_shape = tuple(np.shape(mask))
    allowed = [(batch, samples), (batch, 1, samples), (batch, channels, samples)]
    if mask_shape not in allowed:
        raise ValueError(
            f"padding_mask must have shape [batch, samples] = {(batch, samples)} "
            f"(or [batch, 1|channels, samples]), got {mask_shape}"
        )
    mask = jnp.asarray(mask)
    return (mask.reshape(batch, -1, samples) != 0).astype(jnp.float32)


def _check_codes(codes: Array, config: EncodecConfig) -> jax.Array:
    if not hasattr(codes, "dtype"):
        codes = np.asarray(codes)
    if not jnp.issubdtype(codes.dtype, jnp.integer):
        raise ValueError(f"audio_codes must be integers, got dtype {codes.dtype}")
    if codes.ndim != 4:
        raise ValueError(
            f"audio_codes must have shape [chunks, batch, n_q, frames], got {tuple(codes.shape)}"
        )
    n_q = codes.shape[2]
    if not 1 <= n_q <= config.num_quantizers:
        raise ValueError(
            f"audio_codes has {n_q} codebooks; this model has 1 to {config.num_quantizers}"
        )
    if codes.shape[3] == 0 or codes.shape[0] == 0 or codes.shape[1] == 0:
        raise ValueError(f"audio_codes is empty: shape {tuple(codes.shape)}")
    xp = np if isinstance(codes, np.ndarray) else jnp
    low, high = int(xp.min(codes)), int(xp.max(codes))
    if low < 0 or high >= config.codebook_size:
        raise ValueError(
            f"audio_codes must lie in [0, {config.codebook_size}), got values in [{low}, {high}]"
        )
    return jnp.asarray(codes, jnp.int32)


def _check_scales(
    scales: Sequence[Array | None] | Array | None, n_chunks: int, batch: int, config: EncodecConfig
) -> jax.Array | None:
    if scales is not None and not hasattr(scales, "shape"):
        scales = list(scales)
        if all(s is None for s in scales):
            scales = None
        elif any(s is None for s in scales):
            raise ValueError("audio_scales mixes None and arrays")
        else:
            scales = jnp.stack([jnp.asarray(s, jnp.float32) for s in scales])
    if scales is None:
        if config.normalize:
            raise ValueError(
                "This model normalises its input: decode needs the audio_scales from encode"
            )
        return None
    scales = jnp.asarray(scales, jnp.float32)
    if tuple(scales.shape) not in ((n_chunks, batch), (n_chunks, batch, 1)):
        raise ValueError(
            f"audio_scales must be [chunks, batch] or [chunks, batch, 1] = ({n_chunks}, {batch}"
            f"[, 1]) (or a list of {n_chunks} arrays [batch, 1]), got shape {tuple(scales.shape)}"
        )
    return scales.reshape(n_chunks, batch)


def _chunk_frames(
    shape: tuple[int, ...], last_frame_pad_length: int, chunk_frames: Sequence[int] | None
) -> list[int]:
    n_chunks, _, _, width = shape
    if chunk_frames is not None:
        frames = [int(f) for f in chunk_frames]
        if len(frames) != n_chunks or not all(1 <= f <= width for f in frames):
            raise ValueError(
                f"chunk_frames must give 1..{width} frames for each of {n_chunks} chunks, "
                f"got {tuple(frames)}"
            )
        return frames
    if isinstance(last_frame_pad_length, bool) or not isinstance(
        last_frame_pad_length, (int, np.integer)
    ):
        raise ValueError(f"last_frame_pad_length must be an integer, got {last_frame_pad_length!r}")
    if not 0 <= last_frame_pad_length < width:
        raise ValueError(
            f"last_frame_pad_length must be in [0, {width}), got {last_frame_pad_length}"
        )
    return [width] * (n_chunks - 1) + [width - last_frame_pad_length]
