"""Whole models streamed in float32: the three presets' architectures (every kernel, stride,
padding and the two-layer LSTM; narrow widths so they compile quickly, random weights with
codebooks filled from their own residuals), pushed in random chunk sizes, against offline
`EncodecModel.encode` / `decode` of the whole signal; bad input; the command line.

Codes are compared for equality. A streamed step sums in other shapes than the whole signal's
(XLA blocks reductions by shape), so embeddings differ from offline by float32 rounding
(~1e-7 relative) and a code may flip where two codebook entries are a near-tie: every code that
differs must be such a tie (relative distance gap below `TIE_GAP` at the first level that
differs), and they must be rare. Audio: within `AUDIO_TOLERANCE` of offline decoding. The state
logic itself is proven to 1e-12 in float64 in tests/test_streaming_layers.py.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import soundfile as sf
from jax import lax

from encodec_jax import ENCODEC_24KHZ, ENCODEC_32KHZ, ENCODEC_48KHZ, functional, streaming
from encodec_jax.audio import AudioError, load_audio
from encodec_jax.codes import load_codes
from encodec_jax.streaming.pipeline import AudioSource, RawFormat
from encodec_jax.testing import near_tie_gaps, random_audio

from .test_cli import assert_one_line_error, run_cli, tiny_checkpoint, tone
from .test_cli import random_model as quick_random_model

TIE_GAP = 1e-4  # relative gap between the two codes' squared distances: float32 noise is ~1e-6
MAX_FLIPPED = 0.01  # fraction of codes that may differ (all near-ties)
AUDIO_TOLERANCE = 1e-5  # absolute, audio of peak ~1: float32 rounding in other sum orders

# The presets' architectures at narrow widths: same ratios, kernels, causality, padding, norms,
# LSTM layers, chunking and normalisation; 4 filters and 16-dim embeddings.
NARROW = {"num_filters": 4, "hidden_size": 16, "codebook_dim": 16}
CONFIG_24 = dataclasses.replace(ENCODEC_24KHZ, **NARROW, target_bandwidths=(1.5, 6.0))
CONFIG_32 = dataclasses.replace(ENCODEC_32KHZ, **NARROW)
CONFIG_48 = dataclasses.replace(ENCODEC_48KHZ, **NARROW, target_bandwidths=(3.0, 6.0))


# Random weights set from NumPy on the abstract model (initialising through nnx.Rngs costs
# ~20 s of small compiles on a cold CPU process), codebooks drawn from the encoder's own output.
@pytest.fixture(scope="module")
def model24():
    return quick_random_model(CONFIG_24, seed=0)


@pytest.fixture(scope="module")
def model32():
    return quick_random_model(CONFIG_32, seed=1)


@pytest.fixture(scope="module")
def model48():
    return quick_random_model(CONFIG_48, seed=2)


# ---- helpers ----
def push_randomly(stream, data: np.ndarray, rng: np.random.Generator, most: int) -> np.ndarray:
    """Push `data` `[B, X, n]` in random pieces of 1..`most` along the last axis, then flush;
    the outputs joined along the last axis."""
    outputs, position = [], 0
    while position < data.shape[-1]:
        size = int(rng.integers(1, most + 1))
        outputs.append(stream.push(data[..., position : position + size]))
        position += size
    outputs.append(stream.flush())
    return np.concatenate(outputs, axis=-1)


def offline_codes(model, audio: np.ndarray, bandwidth: float) -> np.ndarray:
    """`[B, n_q, frames]`: codes of the whole signal (one chunk)."""
    return np.asarray(model.encode(audio, bandwidth=bandwidth).audio_codes[0])


def assert_codes_match(model, audio: np.ndarray, streamed: np.ndarray, expected: np.ndarray):
    """Streamed codes equal offline ones except for rare near-ties (see the module docstring).
    Returns the number of codes that differ."""
    assert streamed.shape == expected.shape, (streamed.shape, expected.shape)
    differ = streamed != expected
    flipped = int(differ.sum())
    if not flipped:
        return 0
    assert flipped <= MAX_FLIPPED * expected.size, f"{flipped} of {expected.size} codes differ"
    for _, t, level, gap in near_tie_gaps(model, audio, streamed, expected):
        assert gap < TIE_GAP, f"frame {t} level {level}: not a near-tie (relative gap {gap:.2e})"
    return flipped


def offline_audio(model, codes: np.ndarray) -> np.ndarray:
    return np.asarray(model.decode(codes[None], [None]).audio_values)


# ---- the causal 24 kHz model ----
def test_24khz_streams_equal_offline(model24, caplog):
    """Random push sizes, a length that is not a multiple of the hop, two streams batched;
    1-frame steps: the 7-frame start that reflect padding needs, then one frame of latency."""
    config = model24.config
    hop, bandwidth = config.hop_length, 6.0
    audio = random_audio(2, 1, 40 * hop + 123, seed=3)
    rng = np.random.default_rng(0)
    info = streaming.info(model24)
    assert (info.encoder_warmup_frames, info.encoder_lag_frames) == (7, 0)
    assert (info.decoder_warmup_frames, info.decoder_lag_samples) == (7, 0)

    encoder = streaming.Encoder(model24, bandwidth, batch_size=2, chunk_frames=1)
    encoder.compile()
    with jax.log_compiles(), caplog.at_level(logging.WARNING):
        # Before the warmup nothing comes out; then each frame's codes come with its last sample.
        assert encoder.push(audio[..., : 7 * hop - 1]).shape == (2, 8, 0)
        start = encoder.push(audio[..., 7 * hop - 1 : 7 * hop])
        assert start.shape == (2, 8, 7)
        assert encoder.push(audio[..., 7 * hop : 8 * hop - 1]).shape == (2, 8, 0)
        rest = push_randomly(encoder, audio[..., 8 * hop - 1 :], rng, 3 * hop)
    streamed = np.concatenate([start, rest], axis=-1)
    compiled = [
        r.getMessage() for r in caplog.records if "Compiling jit(encode_step" in r.getMessage()
    ]
    assert not compiled, compiled  # no new program per push after compile()
    expected = offline_codes(model24, audio, bandwidth)
    assert_codes_match(model24, audio, streamed, expected)

    decoder = streaming.Decoder(model24, batch_size=2, chunk_frames=1)
    decoded = push_randomly(decoder, expected, rng, 4)
    reference = offline_audio(model24, expected)
    assert decoded.shape == reference.shape == (2, 1, 41 * hop)
    np.testing.assert_allclose(decoded, reference, rtol=0, atol=AUDIO_TOLERANCE)


@pytest.mark.slow
def test_pure_steps_scan_over_a_stream(model24):
    """The pure form: `prepare`, `init_*_state`, a first step, then `lax.scan` of the steady
    step over equal chunks inside one jitted program, and the flush: the codes and audio of the
    host streams (same programs' arithmetic)."""
    config = model24.config
    hop, n_q = config.hop_length, config.num_quantizers_for_bandwidth(6.0)
    audio = random_audio(2, 1, 30 * hop + 50, seed=4)
    codec = streaming.prepare(model24)
    state = streaming.init_encoder_state(codec, 2)
    state, first = jax.jit(streaming.encode_step, static_argnums=3)(
        codec, state, audio[..., : 7 * hop], n_q
    )
    chunks = audio[..., 7 * hop : 30 * hop].reshape(2, 1, 23, hop).transpose(2, 0, 1, 3)

    @jax.jit
    def run(codec, state, chunks, tail):
        def body(state, chunk):
            return streaming.encode_step(codec, state, chunk, n_q)

        state, codes = lax.scan(body, state, chunks)
        last, count = streaming.encode_flush(codec, state, tail, 50, n_q)
        return codes, last, count

    tail = np.pad(audio[..., 30 * hop :], ((0, 0), (0, 0), (0, hop - 50)))
    codes, last, count = run(codec, state, jnp.asarray(chunks), tail)
    assert int(count) == 1
    scanned = np.concatenate(
        [
            np.asarray(first),
            np.moveaxis(np.asarray(codes)[..., 0], 0, -1),
            np.asarray(last)[..., :1],
        ],
        axis=-1,
    )
    encoder = streaming.Encoder(model24, 6.0, batch_size=2)
    hosted = np.concatenate([encoder.push(audio), encoder.flush()], axis=-1)
    np.testing.assert_array_equal(scanned, hosted)
    # The state keeps its tree and shapes from step to step (so scan can carry it).
    after, _ = streaming.encode_step(codec, state, audio[..., :hop], n_q)
    assert jax.tree.structure(after) == jax.tree.structure(state)
    assert jax.tree.map(jnp.shape, after) == jax.tree.map(jnp.shape, state)


# ---- the non-causal 32 kHz model: a fixed look-ahead ----
@pytest.mark.slow
def test_32khz_lookahead_is_what_the_receptive_field_says(model32):
    """The look-ahead of the encoder and the decoder, computed from the layers' receptive fields
    (the slow test below checks the encoder's by perturbation); the stream's lags follow from
    it. Widths do not change a receptive field, so these are the published model's figures."""
    config = model32.config
    hop = config.hop_length
    info = streaming.info(model32)
    assert info.encoder_lookahead_samples == 2386  # 74.6 ms at 32 kHz
    assert info.encoder_lag_frames == -(-info.encoder_lookahead_samples // hop) == 4
    assert info.decoder_lag_samples == 2402  # 75.1 ms
    decoder = model32.decoder
    decoder_right = decoder.layers[0].receptive_field.right + decoder.convs_receptive_field.right
    assert info.decoder_lag_samples == decoder_right * hop


@pytest.mark.slow
def test_32khz_lookahead_is_where_dependence_ends(model32):
    """Frame 10 ends at sample 11 * hop - 1: a change `encoder_lookahead_samples` past it
    reaches its embedding, one sample further does not."""
    hop = model32.config.hop_length
    info = streaming.info(model32)
    audio = random_audio(1, 1, 30 * hop, seed=5)
    embed = jax.jit(lambda m, x: functional.embed(m, x)[0])
    base = np.asarray(embed(model32, audio))
    last = 11 * hop - 1 + info.encoder_lookahead_samples
    for position, changes in ((last, True), (last + 1, False)):
        moved = audio.copy()
        moved[..., position] += 0.5
        difference = np.abs(np.asarray(embed(model32, moved)) - base)[0, 10].max()
        assert (difference > 0) == changes, (position, difference)  # same program: exact


@pytest.mark.slow
def test_32khz_streams_equal_offline(model32):
    config = model32.config
    hop = config.hop_length
    audio = random_audio(1, 1, 25 * hop + 7, seed=6)
    rng = np.random.default_rng(1)
    encoder = streaming.Encoder(model32, 2.2, chunk_frames=2)
    # One push of two frames after the warmup brings the codes of two frames, 4 frames back.
    first_frames = encoder.first_frames
    codes = encoder.push(audio[..., : first_frames * hop])
    assert codes.shape[-1] == first_frames - encoder.info.encoder_lag_frames
    streamed = np.concatenate(
        [codes, push_randomly(encoder, audio[..., first_frames * hop :], rng, 2 * hop)], axis=-1
    )
    expected = offline_codes(model32, audio, 2.2)
    assert_codes_match(model32, audio, streamed, expected)

    decoder = streaming.Decoder(model32, chunk_frames=2)
    decoded = push_randomly(decoder, expected, rng, 3)
    reference = offline_audio(model32, expected)
    assert decoded.shape == reference.shape
    np.testing.assert_allclose(decoded, reference, rtol=0, atol=AUDIO_TOLERANCE)


# ---- the 48 kHz model: its own 1 s chunks ----
@pytest.mark.slow
def test_48khz_streams_in_its_chunks(model48):
    """Stereo, normalised, time_group_norm: chunk by chunk, exactly offline's chunks, scales
    and codes; overlap-added as offline."""
    config = model48.config
    audio = random_audio(1, 2, int(2.3 * config.sampling_rate), seed=7)
    rng = np.random.default_rng(2)
    with pytest.raises(streaming.StreamingError, match="ChunkEncoder"):
        streaming.Encoder(model48)
    encoder = streaming.ChunkEncoder(model48, 6.0)
    chunks, position = [], 0
    while position < audio.shape[-1]:
        size = int(rng.integers(1, 20_000))
        done = encoder.push(audio[..., position : position + size])
        position += size
        # A chunk comes out as soon as its last sample is in.
        for chunk in done:
            assert (len(chunks) * config.chunk_stride + config.chunk_length) <= position
            chunks.append(chunk)
    chunks += encoder.flush()
    offline = model48.encode(audio, bandwidth=6.0)
    assert len(chunks) == len(offline.chunk_frames) == 3
    flipped = []
    for chunk, codes, scale, frames in zip(
        chunks, offline.audio_codes, offline.audio_scales, offline.chunk_frames, strict=True
    ):
        np.testing.assert_allclose(chunk.scale, np.asarray(scale), rtol=1e-6)
        start = len(flipped) * config.chunk_stride
        piece = audio[..., start : start + config.chunk_length]
        expected = np.asarray(codes)[..., :frames]
        flipped.append(assert_codes_match(model48, piece, chunk.codes, expected))

    decoder = streaming.ChunkDecoder(model48)
    decoded = [decoder.push(c.codes, c.scale) for c in chunks] + [decoder.flush()]
    decoded = np.concatenate(decoded, axis=-1)
    reference = np.asarray(
        model48.decode(
            offline.audio_codes, offline.audio_scales, chunk_frames=offline.chunk_frames
        ).audio_values
    )
    assert decoded.shape == reference.shape
    np.testing.assert_allclose(decoded, reference, rtol=0, atol=AUDIO_TOLERANCE)


# ---- bad input ----
def test_bad_input_is_refused(model24):
    hop = model24.config.hop_length
    encoder = streaming.Encoder(model24, 1.5)
    for audio, message in (
        (np.zeros((1, 2, hop), np.float32), r"\[1, 1, n\]"),  # two channels for a mono model
        (np.zeros((1, 1, hop), np.int16), "floating point"),
        (np.full((1, 1, hop), np.nan, np.float32), "NaN"),
        (np.zeros((2, 1, hop), np.float32), "batch"),
    ):
        with pytest.raises(streaming.StreamingError, match=message):
            encoder.push(audio)
    # A partial frame is buffered until a later push completes it.
    assert encoder.push(np.zeros((1, 1, 7 * hop - 5), np.float32)).shape[-1] == 0
    encoder = streaming.Encoder(model24, 1.5)
    assert encoder.flush().shape == (1, 2, 0)
    for call in (lambda: encoder.push(np.zeros((1, 1, hop), np.float32)), encoder.flush):
        with pytest.raises(streaming.StreamingError, match="after flush"):
            call()

    decoder = streaming.Decoder(model24)
    with pytest.raises(streaming.StreamingError, match="integers"):
        decoder.push(np.zeros((1, 2, 3), np.float32))
    with pytest.raises(streaming.StreamingError, match="another model"):
        decoder.push(np.full((1, 2, 3), model24.config.codebook_size, np.int32))
    with pytest.raises(streaming.StreamingError, match="another model"):
        decoder.push(np.zeros((1, model24.config.num_quantizers + 1, 3), np.int32))
    decoder.push(np.zeros((1, 2, 3), np.int32))
    with pytest.raises(streaming.StreamingError, match="same codebooks"):
        decoder.push(np.zeros((1, 4, 3), np.int32))
    with pytest.raises(ValueError, match="chunk_frames"):
        streaming.Encoder(model24, chunk_frames=0)

    # The pure steps check at trace time (traced here without running).
    codec = streaming.prepare(model24)
    state = streaming.init_encoder_state(codec, 1)
    cases = (
        (lambda: streaming.encode_step(codec, state, np.zeros((1, 1, 7 * hop + 1)), 2), "whole"),
        (lambda: streaming.encode_step(codec, state, np.zeros((1, 1, 6 * hop)), 2), "at least 7"),
        (lambda: streaming.encode_flush(codec, state, np.zeros((1, 1, hop)), 0, 2), "not started"),
        (lambda: streaming.decode_step(codec, state, np.zeros((1, 2, 7), np.int32)), "decoder"),
        (lambda: streaming.encode_step(codec, state, np.zeros((1, 1, 7 * hop)), 99), "1..8"),
    )
    for call, message in cases:
        with pytest.raises(streaming.StreamingError, match=message):
            jax.eval_shape(call)
    # Models whose input normalisation or norms need the whole signal.
    with pytest.raises(streaming.StreamingError, match="ChunkEncoder"):
        streaming.check_frame_streamable(CONFIG_48)
    with pytest.raises(streaming.StreamingError, match="normalises its input"):
        streaming.check_frame_streamable(dataclasses.replace(CONFIG_24, normalize=True))
    with pytest.raises(streaming.StreamingError, match="frame by frame"):
        streaming.ChunkEncoder(model24)


# ---- memory ----
def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")
def test_ten_minute_stream_keeps_memory_flat(model24):
    """10 minutes at 24 kHz in 0.1 s pushes, 10-frame steps: resident memory after the first
    minute stays within 16 MiB (10 minutes of float32 audio alone is 55 MiB), the state keeps
    its shapes, and the codes equal offline encoding of the whole signal."""
    config = model24.config
    rate, hop = config.sampling_rate, config.hop_length
    seconds = 600
    encoder = streaming.Encoder(model24, 1.5, chunk_frames=10)
    encoder.compile()
    shapes = jax.tree.map(jnp.shape, encoder.state.layers)
    block = rate // 10
    parts, memory = [], []
    for i in range(seconds * 10):
        audio = random_audio(1, 1, block, seed=i)
        parts.append(encoder.push(audio))
        if i % 600 == 599:  # each minute
            memory.append(_resident_bytes())
    parts.append(encoder.flush())
    streamed = np.concatenate(parts, axis=-1)
    assert jax.tree.map(jnp.shape, encoder.state.layers) == shapes
    growth = max(memory) - memory[0]
    assert growth < 16 * 2**20, f"resident memory grew by {growth / 2**20:.1f} MiB"
    assert streamed.shape[-1] == seconds * rate // hop
    whole = np.concatenate([random_audio(1, 1, block, seed=i) for i in range(seconds * 10)], -1)
    assert_codes_match(model24, whole, streamed, offline_codes(model24, whole, 1.5))


# ---- the command line ----
@pytest.fixture(scope="module")
def wav_input(tmp_path_factory):
    """A 0.7 s mono file for the tiny 16 kHz checkpoint of tests/test_cli.py: float samples,
    and the same signal as 16-bit integers. Returns (directory, float data, int16 data)."""
    directory = tmp_path_factory.mktemp("stream-cli")
    data = tone(0.7, 16_000, 1)[:, 0]
    ints = np.round(data * 32767).astype("<i2")
    sf.write(directory / "f32.wav", data, 16_000, subtype="FLOAT")
    sf.write(directory / "s16.wav", ints, 16_000, subtype="PCM_16")
    return directory, data, ints


@pytest.mark.parametrize("chunk_frames", [1, pytest.param(3, marks=pytest.mark.slow)])
def test_cli_stream_codes_equal_encode(wav_input, chunk_frames, capsys):
    directory, data, _ = wav_input
    model = tiny_checkpoint()
    common = ("--model", model, "--bandwidth", 4.0)
    code, _, err = run_cli(
        capsys, "encode", directory / "f32.wav", "-o", directory / "e.npz", *common
    )
    assert code == 0, err
    streamed_file = directory / f"s{chunk_frames}.npz"
    code, out, err = run_cli(
        capsys,
        "stream",
        directory / "f32.wav",
        "-o",
        streamed_file,
        *common,
        "--chunk-frames",
        chunk_frames,
    )
    assert code == 0, err
    assert "real-time factor" in out and "latency" in out
    streamed, offline = load_codes(streamed_file), load_codes(directory / "e.npz")
    np.testing.assert_array_equal(streamed.audio_codes, offline.audio_codes)
    assert streamed.num_samples == offline.num_samples == len(data)
    assert streamed.chunk_frames == offline.chunk_frames
    if chunk_frames > 1:  # the slow variant: `decode` takes the streamed file
        code, _, err = run_cli(
            capsys, "decode", streamed_file, "-o", directory / "d.wav", "--model", model
        )
        assert code == 0, err


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["s16", "f32"])
def test_cli_stream_stdin_equals_reconstruct(wav_input, fmt, capsys, monkeypatch):
    """`sox ... -t raw - | encodec-jax stream - ...`: raw PCM on stdin, reconstructed audio
    written as it goes, equal to `reconstruct` of a file holding the same samples."""
    directory, data, ints = wav_input
    model = tiny_checkpoint()
    common = ("--model", model, "--bandwidth", 4.0)
    raw = ints if fmt == "s16" else data.astype("<f4")
    code, _, err = run_cli(
        capsys, "reconstruct", directory / f"{fmt}.wav", "-o", directory / f"r-{fmt}.wav", *common
    )
    assert code == 0, err
    expected, _ = sf.read(directory / f"r-{fmt}.wav", dtype="int16")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(raw.tobytes())))
    output = directory / f"s-{fmt}.wav"
    code, out, err = run_cli(
        capsys, "stream", "-", "-o", output, *common, "--rate", 16_000, "--pcm-format", fmt
    )
    assert code == 0, err
    assert "stdin" in out and "real-time factor" in out
    audio, _ = sf.read(output, dtype="int16")
    assert audio.shape == expected.shape == (len(data),)
    # 16-bit files: float32 rounding may move a sample across a rounding boundary.
    assert np.abs(audio.astype(int) - expected.astype(int)).max() <= 1


