"""Input validation of `EncodecModel.encode` / `decode` / `__call__`: every bad input is a
ValueError saying what was expected; the accepted variants (NumPy or JAX, float16/64, the three
padding-mask layouts) give identical codes; outputs index like transformers' `ModelOutput`.

Two tiny models, one plain (mono, one chunk) and one normalising stereo model with chunks, each
saved and loaded as users have them, with codebooks filled from their own residuals
(`encodec_jax.testing.random_model`), so codes are not degenerate.
Shapes are kept few: every new input shape costs a compilation.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from encodec_jax import EncodecModel
from encodec_jax.testing import TINY_CHUNKED_CONFIG, TINY_CONFIG, random_audio, random_model

from .requires import needs_transformers

PLAIN = TINY_CONFIG
# Chunks without overlap, so 240 samples make 3 equal chunks: one compiled shape instead of two
# (a short last chunk is covered by test_parity.py).
NORM = TINY_CHUNKED_CONFIG
BATCH, LENGTH, NORM_LENGTH = 2, 260, 240
# each model encodes at one bandwidth throughout, so its quantizer compiles once
BANDWIDTH = {"plain": 24.0, "norm": 8.0}
PLAIN_AUDIO = random_audio(BATCH, 1, LENGTH, seed=5)
NORM_AUDIO = random_audio(BATCH, 2, NORM_LENGTH, seed=6)
AUDIO = {"plain": PLAIN_AUDIO, "norm": NORM_AUDIO}


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> EncodecModel:
    directory = tmp_path_factory.mktemp("plain")
    random_model(PLAIN, seed=1).save_pretrained(directory)
    return EncodecModel.from_pretrained(directory)


@pytest.fixture(scope="module")
def norm(tmp_path_factory) -> EncodecModel:
    directory = tmp_path_factory.mktemp("norm")
    random_model(NORM, seed=2).save_pretrained(directory)
    return EncodecModel.from_pretrained(directory)


@pytest.fixture(scope="module")
def plain_encoded(plain):
    return plain.encode(PLAIN_AUDIO, bandwidth=BANDWIDTH["plain"])


@pytest.fixture(scope="module")
def norm_encoded(norm):
    return norm.encode(NORM_AUDIO, bandwidth=BANDWIDTH["norm"])


def test_configs():
    assert PLAIN.num_quantizers == 3 and NORM.num_quantizers == 2
    assert (NORM.chunk_length, NORM.chunk_stride) == (80, 80)


def test_encoded_shapes(plain_encoded, norm_encoded):
    assert plain_encoded.audio_codes.shape == (1, BATCH, 3, LENGTH // 4)
    assert plain_encoded.audio_scales == [None]
    assert norm_encoded.audio_codes.shape == (3, BATCH, 1, 20)
    assert norm_encoded.last_frame_pad_length == 0
    assert len(norm_encoded.audio_scales) == 3
    assert all(s.shape == (BATCH, 1) for s in norm_encoded.audio_scales)
    assert len(np.unique(np.asarray(plain_encoded.audio_codes))) > 2


# ---- bad audio ----
def _with(x: np.ndarray, index, value) -> np.ndarray:
    x = x.copy()
    x[index] = value
    return x


BAD_AUDIO = {
    "1-D": (PLAIN_AUDIO[0, 0], r"must have shape \[batch, channels, samples\], got \(260,\)"),
    "2-D": (PLAIN_AUDIO[:, 0], r"must have shape \[batch, channels, samples\], got \(2, 260\)"),
    "4-D": (PLAIN_AUDIO[None], r"must have shape \[batch, channels, samples\], got \(1, 2, 1,"),
    "2 channels": (
        np.concatenate([PLAIN_AUDIO, PLAIN_AUDIO], axis=1),
        r"takes 1-channel audio, got 2 channels",
    ),
    "0 channels": (PLAIN_AUDIO[:, :0], r"takes 1-channel audio, got 0 channels"),
    "int16": ((PLAIN_AUDIO * 32767).astype(np.int16), r"floating-point audio .*dtype int16"),
    "int32": (np.zeros((2, 1, 260), np.int32), r"floating-point audio .*dtype int32"),
    "bool": (np.ones((2, 1, 260), bool), r"floating-point audio .*dtype bool"),
    "NaN": (_with(PLAIN_AUDIO, (1, 0, 7), np.nan), r"contains NaN or Inf"),
    "Inf": (_with(PLAIN_AUDIO, (0, 0, 0), np.inf), r"contains NaN or Inf"),
    "-Inf": (_with(PLAIN_AUDIO, (0, 0, -1), -np.inf), r"contains NaN or Inf"),
    "0 samples": (PLAIN_AUDIO[..., :0], r"input_values is empty: shape \(2, 1, 0\)"),
    "0 batch": (PLAIN_AUDIO[:0], r"input_values is empty: shape \(0, 1, 260\)"),
}


@pytest.mark.parametrize("array", [np.asarray, jnp.asarray], ids=["numpy", "jax"])
@pytest.mark.parametrize("method", ["encode", "call"])
@pytest.mark.parametrize("case", list(BAD_AUDIO))
def test_bad_audio(case, method, array, plain):
    x, message = BAD_AUDIO[case]
    run = plain.encode if method == "encode" else plain
    with pytest.raises(ValueError, match=message):
        run(array(x))


def test_wrong_channel_count_for_stereo_model(norm):
    with pytest.raises(ValueError, match=r"takes 2-channel audio, got 1 channels"):
        norm.encode(PLAIN_AUDIO)


@pytest.mark.parametrize(
    "shape",
    [(2, 259), (1, 260), (260,), (2, 2, 260), (2, 1, 1, 260), (3, 1, 260)],
    ids=str,
)
@pytest.mark.parametrize("method", ["encode", "call"])
def test_padding_mask_of_wrong_shape(shape, method, plain):
    run = plain.encode if method == "encode" else plain
    with pytest.raises(ValueError, match=r"padding_mask must have shape \[batch, samples\] = "):
        run(PLAIN_AUDIO, np.ones(shape, np.int64))


@pytest.mark.parametrize("bandwidth", [1.5, 0.0, 32.0, -8.0])
@pytest.mark.parametrize("method", ["encode", "call"])
def test_unknown_bandwidth_lists_the_valid_ones(bandwidth, method, plain):
    run = plain.encode if method == "encode" else plain
    valid = r"\[8\.0, 16\.0, 24\.0\]"
    message = rf"does not support bandwidth {bandwidth!r} kbps; select one of {valid}"
    with pytest.raises(ValueError, match=message):
        run(PLAIN_AUDIO, bandwidth=bandwidth)


def test_bandwidth_as_int_or_numpy_float_is_accepted(plain, plain_encoded):
    for bandwidth in (24, np.float32(24.0), np.float64(24.0)):
        codes = plain.encode(PLAIN_AUDIO, bandwidth=bandwidth).audio_codes
        assert np.array_equal(np.asarray(codes), np.asarray(plain_encoded.audio_codes))


# ---- bad codes ----
def _codes_with(codes, index, value) -> np.ndarray:
    codes = np.array(codes)
    codes[index] = value
    return codes


def bad_codes(good: np.ndarray) -> dict[str, tuple[np.ndarray, str]]:
    good = np.asarray(good)
    return {
        "negative": (_codes_with(good, (0, 1, 2, 5), -1), r"must lie in \[0, 16\), got values in"),
        "too large": (
            _codes_with(good, (0, 0, 0, 0), 16),
            rf"must lie in \[0, 16\), got values in \[{good.min()}, 16\]",
        ),
        "huge": (_codes_with(good, (0, 0, 1, 3), 2**31 - 1), r"must lie in \[0, 16\)"),
        "4 codebooks": (
            np.concatenate([good, good[:, :, :1]], axis=2),
            r"has 4 codebooks; this model has 1 to 3",
        ),
        "0 codebooks": (good[:, :, :0], r"has 0 codebooks; this model has 1 to 3"),
        "float": (good.astype(np.float32), r"must be integers, got dtype float32"),
        "bool": (good > 3, r"must be integers, got dtype bool"),
        "3-D": (good[0], r"must have shape \[chunks, batch, n_q, frames\], got \(2, 3, 65\)"),
        "5-D": (good[None], r"must have shape \[chunks, batch, n_q, frames\], got \(1, 1, 2,"),
        "0 frames": (good[..., :0], r"audio_codes is empty: shape \(1, 2, 3, 0\)"),
        "0 batch": (good[:, :0], r"audio_codes is empty: shape \(1, 0, 3, 65\)"),
        "0 chunks": (good[:0], r"audio_codes is empty: shape \(0, 2, 3, 65\)"),
        # batch 1, so that the decode this check comes after reuses the compiled [2, ...] call
        "2 chunks for an unchunked model": (
            np.concatenate([good[:, :1], good[:, 1:]]),
            r"encodes audio as one chunk, but audio_codes has 2",
        ),
    }


BAD_CODE_CASES = list(bad_codes(np.zeros((1, 2, 3, 65), np.int32)))


@pytest.mark.parametrize("array", [np.asarray, jnp.asarray], ids=["numpy", "jax"])
@pytest.mark.parametrize("method", ["decode", "call"])
@pytest.mark.parametrize("case", BAD_CODE_CASES)
def test_bad_codes(case, method, array, plain, plain_encoded):
    codes, message = bad_codes(plain_encoded.audio_codes)[case]
    with pytest.raises(ValueError, match=message):
        if method == "decode":
            plain.decode(array(codes), None)
        else:
            plain(PLAIN_AUDIO, audio_codes=array(codes))


# ---- scales and framing of the normalising, chunked model ----
@pytest.mark.parametrize("scales", [None, [None] * 3], ids=["None", "list of None"])
def test_missing_scales_for_normalising_model(scales, norm, norm_encoded):
    message = r"normalises its input: decode needs the audio_scales from encode"
    with pytest.raises(ValueError, match=message):
        norm.decode(norm_encoded.audio_codes, scales)
    with pytest.raises(ValueError, match=message):
        norm(NORM_AUDIO, audio_codes=norm_encoded.audio_codes, audio_scales=scales)


def test_scales_of_wrong_size(norm, norm_encoded):
    codes, scales = norm_encoded.audio_codes, norm_encoded.audio_scales
    message = r"audio_scales must be \[chunks, batch\] or \[chunks, batch, 1\] = \(3, 2"
    wrong = {
        "one chunk short": scales[:-1],
        "one chunk extra": [*scales, scales[0]],
        "batch of 3": [np.ones((3, 1), np.float32)] * 3,
        "array [2, 2, 1]": jnp.stack(scales[:-1]),
        "scalar": np.float32(1.0),
    }
    for value in wrong.values():
        with pytest.raises(ValueError, match=message):
            norm.decode(codes, value)
        with pytest.raises(ValueError, match=message):
            norm(NORM_AUDIO, audio_codes=codes, audio_scales=value)


def test_scales_mixing_none_and_arrays(norm, norm_encoded):
    scales = [*norm_encoded.audio_scales[:-1], None]
    with pytest.raises(ValueError, match=r"audio_scales mixes None and arrays"):
        norm.decode(norm_encoded.audio_codes, scales)


def test_scales_of_right_size_but_wrong_layout(norm, norm_encoded):
    transposed = jnp.stack(norm_encoded.audio_scales)[..., 0].T  # [batch, chunks] = [2, 3]
    pad = norm_encoded.last_frame_pad_length
    with pytest.raises(ValueError, match=r"audio_scales"):
        norm.decode(norm_encoded.audio_codes, transposed, last_frame_pad_length=pad)


def test_scales_as_list_or_array_decode_alike(norm, norm_encoded):
    codes, pad = norm_encoded.audio_codes, norm_encoded.last_frame_pad_length
    as_list = norm.decode(codes, norm_encoded.audio_scales, last_frame_pad_length=pad)
    as_array = norm.decode(codes, jnp.stack(norm_encoded.audio_scales), last_frame_pad_length=pad)
    assert np.array_equal(np.asarray(as_list.audio_values), np.asarray(as_array.audio_values))
    assert as_list.audio_values.shape == (BATCH, 2, NORM_LENGTH)


@pytest.mark.parametrize("model_name", ["plain", "norm"])
def test_scales_without_codes_in_call(model_name, request):
    model, audio = request.getfixturevalue(model_name), AUDIO[model_name]
    scales = [np.ones((BATCH, 1), np.float32)]
    with pytest.raises(ValueError, match=r"audio_scales were given without audio_codes"):
        model(audio, audio_scales=scales)


@pytest.mark.parametrize("pad", [-1, 20, 21, 1000])
def test_last_frame_pad_length_out_of_range(pad, norm, norm_encoded):
    codes, scales = norm_encoded.audio_codes, norm_encoded.audio_scales
    message = rf"last_frame_pad_length must be in \[0, 20\), got {pad}"
    with pytest.raises(ValueError, match=message):
        norm.decode(codes, scales, last_frame_pad_length=pad)
    with pytest.raises(ValueError, match=message):
        norm(NORM_AUDIO, audio_codes=codes, audio_scales=scales, last_frame_pad_length=pad)


@pytest.mark.parametrize("pad", [-1, 65])
def test_last_frame_pad_length_out_of_range_unchunked(pad, plain, plain_encoded):
    with pytest.raises(ValueError, match=rf"last_frame_pad_length must be in \[0, 65\), got {pad}"):
        plain.decode(plain_encoded.audio_codes, None, last_frame_pad_length=pad)


@pytest.mark.parametrize("frames", [(20, 20), (20, 20, 0), (20, 20, 21), (20, 20, 20, 20)])
def test_chunk_frames_out_of_range(frames, norm, norm_encoded):
    with pytest.raises(ValueError, match=r"chunk_frames must give 1\.\.20 frames for each of 3"):
        norm.decode(norm_encoded.audio_codes, norm_encoded.audio_scales, chunk_frames=frames)


# ---- accepted variants give identical results ----
def _mask(audio: np.ndarray, length: int) -> np.ndarray:
    """[batch, samples] int mask; the last item is padded after `length` samples."""
    mask = np.ones(audio[:, 0].shape, np.int64)
    mask[-1, length:] = 0
    return mask


@pytest.mark.parametrize("model_name", ["plain", "norm"])
def test_numpy_and_jax_inputs_give_identical_codes(model_name, request):
    model, audio = request.getfixturevalue(model_name), AUDIO[model_name]
    # the padding-mask path compiles separately; the chunked model covers it
    mask = None if model_name == "plain" else _mask(audio, 200)
    bandwidth = BANDWIDTH[model_name]
    from_numpy = model.encode(audio, mask, bandwidth)
    from_jax = model.encode(
        jnp.asarray(audio), None if mask is None else jnp.asarray(mask), bandwidth
    )
    assert np.array_equal(np.asarray(from_numpy.audio_codes), np.asarray(from_jax.audio_codes))
    for a, b in zip(from_numpy.audio_scales, from_jax.audio_scales, strict=True):
        assert (a is None and b is None) or np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("model_name", ["plain", "norm"])
def test_float64_and_float16_inputs_are_accepted(model_name, request):
    model, audio = request.getfixturevalue(model_name), AUDIO[model_name]
    bandwidth = BANDWIDTH[model_name]

    def codes(x):
        return np.asarray(model.encode(x, bandwidth=bandwidth).audio_codes)

    # float64 holding float32 values converts exactly
    assert np.array_equal(codes(audio.astype(np.float64)), codes(audio))
    half = audio.astype(np.float16)
    expected = codes(half.astype(np.float32))
    assert np.array_equal(codes(half), expected)
    assert np.array_equal(codes(jnp.asarray(half)), expected)
    out = model(audio.astype(np.float64), bandwidth=bandwidth)
    assert out.audio_values.dtype == jnp.float32


def test_padding_mask_layouts_give_identical_codes(norm):
    """[B, T], [B, 1, T] and [B, C, T] masks (ints, bools or floats) all zero the padded tail."""
    mask = np.ones((BATCH, NORM_LENGTH), np.int64)
    mask[0, 150:] = 0
    expected = norm.encode(NORM_AUDIO * mask[:, None, :], bandwidth=BANDWIDTH["norm"])
    layouts = {
        "[B, T]": mask,
        "[B, 1, T]": mask[:, None, :],
        "[B, C, T]": np.repeat(mask[:, None, :], 2, axis=1),
        "[B, T] bool": mask.astype(bool),
        "[B, C, T] float": np.repeat(mask[:, None, :], 2, axis=1).astype(np.float32),
    }
    for what, layout in layouts.items():
        out = norm.encode(NORM_AUDIO, layout, BANDWIDTH["norm"])
        assert np.array_equal(np.asarray(out.audio_codes), np.asarray(expected.audio_codes)), what
        for a, b in zip(out.audio_scales, expected.audio_scales, strict=True):
            assert np.array_equal(np.asarray(a), np.asarray(b)), what
    unmasked = norm.encode(NORM_AUDIO, bandwidth=BANDWIDTH["norm"])
    assert not np.array_equal(np.asarray(unmasked.audio_codes), np.asarray(expected.audio_codes))


def test_padding_mask_cuts_the_decoded_audio(plain, plain_encoded):
    codes = plain_encoded.audio_codes
    assert plain.decode(codes, None).audio_values.shape == (BATCH, 1, LENGTH)
    cut = plain.decode(codes, None, np.ones((BATCH, 250), np.int64)).audio_values
    assert cut.shape == (BATCH, 1, 250)


# ---- outputs index like transformers' ModelOutput ----
def test_outputs_index_like_model_output(plain, plain_encoded):
    enc = plain_encoded
    assert enc[0] is enc.audio_codes
    assert enc["audio_codes"] is enc.audio_codes
    assert enc[1] is enc.audio_scales and enc["audio_scales"] is enc.audio_scales
    assert enc[2] == enc.last_frame_pad_length == enc["last_frame_pad_length"] == 0
    first_two = enc[:2]
    assert len(first_two) == 2
    assert first_two[0] is enc.audio_codes and first_two[1] is enc.audio_scales

    dec = plain.decode(enc[0], enc[1], last_frame_pad_length=enc[2])
    assert dec[0] is dec.audio_values and dec["audio_values"] is dec.audio_values
    assert dec[-1] is dec.audio_values
    assert len(dec.to_tuple()) == 1

    out = plain(PLAIN_AUDIO, bandwidth=BANDWIDTH["plain"])
    assert out[0] is out.audio_codes and out["audio_codes"] is out.audio_codes
    assert out[1] is out.audio_values and out["audio_values"] is out.audio_values
    assert np.array_equal(np.asarray(out[0]), np.asarray(enc[0]))
    assert np.array_equal(np.asarray(out[1]), np.asarray(dec[0]))
    with pytest.raises(IndexError):
        out[2]


@needs_transformers
def test_output_tuple_matches_transformers_field_order(plain_encoded):
    from transformers.models.encodec import modeling_encodec

    theirs = modeling_encodec.EncodecEncoderOutput(
        audio_codes=1, audio_scales=[None], last_frame_pad_length=0
    )
    ours = plain_encoded
    assert len(theirs.to_tuple()) == 3
    for i, name in enumerate(theirs.keys()):
        assert ours[i] is getattr(ours, name)


def test_unknown_output_key_raises_key_error(plain_encoded):
    with pytest.raises(KeyError):
        plain_encoded["audio_values"]


# ---- inputs are left untouched ----
@pytest.mark.parametrize("model_name", ["plain", "norm"])
def test_encode_does_not_modify_its_inputs(model_name, request):
    model, audio = request.getfixturevalue(model_name), AUDIO[model_name].copy()
    mask = _mask(audio, 100)
    audio_before, mask_before = audio.copy(), mask.copy()
    # the plain model without a mask (its masked path would be one more compilation)
    model_mask = None if model_name == "plain" else mask
    model.encode(audio, model_mask, BANDWIDTH[model_name])
    model(audio, model_mask, BANDWIDTH[model_name])
    assert np.array_equal(audio, audio_before)
    assert np.array_equal(mask, mask_before)
    assert audio.flags.writeable and mask.flags.writeable
