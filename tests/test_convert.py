"""`encodec-jax convert`: every PyTorch source, through the command line, checked for parity.

- the `encodec` package's `.th` state dicts (24 and 48 kHz), against that package's own
  encode/decode at every bandwidth;
- audiocraft's `compression_state_dict.bin` (a MusicGen-style 32 kHz model whose settings differ
  from transformers' defaults), against transformers running the same weights;
- audiocraft's `{'pretrained': ...}` pointer, transformers directories and Hub ids, from a
  hand-built offline Hugging Face cache;
- export back to transformers, exact to the last bit;
- loading without torch, atomic output directories, and one-line errors for bad input.

Reference models are built once per module; inputs are short except the 48 kHz one, which spans
three chunks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.numpy import load_file

from encodec_jax import ENCODEC_24KHZ, ENCODEC_32KHZ, ENCODEC_48KHZ, EncodecConfig, EncodecModel
from encodec_jax.checkpoint import rename_hf_key
from encodec_jax.cli import main
from encodec_jax.convert import ConversionError, config_from_audiocraft_yaml, export_to_transformers
from encodec_jax.testing import random_audio

from .reference import make_hf_model, make_original_model, save_hf_model
from .test_parity import SCALE_RTOL, assert_audio_close

ERROR_PREFIX = "encodec-jax convert: error:"
TH_24 = "encodec_24khz-d7cc33bc.th"
TH_48 = "encodec_48khz-7e698e3e.th"
HUB_ID = "facebook/encodec_32khz"
COMMIT = "fedcba9876543210fedcba9876543210fedcba98"
AUDIO_32K = (2, 1, 16_077, 23)  # random_audio(batch, channels, length, seed)

# MusicGen's compression model as audiocraft configures it (default.yaml with
# encodec_large_nq4_s640's overrides): constant padding and identity shortcuts, unlike
# transformers' defaults.
AUDIOCRAFT_CONFIG = dataclasses.replace(ENCODEC_32KHZ, pad_mode="constant")

# `OmegaConf.to_yaml(cfg)` of such an experiment, interpolations unresolved (audiocraft dumps it
# that way into `xp.cfg`), with a few of the sections that have nothing to do with the model.
XP_CFG = """\
device: cuda
dtype: float32
autocast: false
seed: 2036
show: false
continue_from: null
execute_only: null
execute_inplace: false
benchmark_no_load: false
efficient_attention_backend: torch
dora:
  dir: /checkpoint/${oc.env:USER}/experiments/audiocraft/outputs
  exclude:
  - device
  - wandb.*
  - tensorboard.*
  - logging.*
  - dataset.num_workers
  use_rendezvous: false
  git_save: true
solver: compression
sample_rate: 32000
channels: 1
balancer:
  balance_grads: true
  ema_decay: 0.999
  per_batch_item: true
  total_norm: 1.0
msspec:
  sample_rate: ${sample_rate}
  range_start: 6
  range_end: 11
  n_mels: 64
  f_min: 64
  f_max: null
  normalized: true
  alphas: false
  floor_level: 1.0e-05
datasource:
  max_sample_rate: 32000
  max_channels: 1
  train: egs/music/train
  valid: egs/music/valid
  evaluate: egs/music/test
  generate: egs/music/test
dataset:
  batch_size: 64
  num_workers: 10
  segment_duration: 1
  train:
    num_samples: 500000
  valid:
    num_samples: 10000
generate:
  every: 25
  num_workers: 5
  path: samples
  audio:
    format: mp3
    strategy: clip
    sample_rate: ${sample_rate}
checkpoint:
  save_last: true
  save_every: 25
  keep_last: 10
  keep_every_states: null
losses:
  adv: 4.0
  feat: 4.0
  l1: 0.1
  mel: 0.0
  msspec: 2.0
  sisnr: 0.0
optim:
  epochs: 200
  updates_per_epoch: 2000
  lr: 0.0003
  max_norm: 0.0
  optimizer: adam
  adam:
    betas:
    - 0.5
    - 0.9
    weight_decay: 0.0
  ema:
    use: true
    updates: 1
    device: ${device}
    decay: 0.99
