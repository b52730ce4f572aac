"""EnCodec configuration: the architecture (`EncodecConfig`, with the published models as
presets) and how a model runs (`RuntimeSettings`). Both are frozen dataclasses, static under jit.

`EncodecConfig`'s field names and meanings are those of `transformers.EncodecConfig`, so a Hub
`config.json` maps onto it one to one (`from_hf_config` / `to_hf_config`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from collections.abc import Mapping
from typing import Any

from .atomic import atomic_write
from .untrusted import is_finite, parse_json_object

PAD_MODES = ("reflect", "constant", "replicate", "circular")
NORM_TYPES = ("weight_norm", "time_group_norm")

# Keys that transformers' generic `PretrainedConfig` may write into any config.json. They carry
# nothing about the codec, so they are accepted and dropped; any other unknown key is an error.
_GENERIC_HF_KEYS = frozenset(
    """
    _name_or_path _commit_hash _attn_implementation _attn_implementation_autoset
    _attn_implementation_internal transformers_version model_type architectures dtype torch_dtype
    return_dict output_hidden_states output_attentions torchscript use_bfloat16 tf_legacy_loss
    pruned_heads tie_word_embeddings chunk_size_feed_forward is_encoder_decoder is_decoder
    cross_attention_hidden_size add_cross_attention tie_encoder_decoder max_length min_length
    do_sample early_stopping num_beams num_beam_groups diversity_penalty temperature top_k top_p
    typical_p repetition_penalty length_penalty no_repeat_ngram_size encoder_no_repeat_ngram_size
    bad_words_ids num_return_sequences output_scores return_dict_in_generate forced_bos_token_id
    forced_eos_token_id remove_invalid_values exponential_decay_length_penalty suppress_tokens
    begin_suppress_tokens finetuning_task id2label label2id num_labels tokenizer_class prefix
    bos_token_id pad_token_id eos_token_id sep_token_id decoder_start_token_id
    task_specific_params problem_type use_cache gradient_checkpointing
    """.split()
)


@dataclasses.dataclass(frozen=True)
class EncodecConfig:
    """Architecture and framing of an EnCodec model (defaults: `facebook/encodec_24khz`)."""

    target_bandwidths: tuple[float, ...] = (1.5, 3.0, 6.0, 12.0, 24.0)
    sampling_rate: int = 24_000
    audio_channels: int = 1
    normalize: bool = False
    chunk_length_s: float | None = None
    overlap: float | None = None
    hidden_size: int = 128
    num_filters: int = 32
    num_residual_layers: int = 1
    upsampling_ratios: tuple[int, ...] = (8, 5, 4, 2)
    norm_type: str = "weight_norm"
    kernel_size: int = 7
    last_kernel_size: int = 7
    residual_kernel_size: int = 3
    dilation_growth_rate: int = 2
    use_causal_conv: bool = True
    pad_mode: str = "reflect"
    compress: int = 2
    num_lstm_layers: int = 2
    trim_right_ratio: float = 1.0
    codebook_size: int = 1024
    codebook_dim: int | None = None
    use_conv_shortcut: bool = True

    def __post_init__(self) -> None:
        # Lists from JSON become tuples so that the config is hashable (it is static under jit).
        set_ = object.__setattr__
        for name, kind in (("target_bandwidths", numbers.Real), ("upsampling_ratios", int)):
            values = getattr(self, name)
            if not isinstance(values, (list, tuple)) or not all(
                isinstance(v, kind) and not isinstance(v, bool) and is_finite(v) for v in values
            ):
                raise ValueError(f"Invalid EncodecConfig: {name} must be a list of numbers")
            if len(values) > _MAX_LIST_LENGTH:
                raise ValueError(
                    f"Invalid EncodecConfig: {name} has {len(values)} entries, at most "
                    f"{_MAX_LIST_LENGTH} are accepted"
                )
        set_(self, "target_bandwidths", tuple(float(b) for b in self.target_bandwidths))
        set_(self, "upsampling_ratios", tuple(int(r) for r in self.upsampling_ratios))
        if self.codebook_dim is None:
            set_(self, "codebook_dim", self.hidden_size)
        self._validate()

    def _validate(self) -> None:
        def fail(msg: str) -> None:
            raise ValueError(f"Invalid EncodecConfig: {msg}")

        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            expected = _FIELD_TYPES.get(field.name)
            if expected is None or (value is None and field.name in _OPTIONAL_FIELDS):
                continue
            # bool is an int subclass; an int where a float is expected is fine.
            ok = isinstance(value, expected) and not (
                expected is not bool and isinstance(value, bool)
            )
            if not ok:
                name = expected.__name__ if isinstance(expected, type) else "a number"
                fail(f"{field.name} must be {name}, got {value!r}")

        for name, low in _LOWER_BOUNDS.items():
            if getattr(self, name) < low:
                fail(f"{name} must be at least {low}, got {getattr(self, name)}")
        for name in ("chunk_length_s", "overlap", "trim_right_ratio"):
            if getattr(self, name) is not None and not is_finite(getattr(self, name)):
                fail(f"{name} must be a finite number, got {getattr(self, name)}")
        if not all(0 < b <= _MAX_BANDWIDTH for b in self.target_bandwidths):
            fail(
                f"target_bandwidths must be positive numbers of kbps up to {_MAX_BANDWIDTH:g}, "
                f"got {self.target_bandwidths}"
            )
        if self.sampling_rate > _MAX_SAMPLING_RATE:
            fail(f"sampling_rate is {self.sampling_rate} Hz, more than the {_MAX_SAMPLING_RATE}")
        if self.chunk_length_s is not None and not (
            is_finite(self.chunk_length_s * self.sampling_rate) and self.chunk_length >= 1
        ):
            fail(
                f"chunk_length_s ({self.chunk_length_s} s) times sampling_rate must be a finite "
                "number of at least one sample"
            )
        if self.overlap is not None and not 0 <= self.overlap < 1:
            fail(f"overlap must be a fraction in [0, 1), got {self.overlap}")
        if not 0 <= self.trim_right_ratio <= 1:
            fail(f"trim_right_ratio must be in [0, 1], got {self.trim_right_ratio}")
        if self.norm_type not in NORM_TYPES:
            fail(f"norm_type must be one of {NORM_TYPES}, got {self.norm_type!r}")
        if self.pad_mode not in PAD_MODES:
            fail(f"pad_mode must be one of {PAD_MODES}, got {self.pad_mode!r}")
        if not self.target_bandwidths:
            fail("target_bandwidths must name at least one bandwidth")
        if self.audio_channels not in (1, 2):
            fail(f"audio_channels must be 1 or 2, got {self.audio_channels}")
        if not self.upsampling_ratios or any(r < 1 for r in self.upsampling_ratios):
            fail(f"upsampling_ratios must be positive integers, got {self.upsampling_ratios}")
        if self.codebook_size < 1 or 2 ** int(math.log2(self.codebook_size)) != self.codebook_size:
            fail(f"codebook_size must be a power of 2, got {self.codebook_size}")
        if self.codebook_dim != self.hidden_size:
            # transformers accepts this config but its model cannot run: the quantizer compares
            # encoder outputs of size hidden_size with codebook vectors of size codebook_dim.
            fail(f"codebook_dim ({self.codebook_dim}) must equal hidden_size ({self.hidden_size})")
        if not self.use_causal_conv and self.trim_right_ratio != 1.0:
            fail("trim_right_ratio != 1.0 only makes sense for causal convolutions")
        if self.compress < 1 or self.num_filters // self.compress < 1:
            fail(f"compress ({self.compress}) must be in 1..num_filters ({self.num_filters})")
        if (self.chunk_length_s is None) != (self.overlap is None):
            # transformers silently ignores chunking when only one of the two is set; a
            # half-specified chunking is almost certainly a mistake, so say so.
            fail("chunk_length_s and overlap must be set together (or both left None)")
        if self.num_quantizers < 1:
            fail(
                f"the largest target bandwidth ({max(self.target_bandwidths)} kbps) leaves no "
                f"quantizer at {self.frame_rate} frames/s and {self.codebook_nbits} bits/code"
            )
        # Far beyond any published model, and small enough that building one (even abstractly:
        # one Python object per layer) can neither hang nor exhaust memory.
        for name, high in _UPPER_BOUNDS.items():
            if getattr(self, name) > high:
                fail(f"{name} is {getattr(self, name)}, more than the {high} accepted")
        if self.dilation_growth_rate ** max(self.num_residual_layers - 1, 0) > _MAX_DILATION:
            fail(
                f"the last residual layer's dilation, dilation_growth_rate ** "
                f"(num_residual_layers - 1), exceeds {_MAX_DILATION}"
            )
        if self.weights_size > MAX_WEIGHTS:
            fail(
                f"the model would hold about {self.weights_size:,} weights, more than the "
                f"{MAX_WEIGHTS:,} accepted"
            )

    # ---- derived quantities (same formulas as transformers.EncodecConfig) ----
    @property
    def hop_length(self) -> int:
        return math.prod(self.upsampling_ratios)

    @property
    def frame_rate(self) -> int:
        return math.ceil(self.sampling_rate / self.hop_length)

    @property
    def codebook_nbits(self) -> int:
        return math.ceil(math.log2(self.codebook_size))

    @property
    def num_quantizers(self) -> int:
        return int(1000 * self.target_bandwidths[-1] // (self.frame_rate * self.codebook_nbits))

    @property
    def chunk_length(self) -> int | None:
        return chunk_length_and_stride(self.sampling_rate, self.chunk_length_s, self.overlap)[0]

    @property
    def chunk_stride(self) -> int | None:
        return chunk_length_and_stride(self.sampling_rate, self.chunk_length_s, self.overlap)[1]

    @property
    def weights_size(self) -> int:
        """The number of weights of the convolutions, LSTMs and codebooks (biases and norms,
        a few per channel, left out): what building the model allocates, to within 1% for the
        published models."""
        dims = [self.num_filters * 2**i for i in range(len(self.upsampling_ratios) + 1)]
        residual = self.num_residual_layers * sum(
            d * (d // self.compress) * (self.residual_kernel_size + 1)
            + (d * d if self.use_conv_shortcut else 0)
            for d in dims[:-1]
        )
        resample = sum(
            4 * d * d * r for d, r in zip(dims[:-1], self.upsampling_ratios[::-1], strict=True)
        )
        lstm = self.num_lstm_layers * 8 * dims[-1] ** 2
        # The decoder mirrors the encoder; their outer convolutions swap kernel sizes.
        outer = (self.audio_channels * dims[0] + self.hidden_size * dims[-1]) * (
            self.kernel_size + self.last_kernel_size
        )
        codebooks = self.num_quantizers * 2 * self.codebook_size * self.hidden_size
        return 2 * (residual + resample + lstm) + outer + codebooks

    def num_quantizers_for_bandwidth(self, bandwidth: float | None) -> int:
        """Codebooks used at `bandwidth` (kbps); None means the smallest target bandwidth.

        Raises ValueError for a bandwidth that is not one of `target_bandwidths`.
        """
        if bandwidth is None:
            bandwidth = self.target_bandwidths[0]
        if bandwidth not in self.target_bandwidths:
            raise ValueError(
                f"This model does not support bandwidth {bandwidth!r} kbps; "
                f"select one of {list(self.target_bandwidths)}."
            )
        bits_per_quantizer = math.log2(self.codebook_size) * self.frame_rate
        return int(max(1, math.floor(bandwidth * 1000 / bits_per_quantizer)))

    # ---- conversion to and from transformers' config.json ----
    @classmethod
    def from_hf_config(cls, hf_config: Mapping[str, Any] | Any) -> EncodecConfig:
        """Build from a transformers `EncodecConfig`, its `to_dict()`, or a config.json dict.

        Unknown EnCodec-specific keys raise: a field this class does not model would otherwise be
        silently ignored and the weights run with the wrong architecture.
        """
        data = hf_config if isinstance(hf_config, Mapping) else hf_config.to_dict()
        model_type = data.get("model_type", "encodec")
        if model_type != "encodec":
            raise ValueError(f"Not an EnCodec config: model_type is {model_type!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in data if k not in names and k not in _GENERIC_HF_KEYS)
        if unknown:
            raise ValueError(f"EnCodec config has keys encodec-jax does not handle: {unknown}")
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_hf_config(self) -> dict[str, Any]:
        """The config.json dict that `transformers.EncodecConfig` reads."""
        data = dataclasses.asdict(self)
        data["target_bandwidths"] = list(self.target_bandwidths)
        data["upsampling_ratios"] = list(self.upsampling_ratios)
        data["model_type"] = "encodec"
        data["architectures"] = ["EncodecModel"]
        return data

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> EncodecConfig:
        """Read a Hub `config.json`.

        Raises:
            ValueError: for a file that is not a JSON object (not UTF-8, not JSON, a key given
                twice) or describes no valid EnCodec model, naming the file.
        """
        with open(path, "rb") as f:
            data = parse_json_object(f.read(), str(path), ValueError)
        try:
            return cls.from_hf_config(data)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None

    def to_json_file(self, path: str | os.PathLike) -> None:
        with atomic_write(path, "w") as f:
            json.dump(self.to_hf_config(), f, indent=2, sort_keys=True)
            f.write("\n")


def chunk_length_and_stride(
    sampling_rate: int, chunk_length_s: float | None, overlap: float | None
) -> tuple[int | None, int | None]:
    """Samples per chunk and between chunk starts, as transformers computes them:
    `int(chunk_length_s * sampling_rate)` and `max(1, int((1 - overlap) * chunk_length))`.
    Each is None when its setting is (the stride also when the chunk length is)."""
    if chunk_length_s is None:
        return None, None
    length = int(chunk_length_s * sampling_rate)
    if overlap is None:
        return length, None
    return length, max(1, int((1.0 - overlap) * length))


_FIELD_TYPES = {
    "sampling_rate": int,
    "audio_channels": int,
    "normalize": bool,
    "hidden_size": int,
    "num_filters": int,
    "num_residual_layers": int,
    "norm_type": str,
    "kernel_size": int,
    "last_kernel_size": int,
    "residual_kernel_size": int,
    "dilation_growth_rate": int,
    "use_causal_conv": bool,
    "pad_mode": str,
    "compress": int,
    "num_lstm_layers": int,
    "codebook_size": int,
    "codebook_dim": int,
    "use_conv_shortcut": bool,
}
_FIELD_TYPES.update(
    {"chunk_length_s": (int, float), "overlap": (int, float), "trim_right_ratio": (int, float)}
)
_OPTIONAL_FIELDS = {"chunk_length_s", "overlap"}
_LOWER_BOUNDS = {
    "sampling_rate": 1,
    "hidden_size": 1,
    "num_filters": 1,
    "num_residual_layers": 0,
    "kernel_size": 1,
    "last_kernel_size": 1,
    "residual_kernel_size": 1,
    "dilation_growth_rate": 1,
    "num_lstm_layers": 0,
}
# Counts that make one Python object each when a model is built; sizes are bounded together by
# MAX_WEIGHTS. Each is a hundred times or more what a published model uses.
_UPPER_BOUNDS = {
    "num_residual_layers": 64,
    "num_lstm_layers": 64,
    "num_quantizers": 1024,
    "hop_length": 2**20,
}
_MAX_LIST_LENGTH = 64
_MAX_BANDWIDTH = 1e6
_MAX_SAMPLING_RATE = 2**24
_MAX_DILATION = 2**20
# 2^31 weights (8 GiB in float32): a hundred times the largest published EnCodec.
MAX_WEIGHTS = 2**31

ENCODEC_24KHZ = EncodecConfig()

ENCODEC_32KHZ = EncodecConfig(
    target_bandwidths=(2.2,),
    sampling_rate=32_000,
    num_filters=64,
    upsampling_ratios=(8, 5, 4, 4),
    use_causal_conv=False,
    codebook_size=2048,
    use_conv_shortcut=False,
)

ENCODEC_48KHZ = EncodecConfig(
    target_bandwidths=(3.0, 6.0, 12.0, 24.0),
    sampling_rate=48_000,
    audio_channels=2,
    normalize=True,
    chunk_length_s=1.0,
    overlap=0.01,
    norm_type="time_group_norm",
    use_causal_conv=False,
)

PRESETS: dict[str, EncodecConfig] = {
    "facebook/encodec_24khz": ENCODEC_24KHZ,
    "facebook/encodec_32khz": ENCODEC_32KHZ,
    "facebook/encodec_48khz": ENCODEC_48KHZ,
}


MATMUL_PRECISIONS = ("highest", "high", "default", "float32", "tensorfloat32", "bfloat16")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class RuntimeSettings:
    """How a model runs: numerics and memory bounds. None of it changes the architecture or the
    weights; all of it is static under jit (a change compiles new programs).

    Change it with `model.settings = model.settings.replace(matmul_precision="default")`.

    Attributes:
        matmul_precision: precision of matmuls and convolutions, as `jax.default_matmul_precision`
            takes it. "highest" keeps float32 everywhere: TF32 or bf16 passes on GPU/TPU flip
            codes, and a flipped code changes every later residual. "default" trades that for
            speed (see benchmarks/RESULTS.md for the agreement measured).
        compute_dtype: dtype of the SEANet activations and weights inside the encoder and
            decoder ("float32" or "bfloat16"); the quantizer always runs in float32.
        param_dtype: dtype the weights are stored and trained in.
        tile_frames: inputs longer than twice this many frames run their conv stacks in tiles of
            it (`encodec_jax.tiling`): same codes, memory bounded by the tile. None: never tile.
        chunk_rows_per_call: chunked models (48 kHz) run at most this many chunks x batch items
            per compiled call (at least one chunk of each item), so memory stays bounded however
            long the input. On the CPU, 32 rows ran as fast as all 80 chunks of 8 x 10 s at once,
            at 1.9 instead of 3.3 GiB peak. None: all chunks at once.
    """

    matmul_precision: str = "highest"
    compute_dtype: str = "float32"
    param_dtype: str = "float32"
    tile_frames: int | None = 1024
    chunk_rows_per_call: int | None = 32

    def __post_init__(self) -> None:
        if self.matmul_precision not in MATMUL_PRECISIONS:
            raise ValueError(
                f"matmul_precision must be one of {MATMUL_PRECISIONS}, "
                f"got {self.matmul_precision!r}"
            )
        for name in ("compute_dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"{name} must be one of {DTYPES}, got {getattr(self, name)!r}")
        for name in ("tile_frames", "chunk_rows_per_call"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")

    def replace(self, **changes: Any) -> RuntimeSettings:
        """A copy with `changes` applied (and checked)."""
        return dataclasses.replace(self, **changes)
