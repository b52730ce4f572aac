"""Parity with the original `encodec` package, where transformers cannot be the reference.

transformers fails for 48 kHz inputs whose last two chunks are both short (its `torch.stack`
needs equal sizes), e.g. 95,047 samples; the original package encodes and decodes each chunk at
its own length. encodec-jax follows the original there.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from encodec_jax import ENCODEC_24KHZ, ENCODEC_48KHZ, EncodecModel
from encodec_jax.checkpoint import rename_original_key
from encodec_jax.testing import random_audio

from .reference import make_original_model
from .test_parity import SCALE_RTOL, assert_audio_close

_MODELS: dict[int, tuple] = {}


def load_original(sample_rate: int) -> tuple:
    if sample_rate not in _MODELS:
        reference = make_original_model(sample_rate, seed=1)
        config = ENCODEC_24KHZ if sample_rate == 24_000 else ENCODEC_48KHZ
        state = {k: v.numpy() for k, v in reference.state_dict().items()}
        _MODELS[sample_rate] = (
            reference,
            EncodecModel.from_state_dict(config, state, rename_original_key),
        )
    return _MODELS[sample_rate]


def compare_with_original(reference, model: EncodecModel, x: np.ndarray) -> None:
    for bandwidth in model.config.target_bandwidths:
        check_forward = bandwidth == model.config.target_bandwidths[-1]
        reference.set_target_bandwidth(bandwidth)
        with torch.no_grad():
            frames = reference.encode(torch.from_numpy(x))
            ref_audio = reference.decode(frames)
            ref_forward = reference(torch.from_numpy(x)) if check_forward else None
        out = model.encode(x, bandwidth=bandwidth)
        assert len(frames) == out.audio_codes.shape[0]
        for i, (codes, scale) in enumerate(frames):
            n_frames = codes.shape[-1]
            assert out.chunk_frames[i] == n_frames
            np.testing.assert_array_equal(np.asarray(out.audio_codes[i, ..., :n_frames]), codes)
            if scale is None:
                assert out.audio_scales[i] is None
            else:
                np.testing.assert_allclose(np.asarray(out.audio_scales[i]), scale, rtol=SCALE_RTOL)
        audio = model.decode(out.audio_codes, out.audio_scales, chunk_frames=out.chunk_frames)
        assert_audio_close(audio.audio_values, ref_audio.numpy(), f"decode at {bandwidth} kbps")
        if check_forward:
            forward = model(x, bandwidth=bandwidth).audio_values[..., : x.shape[-1]]
            assert_audio_close(forward, ref_forward.numpy(), f"forward at {bandwidth} kbps")


@pytest.mark.parametrize(
    "length",
    [
        95_047,  # last chunk 7 samples: the one before is short too (and one frame short)
        pytest.param(95_361, marks=pytest.mark.slow),  # the one before short, whole in frames
        47_521,  # two chunks: a full one and a 1-sample one
        pytest.param(30_001, marks=pytest.mark.slow),  # a single short chunk
    ],
)
def test_48khz_lengths_transformers_cannot_encode(length):
    reference, model = load_original(48_000)
    x = random_audio(2, 2, length, seed=length)
    compare_with_original(reference, model, x)


def test_transformers_fails_where_we_follow_the_original():
    """Guard that the lengths above really are ones transformers rejects: if a future release
    handles them, its results must be checked against ours instead of the original package."""
    import transformers

    reference = transformers.EncodecModel(
        transformers.EncodecConfig(**ENCODEC_48KHZ.to_hf_config())
    ).eval()
    with torch.no_grad(), pytest.raises(RuntimeError, match="stack expects each tensor"):
        reference.encode(torch.zeros(1, 2, 95_047))


def test_24khz_matches_original():
    reference, model = load_original(24_000)
    compare_with_original(reference, model, random_audio(2, 1, 24_000 + 123, seed=5))
