"""Waveform preprocessing for EnCodec: the NumPy counterpart of transformers' feature extractor.

`EncodecFeatureExtractor` turns raw audio (one item or a batch) into the `input_values` and
`padding_mask` an EnCodec model takes, with the arrays, dtypes and shapes of
`transformers.EncodecFeatureExtractor` for valid input, and reads and writes the same
`preprocessor_config.json`. The length planning (`target_lengths`) and the padding (`pad_items`)
are small pure functions. NumPy only: jax is imported for `return_tensors="jax"` alone, and
huggingface_hub only to download from the Hub.
"""

from __future__ import annotations

import json
import numbers
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from .atomic import atomic_write
from .config import EncodecConfig, chunk_length_and_stride
from .hub import checkpoint_file
from .untrusted import is_finite, parse_json_object

PREPROCESSOR_CONFIG_NAME = "preprocessor_config.json"
MODEL_CONFIG_NAME = "config.json"
_PADDING_MODES = ("longest", "max_length", "do_not_pad")
_PADDING_SIDES = ("right", "left")
# The settings transformers' EnCodec extractor saves (and so reads back).
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
    """The extractor's output: a dict whose keys (`input_values`, `padding_mask` when padding is
    active) are also attributes."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None  # hasattr(), copy and pickle rely on it


def target_lengths(
    lengths: list[int],
    padding: str | None,
    truncation: bool,
    max_length: int | None,
    chunking: tuple[int | None, int | None],
) -> tuple[int | None, int | None]:
    """(length to truncate every item to or None, length to pad every item to or None).

    `padding` is one of "longest", "max_length", "do_not_pad" or None (unset). A chunked model
    (`chunking` = (chunk length, stride), both set) without `max_length` truncates to whole
    chunks of the shortest item and pads to whole chunks of the longest, as transformers does.
    """
    if truncation and padding in ("longest", "max_length"):
        raise ValueError(
            "Both padding and truncation were set; set only one of them (truncation with "
            "padding left unset truncates and then pads to the longest truncated item)."
        )
    padding = padding or "longest"
    chunk, stride = chunking
    if chunk is not None and stride is not None and max_length is None:
        # Integer arithmetic equals transformers' float floor/ceil for any realistic length.
        if truncation:
            max_length = (min(lengths) // stride - 1) * stride + chunk
            if max_length < 1:
                raise ValueError(
                    f"Truncating to whole chunks leaves no samples: the shortest item has "
                    f"{min(lengths)} samples, fewer than one chunk stride ({stride})."
                )
        elif padding != "do_not_pad":
            max_length = (-(-max(lengths) // stride) - 1) * stride + chunk
            padding = "max_length"
    if truncation and max_length is None:
        raise ValueError("truncation=True needs max_length (the length to truncate to).")
    truncate_to = max_length if truncation else None
    if truncate_to is not None:
        lengths = [min(n, truncate_to) for n in lengths]
    if padding == "do_not_pad":
        return truncate_to, None
    if padding == "longest":
        return truncate_to, max(lengths)
    if max_length is None:
        raise ValueError('padding="max_length" needs max_length (the length to pad to).')
    too_long = [i for i, n in enumerate(lengths) if n > max_length]
    if too_long:
        # transformers leaves such items ragged with an object-dtype mask no model can use.
        raise ValueError(
            f"Item {too_long[0]} has {lengths[too_long[0]]} samples, more than "
            f"max_length={max_length}; pass a larger max_length, or truncation=True with "
            "padding left unset."
        )
    return truncate_to, max_length


def pad_items(
    items: list[np.ndarray], target: int, value: float, side: str = "right"
) -> tuple[list[np.ndarray], np.ndarray]:
    """Items `[channels, n]` padded with `value` to `target` samples on `side`, and the
    int32 padding mask `[batch, target]` (1 = real sample)."""
    padded, mask = [], np.zeros((len(items), target), dtype=np.int32)
    for item, row in zip(items, mask, strict=True):
        n = item.shape[-1]
        real = slice(0, n) if side == "right" else slice(target - n, target)
        row[real] = 1
        if n == target:
            padded.append(item)
            continue
        out = np.full((item.shape[0], target), value, dtype=np.float32)
        out[:, real] = item
        padded.append(out)
    return padded, mask


class EncodecFeatureExtractor:
    """Prepares raw waveforms for an EnCodec model, as transformers' `EncodecFeatureExtractor`.

    The defaults describe `facebook/encodec_24khz`; `facebook/encodec_48khz` is
    `EncodecFeatureExtractor(feature_size=2, sampling_rate=48000, chunk_length_s=1.0,
    overlap=0.01)` (`from_config` builds the one matching a model).

    Args:
        feature_size: audio channels, 1 (mono) or 2 (stereo).
        sampling_rate: the model's sampling rate in Hz.
        padding_value: written into padded samples.
        chunk_length_s: chunk length in seconds of a chunked model, or None.
        overlap: fraction of a chunk shared by consecutive chunks, in [0, 1), or None;
            chunk-aligned padding and truncation are on only when both are set.
        padding_side: "right" (every published extractor) or "left".
        return_attention_mask: saved for transformers' sake only: as there, a `padding_mask` is
            returned exactly when the extractor pads.
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
        if not _is_real(padding_value) or not is_finite(padding_value):
            raise ValueError(f"padding_value must be a finite number, got {padding_value!r}")
        if chunk_length_s is not None and (
            not _is_real(chunk_length_s) or not _whole_samples(chunk_length_s, sampling_rate) >= 1
        ):
            raise ValueError(
                "chunk_length_s must be a finite number of seconds worth at least one sample at "
                f"{sampling_rate} Hz, got {chunk_length_s!r}"
            )
        if overlap is not None and not (_is_real(overlap) and 0.0 <= overlap < 1.0):
            # overlap >= 1 collapses the stride to one sample; a negative one makes chunk-aligned
            # truncation lengths negative: neither describes a real model.
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

    # Properties, so that they follow chunk_length_s / overlap changed later, as in transformers.
    @property
    def chunk_length(self) -> int | None:
        """Samples per chunk, or None if not chunked."""
        return chunk_length_and_stride(self.sampling_rate, self.chunk_length_s, self.overlap)[0]

    @property
    def chunk_stride(self) -> int | None:
        """Samples between chunk starts, or None."""
        return chunk_length_and_stride(self.sampling_rate, self.chunk_length_s, self.overlap)[1]

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={getattr(self, k)!r}" for k in _SAVED_KEYS)
        return f"{type(self).__name__}({settings})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, EncodecFeatureExtractor):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    __hash__ = None  # mutable settings, like transformers' extractor

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
            raw_audio: one item or a batch (a list or tuple of items). An item is an array or a
                nested list of numbers: `[samples]` mono, `[2, samples]` stereo. As in
                transformers, a list whose first element is a list or an array is a batch.
            padding: None or True or "longest" (pad to the longest item after truncation),
                "max_length" (to `max_length`), False or "do_not_pad" (no `padding_mask`). A
                chunked extractor without `max_length` pads to whole chunks.
            truncation: cut items to `max_length` (chunked, without it: to whole chunks of the
                shortest item); unless `padding` is False, shorter items are then padded.
            max_length: target length in samples for "max_length" padding and truncation.
            return_tensors: None (a list of arrays), "np" or "jax".
            sampling_rate: the audio's rate in Hz, checked against the extractor's.

        Returns:
            `input_values`, float32 `[channels, samples]` per item (stacked to `[batch, channels,
            samples]` with tensors), and, when padding, `padding_mask` int32 `[batch, samples]`.

        Raises:
            ValueError: a wrong sampling rate; audio that is not real, finite, non-empty and of
                the right shape; contradicting options; unequal lengths with tensors.
        """
        # No warning when sampling_rate is omitted (transformers logs one): where warnings are
        # errors it would fail input that is usually fine.
        if sampling_rate is not None and sampling_rate != self.sampling_rate:
            raise ValueError(
                f"The audio was sampled at {sampling_rate} Hz but this feature extractor expects "
                f"{self.sampling_rate} Hz; resample the audio to {self.sampling_rate} Hz first."
            )
        mode = _padding_mode(padding)
        tensor_type = _tensor_type(return_tensors)
        truncation = False if truncation is None else truncation
        if not isinstance(truncation, (bool, np.bool_)):
            raise ValueError(f"truncation must be True or False, got {truncation!r}")
        if max_length is not None and (not _is_int(max_length) or max_length < 1):
            raise ValueError(f"max_length must be a positive number of samples, got {max_length!r}")

        items = self._items(raw_audio)
        chunking = (self.chunk_length, self.chunk_stride)
        truncate_to, pad_to = target_lengths(
            [item.shape[-1] for item in items], mode, bool(truncation), max_length, chunking
        )
        if truncate_to is not None:
            items = [item[:, :truncate_to] for item in items]
        output = BatchFeature(input_values=items)
        if pad_to is not None:
            output["input_values"], output["padding_mask"] = pad_items(
                items, pad_to, self.padding_value, self.padding_side
            )
        if tensor_type is None:
            return output
        lengths = [item.shape[-1] for item in output["input_values"]]
        if len(set(lengths)) > 1:
            raise ValueError(
                f"Cannot return {tensor_type!r} tensors for items of unequal lengths {lengths}; "
                "pad them (padding=True) or pass return_tensors=None for a list of arrays."
            )
        output["input_values"] = np.stack(output["input_values"])
        if tensor_type == "jax":
            import jax.numpy as jnp

            output = BatchFeature({k: jnp.asarray(v) for k, v in output.items()})
        return output

    def _items(self, raw_audio: Any) -> list[np.ndarray]:
        """Validated float32 `[channels, samples]` arrays, one per item of `raw_audio`."""
        if isinstance(raw_audio, (list, tuple)):
            if len(raw_audio) == 0:
                raise ValueError("Expected audio, got an empty list.")
            # transformers' rule (a list of lists or arrays is a batch), for any array type.
            first = raw_audio[0]
            if isinstance(first, (list, tuple)) or getattr(first, "ndim", 0) > 0:
                return [self._item(audio, f"item {i}") for i, audio in enumerate(raw_audio)]
        return [self._item(raw_audio, "audio")]

    def _item(self, audio: Any, name: str) -> np.ndarray:
        try:
            array = np.asarray(audio)
        except ValueError as error:  # NumPy refuses ragged nested lists
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
        # float32 always (transformers keeps a single item's integer or float16 dtype, which no
        # model takes); values beyond float32's range become Inf, reported as an error below.
        with np.errstate(over="ignore"):
            array = array.astype(np.float32)
        if not np.isfinite(array).all():
            raise ValueError(f"Expected {name} to be finite, but it holds NaN or Inf values.")
        return array

    # ---- configuration ----
    def to_dict(self) -> dict[str, Any]:
        """The settings as `preprocessor_config.json` holds them (transformers' keys)."""
        return {**{key: getattr(self, key) for key in _SAVED_KEYS}, **_KIND}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EncodecFeatureExtractor:
        """From a parsed `preprocessor_config.json`; keys transformers' EnCodec extractor does not
        read either (such as `processor_class`) are ignored.

        Raises:
            ValueError: another kind of feature extractor, or a setting out of range.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"Expected the settings as a mapping, got {type(data).__name__}")
        kind = data.get("feature_extractor_type", "EncodecFeatureExtractor")
        if kind != "EncodecFeatureExtractor":
            raise ValueError(f"Not an EnCodec feature extractor config: {kind!r}")
        return cls(**{key: data[key] for key in _SAVED_KEYS if key in data})

    @classmethod
    def from_config(cls, config: EncodecConfig) -> EncodecFeatureExtractor:
        """The extractor matching a model's `EncodecConfig` (channels, rate, chunking)."""
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
        """From a directory or a Hub model repository: its `preprocessor_config.json`, else the
        model's `config.json`, which determines the published extractors completely.

        Raises:
            FileNotFoundError: a directory with neither file (for a Hub id, huggingface_hub's own
                error for config.json says why).
            ValueError: a file that describes no EnCodec extractor or model, or is damaged (not
                a UTF-8 JSON object, a key given twice), naming the file.
        """
        path = checkpoint_file(
            path_or_repo_id,
            [PREPROCESSOR_CONFIG_NAME, MODEL_CONFIG_NAME],
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            token=token,
        )
        if path.name == MODEL_CONFIG_NAME:
            return cls.from_config(EncodecConfig.from_json_file(path))
        with open(path, "rb") as f:
            data = parse_json_object(f.read(), str(path), ValueError)
        try:
            return cls.from_dict(data)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None

    def save_pretrained(self, directory: str | os.PathLike) -> str:
        """Writes `preprocessor_config.json` (created directory if missing), as transformers
        lays it out; returns its path."""
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, PREPROCESSOR_CONFIG_NAME)
        with atomic_write(path, "w") as f:
            f.write(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path


_KIND = {"feature_extractor_type": "EncodecFeatureExtractor"}


def _whole_samples(seconds: float, rate: int) -> int:
    """int(seconds * rate) as transformers computes a chunk length; 0 when that is no finite
    number (an int too large for a float, an infinite or NaN product)."""
    try:
        return int(seconds * rate)
    except (OverflowError, ValueError):
        return 0


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
    mode = getattr(padding, "value", padding)  # transformers' PaddingStrategy, without importing it
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
    if kind not in (None, "np", "jax"):
        raise ValueError(
            f"return_tensors must be None, 'np' or 'jax', got {return_tensors!r} "
            "(torch tensors are not produced)"
        )
    return kind


__all__ = ["BatchFeature", "EncodecFeatureExtractor", "PREPROCESSOR_CONFIG_NAME"]
