"""Convert EnCodec checkpoints from every PyTorch source into encodec-jax directories, and back.

Sources, told apart by their content (never by trust in a file extension):

- a transformers directory (config.json + model.safetensors / pytorch_model.bin) or a Hub id;
- audiocraft's `compression_state_dict.bin`: a pickle with `best_state` (the state dict) and
  `xp.cfg` (its Hydra config as YAML), or with `pretrained` naming a Hub model;
- the original `encodec` package's `.th` state dicts, whose architecture is not stored in the
  file: it comes from the standard file name (`encodec_24khz-d7cc33bc.th`,
  `encodec_48khz-7e698e3e.th`), a preset name, or a config.json.

The output is a directory `EncodecModel.from_pretrained` loads without torch (config.json and
model.safetensors in the Hub's layout); `to="transformers"` writes the tensor names current
transformers itself saves. Reading the PyTorch pickles needs torch.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import untrusted
from .atomic import atomic_directory
from .checkpoint import read_torch_state_dict, rename_original_key
from .config import ENCODEC_24KHZ, ENCODEC_32KHZ, ENCODEC_48KHZ, PRESETS, EncodecConfig
from .hub import is_hub_id
from .model import EncodecModel

PRESET_ALIASES = {
    "24khz": ENCODEC_24KHZ,
    "32khz": ENCODEC_32KHZ,
    "48khz": ENCODEC_48KHZ,
    "encodec_24khz": ENCODEC_24KHZ,
    "encodec_32khz": ENCODEC_32KHZ,
    "encodec_48khz": ENCODEC_48KHZ,
    **PRESETS,
}
# The original package's checkpoints; the 48 kHz file name is the one its code downloads.
_ORIGINAL_FILE = re.compile(r"^encodec_(24|48)khz-[0-9a-f]{8}\.th$")
_ORIGINAL_LM_FILE = re.compile(r"^encodec_lm_(24|48)khz-[0-9a-f]{8}\.th$")


class ConversionError(ValueError):
    """A source that cannot be converted; the message says why in one line."""


# ---- reading each source ----
def load_any(
    src: str | os.PathLike,
    *,
    preset: str | None = None,
    config_file: str | os.PathLike | None = None,
    **hub_kwargs,
) -> tuple[EncodecModel, str]:
    """Load a model from any supported source. Returns the model and the source kind."""
    path = Path(src)
    override = _config_override(preset, config_file)
    if path.is_dir() or not path.exists():
        if override is not None:
            raise ConversionError("--preset/--config apply to .th files only")
        if not path.exists() and not is_hub_id(str(src)):
            raise FileNotFoundError(f"No such file or directory: {src}")
        return EncodecModel.from_pretrained(src, **hub_kwargs), "transformers"
    obj = read_torch_state_dict(path)
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{path} holds a {type(obj).__name__}, not an EnCodec checkpoint")
    if "best_state" in obj or "pretrained" in obj:
        if override is not None:
            raise ConversionError("--preset/--config apply to .th files only")
        return _from_audiocraft(obj, path, **hub_kwargs), "audiocraft"
    if any(str(k).startswith("encoder.model.") for k in obj):
        config = override or _config_from_original_name(path)
        return EncodecModel.from_state_dict(config, obj, rename_original_key), "encodec"
    if any(str(k).startswith("encoder.layers.") for k in obj):
        if override is None:
            raise ConversionError(
                f"{path} is a transformers state dict without its config: give --config "
                "config.json or --preset"
            )
        return EncodecModel.from_state_dict(override, obj), "transformers"
    if _ORIGINAL_LM_FILE.match(path.name) or any(str(k).startswith("transformer.") for k in obj):
        raise ConversionError(
            f"{path} is the encodec package's entropy-coding language model, not the codec"
        )
    raise ConversionError(f"{path} is not an EnCodec checkpoint (no encoder/decoder tensors)")


def _config_override(preset: str | None, config_file) -> EncodecConfig | None:
    if preset is not None and config_file is not None:
        raise ConversionError("give --preset or --config, not both")
    if preset is not None:
        if preset not in PRESET_ALIASES:
            raise ConversionError(
                f"unknown preset {preset!r}; choose one of {sorted(PRESET_ALIASES)}"
            )
        return PRESET_ALIASES[preset]
    if config_file is not None:
        return EncodecConfig.from_json_file(config_file)
    return None


def _config_from_original_name(path: Path) -> EncodecConfig:
    match = _ORIGINAL_FILE.match(path.name)
    if match is None:
        raise ConversionError(
            f"{path.name}: the encodec package's .th files do not store their architecture; "
            "name it as published (encodec_24khz-d7cc33bc.th, encodec_48khz-7e698e3e.th) or "
            "give --preset 24khz|48khz or --config config.json"
        )
    return ENCODEC_24KHZ if match.group(1) == "24" else ENCODEC_48KHZ


# ---- audiocraft ----
def _from_audiocraft(pkg: Mapping[str, Any], path: Path, **hub_kwargs) -> EncodecModel:
    if "pretrained" in pkg:
        name = str(pkg["pretrained"])
        if not name.startswith("facebook/encodec_"):
            raise ConversionError(
                f"{path} points at the pretrained model {name!r}; only EnCodec Hub models "
                "(facebook/encodec_*) are supported"
            )
        return EncodecModel.from_pretrained(name, **hub_kwargs)
    if "xp.cfg" not in pkg:
        raise ConversionError(f"{path} has best_state but no xp.cfg: its config is unknown")
    config = config_from_audiocraft_yaml(pkg["xp.cfg"])
    state = pkg["best_state"]
    if (
        isinstance(state, Mapping)
        and "model" in state
        and not any(str(k).startswith("encoder.") for k in state)
    ):
        state = state["model"]  # solver checkpoints nest the model's state one level down
    return EncodecModel.from_state_dict(config, state, rename_original_key)


def config_from_audiocraft_yaml(text: str | Mapping[str, Any]) -> EncodecConfig:
    """Map audiocraft's EnCodec config (the `xp.cfg` YAML) onto `EncodecConfig`.

    Every setting that shapes the model is read, none assumed; a setting transformers' layout
    cannot express (another activation, norms disabled on the outer blocks, encoder and decoder
    that differ, a final activation) is an error naming it.

    Raises:
        ConversionError: for YAML that is damaged, describes no EnCodec model, or one that
            `EncodecConfig` refuses, in one line naming the setting.
    """
    cfg = _resolve_interpolations(_parse_yaml(text), sections=_MODEL_SECTIONS)
    if cfg.get("compression_model", "encodec") != "encodec":
        raise ConversionError(f"not an EnCodec model: compression_model={cfg['compression_model']}")
    encodec, seanet, rvq = (_section(cfg.get(name), name) for name in ("encodec", "seanet", "rvq"))
    for section, value in (("encodec", encodec), ("seanet", seanet), ("rvq", rvq)):
        if not value:
            raise ConversionError(f"xp.cfg has no '{section}' section")
    if encodec.get("autoencoder", "seanet") != "seanet" or encodec.get("quantizer", "rvq") != "rvq":
        raise ConversionError(
            f"unsupported audiocraft model: autoencoder={encodec.get('autoencoder')}, "
            f"quantizer={encodec.get('quantizer')}"
        )
    encoder_only = _section(seanet.pop("encoder", None), "seanet.encoder")
    decoder_only = _section(seanet.pop("decoder", None), "seanet.decoder")
    trim_right_ratio = _number(
        decoder_only.pop("trim_right_ratio", 1.0), "seanet.decoder.trim_right_ratio"
    )
    if decoder_only.pop("final_activation", None) is not None:
        raise ConversionError("seanet.decoder.final_activation is not supported")
    decoder_only.pop("final_activation_params", None)
    for key in sorted(set(encoder_only) | set(decoder_only), key=str):
        enc, dec = {**seanet, **encoder_only}.get(key), {**seanet, **decoder_only}.get(key)
        if enc != dec:
            raise ConversionError(
                f"encoder and decoder differ in seanet.{key} ({enc} vs {dec}); "
                "transformers' layout has one setting for both"
            )
        seanet[key] = enc

    def need(section: dict, key: str, name: str):
        if key not in section:
            raise ConversionError(f"xp.cfg is missing {name}.{key}")
        return section[key]

    def need_int(section: dict, key: str, name: str) -> int:
        return _integer(need(section, key, name), f"{name}.{key}")

    if need(seanet, "activation", "seanet") != "ELU":
        raise ConversionError(f"seanet.activation {seanet['activation']} is not supported (ELU)")
    activation_params = _section(seanet.get("activation_params"), "seanet.activation_params")
    if _number(activation_params.get("alpha", 1.0), "seanet.activation_params.alpha") != 1.0:
        raise ConversionError("seanet.activation_params.alpha must be 1.0")
    disabled = _integer(
        seanet.get("disable_norm_outer_blocks", 0), "seanet.disable_norm_outer_blocks"
    )
    if disabled != 0:
        raise ConversionError("seanet.disable_norm_outer_blocks > 0 is not supported")
    norm = need(seanet, "norm", "seanet")
    if norm not in ("weight_norm", "time_group_norm"):
        raise ConversionError(f"seanet.norm {norm!r} is not supported")
    if seanet.get("norm_params"):
        raise ConversionError(f"seanet.norm_params {seanet['norm_params']} are not supported")
    if need_int(seanet, "lstm", "seanet") < 1:
        raise ConversionError("seanet.lstm = 0 (no LSTM) is not supported")
    sample_rate = need_int(encodec, "sample_rate", "encodec")
    ratios = need(seanet, "ratios", "seanet")
    if not isinstance(ratios, list):
        raise ConversionError(f"seanet.ratios must be a list of integers, got {ratios!r}")
    ratios = [_integer(r, "seanet.ratios") for r in ratios]
    bins = need_int(rvq, "bins", "rvq")
    n_q = need_int(rvq, "n_q", "rvq")
    if min([sample_rate, bins, n_q, *ratios]) < 1:
        raise ConversionError(
            f"xp.cfg's encodec.sample_rate ({sample_rate}), seanet.ratios ({ratios}), rvq.bins "
            f"({bins}) and rvq.n_q ({n_q}) must be positive"
        )
    hop = math.prod(ratios)
    try:
        # The bandwidth that makes transformers' formulas give exactly n_q codebooks.
        bandwidth = round(n_q * math.ceil(sample_rate / hop) * math.ceil(math.log2(bins)) / 1000, 6)
        config = EncodecConfig(
            target_bandwidths=(bandwidth,),
            sampling_rate=sample_rate,
            audio_channels=need_int(encodec, "channels", "encodec"),
            normalize=bool(encodec.get("renormalize", encodec.get("renorm", False))),
            hidden_size=need_int(seanet, "dimension", "seanet"),
            num_filters=need_int(seanet, "n_filters", "seanet"),
            num_residual_layers=need_int(seanet, "n_residual_layers", "seanet"),
            upsampling_ratios=tuple(ratios),
            norm_type=norm,
            kernel_size=need_int(seanet, "kernel_size", "seanet"),
            last_kernel_size=need_int(seanet, "last_kernel_size", "seanet"),
            residual_kernel_size=need_int(seanet, "residual_kernel_size", "seanet"),
            dilation_growth_rate=need_int(seanet, "dilation_base", "seanet"),
            use_causal_conv=bool(need(seanet, "causal", "seanet")),
            pad_mode=str(need(seanet, "pad_mode", "seanet")),
            compress=need_int(seanet, "compress", "seanet"),
            num_lstm_layers=need_int(seanet, "lstm", "seanet"),
            trim_right_ratio=trim_right_ratio,
            codebook_size=bins,
            use_conv_shortcut=not bool(need(seanet, "true_skip", "seanet")),
        )
    except ConversionError:
        raise
    except (ValueError, OverflowError) as err:
        raise ConversionError(f"xp.cfg describes no valid model: {err}") from None
    if config.num_quantizers != n_q:
        raise ConversionError(f"cannot express rvq.n_q={n_q} as a transformers bandwidth")
    return config


def _section(value: Any, name: str) -> dict:
    """A mapping of xp.cfg (None or absent: empty), copied."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConversionError(f"xp.cfg's {name} must be a mapping, got {value!r:.60}")
    return dict(value)


