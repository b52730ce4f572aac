"""Long inputs run their conv stacks in time tiles, and chunked models their chunks in groups:
the result must not change."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from encodec_jax import ENCODEC_24KHZ, ENCODEC_32KHZ, EncodecConfig, EncodecModel, ops, tiling
from encodec_jax import functional as F
from encodec_jax.testing import TINY_CHUNKED_CONFIG

# With 48 kHz's overlapping chunks and time_group_norm too.
CHUNKED_CONFIG = dataclasses.replace(TINY_CHUNKED_CONFIG, overlap=0.25, norm_type="time_group_norm")


def tiled_and_untiled(config: EncodecConfig, length: int, tile_frames: int = 7):
    model = EncodecModel(config, rngs=nnx.Rngs(0))
    model.settings = model.settings.replace(tile_frames=tile_frames)
    rng = np.random.default_rng(length)
    x = jnp.asarray(0.1 * rng.standard_normal((2, config.audio_channels, length)), jnp.float32)
    emb, scale = jax.jit(F.embed)(model, x)
    tiled_emb, tiled_scale = tiling.embed_tiled(model, x, None)
    audio = jax.jit(F.decode_embeddings)(model, emb, scale)
    tiled_audio = tiling.decode_tiled(model, emb, scale)
    return (emb, audio), (tiled_emb, tiled_audio)


@pytest.mark.parametrize("config", [ENCODEC_24KHZ, ENCODEC_32KHZ], ids=["24khz", "32khz"])
@pytest.mark.parametrize("extra", [13, pytest.param(0, marks=pytest.mark.slow)])
def test_tiles_keep_published_architectures_exact(config, extra):
    """Embeddings agree to float32 rounding, bit for bit where XLA's CPU kernels sum in the same
    order at every input length (measured: identical on an AVX-512 CPU; 3.9e-8 apart on an AVX2
    one, whose kernels block the sums by length), so a code can only differ at a float32 tie.
    The decoder's matmuls get other row counts per tile, for which XLA may block the sums
    differently: audio agrees to float32 rounding (measured 6e-8 at 24 kHz, 0 at 32 kHz)."""
    length = config.hop_length * 37 + extra  # 37 frames in tiles of 7 plus margins
    (emb, audio), (tiled_emb, tiled_audio) = tiled_and_untiled(config, length)
    # Values of order 0.01-0.1: atol 2e-7, a few float32 roundings of them.
    np.testing.assert_allclose(np.asarray(tiled_emb), np.asarray(emb), rtol=0, atol=2e-7)
    np.testing.assert_allclose(np.asarray(tiled_audio), np.asarray(audio), rtol=0, atol=1e-6)


def test_tiles_match_other_architectures_to_float_rounding():
    """Other shapes compile to other XLA kernels, which can round differently (~1e-7)."""
    config = EncodecConfig(
        num_filters=4,
        hidden_size=8,
        codebook_size=16,
        use_causal_conv=False,
        pad_mode="constant",
        upsampling_ratios=(3, 5, 2),
        num_residual_layers=2,
        dilation_growth_rate=3,
        normalize=True,
    )
    (emb, audio), (tiled_emb, tiled_audio) = tiled_and_untiled(config, config.hop_length * 40 + 7)
    np.testing.assert_allclose(np.asarray(tiled_emb), np.asarray(emb), rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(tiled_audio), np.asarray(audio), rtol=0, atol=1e-6)


@pytest.mark.parametrize("max_rows", [7, 1])
def test_chunk_groups_bound_rows_per_call_and_keep_the_result(monkeypatch, max_rows):
    """A long input of a chunked model runs its chunks a few at a time (memory bounded by
    `chunk_rows_per_call`, at least one chunk position of the batch per call): the groups that
    encode and decode actually run are recorded; codes and scales are identical to all chunks
    at once, audio equal to float32 rounding."""
    codec = EncodecModel(CHUNKED_CONFIG, rngs=nnx.Rngs(0))
    x = 0.1 * np.random.default_rng(3).standard_normal((3, 2, 1013)).astype(np.float32)
    codec.settings = codec.settings.replace(chunk_rows_per_call=None)
    ref_enc = codec.encode(x, bandwidth=16.0)
    ref_audio = codec.decode(
        ref_enc.audio_codes, ref_enc.audio_scales, chunk_frames=ref_enc.chunk_frames
    )
    group_chunks, made = ops.group_chunks, []

    def recording_group_chunks(items, batch, max_rows_per_call):
        calls = group_chunks(items, batch, max_rows_per_call)
        made.append([batch * len(indices) for _, indices in calls])
        return calls

    monkeypatch.setattr(ops, "group_chunks", recording_group_chunks)
    codec.settings = codec.settings.replace(chunk_rows_per_call=max_rows)
    enc = codec.encode(x, bandwidth=16.0)
    audio = codec.decode(enc.audio_codes, enc.audio_scales, chunk_frames=enc.chunk_frames)

    n_chunks = enc.audio_codes.shape[0]
    assert n_chunks == 17 and len(made) == 2  # one grouping for encode, one for decode
    per_call = 3 * max(1, max_rows // 3)  # 6 rows for 7, one chunk position (3 rows) for 1
    for rows in made:
        assert max(rows) == per_call and sum(rows) == 3 * n_chunks
    np.testing.assert_array_equal(np.asarray(enc.audio_codes), np.asarray(ref_enc.audio_codes))
    np.testing.assert_array_equal(np.stack(enc.audio_scales), np.stack(ref_enc.audio_scales))
    np.testing.assert_allclose(
        np.asarray(audio.audio_values), np.asarray(ref_audio.audio_values), rtol=0, atol=1e-6
    )


def test_plan_covers_every_frame_once():
    plan = tiling.plan_tiles(num_frames=37, tile_frames=7, margin=3, scale=320, length=37 * 320 - 5)
    kept = []
    for tile in plan:
        first = tile.start // 320 + tile.keep_start
        kept.extend(range(first, first + tile.keep_stop - tile.keep_start))
        assert tile.keep_start >= min(3, tile.start // 320 + tile.keep_start)
    assert kept == list(range(37))
    assert plan[0].start == 0 and plan[-1].stop == 37 * 320 - 5


def test_time_group_norm_models_are_not_tiled():
    assert not tiling.can_tile(EncodecConfig(norm_type="time_group_norm"))


LONG_AUDIO = textwrap.dedent(
    """
    import resource, sys
    import numpy as np
    from flax import nnx
    from encodec_jax import ENCODEC_32KHZ, EncodecModel
    model = EncodecModel(ENCODEC_32KHZ, rngs=nnx.Rngs(0))
    x = (0.1 * np.random.default_rng(0).standard_normal((1, 1, 32000 * 600))).astype(np.float32)
    out = model(x)
    assert out.audio_values.shape[-1] >= x.shape[-1]
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    """
)


@pytest.mark.slow
def test_ten_minutes_at_32khz_in_one_call_stays_small():
    """10 min at 32 kHz, encoded and decoded in one call. Untiled, the first layers alone hold
    several 4.9 GB activations (transformers measured 2.8 GiB at 60 s, growing linearly)."""
    out = subprocess.run(
        [sys.executable, "-c", LONG_AUDIO], capture_output=True, text=True, timeout=1200
    )
    assert out.returncode == 0, out.stderr[-2000:]
    peak_gib = float(out.stdout.strip().splitlines()[-1])
    assert peak_gib < 4.0, f"peak memory {peak_gib:.2f} GiB"
