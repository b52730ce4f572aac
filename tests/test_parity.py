"""Parity with transformers' EncodecModel, through the real loading path.

Each reference model is random-initialised (codebooks filled from its own residuals), saved with
`save_pretrained` and loaded with `EncodecModel.from_pretrained`. Codes must be identical
(`np.array_equal`); scales and audio must agree to within AUDIO_RTOL of the reference's peak.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from encodec_jax import ENCODEC_24KHZ, ENCODEC_32KHZ, ENCODEC_48KHZ, EncodecConfig, EncodecModel
from encodec_jax.feature_extraction import EncodecFeatureExtractor
from encodec_jax.testing import random_audio

from .reference import make_hf_model, save_hf_model

# max |error| <= AUDIO_RTOL * peak |reference|: float32 convolutions summed in another order
# differ by a few ulps per layer; measured worst cases are around 2e-6 of the peak.
AUDIO_RTOL = 1e-5
SCALE_RTOL = 1e-6

PRESETS = {"24khz": ENCODEC_24KHZ, "32khz": ENCODEC_32KHZ, "48khz": ENCODEC_48KHZ}
# Lengths from one sample up, none a multiple of the hop; at 48 kHz one chunk, two chunks with a
# short last one, and three chunks.
LENGTHS = {
    "24khz": [1, 319, 24_017],
    "32khz": [1, 641, 32_033],
    "48khz": [1, 47_999, 49_000, 96_000],
}


@dataclasses.dataclass
class Pair:
    config: EncodecConfig
    reference: torch.nn.Module
    model: EncodecModel


_PAIRS: dict[tuple[str, bool], Pair] = {}


def load_pair(name: str, tmp_path_factory, legacy_weight_norm: bool = False) -> Pair:
    key = (name, legacy_weight_norm)
    if key not in _PAIRS:
        config = PRESETS[name]
        reference = make_hf_model(config, seed=0)
        directory = tmp_path_factory.mktemp(f"hf_{name}")
        save_hf_model(reference, directory, legacy_weight_norm=legacy_weight_norm)
        _PAIRS[key] = Pair(config, reference, EncodecModel.from_pretrained(directory))
    return _PAIRS[key]


def assert_audio_close(actual, expected, what: str = "audio") -> None:
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    peak = max(float(np.abs(expected).max()), 1e-6)
    err = float(np.abs(actual - expected).max())
    assert err <= AUDIO_RTOL * peak, f"{what}: max error {err:.3g} > {AUDIO_RTOL} x peak {peak:.3g}"


def assert_same_encoding(out, ref, max_flipped: float = 0.0) -> None:
    codes, ref_codes = np.asarray(out.audio_codes), ref.audio_codes.numpy()
    if max_flipped == 0.0:
        np.testing.assert_array_equal(codes, ref_codes)
    else:
        assert codes.shape == ref_codes.shape
        flipped = float(np.mean(codes != ref_codes))
        assert flipped <= max_flipped, f"{flipped:.2%} of codes differ"
    assert out.last_frame_pad_length == ref.last_frame_pad_length
    assert len(out.audio_scales) == len(ref.audio_scales)
    for ours, theirs in zip(out.audio_scales, ref.audio_scales, strict=True):
        if theirs is None:
            assert ours is None
        else:
            np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), rtol=SCALE_RTOL)


def compare_every_bandwidth(pair: Pair, x: np.ndarray, max_flipped: float = 0.0) -> None:
    for bandwidth in pair.config.target_bandwidths:
        with torch.no_grad():
            ref = pair.reference.encode(torch.from_numpy(x), bandwidth=bandwidth)
            ref_audio = pair.reference.decode(
                ref.audio_codes, ref.audio_scales, last_frame_pad_length=ref.last_frame_pad_length
            ).audio_values
        out = pair.model.encode(x, bandwidth=bandwidth)
        assert_same_encoding(out, ref, max_flipped)
        # Decode the reference's codes, so that the audio check stands apart from the codes'.
        audio = pair.model.decode(
            ref.audio_codes.numpy(),
            out.audio_scales,
            last_frame_pad_length=out.last_frame_pad_length,
        ).audio_values
        assert_audio_close(audio, ref_audio.numpy(), f"decode at {bandwidth} kbps")


# Three 48 kHz chunks are also covered by the original-package tests (95,047 samples).
SLOW_CASES = {("48khz", 96_000)}


@pytest.mark.parametrize(
    "name,length",
    [
        pytest.param(name, length, marks=[pytest.mark.slow] if (name, length) in SLOW_CASES else [])
        for name, lengths in LENGTHS.items()
        for length in lengths
    ],
)
def test_presets_match_transformers(name, length, tmp_path_factory):
    pair = load_pair(name, tmp_path_factory)
    x = random_audio(2, pair.config.audio_channels, length, seed=length)
    compare_every_bandwidth(pair, x)


@pytest.mark.parametrize("name", list(PRESETS))
def test_batch_of_one_and_hub_weight_norm_names(name, tmp_path_factory):
    """The Hub's files store weight norm as weight_g/weight_v; current transformers saves
    parametrizations.weight.original0/1. Both load to the same model."""
    pair = load_pair(name, tmp_path_factory, legacy_weight_norm=True)
    length = {"24khz": 4_801, "32khz": 6_401, "48khz": 50_000}[name]
    compare_every_bandwidth(pair, random_audio(1, pair.config.audio_channels, length, seed=7))


@pytest.mark.parametrize("name", list(PRESETS))
def test_model_card_snippet(name, tmp_path_factory):
    """The transformers model-card flow, with padding: feature extractor, encode with the padding
    mask, decode, and the one-call forward."""
    import transformers

    pair = load_pair(name, tmp_path_factory)
    rate, channels = pair.config.sampling_rate, pair.config.audio_channels
    lengths = [rate // 3 + 11, rate // 2 + 5]
    raw = [random_audio(1, channels, n, seed=n)[0] for n in lengths]
    raw = [a[0] if channels == 1 else a for a in raw]

    processor = EncodecFeatureExtractor.from_config(pair.config)
    ref_processor = transformers.EncodecFeatureExtractor(
        feature_size=channels,
        sampling_rate=rate,
        chunk_length_s=pair.config.chunk_length_s,
        overlap=pair.config.overlap,
    )
    inputs = processor(raw_audio=raw, sampling_rate=rate, return_tensors="np")
    ref_inputs = ref_processor(raw_audio=raw, sampling_rate=rate, return_tensors="pt")
    np.testing.assert_array_equal(inputs["input_values"], ref_inputs["input_values"].numpy())

    bandwidth = pair.config.target_bandwidths[-1]
    enc = pair.model.encode(inputs["input_values"], inputs["padding_mask"], bandwidth=bandwidth)
    audio = pair.model.decode(enc.audio_codes, enc.audio_scales, inputs["padding_mask"])[0]
    forward = pair.model(inputs["input_values"], inputs["padding_mask"]).audio_values
    with torch.no_grad():
        ref_values, ref_mask = ref_inputs["input_values"], ref_inputs["padding_mask"]
        ref_enc = pair.reference.encode(ref_values, ref_mask, bandwidth=bandwidth)
        ref_audio = pair.reference.decode(ref_enc.audio_codes, ref_enc.audio_scales, ref_mask)[0]
        ref_forward = pair.reference(ref_values, ref_mask).audio_values
    assert_same_encoding(enc, ref_enc)
    assert_audio_close(audio, ref_audio.numpy(), "decode")
    assert_audio_close(forward, ref_forward.numpy(), "forward")


def _layer_outputs_match(torch_layers, jax_layers, x: torch.Tensor, where: str) -> None:
    """Feed each layer the reference's previous output, so a mismatch names its layer."""
    h = x
    for i, (ref_layer, layer) in enumerate(zip(torch_layers, jax_layers, strict=True)):
        ours = layer(jnp.asarray(h.numpy().transpose(0, 2, 1)))
        with torch.no_grad():
            h = ref_layer(h)
        name = f"{where}.layers.{i} ({type(ref_layer).__name__})"
        assert_audio_close(np.asarray(ours).transpose(0, 2, 1), h.numpy(), name)