compression_model: encodec
encodec:
  autoencoder: seanet
  quantizer: rvq
  sample_rate: ${sample_rate}
  channels: ${channels}
  causal: false
  renormalize: false
seanet:
  dimension: 128
  channels: ${channels}
  causal: ${encodec.causal}
  n_filters: 64
  n_residual_layers: 1
  ratios:
  - 8
  - 5
  - 4
  - 4
  activation: ELU
  activation_params:
    alpha: 1.0
  norm: weight_norm
  norm_params: {}
  kernel_size: 7
  residual_kernel_size: 3
  last_kernel_size: 7
  dilation_base: 2
  pad_mode: constant
  true_skip: true
  compress: 2
  lstm: 2
  disable_norm_outer_blocks: 0
  decoder:
    trim_right_ratio: 1.0
    final_activation: null
    final_activation_params: null
  encoder: {}
rvq:
  n_q: 4
  q_dropout: false
  bins: 2048
  decay: 0.99
  kmeans_init: true
  kmeans_iters: 50
  threshold_ema_dead_code: 2
  orthogonal_reg_weight: 0.0
  orthogonal_reg_active_codes_only: false
"""

# Worst audio error relative to the reference's peak, per source and bandwidth (shown with -s).
MEASURED: dict[str, dict[float, float]] = {}


# ---- helpers ----
def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main(["convert", *(str(a) for a in args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, pattern: str) -> str:
    assert code != 0
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(ERROR_PREFIX), lines[0]
    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


def convert_ok(capsys, src, out, *options) -> Path:
    code, stdout, err = run_cli(capsys, src, out, *options)
    assert code == 0, err
    assert err == ""
    assert "converted" in stdout
    assert (Path(out) / "config.json").is_file()
    assert (Path(out) / "model.safetensors").is_file()
    return Path(out)


def relative_error(actual, expected) -> float:
    actual, expected = np.asarray(actual), np.asarray(expected)
    return float(np.abs(actual - expected).max() / max(float(np.abs(expected).max()), 1e-6))


def compare_with_package(
    reference, model: EncodecModel, x: np.ndarray, source: str
) -> tuple[int, ...]:
    """Codes (identical), scales and audio against the `encodec` package at every bandwidth.
    Returns the frames of each chunk."""
    for bandwidth in model.config.target_bandwidths:
        reference.set_target_bandwidth(bandwidth)
        with torch.no_grad():
            frames = reference.encode(torch.from_numpy(x))
            ref_audio = reference.decode(frames).numpy()
        out = model.encode(x, bandwidth=bandwidth)
        n_q = model.config.num_quantizers_for_bandwidth(bandwidth)
        assert out.audio_codes.shape[:3] == (len(frames), x.shape[0], n_q)
        for i, (codes, scale) in enumerate(frames):
            n_frames = codes.shape[-1]
            assert codes.shape[1] == n_q
            assert out.chunk_frames[i] == n_frames
            np.testing.assert_array_equal(
                np.asarray(out.audio_codes[i, ..., :n_frames]), codes.numpy()
            )
            if scale is None:
                assert out.audio_scales[i] is None
            else:
                np.testing.assert_allclose(
                    np.asarray(out.audio_scales[i]), scale.numpy(), rtol=SCALE_RTOL
                )
        audio = model.decode(out.audio_codes, out.audio_scales, chunk_frames=out.chunk_frames)
        assert_audio_close(audio.audio_values, ref_audio, f"{source} decode at {bandwidth} kbps")
        MEASURED.setdefault(source, {})[bandwidth] = relative_error(audio.audio_values, ref_audio)
    last = np.asarray(out.audio_codes)
    assert len(np.unique(last)) > 50, "degenerate codes would make the comparison vacuous"
    print(f"{source}: {MEASURED[source]}")
    return out.chunk_frames


def compare_with_transformers(reference, model: EncodecModel, x: np.ndarray, source: str) -> None:
    for bandwidth in model.config.target_bandwidths:
        with torch.no_grad():
            ref = reference.encode(torch.from_numpy(x), bandwidth=bandwidth)
            ref_audio = reference.decode(
                ref.audio_codes, ref.audio_scales, last_frame_pad_length=ref.last_frame_pad_length
            ).audio_values.numpy()
        out = model.encode(x, bandwidth=bandwidth)
        codes = np.asarray(out.audio_codes)
        np.testing.assert_array_equal(codes, ref.audio_codes.numpy())
        assert codes.shape[2] == model.config.num_quantizers_for_bandwidth(bandwidth)
        assert len(np.unique(codes)) > 50, "degenerate codes would make the comparison vacuous"
        audio = model.decode(
            out.audio_codes, out.audio_scales, last_frame_pad_length=out.last_frame_pad_length
        ).audio_values
        assert_audio_close(audio, ref_audio, f"{source} decode at {bandwidth} kbps")
        MEASURED.setdefault(source, {})[bandwidth] = relative_error(audio, ref_audio)
    print(f"{source}: {MEASURED[source]}")


def tensors_of(directory: Path) -> dict[str, np.ndarray]:
    """A converted directory's tensors under encodec-jax's names."""
    return {rename_hf_key(k): v for k, v in load_file(directory / "model.safetensors").items()}


def assert_same_tensors(actual: dict, expected: dict) -> None:
    assert sorted(actual) == sorted(expected)
    for key, value in expected.items():
        assert actual[key].dtype == value.dtype, key
        assert np.array_equal(actual[key], value), key


def torch_tensors(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def tensors_of_torch(hf_model) -> dict[str, np.ndarray]:
    """A transformers model's tensors under encodec-jax's names."""
    return {rename_hf_key(k): v for k, v in torch_tensors(hf_model).items()}


def audiocraft_key(key: str, transposed: set[int]) -> str:
    """transformers key -> audiocraft's (= the encodec package's) key: the inverse of
    `rename_original_key`, written independently of it. `transposed` holds the indices of the
    decoder's transposed convolutions, which audiocraft wraps as `convtr.convtr`."""
    key = key.replace("parametrizations.weight.original0", "weight_g")
    key = key.replace("parametrizations.weight.original1", "weight_v")
    match = re.fullmatch(r"quantizer\.layers\.(\d+)\.codebook\.(\w+)", key)
    if match:
        return f"quantizer.vq.layers.{match[1]}._codebook.{match[2]}"
    match = re.fullmatch(r"(encoder|decoder)\.layers\.(\d+)\.(.+)", key)
    assert match, key
    part, index, rest = match[1], int(match[2]), match[3]
    wrap = "convtr" if part == "decoder" and index in transposed else "conv"
    rest = re.sub(r"(^|\.)conv\.", rf"\g<1>{wrap}.{wrap}.", rest, count=1)
    rest = re.sub(r"(^|\.)norm\.", rf"\g<1>{wrap}.norm.", rest, count=1)
    return f"{part}.model.{index}.{rest}"