def _integer(value: Any, name: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        raise ConversionError(f"xp.cfg's {name} must be an integer, got {value!r:.60}") from None


def _number(value: Any, name: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        number = math.nan
    if not math.isfinite(number):
        raise ConversionError(f"xp.cfg's {name} must be a finite number, got {value!r:.60}")
    return number


def _parse_yaml(text: str | Mapping[str, Any]) -> dict:
    if isinstance(text, Mapping):
        return dict(text)
    import yaml

    try:
        data = yaml.load(text, Loader=untrusted.yaml_loader(aliases=True))
    except (yaml.YAMLError, ValueError, OverflowError, RecursionError) as err:
        # ValueError/OverflowError: a scalar YAML types but cannot build (a date out of range).
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConversionError(f"xp.cfg is not valid YAML: {reason}") from None
    if not isinstance(data, dict):
        raise ConversionError("xp.cfg is not a YAML mapping")
    return data


_MODEL_SECTIONS = ("compression_model", "encodec", "seanet", "rvq")
_MAX_CONFIG_VALUES = 100_000


def _resolve_interpolations(cfg: dict, sections: tuple[str, ...]) -> dict:
    """Resolve OmegaConf's absolute `${a.b}` references (audiocraft dumps its config unresolved)
    in the given top-level `sections`; the rest of the file (solver, optim...) is not read."""

    def lookup(dotted: str, depth: int):
        node: Any = cfg
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                raise ConversionError(f"xp.cfg refers to ${{{dotted}}}, which it does not define")
            node = node[part]
        return resolve(node, depth + 1)

    visited = [0]

    def resolve(node: Any, depth: int = 0) -> Any:
        if depth > 20:
            raise ConversionError("xp.cfg has circular ${...} references")
        # YAML aliases share nodes, which this walk copies: a few lines can expand to billions.
        visited[0] += 1
        if visited[0] > _MAX_CONFIG_VALUES:
            raise ConversionError(
                f"xp.cfg's model sections hold more than {_MAX_CONFIG_VALUES} values once "
                "expanded; an audiocraft config holds a few hundred"
            )
        if isinstance(node, dict):
            return {k: resolve(v, depth) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v, depth) for v in node]
        if isinstance(node, str):
            whole = re.fullmatch(r"\$\{([\w.]+)\}", node)
            if whole:
                return lookup(whole.group(1), depth)
        return node

    try:
        return {k: resolve(v) for k, v in cfg.items() if k in sections}
    except RecursionError:
        raise ConversionError(
            "xp.cfg is nested too deeply (or a YAML alias holds itself)"
        ) from None


# ---- writing ----
# Weight-norm spelling of each output layout: the Hub files' weight_g/weight_v, or the
# parametrizations current transformers saves.
_WEIGHT_NORM = {"encodec-jax": "legacy", "transformers": "parametrizations"}
TARGETS = tuple(_WEIGHT_NORM)


def export_to_transformers(model: EncodecModel, directory: str | os.PathLike, force=False) -> None:
    """Write an in-memory model (fine-tuned, say) as a transformers checkpoint directory."""
    atomic_directory(directory, lambda tmp: model.save_pretrained(tmp, "parametrizations"), force)


def convert(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    to: str = "encodec-jax",
    force: bool = False,
    preset: str | None = None,
    config_file: str | os.PathLike | None = None,
    **hub_kwargs,
) -> str:
    """Convert `src` (any supported source) into the directory `out`. Returns the source kind."""
    if to not in TARGETS:
        raise ConversionError(f"unknown target {to!r}; choose one of {list(TARGETS)}")
    if Path(out).exists() and not force:
        raise FileExistsError(f"{out} exists; pass --force to replace it")
    model, kind = load_any(src, preset=preset, config_file=config_file, **hub_kwargs)
    atomic_directory(out, lambda tmp: model.save_pretrained(tmp, _WEIGHT_NORM[to]), force)
    return kind


__all__ = [
    "ConversionError",
    "config_from_audiocraft_yaml",
    "convert",
    "export_to_transformers",
    "load_any",
]
