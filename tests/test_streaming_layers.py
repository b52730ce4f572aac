"""The state logic of streaming, layer by layer, in float64: every layer kind streamed in chunks
of 1, 2 and 7 frames equals the offline layer on the whole signal to ~1e-12.

float32 cannot show that the streamed computation is the offline one (XLA blocks sums
differently for other shapes: differences of 1e-6 that look like bugs and hide them); in float64
those differences are ~1e-16, so anything above 1e-12 is a wrong state, lag, start or end.
Each stack runs the first step with exactly its warmup frames, then equal steps, then the flush
of a partial last frame, as `streaming.Encoder` does.
"""

from __future__ import annotations

import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from encodec_jax import EncodecConfig
from encodec_jax.modules import (
    ELU,
    EncodecConv1d,
    EncodecConvTranspose1d,
    EncodecDecoder,
    EncodecEncoder,
    EncodecLSTM,
)
from encodec_jax.streaming import StreamingError
from encodec_jax.streaming import layers as stream_layers

TOLERANCE = 1e-12  # float64, values of order 1
CHUNKS = (1, 2, 7)
MAX_CHUNK = max(CHUNKS)


def conv_stack(config: EncodecConfig, strides: str):
    """Convolutions of every kernel size, stride and dilation EnCodec uses, and more."""
    rngs = nnx.Rngs(0)

    def conv(c_in, c_out, kernel, stride=1, dilation=1):
        return EncodecConv1d(config, c_in, c_out, kernel, stride, dilation, rngs=rngs)

    if strides == "2-4-8":  # kernel 2 * stride as EnCodec's, dilations 2 and 3, even kernels
        return [
            conv(1, 3, 7),
            ELU(),
            conv(3, 3, 3, dilation=2),
            conv(3, 4, 4, stride=2),
            conv(4, 4, 1),
            conv(4, 5, 8, stride=4),
            ELU(),
            conv(5, 4, 16, stride=8),
            conv(4, 4, 3, dilation=3),
            conv(4, 3, 8),
        ]
    # odd strides, a kernel equal to its stride (no context at all), a dilated kernel 5
    return [conv(1, 3, 3), conv(3, 4, 6, stride=3), conv(4, 4, 10, stride=5), conv(4, 3, 7, 7)]


def seanet_config(causal: bool, ratios=(3, 2)) -> EncodecConfig:
    """A SEANet with two residual layers (dilations 1, 3), odd ratios, both LSTM layers, and
    for the causal one a transposed-conv trim split between left and right."""
    return EncodecConfig(
        num_filters=4,
        hidden_size=6,
        upsampling_ratios=ratios,
        num_residual_layers=2,
        dilation_growth_rate=3,
        kernel_size=5,
        last_kernel_size=3,
        use_causal_conv=causal,
        trim_right_ratio=0.5 if causal else 1.0,
        use_conv_shortcut=causal,
        codebook_size=16,
        target_bandwidths=(48.0,),
    )