def test_cli_stream_errors(wav_input, capsys):
    directory, _, _ = wav_input
    model = tiny_checkpoint()
    wav = directory / "f32.wav"
    cases = (
        (("stream", "-", "-o", directory / "x.npz", "--model", model), "--rate"),
        (("stream", wav, "-o", directory / "x.npz", "--model", model, "--rate", 8000), "IN = -"),
        (("stream", wav, "-o", directory / "x.xyz", "--model", model), "x.xyz"),
    )
    for argv, needle in cases:
        code, _, err = run_cli(capsys, *argv)
        assert_one_line_error(code, err, needle)


def test_audio_source_reads_as_load_audio(tmp_path):
    """Block by block, a file converts as `load_audio` converts it whole (channels mixed down,
    soxr's streaming resampler at the same quality); raw PCM that ends inside a sample frame
    is an error."""
    stereo = tone(0.6, 44_100, 2)
    sf.write(tmp_path / "stereo.wav", stereo, 44_100, subtype="FLOAT")
    source = AudioSource(tmp_path / "stereo.wav", 16_000, 1, block_seconds=0.05)
    streamed = np.concatenate(list(source), axis=-1)
    whole, notes = load_audio(tmp_path / "stereo.wav", 16_000, 1)
    assert source.notes == notes == ["mixed 2 channels down to mono", "resampled 44100 -> 16000 Hz"]
    assert streamed.shape == whole.shape
    np.testing.assert_allclose(streamed, whole, rtol=0, atol=1e-6)
    broken = io.BytesIO(np.zeros(5, "<i2").tobytes() + b"\x01")
    with pytest.raises(AudioError, match="inside a sample frame"):
        list(AudioSource(broken, 16_000, 1, RawFormat(16_000, 1, "s16")))
