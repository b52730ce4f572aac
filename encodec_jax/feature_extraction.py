"""Waveform preprocessing for EnCodec: the NumPy counterpart of transformers' feature extractor.

`EncodecFeatureExtractor` turns raw audio (one item or a batch) into the `input_values` and
`padding_mask` that an EnCodec model consumes, with the same arrays, dtypes and shapes as
`transformers.EncodecFeatureExtractor` for valid input: mono items are `[samples]`, stereo items
`[2, samples]`; every output item is `[channels, samples]` float32; padding is to the longest item,
to `max_length`, or, for chunked models such as `facebook/encodec_48khz`, to a whole number of
chunk strides. It reads and writes the same `preprocessor_config.json`.

It depends on NumPy only. torch and transformers are never imported; jax is imported only when
`return_tensors="jax"` is asked for, and huggingface_hub only to download from the Hub.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from .atomic import atomic_write
from .config import EncodecConfig
from .hub import checkpoint_file

PREPROCESSOR_CONFIG_NAME = "preprocessor_config.json"
MODEL_CONFIG_NAME = "config.json"

_PADDING_MODES = ("longest", "max_length", "do_not_pad")
_TENSOR_TYPES = (None, "np", "jax")
_PADDING_SIDES = ("right", "left")

# The settings that transformers' EnCodec extractor saves and that change its output (or are
# written back so that transformers reads the same extractor).
_SAVED_KEYS = (
    "feature_size",
    "sampling_rate",
    "padding_value",
    "padding_side",
    "return_attention_mask",
    "chunk_length_s",
    "overlap",
)


class BatchFeature(dict):
    """The output of `EncodecFeatureExtractor`: a dict whose keys are also attributes.

    Keys: `input_values` (always) and `padding_mask` (when padding is active).
    """

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            # AttributeError, not KeyError: hasattr(), copy and pickle rely on it.
            raise AttributeError(name) from None


class EncodecFeatureExtractor:
    """Prepares raw waveforms for an EnCodec model, as transformers' `EncodecFeatureExtractor`.

    The defaults describe `facebook/encodec_24khz`; `facebook/encodec_48khz` is
    `EncodecFeatureExtractor(feature_size=2, sampling_rate=48000, chunk_length_s=1.0,
    overlap=0.01)`.

    Args:
        feature_size: Audio channels, 1 (mono) or 2 (stereo).
        sampling_rate: Sampling rate of the model's audio, in Hz.
        padding_value: Value written into padded samples.
        chunk_length_s: Length in seconds of the chunks a chunked model encodes one by one, or
            None. Chunk-aligned padding and truncation are on only when `overlap` is set too.
        overlap: Fraction of a chunk shared by consecutive chunks, in [0, 1), or None.
        padding_side: "right" (the default, as every published EnCodec extractor) or "left".
        return_attention_mask: Stored and saved for transformers' sake only: like transformers,
            the extractor returns a `padding_mask` exactly when it pads.

    Raises:
        ValueError: If a setting is out of range.
    """

    model_input_names = ("input_values", "padding_mask")

    def __init__(
        self,
        feature_size: int = 1,
        sampling_rate: int = 24000,
        padding_value: float = 0.0,
        chunk_length_s: float | None = None,
        overlap: float | None = None,
        *,
        padding_side: str = "right",
        return_attention_mask: bool = True,
    ) -> None:
        if isinstance(feature_size, bool) or feature_size not in (1, 2):
            raise ValueError(f"feature_size must be 1 (mono) or 2 (stereo), got {feature_size!r}")
        if not _is_int(sampling_rate) or sampling_rate < 1:
            raise ValueError(
                f"sampling_rate must be a positive integer (Hz), got {sampling_rate!r}"
            )
        if not _is_real(padding_value) or not math.isfinite(padding_value):
            raise ValueError(f"padding_value must be a finite number, got {padding_value!r}")
        if chunk_length_s is not None:
            if not _is_real(chunk_length_s) or not int(chunk_length_s * sampling_rate) >= 1:
                raise ValueError(
                    "chunk_length_s must be a number of seconds worth at least one sample at "
                    f"{sampling_rate} Hz, got {chunk_length_s!r}"
                )
        if overlap is not None and not (_is_real(overlap) and 0.0 <= overlap < 1.0):
            # overlap >= 1 makes the stride collapse to one sample, and a negative one makes
            # chunk-aligned truncation lengths negative: neither describes a real model.
            raise ValueError(f"overlap must be a fraction in [0, 1), got {overlap!r}")
        if padding_side not in _PADDING_SIDES:
            raise ValueError(f"padding_side must be one of {_PADDING_SIDES}, got {padding_side!r}")
        self.feature_size = int(feature_size)
        self.sampling_rate = int(sampling_rate)
        self.padding_value = float(padding_value)
        self.chunk_length_s = chunk_length_s
        self.overlap = overlap
        self.padding_side = padding_side
        self.return_attention_mask = bool(return_attention_mask)

    # Properties rather than attributes so that they follow chunk_length_s / overlap if those are
    # changed after construction, as in transformers.
    @property
    def chunk_length(self) -> int | None:
        """Samples per chunk, `int(chunk_length_s * sampling_rate)`, or None if not chunked."""
        if self.chunk_length_s is None:
            return None
        return int(self.chunk_length_s * self.sampling_rate)

    @property
    def chunk_stride(self) -> int | None:
        """Samples between chunk starts, `max(1, int((1 - overlap) * chunk_length))`, or None."""
        if self.chunk_length_s is None or self.overlap is None:
            return None
        return max(1, int((1.0 - self.overlap) * self.chunk_length))

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={getattr(self, k)!r}" for k in _SAVED_KEYS)
        return f"{type(self).__name__}({settings})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, EncodecFeatureExtractor):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    __hash__ = None  # mutable settings, like transformers' extractor

    # ---- preprocessing ----

    def __call__(
        self,
        raw_audio: Any,
        padding: bool | str | None = None,
        truncation: bool = False,
        max_length: int | None = None,
        return_tensors: str | None = None,
        sampling_rate: int | None = None,
    ) -> BatchFeature:
        """Converts one waveform or a batch of waveforms into model inputs.

        Args:
            raw_audio: One item, or a batch as a list or tuple of items. An item is an array or a
                (nested) list of numbers: `[samples]` for mono, `[2, samples]` for stereo. As in
                transformers, a list whose first element is itself a list or an array is a batch,
                so a single stereo item given as nested lists must be wrapped in a list.
            padding: None (the default, same as True), True or "longest": pad to the longest
                item (after truncation). "max_length": pad to `max_length`. False or
                "do_not_pad": no padding and no `padding_mask`. For a chunked extractor without
                `max_length`, any padding pads to whole chunks:
                `(ceil(longest / chunk_stride) - 1) * chunk_stride + chunk_length` samples.
            truncation: Cut items to `max_length` samples. Without `max_length`, a chunked
                extractor cuts to `(floor(shortest / chunk_stride) - 1) * chunk_stride +
                chunk_length` samples. Unless `padding` is False, shorter items are then padded
                to the longest one.
            max_length: Target length in samples for "max_length" padding and for truncation.
            return_tensors: None for a list of per-item arrays (the `padding_mask` is an array
                all the same, as in transformers), "np" for NumPy arrays, "jax" for jax arrays.
            sampling_rate: Sampling rate of `raw_audio` in Hz; checked against the extractor's
                when given.

        Returns:
            A `BatchFeature` with `input_values`, float32 `[channels, samples]` per item (stacked
            to `[batch, channels, samples]` with tensors), and, when padding is active,
            `padding_mask`: int32 `[batch, samples]`, 1 for real samples and 0 for padding.

        Raises:
            ValueError: On a sampling rate that differs from the extractor's, on input that is
                not real-valued, finite, non-empty audio of the right shape, on incompatible
                padding and truncation options, or on items of unequal lengths when tensors are
                asked for.
        """
        # No warning when sampling_rate is omitted: transformers logs one, but a warning would
        # turn into an error wherever warnings are errors, for input that is usually fine.
        if sampling_rate is not None and sampling_rate != self.sampling_rate:
            raise ValueError(
                f"The audio was sampled at {sampling_rate} Hz but this feature extractor expects "
                f"{self.sampling_rate} Hz; resample the audio to {self.sampling_rate} Hz first."
            )
        mode = _padding_mode(padding)
        tensor_type = _tensor_type(return_tensors)
        if truncation is None:
            truncation = False
        if not isinstance(truncation, (bool, np.bool_)):
            raise ValueError(f"truncation must be True or False, got {truncation!r}")
        truncation = bool(truncation)
        if max_length is not None and (not _is_int(max_length) or max_length < 1):
            raise ValueError(f"max_length must be a positive number of samples, got {max_length!r}")
        if truncation and mode in ("longest", "max_length"):
            raise ValueError(
                "Both padding and truncation were set; set only one of them (truncation with "
                "padding left unset truncates and then pads to the longest truncated item)."
            )
        if mode is None:
            mode = "longest"

        items = self._items(raw_audio)
        lengths = [item.shape[-1] for item in items]

        stride, chunk = self.chunk_stride, self.chunk_length
        if stride is not None and chunk is not None and max_length is None:
            # A chunked model encodes chunk_length samples every chunk_stride samples; whole
            # chunks avoid a ragged last chunk. Integer arithmetic equals transformers' float
            # floor/ceil for any realistic length.
            if truncation:
                max_length = (min(lengths) // stride - 1) * stride + chunk
                if max_length < 1:
                    raise ValueError(
                        f"Truncating to whole chunks leaves no samples: the shortest item has "
                        f"{min(lengths)} samples, fewer than one chunk stride ({stride})."
                    )
            elif mode != "do_not_pad":
                max_length = (-(-max(lengths) // stride) - 1) * stride + chunk
                mode = "max_length"

        if truncation:
            if max_length is None:
                raise ValueError("truncation=True needs max_length (the length to truncate to).")
            items = [item[:, :max_length] for item in items]
            lengths = [item.shape[-1] for item in items]

        padding_mask = None
        if mode != "do_not_pad":
            if mode == "longest":
                target = max(lengths)
            elif max_length is None:
                raise ValueError('padding="max_length" needs max_length (the length to pad to).')
            else:
                target = max_length
            too_long = [i for i, n in enumerate(lengths) if n > target]
            if too_long:
                # transformers leaves such items ragged and returns an object-dtype padding_mask
                # that no model can use; an error says how to get a usable batch.
                raise ValueError(
                    f"Item {too_long[0]} has {lengths[too_long[0]]} samples, more than "
                    f"max_length={target}; pass a larger max_length, or truncation=True with "
                    "padding left unset."
                )
            items, padding_mask = self._pad(items, target)

        if tensor_type is None:
            output = BatchFeature(input_values=items)
            if padding_mask is not None:
                output["padding_mask"] = padding_mask
            return output
        lengths = [item.shape[-1] for item in items]
        if len(set(lengths)) > 1:
            raise ValueError(
                f"Cannot return {tensor_type!r} tensors for items of unequal lengths {lengths}; "
                "pad them (padding=True) or pass return_tensors=None for a list of arrays."
            )
        output = BatchFeature(input_values=np.stack(items))
        if padding_mask is not None:
            output["padding_mask"] = padding_mask
        if tensor_type == "jax":
            import jax.numpy as jnp

            output = BatchFeature({k: jnp.asarray(v) for k, v in output.items()})
        return output

    def _items(self, raw_audio: Any) -> list[np.ndarray]:
        """Validated float32 `[channels, samples]` arrays, one per item of `raw_audio`."""
        if isinstance(raw_audio, (list, tuple)):
            if len(raw_audio) == 0:
                raise ValueError("Expected audio, got an empty list.")
            first = raw_audio[0]
            # transformers' rule (a list of lists or arrays is a batch), extended to any array
            # type (jax, torch) so that a list of those is a batch too.
            if isinstance(first, (list, tuple)) or getattr(first, "ndim", 0) > 0:
                return [self._item(audio, f"item {i}") for i, audio in enumerate(raw_audio)]
        return [self._item(raw_audio, "audio")]

    def _item(self, audio: Any, name: str) -> np.ndarray:
        try:
            array = np.asarray(audio)
        except ValueError as error:
            # NumPy refuses ragged nested lists.
            raise ValueError(f"Expected {name} to be an array of numbers: {error}") from None
        if array.dtype.kind not in "iuf":
            raise ValueError(
                f"Expected {name} to hold real numbers, got an array of dtype {array.dtype}."
            )
        if self.feature_size == 1:
            if array.ndim != 1:
                raise ValueError(
                    f"Expected {name} to be mono audio of shape (samples,), got shape "
                    f"{array.shape}; stereo audio (2, samples) needs feature_size=2, and a batch "
                    "is a list of items."
                )
            array = array[None]
        elif array.ndim != 2:
            raise ValueError(
                f"Expected {name} to be stereo audio of shape (2, samples), got a "
                f"{array.ndim}-D array of shape {array.shape}; a batch is a list of items."
            )
        elif array.shape[0] != 2:
            raise ValueError(
                f"Expected {name} to be stereo audio with 2 channels, shape (2, samples), got "
                f"{array.shape[0]} channels (shape {array.shape})."
            )
        if array.shape[-1] == 0:
            raise ValueError(
                f"Expected {name} to have at least one sample, got shape {array.shape}."
            )
        # float32 always: transformers keeps the dtype of a single integer or float16 array, which
        # no EnCodec model takes as is. Values beyond float32's range become Inf, reported below
        # as an error rather than as a RuntimeWarning.
        with np.errstate(over="ignore"):
            array = array.astype(np.float32)
        if not np.isfinite(array).all():
            raise ValueError(f"Expected {name} to be finite, but it holds NaN or Inf values.")
        return array

    def _pad(self, items: list[np.ndarray], target: int) -> tuple[list[np.ndarray], np.ndarray]:
        """Pads every item to `target` samples; returns the items and their padding mask."""
        padded = []
        padding_mask = np.zeros((len(items), target), dtype=np.int32)
        for item, mask in zip(items, padding_mask, strict=True):
            length = item.shape[-1]
            if length == target:
                padded.append(item)
                mask[:] = 1
                continue
            out = np.full((item.shape[0], target), self.padding_value, dtype=np.float32)
            real = (
                slice(0, length) if self.padding_side == "right" else slice(target - length, None)
            )
            out[:, real] = item
            mask[real] = 1
            padded.append(out)
        return padded, padding_mask

    # ---- configuration ----

    def to_dict(self) -> dict[str, Any]:
        """The settings as saved in `preprocessor_config.json`.

        Returns:
            The same keys and values as transformers' `EncodecFeatureExtractor.to_dict()`.
        """
        data = {key: getattr(self, key) for key in _SAVED_KEYS}
        data["feature_extractor_type"] = "EncodecFeatureExtractor"
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EncodecFeatureExtractor:
        """Builds an extractor from the contents of a `preprocessor_config.json`.

        Args:
            data: The parsed JSON. Keys other than the extractor's settings (such as
                `processor_class`) are ignored: transformers' EnCodec extractor does not read
                them either, so they cannot change its output.

        Returns:
            The extractor.

        Raises:
            ValueError: If the file describes another kind of feature extractor, or a setting is
                out of range.
        """
        kind = data.get("feature_extractor_type", "EncodecFeatureExtractor")
        if kind != "EncodecFeatureExtractor":
            raise ValueError(f"Not an EnCodec feature extractor config: {kind!r}")
        return cls(**{key: data[key] for key in _SAVED_KEYS if key in data})

    @classmethod
    def from_config(cls, config: EncodecConfig) -> EncodecFeatureExtractor:
        """Builds the extractor that matches a model configuration.

        Args:
            config: An `encodec_jax.config.EncodecConfig`.

        Returns:
            An extractor with the model's channels, sampling rate and chunking.
        """
        if not isinstance(config, EncodecConfig):
            raise ValueError(f"Expected an encodec_jax EncodecConfig, got {type(config).__name__}")
        return cls(
            feature_size=config.audio_channels,
            sampling_rate=config.sampling_rate,
            chunk_length_s=config.chunk_length_s,
            overlap=config.overlap,
        )

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike,
        *,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
    ) -> EncodecFeatureExtractor:
        """Loads an extractor from a local directory or a Hugging Face Hub model repository.

        `preprocessor_config.json` is read if present; otherwise the extractor is derived from
        the EnCodec model's `config.json` (`audio_channels`, `sampling_rate`, `chunk_length_s`,
        `overlap`), which determine the published extractors completely.

        Args:
            path_or_repo_id: A directory, or a Hub repository id such as
                "facebook/encodec_24khz".
            revision: Hub branch, tag or commit.
            cache_dir: Hub cache directory.
            local_files_only: Use only files already in the Hub cache.
            token: Hub access token.

        Returns:
            The extractor.

        Raises:
            FileNotFoundError: If neither file exists.
            ValueError: If a file does not describe an EnCodec extractor or model.
        """
        path = checkpoint_file(
            path_or_repo_id,
            [PREPROCESSOR_CONFIG_NAME, MODEL_CONFIG_NAME],
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            token=token,
        )
        return cls._from_file(str(path), path.name)

    @classmethod
    def _from_file(cls, path: str, name: str) -> EncodecFeatureExtractor:
        if name == MODEL_CONFIG_NAME:
            return cls.from_config(EncodecConfig.from_json_file(path))
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def save_pretrained(self, directory: str | os.PathLike) -> str:
        """Writes `preprocessor_config.json`, readable by transformers' `from_pretrained`.

        Args:
            directory: Created if missing.

        Returns:
            The path of the written file.
        """
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, PREPROCESSOR_CONFIG_NAME)
        with atomic_write(path, "w") as f:
            # transformers' own layout, so that a saved file diffs cleanly against one it wrote.
            f.write(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _padding_mode(padding: Any) -> str | None:
    """The padding strategy as one of `_PADDING_MODES`, or None when left unset."""
    if padding is None:
        return None
    if isinstance(padding, (bool, np.bool_)):
        return "longest" if padding else "do_not_pad"
    # .value accepts transformers' PaddingStrategy members without importing transformers.
    mode = getattr(padding, "value", padding)
    if mode not in _PADDING_MODES:
        raise ValueError(
            f"padding must be None, True, False or one of {list(_PADDING_MODES)}, got {padding!r}"
        )
    return mode


def _tensor_type(return_tensors: Any) -> str | None:
    kind = getattr(return_tensors, "value", return_tensors)
    if kind == "pt":
        raise ValueError(
            "encodec-jax does not produce torch tensors (return_tensors='pt'); accepted values "
            "are None, 'np' and 'jax'."
        )
    if kind not in _TENSOR_TYPES:
        raise ValueError(
            f"return_tensors must be None, 'np' or 'jax', got {return_tensors!r} "
            "(torch tensors are not produced)"
        )
    return kind


__all__ = ["BatchFeature", "EncodecFeatureExtractor", "PREPROCESSOR_CONFIG_NAME"]