def transposed_layers(hf_model) -> set[int]:
    return {
        i
        for i, layer in enumerate(hf_model.decoder.layers)
        if type(layer).__name__ == "EncodecConvTranspose1d"
    }


def to_audiocraft_state(hf_model) -> dict[str, torch.Tensor]:
    transposed = transposed_layers(hf_model)
    return {audiocraft_key(k, transposed): v for k, v in hf_model.state_dict().items()}


def add_to_cache(cache: Path, repo_id: str, source: Path) -> None:
    """`<cache>/models--owner--name/snapshots/<commit>/{config.json,model.safetensors}` and
    `refs/main`, as huggingface_hub finds them offline."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(source / name, snapshot / name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)


def convert_in_fixture(src: Path, out: Path, kind: str) -> Path:
    """The CLI, for module-scoped fixtures (which cannot use capsys)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(["convert", str(src), str(out)])
    assert code == 0, stderr.getvalue()
    assert stdout.getvalue() == f"converted {kind} checkpoint {src} -> {out} (encodec-jax)\n"
    return out


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp" in p.name)


# ---- shared models and files ----
@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("convert")


@pytest.fixture(scope="module")
def original_24():
    return make_original_model(24_000, seed=11)


@pytest.fixture(scope="module")
def original_48():
    return make_original_model(48_000, seed=12)


