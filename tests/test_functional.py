"""`encodec_jax.functional` inside the user's own JAX program: jit, vmap, grad, sharding.

The functions must give exactly `EncodecModel.encode`/`decode`'s codes (and audio to float32
rounding) for the same chunk, trace without host synchronisation, and let gradients through the
straight-through quantizer to the encoder. No PyTorch needed.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from encodec_jax import ENCODEC_24KHZ, ENCODEC_32KHZ, ENCODEC_48KHZ, EncodecModel
from encodec_jax import functional as F
from encodec_jax.testing import (
    TINY_CHUNKED_CONFIG,
    TINY_CONFIG,
    TINY_NONCAUSAL_CONFIG,
    random_audio,
    random_model,
)

# Audio of the model's own fast paths: float32 rounding of another program's sums.
AUDIO_ATOL = 1e-5

TINY = {"causal": TINY_CONFIG, "noncausal": TINY_NONCAUSAL_CONFIG, "chunked": TINY_CHUNKED_CONFIG}


@functools.cache
def model_for(name: str) -> EncodecModel:
    configs = {"24khz": ENCODEC_24KHZ, "32khz": ENCODEC_32KHZ, "48khz": ENCODEC_48KHZ, **TINY}
    return random_model(configs[name], seed=1)


def model_encode(model: EncodecModel, audio: np.ndarray, n_q: int):
    """`EncodecModel.encode` of a single chunk: codes `[B, n_q, frames]`, scale or None."""
    bandwidth = next(
        b
        for b in model.config.target_bandwidths
        if model.config.num_quantizers_for_bandwidth(b) == n_q
    )
    out = model.encode(audio, bandwidth=bandwidth)
    assert out.audio_codes.shape[0] == 1, "one chunk expected"
    return np.asarray(out.audio_codes[0]), out.audio_scales[0]


@pytest.mark.parametrize(
    "name,length",
    [("24khz", 2_000), ("32khz", 2_600), ("48khz", 4_801), ("causal", 203), ("chunked", 77)],
)
def test_jitted_functions_equal_the_model(name, length):
    """The three published architectures (random weights, codebooks from their own residuals)
    and tiny ones: `jax.jit(encode)` gives EncodecModel's codes exactly, `jax.jit(decode)` its
    audio to float32 rounding."""
    model = model_for(name)
    config = model.config
    n_q = config.num_quantizers_for_bandwidth(config.target_bandwidths[-1])
    audio = random_audio(2, config.audio_channels, length, seed=7)
    codes, scale = jax.jit(F.encode, static_argnums=2)(model, audio, n_q)
    ref_codes, ref_scale = model_encode(model, audio, n_q)
    np.testing.assert_array_equal(np.asarray(codes), ref_codes)
    assert len(np.unique(ref_codes)) > 3, "codes should vary"
    if config.normalize:
        np.testing.assert_array_equal(np.asarray(scale), np.asarray(ref_scale))
    else:
        assert scale is None and ref_scale is None

    decoded = jax.jit(F.decode)(model, codes, scale)
    hop = config.hop_length
    assert decoded.shape == (2, config.audio_channels, codes.shape[-1] * hop)
    ref = model.decode(ref_codes[None], None if scale is None else [ref_scale]).audio_values
    np.testing.assert_allclose(np.asarray(decoded), np.asarray(ref), rtol=0, atol=AUDIO_ATOL)


def test_stages_compose_to_encode_and_decode():
    model = model_for("chunked")
    audio = jnp.asarray(random_audio(3, 2, 80, seed=2))
    mask = jnp.ones((3, 80)).at[1, 50:].set(0)
    embeddings, scale = jax.jit(F.embed)(model, audio, mask)
    codes = jax.jit(F.quantize, static_argnums=2)(model, embeddings, 2)
    enc_codes, enc_scale = jax.jit(F.encode, static_argnums=2)(model, audio, 2, mask)
    np.testing.assert_array_equal(np.asarray(codes), np.asarray(enc_codes))
    np.testing.assert_array_equal(np.asarray(scale), np.asarray(enc_scale))
    # the mask zeroes the padded samples, as EncodecModel.encode's padding_mask does
    ref = model.encode(np.asarray(audio), np.asarray(mask), bandwidth=16.0)
    np.testing.assert_array_equal(np.asarray(codes), np.asarray(ref.audio_codes[0]))
    quantized = jax.jit(F.dequantize)(model, codes)
    np.testing.assert_array_equal(
        np.asarray(jax.jit(F.decode_embeddings)(model, quantized, scale)),
        np.asarray(jax.jit(F.decode)(model, codes, scale)),
    )


@pytest.mark.parametrize("name", ["causal", "chunked"])
def test_vmap_over_a_leading_axis_equals_each_slice(name):
    """`jax.vmap` over an extra leading axis (augmentations, say) of `[V, B, C, L]` audio."""
    model = model_for(name)
    audio = jnp.asarray(random_audio(6, model.config.audio_channels, 64, seed=3)).reshape(
        3, 2, model.config.audio_channels, 64
    )
    encode = jax.jit(jax.vmap(functools.partial(F.encode, num_quantizers=2), in_axes=(None, 0)))
    codes, scale = encode(model, audio)
    assert codes.shape == (3, 2, 2, 16)
    for v in range(3):
        single, single_scale = jax.jit(F.encode, static_argnums=2)(model, audio[v], 2)
        np.testing.assert_array_equal(np.asarray(codes[v]), np.asarray(single))
        if scale is not None:
            np.testing.assert_array_equal(np.asarray(scale[v]), np.asarray(single_scale))
    decoded = jax.jit(jax.vmap(F.decode, in_axes=(None, 0, 0)))(model, codes, scale)
    assert decoded.shape == (3, 2, model.config.audio_channels, 64)


def test_straight_through_quantizer_passes_the_gradient_unchanged():
    model = model_for("causal")
    embeddings = jnp.asarray(np.random.default_rng(0).standard_normal((2, 9, 8)), jnp.float32)
    weights = jnp.asarray(np.random.default_rng(1).standard_normal((2, 9, 8)), jnp.float32)

    def loss(e):
        quantized, _ = F.quantize_st(model, e, 3)
        return jnp.sum(quantized * weights)

    value, grad = jax.jit(jax.value_and_grad(loss))(embeddings)
    np.testing.assert_array_equal(np.asarray(grad), np.asarray(weights))
    # the forward value is the dequantized codes (x + (q - x): q to float32 rounding)
    quantized, codes = jax.jit(F.quantize_st, static_argnums=2)(model, embeddings, 3)
    np.testing.assert_allclose(
        np.asarray(quantized), np.asarray(jax.jit(F.dequantize)(model, codes)), atol=1e-6
    )
    np.testing.assert_allclose(float(value), float(jnp.sum(quantized * weights)), atol=1e-6)


@pytest.mark.parametrize("name", list(TINY))
def test_grad_of_a_loss_on_decoded_audio_reaches_the_encoder(name):
    """A codec-space training loss: encoder -> straight-through RVQ -> decoder -> L1 to the
    input. `jax.grad` over the model's parameters gives finite, non-zero gradients at the
    encoder's first conv (and the codebooks, buffers, get none)."""
    model = model_for(name)
    audio = jnp.asarray(random_audio(2, model.config.audio_channels, 64, seed=4))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def loss_fn(params, audio):
        m = nnx.merge(graphdef, params, rest)
        embeddings, scale = F.embed(m, audio)
        quantized, _ = F.quantize_st(m, embeddings, 2)
        return jnp.mean(jnp.abs(F.decode_embeddings(m, quantized, scale) - audio))

    grads = jax.grad(loss_fn)(params, audio)
    first = grads["encoder"]["layers"][0]["conv"]
    for name_, g in first.items():
        g = np.asarray(g[...])
        assert np.isfinite(g).all() and np.abs(g).max() > 0, name_
    flat = jax.tree.leaves(grads)
    assert all(np.isfinite(np.asarray(g)).all() for g in flat)
    assert "codebook" not in str(jax.tree_util.tree_structure(grads))