@pytest.mark.parametrize("name", list(PRESETS))
def test_intermediate_stages(name, tmp_path_factory):
    pair = load_pair(name, tmp_path_factory)
    # The layers are called one by one, outside the model's own precision context: on a GPU
    # they would run in TF32 (H200: errors of ~1e-3 of the peak).
    with jax.default_matmul_precision(pair.model.settings.matmul_precision):
        config = pair.config
        x = torch.from_numpy(
            random_audio(2, config.audio_channels, config.hop_length * 9 + 7, seed=3)
        )
        _layer_outputs_match(pair.reference.encoder.layers, pair.model.encoder.layers, x, "encoder")

        with torch.no_grad():
            embeddings = pair.reference.encoder(x)
            ref_codes = pair.reference.quantizer.encode(embeddings, config.target_bandwidths[-1])
            ref_quantized = pair.reference.quantizer.decode(ref_codes)
        codes = pair.model.quantizer.encode(
            jnp.asarray(embeddings.numpy().transpose(0, 2, 1)), config.num_quantizers
        )
        np.testing.assert_array_equal(np.asarray(codes), ref_codes.numpy().transpose(1, 0, 2))
        quantized = pair.model.quantizer.decode(codes)
        assert_audio_close(
            np.asarray(quantized).transpose(0, 2, 1), ref_quantized.numpy(), "quantizer.decode"
        )
        _layer_outputs_match(
            pair.reference.decoder.layers, pair.model.decoder.layers, ref_quantized, "decoder"
        )


