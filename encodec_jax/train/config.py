"""A training run's settings: one frozen dataclass per concern, read from and written to YAML.

The defaults are audiocraft 1.3.0's (`config/solver/compression/default.yaml` and
`config/model/encodec/default.yaml`); the presets reproduce its `default`,
`encodec_musicgen_32khz` and `encodec_base_24khz` solver/model configs (and a `tiny` one for
tests). Every option of `encodec-jax train` is a field here, so a YAML file and the command line
say the same things.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from typing import Any

from ..atomic import atomic_write
from ..config import EncodecConfig
from ..untrusted import yaml_loader
from .quantizer import EXPIRY_MODES

SCHEDULES = ("constant", "cosine")


class TrainConfigError(ValueError):
    """A training configuration that cannot be used; the message names the field."""


@dataclasses.dataclass(frozen=True)
class QuantizerSettings:
    """The training-mode RVQ (audiocraft's `rvq` section); sizes come from the model
    (`quantizer.QuantizerConfig.for_model`)."""

    decay: float = 0.99
    epsilon: float = 1e-5
    kmeans_init: bool = True
    kmeans_iters: int = 50
    threshold_ema_dead_code: float = 2.0
    # "faithful": audiocraft's expiry, which its EMA step overwrites (no effect); "reset":
    # expiry that takes effect (the expired codes' embed, embed_avg and cluster_size reset).
    expiry: str = "faithful"
    q_dropout: bool = False
    commitment_weight: float = 1.0


@dataclasses.dataclass(frozen=True)
class LossWeights:
    """Weights of the balanced losses; 0 means computed as a metric only (audiocraft's)."""

    adv: float = 4.0
    feat: float = 4.0
    l1: float = 0.1
    mel: float = 0.0
    msspec: float = 2.0
    sisnr: float = 0.0


@dataclasses.dataclass(frozen=True)
class BalancerSettings:
    balance_grads: bool = True
    total_norm: float = 1.0
    ema_decay: float = 0.999
    per_batch_item: bool = True


@dataclasses.dataclass(frozen=True)
class AdversarialConfig:
    """The MS-STFT discriminator and how often it trains (probability 1/every per step)."""

    every: int = 1
    filters: int = 32
    n_ffts: tuple[int, ...] = (1024, 2048, 512, 256, 128)
    hop_lengths: tuple[int, ...] = (256, 512, 128, 64, 32)
    win_lengths: tuple[int, ...] = (1024, 2048, 512, 256, 128)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Adam for the generator and the discriminator alike (audiocraft's `optim`)."""

    lr: float = 3e-4
    b1: float = 0.5
    b2: float = 0.9
    eps: float = 1e-8
    weight_decay: float = 0.0
    max_norm: float = 0.0  # gradient clipping by global norm; 0: none
    schedule: str = "constant"  # or "cosine" (decay to 0 over the run, after the warmup)
    warmup_steps: int = 0
    ema_decay: float | None = 0.99  # model EMA over parameters and codebooks; None: off


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the audio is and how it is cut."""

    train: str | None = None
    valid: str | None = None
    segment: float = 1.0  # seconds per training example
    batch_size: int = 64  # the global batch, split over all devices of all processes
    workers: int = 2  # processes decoding and resampling audio in the background
    valid_segments: int = 32  # fixed validation segments (evenly spread over the files)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Length of the run, and what it writes when."""

    steps: int = 400_000
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 1000
    keep: int = 3  # checkpoints kept (the newest)
    valid_every: int = 1000
    compute_dtype: str = "float32"  # or "bfloat16" for the SEANet networks


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs.

    `model` is the architecture trained from scratch; with `init` (a directory or Hub id
    `EncodecModel.from_pretrained` takes) the run fine-tunes that checkpoint and `model` must be
    left unset (it comes from the checkpoint). `n_q` is the number of codebooks trained (the
    bandwidth); with `quantizer.q_dropout` each batch draws one from 1..n_q.
    """

    model: EncodecConfig | None = None
    init: str | None = None
    n_q: int | None = None  # None: all of the model's codebooks
    quantizer: QuantizerSettings = QuantizerSettings()
    losses: LossWeights = LossWeights()
    balancer: BalancerSettings = BalancerSettings()
    adversarial: AdversarialConfig = AdversarialConfig()
    optim: OptimConfig = OptimConfig()
    data: DataConfig = DataConfig()
    run: RunConfig = RunConfig()

    def __post_init__(self) -> None:
        if (self.model is None) == (self.init is None):
            raise TrainConfigError(
                "give either a model architecture (a preset or model: in the YAML) to train from "
                "scratch, or init: a checkpoint to fine-tune, not both"
                if self.model is not None
                else "give a checkpoint to fine-tune (--init) or a preset to train from scratch "
                "(--config-preset)"
            )
        q = self.quantizer
        if q.expiry not in EXPIRY_MODES:
            raise TrainConfigError(
                f"quantizer.expiry must be one of {EXPIRY_MODES}, got {q.expiry!r}"
            )
        if not 0.0 < q.decay < 1.0:
            raise TrainConfigError(f"quantizer.decay must be in (0, 1), got {q.decay}")
        if self.optim.schedule not in SCHEDULES:
            raise TrainConfigError(
                f"optim.schedule must be one of {SCHEDULES}, got {self.optim.schedule!r}"
            )
        if self.run.compute_dtype not in ("float32", "bfloat16"):
            raise TrainConfigError(
                f"run.compute_dtype must be float32 or bfloat16, got {self.run.compute_dtype!r}"
            )
        a = self.adversarial
        if not len(a.n_ffts) == len(a.hop_lengths) == len(a.win_lengths):
            raise TrainConfigError(
                "adversarial.n_ffts, hop_lengths and win_lengths differ in length"
            )
        positive = {
            "n_q": self.n_q,
            "adversarial.every": a.every,
            "data.batch_size": self.data.batch_size,
            "data.segment": self.data.segment,
            "data.valid_segments": self.data.valid_segments,
            "run.steps": self.run.steps,
            "run.log_every": self.run.log_every,
            "run.checkpoint_every": self.run.checkpoint_every,
            "run.keep": self.run.keep,
            "run.valid_every": self.run.valid_every,
            "optim.lr": self.optim.lr,
        }
        for name, value in positive.items():
            if value is not None and not value > 0:
                raise TrainConfigError(f"{name} must be positive, got {value}")
        if self.data.workers < 0:
            raise TrainConfigError(f"data.workers must be 0 or more, got {self.data.workers}")
        if self.model is not None and self.n_q is not None and self.n_q > self.model.num_quantizers:
            raise TrainConfigError(
                f"n_q ({self.n_q}) exceeds the model's {self.model.num_quantizers} codebooks"
            )

    # ---- YAML ----
    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["model"] = None if self.model is None else _plain(self.model.to_hf_config())
        for key in ("model_type", "architectures"):
            if data["model"] is not None:
                data["model"].pop(key, None)
        return _plain(data)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """From the nested mapping `to_dict` gives (a YAML file's content); unknown keys are
        errors that name them."""
        if not isinstance(data, Mapping):
            raise TrainConfigError("a training config must be a mapping of sections")
        sections = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(sections))
        if unknown:
            raise TrainConfigError(f"unknown training config keys: {unknown}")
        kwargs: dict[str, Any] = {}
        for name, value in data.items():
            if name == "model":
                try:
                    kwargs[name] = None if value is None else EncodecConfig(**value)
                except TypeError as err:
                    raise TrainConfigError(f"model: {err}") from None
                except ValueError as err:
                    raise TrainConfigError(f"model: {err}") from None
            elif dataclasses.is_dataclass(sections[name].default):
                kwargs[name] = _section(name, type(sections[name].default), value)
            else:
                kwargs[name] = value
        return cls(**kwargs)

    def to_yaml_file(self, path: str | os.PathLike) -> None:
        import yaml

        with atomic_write(path, "w") as f:
            yaml.safe_dump(self.to_dict(), f, sort_keys=False)

    @classmethod
    def from_yaml_file(cls, path: str | os.PathLike) -> TrainConfig:
        """Read a YAML file written by `to_yaml_file` or by hand (any subset of the fields).

        Raises:
            TrainConfigError: unreadable YAML, unknown keys or bad values, naming them.
        """
        return cls.from_dict(read_yaml(path))

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


# A training config is a few hundred bytes; anything near this is not one.
MAX_YAML_BYTES = 1 << 20


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """The mapping a training config YAML file holds (empty for an empty file).

    The file is untrusted (configs are shared): at most MAX_YAML_BYTES, parsed with a safe loader
    (which builds no objects) that refuses deep nesting and anchors and aliases, whose nesting
    can make a small file expand without bound when the config is walked
    (`untrusted.yaml_loader`).

    Raises:
        TrainConfigError: unreadable, too large, not YAML, nested deeper than
            `untrusted.MAX_YAML_DEPTH`, aliases, or not a mapping.
    """
    import yaml

    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_YAML_BYTES + 1)
        if len(raw) > MAX_YAML_BYTES:
            raise TrainConfigError(
                f"training config {path} is larger than {MAX_YAML_BYTES} bytes: not a config"
            )
        data = yaml.load(raw.decode("utf-8"), Loader=yaml_loader(aliases=False))
    except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError) as err:
        reason = " ".join(str(err).split())
        raise TrainConfigError(f"cannot read training config {path}: {reason}") from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise TrainConfigError(
            f"training config {path} must hold a mapping of sections, not {type(data).__name__}"
        )
    return dict(data)


def _section(name: str, kind: type, value: Any):
    if value is None:
        return kind()
    if not isinstance(value, Mapping):
        raise TrainConfigError(f"{name} must be a mapping, got {value!r}")
    fields = {f.name: f for f in dataclasses.fields(kind)}
    unknown = sorted(set(value) - set(fields))
    if unknown:
        raise TrainConfigError(f"unknown keys in {name}: {unknown}")
    kwargs = {}
    for key, item in value.items():
        default = fields[key].default
        if isinstance(default, tuple):
            item = tuple(item)
        elif isinstance(default, bool) and not isinstance(item, bool):
            raise TrainConfigError(f"{name}.{key} must be true or false, got {item!r}")
        elif isinstance(default, (int, float)) and not isinstance(default, bool):
            if isinstance(item, bool) or not isinstance(item, (int, float)):
                raise TrainConfigError(f"{name}.{key} must be a number, got {item!r}")
        kwargs[key] = item
    return kind(**kwargs)


def _plain(value: Any) -> Any:
    """Tuples as lists, for YAML."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# ---- presets ----
def _audiocraft_model(
    sample_rate: int,
    *,
    channels: int = 1,
    ratios: tuple[int, ...] = (8, 5, 4, 2),
    n_filters: int = 32,
    dimension: int = 128,
    bins: int = 1024,
    n_q: int = 8,
    causal: bool = False,
    q_dropout: bool = False,
) -> EncodecConfig:
    """audiocraft's `config/model/encodec/default.yaml` with the given overrides, as an
    EncodecConfig. With quantizer dropout the model serves every power-of-two bandwidth."""
    hop = math.prod(ratios)
    kbps_per_codebook = math.ceil(sample_rate / hop) * math.ceil(math.log2(bins)) / 1000
    counts = [2**i for i in range(int(math.log2(n_q)) + 1)] if q_dropout else [n_q]
    counts = [c for c in counts if c >= min(2, n_q)] if q_dropout else counts
    return EncodecConfig(
        target_bandwidths=tuple(round(c * kbps_per_codebook, 6) for c in counts),
        sampling_rate=sample_rate,
        audio_channels=channels,
        hidden_size=dimension,
        num_filters=n_filters,
        upsampling_ratios=ratios,
        use_causal_conv=causal,
        pad_mode="constant",
        codebook_size=bins,
        use_conv_shortcut=False,  # audiocraft's true_skip
    )


PRESETS: dict[str, TrainConfig] = {
    # audiocraft's solver `compression/default` with its default model (sample rate: 24 kHz here;
    # audiocraft leaves it to the dataset).
    "default": TrainConfig(model=_audiocraft_model(24_000)),
    "encodec_musicgen_32khz": TrainConfig(
        model=_audiocraft_model(32_000, ratios=(8, 5, 4, 4), n_filters=64, bins=2048, n_q=4)
    ),
    "encodec_base_24khz": TrainConfig(
        model=_audiocraft_model(24_000, n_q=32, causal=True, q_dropout=True),
        quantizer=QuantizerSettings(q_dropout=True),
    ),
    # audiocraft's `debug.yaml` sizes (dimension 16, 4 filters) at 8 kHz, for tests and laptops.
    "tiny": TrainConfig(
        model=_audiocraft_model(8_000, ratios=(4, 2), n_filters=4, dimension=16, bins=64, n_q=4),
        adversarial=AdversarialConfig(
            filters=4, n_ffts=(256, 128), hop_lengths=(64, 32), win_lengths=(256, 128)
        ),
        data=DataConfig(batch_size=4, segment=0.25, workers=0, valid_segments=4),
        run=RunConfig(steps=200, log_every=10, checkpoint_every=50, valid_every=50),
    ),
}


def load_config(
    preset: str | None = None,
    yaml_path: str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> TrainConfig:
    """A config from a preset, then a YAML file, then `overrides`, each replacing what comes
    before it field by field.

    Args:
        preset: a name of `PRESETS`, or None for audiocraft's defaults (then `init` or `model`
            must come from the YAML or the overrides).
        yaml_path: a YAML file with any subset of `TrainConfig.to_dict()`'s fields.
        overrides: dotted field names to values, e.g. `{"data.batch_size": 8, "init": "..."}`;
            None values are ignored. Giving `init` drops the preset's model (the checkpoint's
            architecture is the model).

    Raises:
        TrainConfigError: an unknown preset, unreadable YAML, unknown fields or bad values.
    """
    if preset is None:
        merged: dict[str, Any] = {}
    elif preset in PRESETS:
        merged = PRESETS[preset].to_dict()
    else:
        raise TrainConfigError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    if yaml_path is not None:
        data = read_yaml(yaml_path)
        merged = _merge(merged, data)
        if data.get("init") is not None and "model" not in data:
            merged["model"] = None  # the checkpoint's architecture is the model
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        *path, last = dotted.split(".")
        node = merged
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
        if dotted == "init":
            merged["model"] = None
    return TrainConfig.from_dict(merged)


def _merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict) and key != "model":
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out