SHARDED = textwrap.dedent(
    """
    import sys
    import jax, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from encodec_jax import EncodecModel, functional as F
    from encodec_jax.testing import random_audio

    assert jax.device_count() == 8
    mesh = Mesh(np.array(jax.devices()), ("data",))
    batch = NamedSharding(mesh, P("data"))
    for directory in sys.argv[1:]:
        model = EncodecModel.from_pretrained(directory)
        config = model.config
        audio = random_audio(16, config.audio_channels, 80, seed=5)

        @jax.jit
        def step(model, audio):
            codes, scale = F.encode(model, audio, 2)
            return codes, scale, F.decode(model, codes, scale)

        codes, scale, decoded = step(model, jax.device_put(audio, batch))
        assert codes.sharding.spec[0] == "data", codes.sharding
        assert len(codes.sharding.device_set) == 8
        bandwidth = config.target_bandwidths[1]
        ref = model.encode(audio, bandwidth=bandwidth)
        np.testing.assert_array_equal(np.asarray(codes), np.asarray(ref.audio_codes[0]))
        ref_audio = model.decode(ref.audio_codes, ref.audio_scales).audio_values
        np.testing.assert_allclose(np.asarray(decoded), np.asarray(ref_audio), atol=1e-5)
    print("ok")
    """
)


def test_sharded_batch_on_eight_devices_equals_the_model(tmp_path):
    """A batch split over 8 simulated CPU devices, in a jitted step the user writes."""
    directories = []
    for name in ("causal", "chunked"):
        model_for(name).save_pretrained(tmp_path / name)
        directories.append(str(tmp_path / name))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run(
        [sys.executable, "-c", SHARDED, *directories],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