# ---- any config transformers accepts, not only the published ones ----
def random_config(seed: int) -> EncodecConfig:
    rng = np.random.default_rng(seed)

    def pick(options):
        return options[rng.integers(len(options))]

    causal = bool(rng.integers(2))
    ratios = tuple(int(r) for r in rng.choice([2, 3, 4, 5], size=rng.integers(1, 4)))
    sampling_rate = int(pick([8_000, 16_000, 22_050]))
    hop = int(np.prod(ratios))
    codebook_size = int(pick([16, 64, 256]))
    per_quantizer = np.ceil(sampling_rate / hop) * np.log2(codebook_size) / 1000
    chunked = bool(rng.integers(2))
    return EncodecConfig(
        # a hair above n quantizers' worth, so that floor() gives exactly n
        target_bandwidths=tuple(round(n * per_quantizer * 1.001, 6) for n in (1, 2, 3)),
        sampling_rate=sampling_rate,
        audio_channels=int(pick([1, 2])),
        normalize=bool(rng.integers(2)),
        chunk_length_s=0.05 if chunked else None,
        overlap=float(pick([0.01, 0.25])) if chunked else None,
        hidden_size=int(pick([8, 16])),
        num_filters=int(pick([4, 8])),
        num_residual_layers=int(pick([1, 2])),
        upsampling_ratios=ratios,
        norm_type=str(pick(["weight_norm", "time_group_norm"])),
        kernel_size=int(pick([3, 7])),
        last_kernel_size=int(pick([3, 5])),
        residual_kernel_size=int(pick([3, 5])),
        dilation_growth_rate=int(pick([1, 2, 3])),
        use_causal_conv=causal,
        pad_mode=str(pick(["reflect", "constant", "replicate"])),
        compress=int(pick([1, 2, 4])),
        num_lstm_layers=int(pick([1, 2])),
        trim_right_ratio=float(pick([1.0, 0.5])) if causal else 1.0,
        codebook_size=codebook_size,
        use_conv_shortcut=bool(rng.integers(2)),
    )


def check_random_config(seed: int, tmp_path, max_flipped: float = 0.0) -> None:
    config = random_config(seed)
    reference = make_hf_model(config, seed=seed)
    model = EncodecModel.from_pretrained(save_hf_model(reference, tmp_path))
    pair = Pair(config, reference, model)
    for length in (1, config.hop_length + 1, int(config.sampling_rate * 0.13) + 3):
        x = random_audio(2, config.audio_channels, length, seed=seed + length)
        compare_every_bandwidth(pair, x, max_flipped)


@pytest.mark.parametrize("seed", range(2))
def test_random_configs(seed, tmp_path):
    check_random_config(seed, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(2, 23))
def test_random_configs_sweep(seed, tmp_path):
    """Wider sweep. Tiny random models (hidden size 8, 16 codes) leave residuals of ~1e-3 at the
    deeper levels, where float32 rounding in the encoder (1e-7) can flip a true near-tie: seed 5
    has one such code in 420 (relative distance gap 1e-4). Up to 1% may differ here; the
    published presets and the default random configs are held to exact equality."""
    check_random_config(seed, tmp_path, max_flipped=0.01)