def float64(tree):
    return jax.tree.map(
        lambda a: a.astype(jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree
    )


@jax.jit
def offline(layers, x):
    for layer in layers:
        x = layer(x)
    return x


_step = jax.jit(stream_layers.step, static_argnums=(0, 4))
_flush = jax.jit(stream_layers.flush, static_argnums=0)


def stream_in_chunks(p, w, x: jax.Array, chunk: int) -> jax.Array:
    """`x` `[B, T, C]` through the stack: a first step of the warmup frames, steps of `chunk`
    frames, a flush of the rest (padded to `MAX_CHUNK` frames, so one flush program serves
    every chunk size); the outputs joined."""
    per = int(p.per_frame)
    batch, length, _ = x.shape
    state = stream_layers.init(p, batch, x.dtype)
    first = p.frames * per
    state, y = _step(p, w, state, x[:, :first], True)
    outputs, pos = [y[:, p.lag_out :]], first
    while pos + chunk * per <= length:
        state, y = _step(p, w, state, x[:, pos : pos + chunk * per], False)
        outputs.append(y)
        pos += chunk * per
    tail = jnp.pad(x[:, pos:], ((0, 0), (0, MAX_CHUNK * per - (length - pos)), (0, 0)))
    y, count = _flush(p, w, state, tail, length - pos)
    outputs.append(y[:, : int(count)])
    return jnp.concatenate(outputs, axis=1)


def check_stack(layers, per_frame: int, in_channels: int, frames: int, chunks=CHUNKS):
    """Stream a random signal of `frames` frames and a partial one through `layers` in float64
    and compare with the offline layers. Returns the plan."""
    layers = float64(layers)
    p = stream_layers.plan(layers, per_frame)
    w = stream_layers.weights(layers, p)
    length = frames * per_frame + per_frame // 2 + 1
    rng = np.random.default_rng(frames)
    x = jnp.asarray(rng.standard_normal((2, length, in_channels)))
    expected = offline(layers, x)
    for chunk in chunks:
        streamed = stream_in_chunks(p, w, x, chunk)
        assert streamed.shape == expected.shape, (chunk, streamed.shape, expected.shape)
        error = float(jnp.max(jnp.abs(streamed - expected)))
        assert error < TOLERANCE, f"chunks of {chunk} frames: max error {error:.3g}"
    return p


SLOW = pytest.mark.slow  # beyond the default suite's time budget; run with -m slow
CONV_CASES = [
    pytest.param(causal, pad_mode, strides, marks=SLOW, id=name)
    for causal, pad_mode, strides, name in [
        (True, "reflect", "2-4-8", "causal-reflect-2-4-8"),
        (True, "reflect", "3-5-7", "causal-reflect-3-5-7"),
        (False, "reflect", "2-4-8", "centred-reflect-2-4-8"),
        (False, "reflect", "3-5-7", "centred-reflect-3-5-7"),
        (True, "constant", "2-4-8", "causal-constant"),
        (False, "constant", "3-5-7", "centred-constant"),
        (True, "replicate", "3-5-7", "causal-replicate"),
        (False, "replicate", "2-4-8", "centred-replicate"),
    ]
]


@pytest.mark.parametrize("causal,pad_mode,strides", CONV_CASES)
def test_convolutions_stream_exactly(causal, pad_mode, strides):
    """Kernels 1, 3, 4, 6, 7, 8, 10, 16; strides 1, 2, 3, 4, 5, 7, 8; dilations 1, 2, 3; each
    padding mode, causal and centred, in chunks of 1, 2 and 7 frames. The reflect start is the
    hard part (a layer's first outputs read its own later inputs). With -m slow: the default
    suite streams reflect-padded convolutions through the SEANet test below."""
    config = EncodecConfig(use_causal_conv=causal, pad_mode=pad_mode)
    per_frame = {"2-4-8": 64, "3-5-7": 105}[strides]
    with jax.enable_x64(True):
        p = check_stack(conv_stack(config, strides), per_frame, 1, 11)
    if causal:
        assert p.lag_out == 0  # a causal stack never waits for later frames


@pytest.mark.parametrize(
    "causal,ratios,chunks",
    [
        # the default suite's share: one block (stride 3), 1-frame steps
        pytest.param(True, (3,), (1,), id="causal-1"),
        pytest.param(True, (3, 2), CHUNKS, marks=SLOW, id="causal"),
        pytest.param(False, (3, 2), CHUNKS, marks=SLOW, id="centred"),
    ],
)
def test_seanet_encoder_and_decoder_stream_exactly(causal, ratios, chunks):
    """Residual blocks (1x1-conv and identity shortcuts), the two-layer LSTM and transposed
    convolutions (trim split 1:1 when causal with trim_right_ratio 0.5, centred otherwise),
    through the encoder and decoder stacks as `streaming.codec` streams them."""
    config = seanet_config(causal, ratios)
    with jax.enable_x64(True):
        encoder = EncodecEncoder(config, rngs=nnx.Rngs(1))
        decoder = EncodecDecoder(config, rngs=nnx.Rngs(2))
        enc = check_stack(list(encoder.layers), config.hop_length, 1, 16, chunks)
        dec = check_stack(list(decoder.layers), 1, config.hidden_size, 16, chunks)
    # The transposed convs trim half of their padding on the left: their outputs lag by it,
    # and the decoder's lag is exactly what its receptive field says (no rounding).
    hop = config.hop_length
    decoder_right = decoder.layers[0].receptive_field.right + decoder.convs_receptive_field.right
    assert dec.lag_out == decoder_right * hop
    # The encoder lags by whole frames: its look-ahead past a frame's end, rounded up.
    # (the LSTM and ELU after the convs never look ahead; the last conv does, in frames)
    lookahead = encoder.convs_receptive_field.right + encoder.layers[-1].receptive_field.right * hop
    assert enc.lag_out == max(0, math.ceil((lookahead - (hop - 1)) / hop))
    if causal:
        assert enc.lag_out == 0 and dec.lag_out > 0
    assert enc.per_frame == hop and enc.rate == Fraction(1, hop)


@SLOW
def test_single_layers_stream_exactly():
    """One layer at a time, from a stack's start (no incoming lag): an LSTM, a transposed
    convolution of each stride 1-8 (kernel 2 * stride) and a replicate-padded one-frame conv."""
    with jax.enable_x64(True):
        config = EncodecConfig(use_causal_conv=False)
        rngs = nnx.Rngs(3)
        check_stack([EncodecLSTM(config, 5, rngs=rngs)], 1, 5, 12)
        for stride in range(1, 9):
            layer = EncodecConvTranspose1d(config, 3, 2, 2 * stride, stride, rngs=rngs)
            check_stack([layer], 1, 3, 9, chunks=(1, 7) if stride in (1, 8) else (2,))


@pytest.mark.parametrize(
    "causal,pad_mode,plan",
    [
        (True, "reflect", (7, 7, 6, 0)),  # reflects inputs 6..1: waits for 7 of them
        (True, "replicate", (1, 1, 6, 0)),
        (True, "constant", (0, 1, 6, 0)),
        (False, "reflect", (4, 4, 6, 3)),  # 3 each side: lags 3, reflects 3..1 and at the end
    ],
)
def test_start_and_lag_of_a_kernel_7_conv(causal, pad_mode, plan):
    """(need, frames, keep, lag) of the 24 kHz encoder's last conv, at the frame rate."""
    config = EncodecConfig(use_causal_conv=causal, pad_mode=pad_mode)
    conv = nnx.eval_shape(lambda: EncodecConv1d(config, 4, 4, 7, rngs=nnx.Rngs(0)))  # no values
    p = stream_layers.plan([conv], per_frame=1).parts[0]
    assert (p.need, p.frames, p.keep, p.lag_out) == plan


def test_layers_that_cannot_stream_are_refused():
    def abstract(config, layer, *args):  # planning reads settings and shapes, not values
        return nnx.eval_shape(lambda: layer(config, *args, rngs=nnx.Rngs(0)))

    circular = abstract(EncodecConfig(pad_mode="circular"), EncodecConv1d, 1, 1, 3)
    with pytest.raises(StreamingError, match="circular"):
        stream_layers.plan([circular], 1)
    grouped = abstract(EncodecConfig(norm_type="time_group_norm"), EncodecConv1d, 1, 1, 3)
    with pytest.raises(StreamingError, match="time_group_norm"):
        stream_layers.plan([grouped], 1)
    odd = abstract(EncodecConfig(), EncodecConvTranspose1d, 1, 1, 5, 2)
    with pytest.raises(StreamingError, match="multiple of its stride"):
        stream_layers.plan([odd], 1)


def test_state_size_is_fixed_by_the_layers():
    """The state is what the receptive fields say, whatever the chunk size: for a conv, its
    left field (kernel 7: 6 inputs); for a transposed conv, one previous input frame. (Shapes
    only: traced, not run.)"""
    config = EncodecConfig()
    rngs = nnx.Rngs(0)
    conv = EncodecConv1d(config, 4, 4, 7, rngs=rngs)
    transposed = EncodecConvTranspose1d(config, 4, 4, 8, 4, rngs=rngs)
    p = stream_layers.plan([conv, transposed], 1)
    state = stream_layers.init(p, 3, jnp.float32)
    assert [s.shape for s in state] == [(3, 6, 4), (3, 1, 4)]
    w = stream_layers.weights([conv, transposed], p)
    x = jax.ShapeDtypeStruct((3, 7, 4), jnp.float32)
    state, _ = jax.eval_shape(lambda s, x: stream_layers.step(p, w, s, x, True), state, x)
    for chunk in (1, 5):
        x = jax.ShapeDtypeStruct((3, chunk, 4), jnp.float32)
        new, y = jax.eval_shape(lambda s, x: stream_layers.step(p, w, s, x, False), state, x)
        assert y.shape == (3, 4 * chunk, 4)
        assert jax.tree.map(jnp.shape, new) == jax.tree.map(jnp.shape, state)
    assert math.isclose(float(p.rate), 4.0)