@pytest.fixture(scope="module")
def th_24(original_24, files) -> Path:
    path = files / TH_24
    torch.save(original_24.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def th_48(original_48, files) -> Path:
    path = files / TH_48
    torch.save(original_48.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def converted_24(th_24, files) -> Path:
    return convert_in_fixture(th_24, files / "from_th_24", "encodec")


@pytest.fixture(scope="module")
def hf_32():
    """transformers' model with audiocraft's MusicGen settings."""
    return make_hf_model(AUDIOCRAFT_CONFIG, seed=13)


@pytest.fixture(scope="module")
def hf_32_dir(hf_32, files) -> Path:
    return save_hf_model(hf_32, files / "hf_32")


@pytest.fixture(scope="module")
def audiocraft_bin(hf_32, files) -> Path:
    directory = files / "audiocraft"
    directory.mkdir()
    package = {
        "best_state": to_audiocraft_state(hf_32),
        "xp.cfg": XP_CFG,
        "version": "1.3.0",
        "exported": True,
    }
    torch.save(package, directory / "compression_state_dict.bin")
    return directory / "compression_state_dict.bin"


@pytest.fixture(scope="module")
def converted_audiocraft(audiocraft_bin, files) -> Path:
    return convert_in_fixture(audiocraft_bin, files / "from_audiocraft", "audiocraft")


@pytest.fixture(scope="module")
def hub_cache(hf_32_dir, files) -> Path:
    cache = files / "hub_cache"
    add_to_cache(cache, HUB_ID, hf_32_dir)
    return cache


# ---- 1. the encodec package's .th files ----
def test_th_24khz_matches_the_package_at_every_bandwidth(original_24, converted_24, capsys):
    model = EncodecModel.from_pretrained(converted_24)
    assert model.config == ENCODEC_24KHZ
    compare_with_package(original_24, model, random_audio(2, 1, 7_777, seed=21), "24k")


def test_th_48khz_matches_the_package_at_every_bandwidth(original_48, th_48, files, capsys):
    out = convert_ok(capsys, th_48, files / "from_th_48")
    model = EncodecModel.from_pretrained(out)
    assert model.config == ENCODEC_48KHZ
    x = random_audio(1, 2, 96_000, seed=22)  # 2 s: chunks of 48000, 48000 and 960 samples
    assert compare_with_package(original_48, model, x, "48k") == (150, 150, 3)


def test_th_with_another_name_needs_preset_or_config(th_24, converted_24, tmp_path, capsys):
    renamed = tmp_path / "my_codec.th"
    shutil.copy(th_24, renamed)
    code, _, err = run_cli(capsys, renamed, tmp_path / "out")
    assert_one_line_error(code, err, "--preset")
    assert "--config" in err
    assert not (tmp_path / "out").exists()

    expected = tensors_of(converted_24)
    out = convert_ok(capsys, renamed, tmp_path / "preset", "--preset", "24khz")
    assert_same_tensors(tensors_of(out), expected)
    assert EncodecConfig.from_json_file(out / "config.json") == ENCODEC_24KHZ

    ENCODEC_24KHZ.to_json_file(tmp_path / "config.json")
    out = convert_ok(capsys, renamed, tmp_path / "config", "--config", tmp_path / "config.json")
    assert_same_tensors(tensors_of(out), expected)
    assert EncodecConfig.from_json_file(out / "config.json") == ENCODEC_24KHZ


# ---- 2. audiocraft's compression_state_dict.bin ----
def test_audiocraft_key_layout_is_the_encodec_packages(original_24, original_48):
    """The test's inverse renaming reproduces the encodec package's key set exactly (audiocraft
    uses the same layout), for weight norm and for time_group_norm."""
    import transformers

    for config, original in ((ENCODEC_24KHZ, original_24), (ENCODEC_48KHZ, original_48)):
        with torch.device("meta"):  # tensor names only
            hf = transformers.EncodecModel(transformers.EncodecConfig(**config.to_hf_config()))
        assert set(to_audiocraft_state(hf)) == set(original.state_dict())


def test_audiocraft_config_maps_onto_encodec_config():
    assert config_from_audiocraft_yaml(XP_CFG) == AUDIOCRAFT_CONFIG
    assert AUDIOCRAFT_CONFIG.num_quantizers == 4


def test_xp_cfg_is_what_omegaconf_dumps():
    """The YAML above is byte for byte OmegaConf's dump of itself, and resolving it first (as a
    user might) maps onto the same config."""
    omegaconf = pytest.importorskip("omegaconf")
    cfg = omegaconf.OmegaConf.create(XP_CFG)
    assert omegaconf.OmegaConf.to_yaml(cfg) == XP_CFG
    resolved = omegaconf.OmegaConf.to_container(cfg.seanet, resolve=True)
    assert resolved["causal"] is False
    whole = yaml.safe_load(XP_CFG)
    whole["encodec"] = omegaconf.OmegaConf.to_container(cfg.encodec, resolve=True)
    whole["seanet"] = resolved
    assert config_from_audiocraft_yaml(yaml.safe_dump(whole)) == AUDIOCRAFT_CONFIG


def test_audiocraft_checkpoint_matches_transformers(
    hf_32, audiocraft_bin, converted_audiocraft, capsys
):
    state = torch.load(audiocraft_bin, weights_only=True)["best_state"]
    for key in (
        "encoder.model.0.conv.conv.weight_g",
        "encoder.model.1.block.1.conv.conv.weight_v",
        "encoder.model.13.lstm.weight_ih_l0",
        "decoder.model.3.convtr.convtr.weight_g",
        "decoder.model.15.conv.conv.bias",
        "quantizer.vq.layers.3._codebook.embed",
    ):
        assert key in state, key
    assert not any("shortcut" in k for k in state), "true_skip: identity shortcuts"
    assert len([k for k in state if k.endswith("_codebook.embed")]) == 4

    config = (converted_audiocraft / "config.json").read_text()
    assert '"pad_mode": "constant"' in config
    assert '"use_conv_shortcut": false' in config
    model = EncodecModel.from_pretrained(converted_audiocraft)
    assert model.config == AUDIOCRAFT_CONFIG
    assert_same_tensors(model.state_dict(), tensors_of_torch(hf_32))
    x = random_audio(*AUDIO_32K)
    compare_with_transformers(hf_32, model, x, "audiocraft 32k")


def edited_cfg(edit) -> str:
    cfg = yaml.safe_load(XP_CFG)
    edit(cfg)
    return yaml.safe_dump(cfg, sort_keys=False)


@pytest.mark.parametrize(
    "edit,pattern",
    [
        (lambda c: c["seanet"].update(activation="SiLU"), r"seanet\.activation"),
        (lambda c: c["seanet"].update(disable_norm_outer_blocks=1), "disable_norm_outer_blocks"),
        (lambda c: c["seanet"]["decoder"].update(n_filters=32), r"seanet\.n_filters"),
        (lambda c: c["seanet"].pop("pad_mode"), r"seanet\.pad_mode"),
        (lambda c: c["rvq"].pop("bins"), r"rvq\.bins"),
        (lambda c: c["seanet"]["decoder"].update(final_activation="Tanh"), "final_activation"),
    ],
    ids=["activation", "outer_norms", "decoder_override", "no_pad_mode", "no_bins", "final_act"],
)
def test_audiocraft_config_rejects_what_transformers_cannot_express(edit, pattern):
    with pytest.raises(ConversionError, match=pattern):
        config_from_audiocraft_yaml(edited_cfg(edit))


def test_audiocraft_config_accepts_equal_encoder_decoder_overrides():
    cfg = edited_cfg(lambda c: c["seanet"]["encoder"].update(n_filters=64, causal=False))
    assert config_from_audiocraft_yaml(cfg) == AUDIOCRAFT_CONFIG


def test_audiocraft_bad_config_is_a_one_line_cli_error(tmp_path, capsys):
    path = tmp_path / "compression_state_dict.bin"
    cfg = edited_cfg(lambda c: c["seanet"].update(activation="SiLU"))
    torch.save(
        {"best_state": {"encoder.model.0.conv.conv.bias": torch.zeros(2)}, "xp.cfg": cfg}, path
    )
    code, _, err = run_cli(capsys, path, tmp_path / "out")
    assert_one_line_error(code, err, r"seanet\.activation SiLU")
    assert not (tmp_path / "out").exists()


# ---- 3. audiocraft's pointer to a pretrained model ----
def test_audiocraft_pretrained_pointer_uses_the_hub_cache(
    hub_cache, converted_audiocraft, tmp_path, capsys
):
    path = tmp_path / "compression_state_dict.bin"
    torch.save({"pretrained": HUB_ID, "exported": True, "version": "1.3.0"}, path)
    out = convert_ok(capsys, path, tmp_path / "out", "--cache-dir", hub_cache, "--local-files-only")
    assert_same_tensors(tensors_of(out), tensors_of(converted_audiocraft))
    assert EncodecConfig.from_json_file(out / "config.json") == AUDIOCRAFT_CONFIG


def test_audiocraft_pointer_to_another_model_is_an_error(hub_cache, tmp_path, capsys):
    path = tmp_path / "compression_state_dict.bin"
    torch.save({"pretrained": "dac_44khz", "exported": True}, path)
    code, _, err = run_cli(
        capsys, path, tmp_path / "out", "--cache-dir", hub_cache, "--local-files-only"
    )
    assert_one_line_error(code, err, r"'dac_44khz'.*facebook/encodec_")
    assert not (tmp_path / "out").exists()


# ---- 4. transformers directories and Hub ids ----
def test_transformers_directory(hf_32_dir, converted_audiocraft, tmp_path, capsys):
    out = convert_ok(capsys, hf_32_dir, tmp_path / "out")
    assert_same_tensors(tensors_of(out), tensors_of(converted_audiocraft))
    assert EncodecConfig.from_json_file(out / "config.json") == AUDIOCRAFT_CONFIG


def test_hub_id_from_offline_cache(hub_cache, converted_audiocraft, tmp_path, capsys):
    out = convert_ok(
        capsys, HUB_ID, tmp_path / "out", "--cache-dir", hub_cache, "--local-files-only"
    )
    assert_same_tensors(tensors_of(out), tensors_of(converted_audiocraft))
    out = convert_ok(
        capsys,
        HUB_ID,
        tmp_path / "rev",
        "--cache-dir",
        hub_cache,
        "--local-files-only",
        "--revision",
        COMMIT,
    )
    assert_same_tensors(tensors_of(out), tensors_of(converted_audiocraft))


def test_uncached_hub_id_is_a_one_line_error(hub_cache, tmp_path, capsys):
    code, _, err = run_cli(
        capsys, "acme/missing", tmp_path / "out", "--cache-dir", hub_cache, "--local-files-only"
    )
    assert_one_line_error(code, err, "cache")
    assert not (tmp_path / "out").exists()


def test_preset_is_refused_for_directories(hf_32_dir, tmp_path, capsys):
    code, _, err = run_cli(capsys, hf_32_dir, tmp_path / "out", "--preset", "32khz")
    assert_one_line_error(code, err, r"\.th files only")


# ---- 5. export to transformers ----
def load_in_transformers(directory: Path):
    import transformers

    model, info = transformers.EncodecModel.from_pretrained(directory, output_loading_info=True)
    assert not info["missing_keys"], info
    assert not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    return model.eval()


def test_export_to_transformers_round_trip(hf_32, hf_32_dir, tmp_path, capsys):
    jax_dir = convert_ok(capsys, hf_32_dir, tmp_path / "jax")
    hf_dir = convert_ok(capsys, jax_dir, tmp_path / "hf", "--to", "transformers")
    assert any(k.endswith("weight_g") for k in load_file(jax_dir / "model.safetensors"))
    exported_keys = set(load_file(hf_dir / "model.safetensors"))
    assert exported_keys == set(hf_32.state_dict()), "current transformers' tensor names"

    reloaded = load_in_transformers(hf_dir)
    assert_same_tensors(torch_tensors(reloaded), torch_tensors(hf_32))
    assert reloaded.config.pad_mode == "constant"
    assert reloaded.config.use_conv_shortcut is False
    x = torch.from_numpy(random_audio(1, 1, 6_401, seed=24))
    with torch.no_grad():
        codes = reloaded.encode(x, bandwidth=2.2).audio_codes
        expected = hf_32.encode(x, bandwidth=2.2).audio_codes
    assert torch.equal(codes, expected)


def test_th_straight_to_transformers(original_24, th_24, converted_24, tmp_path, capsys):
    out = convert_ok(capsys, th_24, tmp_path / "hf", "--to", "transformers")
    reloaded = load_in_transformers(out)
    expected = tensors_of(converted_24)
    assert_same_tensors(tensors_of_torch(reloaded), expected)
    x = random_audio(1, 1, 1_601, seed=25)
    original_24.set_target_bandwidth(24.0)
    with torch.no_grad():
        codes = reloaded.encode(torch.from_numpy(x), bandwidth=24.0).audio_codes
        (package_codes, _), *_ = original_24.encode(torch.from_numpy(x))
    np.testing.assert_array_equal(codes[0].numpy(), package_codes.numpy())


def test_export_to_transformers_from_python(hf_32, converted_audiocraft, tmp_path):
    model = EncodecModel.from_pretrained(converted_audiocraft)
    export_to_transformers(model, tmp_path / "hf")
    reloaded = load_in_transformers(tmp_path / "hf")
    assert_same_tensors(torch_tensors(reloaded), torch_tensors(hf_32))
    with pytest.raises(FileExistsError, match="--force"):
        export_to_transformers(model, tmp_path / "hf")
    export_to_transformers(model, tmp_path / "hf", force=True)
    assert_same_tensors(torch_tensors(load_in_transformers(tmp_path / "hf")), torch_tensors(hf_32))
    assert leftovers(tmp_path) == []


# ---- 6. without torch ----
def run_without_torch(code: str, *args, cwd: Path) -> subprocess.CompletedProcess:
    script = "import sys; sys.modules['torch'] = None\n" + code
    return subprocess.run(
        [sys.executable, "-c", script, *(str(a) for a in args)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )


TORCH_FREE_LOAD = """
import numpy as np
from encodec_jax import EncodecModel
from encodec_jax.cli import main

model = EncodecModel.from_pretrained(sys.argv[1])
x = np.load(sys.argv[2])
np.save(sys.argv[3], np.asarray(model.encode(x, bandwidth=2.2).audio_codes))
# a safetensors source converts without torch too
assert main(["convert", sys.argv[4], sys.argv[5]]) == 0
assert sys.modules["torch"] is None
print("TORCH FREE OK")
"""


def test_converted_directory_loads_without_torch(hf_32, converted_audiocraft, hf_32_dir, tmp_path):
    x = random_audio(*AUDIO_32K)  # the shape compiled above: JAX's disk cache may serve it
    np.save(tmp_path / "x.npy", x)
    result = run_without_torch(
        TORCH_FREE_LOAD,
        converted_audiocraft,
        tmp_path / "x.npy",
        tmp_path / "codes.npy",
        hf_32_dir,
        tmp_path / "out",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "TORCH FREE OK" in result.stdout
    with torch.no_grad():
        expected = hf_32.encode(torch.from_numpy(x), bandwidth=2.2).audio_codes.numpy()
    np.testing.assert_array_equal(np.load(tmp_path / "codes.npy"), expected)
    assert_same_tensors(tensors_of(tmp_path / "out"), tensors_of(converted_audiocraft))


def test_th_without_torch_is_a_one_line_error(th_24, tmp_path):
    code = "from encodec_jax.cli import main; sys.exit(main(sys.argv[1:]))"
    result = run_without_torch(code, "convert", th_24, tmp_path / "out", cwd=tmp_path)
    assert result.returncode != 0
    line = assert_one_line_error(result.returncode, result.stderr, "needs PyTorch")
    assert "pip install torch" in line
    assert not (tmp_path / "out").exists()
    assert leftovers(tmp_path) == []


# ---- 7. atomic output and bad input ----
def test_existing_out_needs_force(converted_24, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run_cli(capsys, converted_24, out)
    assert_one_line_error(code, err, "exists.*--force")
    assert code == 1
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "mine"

    convert_ok(capsys, converted_24, out, "--force")
    assert not (out / "keep.txt").exists()
    assert_same_tensors(tensors_of(out), tensors_of(converted_24))
    assert leftovers(tmp_path) == []


def test_existing_file_as_out_needs_force(converted_24, tmp_path, capsys):
    out = tmp_path / "out"
    out.write_text("not a directory")
    code, _, err = run_cli(capsys, converted_24, out)
    assert_one_line_error(code, err, "--force")
    assert out.read_text() == "not a directory"
    convert_ok(capsys, converted_24, out, "--force")
    assert out.is_dir()


def test_weights_that_do_not_fit_leave_nothing(th_24, tmp_path, capsys):
    parent = tmp_path / "parent"
    parent.mkdir()
    code, _, err = run_cli(capsys, th_24, parent / "out", "--preset", "48khz")
    assert_one_line_error(code, err, "does not fit the config")
    assert list(parent.iterdir()) == []


def test_failure_while_writing_keeps_the_old_out(converted_24, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")

    def fail_halfway(model, directory, weight_norm="legacy"):
        Path(directory).mkdir(parents=True)
        (Path(directory) / "model.safetensors").write_bytes(b"half")
        raise OSError("No space left on device")

    monkeypatch.setattr(EncodecModel, "save_pretrained", fail_halfway)
    code, _, err = run_cli(capsys, converted_24, out, "--force")
    assert_one_line_error(code, err, "No space left on device")
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert leftovers(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.fixture(scope="module")
def bad_inputs(th_24, files) -> dict[str, Path]:
    directory = files / "bad"
    directory.mkdir()
    truncated = directory / TH_24
    truncated.write_bytes(th_24.read_bytes()[:3000])
    noise = directory / "noise.th"
    noise.write_bytes(np.random.default_rng(0).bytes(5000))
    foreign = directory / "foreign.th"
    torch.save({"foo": torch.zeros(3)}, foreign)
    lm = directory / "encodec_lm_24khz-1608e3c0.th"
    torch.save({"transformer.layers.0.linear1.weight": torch.zeros(4, 4)}, lm)
    not_a_dict = directory / "list.th"
    torch.save([torch.zeros(3)], not_a_dict)
    empty_dir = directory / "empty"
    empty_dir.mkdir()
    return {
        "truncated": truncated,
        "random_bytes": noise,
        "not_encodec": foreign,
        "encodec_lm": lm,
        "not_a_dict": not_a_dict,
        "missing": directory / "missing.th",
        "empty_dir": empty_dir,
    }


@pytest.mark.parametrize(
    "name,pattern",
    [
        ("truncated", "corrupt"),
        ("random_bytes", "not a PyTorch checkpoint"),
        ("not_encodec", "not an EnCodec checkpoint"),
        ("encodec_lm", "language model"),
        ("not_a_dict", "not an EnCodec checkpoint"),
        ("missing", "No such file"),
        ("empty_dir", "config.json"),
    ],
)
def test_bad_input_is_a_one_line_error(bad_inputs, name, pattern, tmp_path, capsys):
    src = bad_inputs[name]
    code, stdout, err = run_cli(capsys, src, tmp_path / "out")
    line = assert_one_line_error(code, err, pattern)
    assert src.name in line or name == "empty_dir"
    assert stdout == ""
    assert list(tmp_path.iterdir()) == []


def test_missing_file_in_existing_folder_is_not_a_hub_id(tmp_path, capsys, monkeypatch):
    (tmp_path / "checkpoints").mkdir()
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(
        capsys, "checkpoints/encodec_24khz-d7cc33bc.th", "out", "--local-files-only"
    )
    assert_one_line_error(code, err, "No such file")
