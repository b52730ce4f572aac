"""`encodec_jax.config`: the published presets, conversion to and from transformers, validation."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import pytest

try:
    import transformers
    from transformers.models.encodec.modeling_encodec import EncodecResidualVectorQuantizer
except ImportError:  # the tests that need them are skipped
    pass

from encodec_jax.config import (
    ENCODEC_24KHZ,
    ENCODEC_32KHZ,
    ENCODEC_48KHZ,
    NORM_TYPES,
    PAD_MODES,
    PRESETS,
    EncodecConfig,
)

from .requires import needs_transformers

PRESET_PARAMS = [
    pytest.param(ENCODEC_24KHZ, id="24khz"),
    pytest.param(ENCODEC_32KHZ, id="32khz"),
    pytest.param(ENCODEC_48KHZ, id="48khz"),
]
DERIVED = ("hop_length", "frame_rate", "num_quantizers", "chunk_length", "chunk_stride")
DERIVED += ("codebook_nbits",)

# config.json of facebook/encodec_32khz as published on the Hub (written out by hand).
HUB_32KHZ = {
    "architectures": ["EncodecModel"],
    "audio_channels": 1,
    "chunk_length_s": None,
    "codebook_dim": 128,
    "codebook_size": 2048,
    "compress": 2,
    "dilation_growth_rate": 2,
    "hidden_size": 128,
    "kernel_size": 7,
    "last_kernel_size": 7,
    "model_type": "encodec",
    "norm_type": "weight_norm",
    "normalize": False,
    "num_filters": 64,
    "num_lstm_layers": 2,
    "num_residual_layers": 1,
    "overlap": None,
    "pad_mode": "reflect",
    "residual_kernel_size": 3,
    "sampling_rate": 32000,
    "target_bandwidths": [2.2],
    "torch_dtype": "float32",
    "transformers_version": "4.31.0.dev0",
    "trim_right_ratio": 1.0,
    "upsampling_ratios": [8, 5, 4, 4],
    "use_causal_conv": False,
    "use_conv_shortcut": False,
}


# ---------------------------------------------------------------------------- presets


@needs_transformers
@pytest.mark.parametrize("preset", PRESET_PARAMS)
def test_preset_derived_values_match_transformers(preset):
    hf = transformers.EncodecConfig(**preset.to_hf_config())
    for name in DERIVED:
        assert getattr(preset, name) == getattr(hf, name), name


def test_presets_match_published_models():
    # (sampling rate, channels, filters, hop, frame rate, codebook size, causal, norm, chunking)
    assert (ENCODEC_24KHZ.sampling_rate, ENCODEC_24KHZ.audio_channels) == (24_000, 1)
    assert (ENCODEC_24KHZ.hop_length, ENCODEC_24KHZ.frame_rate) == (320, 75)
    assert ENCODEC_24KHZ.use_causal_conv and ENCODEC_24KHZ.use_conv_shortcut
    assert (ENCODEC_24KHZ.num_quantizers, ENCODEC_24KHZ.chunk_length) == (32, None)

    assert (ENCODEC_32KHZ.sampling_rate, ENCODEC_32KHZ.num_filters) == (32_000, 64)
    assert (ENCODEC_32KHZ.hop_length, ENCODEC_32KHZ.frame_rate) == (640, 50)
    assert (ENCODEC_32KHZ.codebook_size, ENCODEC_32KHZ.codebook_nbits) == (2048, 11)
    assert not ENCODEC_32KHZ.use_causal_conv and not ENCODEC_32KHZ.use_conv_shortcut
    assert ENCODEC_32KHZ.num_quantizers == 4

    assert (ENCODEC_48KHZ.sampling_rate, ENCODEC_48KHZ.audio_channels) == (48_000, 2)
    assert (ENCODEC_48KHZ.hop_length, ENCODEC_48KHZ.frame_rate) == (320, 150)
    assert ENCODEC_48KHZ.norm_type == "time_group_norm" and ENCODEC_48KHZ.normalize
    assert (ENCODEC_48KHZ.chunk_length, ENCODEC_48KHZ.chunk_stride) == (48_000, 47_520)
    assert ENCODEC_48KHZ.num_quantizers == 16

    for preset in (ENCODEC_24KHZ, ENCODEC_32KHZ, ENCODEC_48KHZ):
        assert preset.codebook_dim == preset.hidden_size == 128
        assert preset.pad_mode == "reflect" and preset.trim_right_ratio == 1.0
    assert PRESETS == {
        "facebook/encodec_24khz": ENCODEC_24KHZ,
        "facebook/encodec_32khz": ENCODEC_32KHZ,
        "facebook/encodec_48khz": ENCODEC_48KHZ,
    }


@needs_transformers
@pytest.mark.parametrize(
    "preset,expected",
    [
        pytest.param(ENCODEC_24KHZ, {1.5: 2, 3.0: 4, 6.0: 8, 12.0: 16, 24.0: 32}, id="24khz"),
        pytest.param(ENCODEC_32KHZ, {2.2: 4}, id="32khz"),
        pytest.param(ENCODEC_48KHZ, {3.0: 2, 6.0: 4, 12.0: 8, 24.0: 16}, id="48khz"),
    ],
)
def test_num_quantizers_for_bandwidth(preset, expected):
    assert {bw: preset.num_quantizers_for_bandwidth(bw) for bw in preset.target_bandwidths} == (
        expected
    )
    # transformers' own count, from its quantizer module.
    quantizer = EncodecResidualVectorQuantizer(transformers.EncodecConfig(**preset.to_hf_config()))
    for bw, n_q in expected.items():
        assert quantizer.get_num_quantizers_for_bandwidth(bw) == n_q
    # None: the smallest target bandwidth, as transformers' `EncodecModel.encode(bandwidth=None)`.
    assert preset.num_quantizers_for_bandwidth(None) == expected[min(expected)]
    assert preset.num_quantizers_for_bandwidth(None) == preset.num_quantizers_for_bandwidth(
        preset.target_bandwidths[0]
    )


def test_num_quantizers_for_integer_bandwidth():
    assert ENCODEC_24KHZ.num_quantizers_for_bandwidth(6) == 8


# ---------------------------------------------------------------------- from / to transformers


@needs_transformers
@pytest.mark.parametrize("preset", PRESET_PARAMS)
def test_from_hf_config_object_and_to_dict(preset):
    hf = transformers.EncodecConfig(**preset.to_hf_config())
    assert EncodecConfig.from_hf_config(hf) == preset
    full = hf.to_dict()
    assert "transformers_version" in full and "_name_or_path" in full  # generic keys present
    assert EncodecConfig.from_hf_config(full) == preset


@needs_transformers
@pytest.mark.parametrize("preset", PRESET_PARAMS)
def test_from_hf_config_save_pretrained(preset, tmp_path):
    transformers.EncodecConfig(**preset.to_hf_config()).save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    assert {"model_type", "transformers_version", "architectures"} <= data.keys()
    assert EncodecConfig.from_hf_config(data) == preset
    assert EncodecConfig.from_json_file(tmp_path / "config.json") == preset


@needs_transformers
def test_from_hf_config_full_json_with_every_generic_key(tmp_path):
    """`to_json_file(use_diff=False)` writes every generic PretrainedConfig key."""
    hf = transformers.EncodecConfig(**ENCODEC_48KHZ.to_hf_config())
    hf.to_json_file(tmp_path / "config.json", use_diff=False)
    data = json.loads((tmp_path / "config.json").read_text())
    assert EncodecConfig.from_hf_config(data) == ENCODEC_48KHZ


@needs_transformers
def test_from_hf_config_default_transformers_config():
    assert EncodecConfig.from_hf_config(transformers.EncodecConfig()) == ENCODEC_24KHZ


@needs_transformers
@pytest.mark.parametrize("preset", PRESET_PARAMS)
def test_hf_round_trip_is_identity(preset, tmp_path):
    assert EncodecConfig.from_hf_config(preset.to_hf_config()) == preset
    data = preset.to_hf_config()
    assert EncodecConfig.from_hf_config(data).to_hf_config() == data
    preset.to_json_file(tmp_path / "config.json")
    assert EncodecConfig.from_json_file(tmp_path / "config.json") == preset
    # ... and transformers reads our file into the same config.
    hf = transformers.EncodecConfig.from_pretrained(tmp_path)
    assert EncodecConfig.from_hf_config(hf) == preset


def test_hub_32khz_config_is_the_preset():
    assert EncodecConfig.from_hf_config(HUB_32KHZ) == ENCODEC_32KHZ
    assert EncodecConfig.from_hf_config(json.loads(json.dumps(HUB_32KHZ))) == ENCODEC_32KHZ


def test_lists_become_tuples():
    config = EncodecConfig(target_bandwidths=[1.5, 3], upsampling_ratios=[8, 5, 4, 2])
    assert config.target_bandwidths == (1.5, 3.0)
    assert config.upsampling_ratios == (8, 5, 4, 2)
    assert config.codebook_dim == config.hidden_size
    hash(config)


# ---------------------------------------------------------------------------- errors


def test_unknown_key_is_named():
    with pytest.raises(ValueError, match="num_codebooks"):
        EncodecConfig.from_hf_config({**HUB_32KHZ, "num_codebooks": 4})


def test_wrong_model_type():
    with pytest.raises(ValueError, match="'dac'"):
        EncodecConfig.from_hf_config({**HUB_32KHZ, "model_type": "dac"})


def test_bad_norm_type_lists_the_accepted_ones():
    with pytest.raises(ValueError) as info:
        EncodecConfig(norm_type="batch_norm")
    assert "batch_norm" in str(info.value)
    assert all(name in str(info.value) for name in NORM_TYPES)
    with pytest.raises(ValueError, match="batch_norm"):
        EncodecConfig.from_hf_config({**HUB_32KHZ, "norm_type": "batch_norm"})


def test_bad_pad_mode_lists_the_accepted_ones():
    with pytest.raises(ValueError) as info:
        EncodecConfig(pad_mode="zero")
    assert "'zero'" in str(info.value)
    assert all(mode in str(info.value) for mode in PAD_MODES)


@pytest.mark.parametrize("size", [0, 3, 1000, 1023, 1025])
def test_codebook_size_must_be_a_power_of_2(size):
    with pytest.raises(ValueError, match="power of 2"):
        EncodecConfig(codebook_size=size)


def test_codebook_size_powers_of_2_are_accepted():
    for bits in (1, 4, 10, 11, 12):
        assert EncodecConfig(codebook_size=2**bits).codebook_nbits == bits


@pytest.mark.parametrize("bandwidth", [0.0, 2.2, 5.0, 48.0])
def test_unknown_bandwidth_lists_the_valid_ones(bandwidth):
    with pytest.raises(ValueError) as info:
        ENCODEC_24KHZ.num_quantizers_for_bandwidth(bandwidth)
    assert str(bandwidth) in str(info.value)
    assert "[1.5, 3.0, 6.0, 12.0, 24.0]" in str(info.value)


def test_codebook_dim_must_equal_hidden_size():
    with pytest.raises(ValueError, match="codebook_dim"):
        EncodecConfig(codebook_dim=64)
    with pytest.raises(ValueError, match="codebook_dim"):
        EncodecConfig.from_hf_config({**HUB_32KHZ, "codebook_dim": 256})
    assert EncodecConfig(hidden_size=64).codebook_dim == 64


def test_trim_right_ratio_needs_causal_conv():
    with pytest.raises(ValueError, match="trim_right_ratio"):
        EncodecConfig(use_causal_conv=False, trim_right_ratio=0.5)
    assert EncodecConfig(use_causal_conv=True, trim_right_ratio=0.5).trim_right_ratio == 0.5


def test_chunking_needs_both_chunk_length_and_overlap():
    with pytest.raises(ValueError, match="overlap"):
        EncodecConfig(chunk_length_s=1.0)
    with pytest.raises(ValueError, match="chunk_length_s"):
        EncodecConfig(overlap=0.01)
    with pytest.raises(ValueError, match="overlap"):
        EncodecConfig.from_hf_config({**HUB_32KHZ, "chunk_length_s": 1.0})


# ---------------------------------------------------------------------------- frozen, hashable


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        ENCODEC_24KHZ.sampling_rate = 16_000  # type: ignore[misc]
    # A changed copy is validated again.
    assert dataclasses.replace(ENCODEC_24KHZ, num_filters=64).num_filters == 64
    with pytest.raises(ValueError, match="pad_mode"):
        dataclasses.replace(ENCODEC_24KHZ, pad_mode="wrap")


def test_config_is_hashable_and_static_under_jit():
    assert hash(ENCODEC_24KHZ) == hash(EncodecConfig())
    assert len({ENCODEC_24KHZ, EncodecConfig(), ENCODEC_32KHZ, ENCODEC_48KHZ}) == 3
    hop = jax.jit(lambda x, config: x * config.hop_length, static_argnums=1)
    assert int(hop(jnp.int32(2), ENCODEC_32KHZ)) == 1280
