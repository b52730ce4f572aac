"""The math of EnCodec as small pure functions, each testable on its own.

Activations are channels-last, `[batch, time, channels]`; weights keep PyTorch's layouts
(`Conv1d`: `[out, in, kernel]`, `ConvTranspose1d`: `[in, out, kernel]`, LSTM: `[4*hidden, in]`)
so that a checkpoint loads without transposes and exports back unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from encodec_jax import cpu_lstm

_CONV_DIMS = ("NWC", "OIW", "NWC")
# A convolution with at most this many weights per input channel runs as a matmul (conv1d).
_SMALL_CONV_SIDE = 32
_JNP_PAD_MODES = {
    "constant": "constant",
    "reflect": "reflect",
    "replicate": "edge",
    "circular": "wrap",
}


def conv_padding(
    length: int, kernel_size: int, stride: int, dilation: int, causal: bool
) -> tuple[int, int]:
    """Left and right padding of EnCodec's padded convolution for an input of `length` steps.

    The input is padded so that the strided convolution covers every sample and yields
    `ceil(length / stride)` frames. Integer arithmetic throughout: transformers computes the frame
    count in float32, which can come out one frame short above 2**24 samples; the original
    `encodec` package uses Python floats and agrees with this function there.
    """
    effective_kernel = (kernel_size - 1) * dilation + 1
    padding_total = effective_kernel - stride
    extra = -(-length // stride) * stride - length  # ceil(length / stride) * stride - length
    if causal:
        return padding_total, extra
    right = padding_total // 2
    return padding_total - right, right + extra


def pad1d(x: jax.Array, left: int, right: int, mode: str) -> jax.Array:
    """Pad the time axis of `[B, T, C]` like PyTorch's `F.pad(mode=...)`.

    Reflect padding wider than the signal is allowed, as in the reference: the signal first gets
    zeros on the right so that one reflection suffices, and those zeros are cut off again, so they
    show up in the result ([1, 2, 3] padded (6, 0) gives [0, 0, 0, 0, 3, 2, 1, 2, 3]).
    """
    widths = ((0, 0), (left, right), (0, 0))
    if mode != "reflect":
        return jnp.pad(x, widths, mode=_JNP_PAD_MODES[mode])
    length = x.shape[1]
    extra = max(left, right) - length + 1 if length <= max(left, right) else 0
    if extra:
        x = jnp.pad(x, ((0, 0), (0, extra), (0, 0)))
    padded = jnp.pad(x, widths, mode="reflect")
    return padded[:, : padded.shape[1] - extra]


def weight_norm(weight_v: jax.Array, weight_g: jax.Array) -> jax.Array:
    """PyTorch's weight norm along dim 0: `v * (g / ||v||)`, the norm over every other dim."""
    axes = tuple(range(1, weight_v.ndim))
    norm = jnp.sqrt(jnp.sum(weight_v * weight_v, axis=axes, keepdims=True))
    return weight_v * (weight_g / norm)


def conv1d(
    x: jax.Array, weight: jax.Array, bias: jax.Array, stride: int = 1, dilation: int = 1
) -> jax.Array:
    """VALID 1-D convolution. x: `[B, T, Cin]`; weight: `[Cout, Cin, K]` -> `[B, T', Cout]`.

    XLA's CPU convolution is slow with very few output channels (the decoder's last layer makes
    1-2 audio channels): those run as one matmul to K values per step, summed at their shifts
    (about 2x faster there; the same trick for few *input* channels measured slower).
    """
    c_out, c_in, kernel = weight.shape
    steps = (x.shape[1] - (kernel - 1) * dilation - 1) // stride + 1

    def tap(a: jax.Array, k: int) -> jax.Array:  # a[t * stride + k * dilation] for every t
        start = k * dilation
        return lax.slice_in_dim(a, start, start + (steps - 1) * stride + 1, stride, axis=1)

    if kernel > 1 and c_out * kernel <= _SMALL_CONV_SIDE:
        z = x @ weight.transpose(1, 2, 0).reshape(c_in, kernel * c_out)  # [B, T, K*Cout]
        z = z.reshape(*z.shape[:2], kernel, c_out)
        out = sum(tap(z[:, :, k], k) for k in range(kernel))
        return out + bias
    y = lax.conv_general_dilated(
        x,
        weight,
        window_strides=(stride,),
        padding="VALID",
        rhs_dilation=(dilation,),
        dimension_numbers=_CONV_DIMS,
    )
    return y + bias


def conv_matrix(weight: jax.Array) -> jax.Array:
    """A `Conv1d` weight `[Cout, Cin, K]` as the matrix `[K * Cin, Cout]` of `conv1d_matmul`."""
    c_out, c_in, kernel = weight.shape
    return weight.transpose(2, 1, 0).reshape(kernel * c_in, c_out)


def conv1d_matmul(
    x: jax.Array, matrix: jax.Array, bias: jax.Array, kernel: int, stride: int, dilation: int
) -> jax.Array:
    """VALID 1-D convolution as one matmul over the stacked taps: x `[B, T, Cin]`, matrix
    `[K * Cin, Cout]` (`conv_matrix`) -> `[B, T', Cout]`. For few output steps (streaming) with
    the matrix laid out once, this reads each weight once per call; XLA's convolution re-lays
    out its kernel on every call, which dominates a call of a few steps."""
    steps = (x.shape[1] - (kernel - 1) * dilation - 1) // stride + 1
    taps = [
        lax.slice_in_dim(x, k * dilation, k * dilation + (steps - 1) * stride + 1, stride, axis=1)
        for k in range(kernel)
    ]
    columns = taps[0] if kernel == 1 else jnp.concatenate(taps, axis=-1)
    return columns @ matrix + bias


def conv_transpose1d(x: jax.Array, weight: jax.Array, bias: jax.Array, stride: int) -> jax.Array:
    """Full (untrimmed) transposed convolution. x: `[B, T, Cin]`; weight: `[Cin, Cout, K]`.

    Returns `[B, (T - 1) * stride + K, Cout]`. When the kernel is a multiple of the stride (EnCodec
    always uses kernel = 2 * stride) it runs over kernel blocks (`transpose_blocks_conv`), which
    skips the multiplications by inserted zeros that a dilated convolution would do.
    """
    _, c_out, kernel = weight.shape
    if kernel % stride:
        flipped = jnp.flip(weight, axis=2).transpose(1, 0, 2)  # [Cout, Cin, K]
        y = lax.conv_general_dilated(
            x,
            flipped,
            window_strides=(1,),
            padding=[(kernel - 1, kernel - 1)],
            lhs_dilation=(stride,),
            dimension_numbers=_CONV_DIMS,
        )
        return y + bias
    blocks = kernel // stride
    out = transpose_blocks_conv(x, transpose_weight_blocks(weight, stride), blocks - 1)
    return out.reshape(x.shape[0], -1, c_out) + bias


def transpose_weight_blocks(weight: jax.Array, stride: int) -> jax.Array:
    """`[Cin, Cout, K]` -> `[K // stride, Cin, stride * Cout]`. Output block t (samples
    `[t * stride, (t + 1) * stride)`) is the sum over blocks k of `x[t - k] @ w[k]`."""
    c_in, c_out, kernel = weight.shape
    w = weight.reshape(c_in, c_out, kernel // stride, stride).transpose(2, 0, 3, 1)
    return w.reshape(kernel // stride, c_in, stride * c_out)


def transpose_blocks_conv(x: jax.Array, w: jax.Array, padding: int) -> jax.Array:
    """The block sum `out[t] = sum_k x[t - k] @ w[k]` (`w`: `transpose_weight_blocks`) as one
    XLA convolution of `x` (zero-padded by `padding` steps on each side) with the blocks in
    reverse order, `[B, T + 2 * padding - blocks + 1, width]`.

    On the CPU this is 1.6-3x the same sum as matmuls (the shifted inputs stacked side by side,
    or one product per block padded into place and added), which write and re-read block-sized
    copies of the activations: 218 against 625 ms for the 32 kHz decoder's last layer at
    4 x 10 s (`benchmarks/RESULTS.md`)."""
    taps = jnp.flip(w, axis=0)  # a convolution correlates: tap j meets x[t + j - padding]
    return lax.conv_general_dilated(
        x, taps, (1,), [(padding, padding)], dimension_numbers=("NWC", "WIO", "NWC")
    )


# Streaming steps are a few frames long, where the convolution's per-call kernel layout costs
# more than it saves: there the block sum stays a matmul. Measured on the CPU
# (benchmarks/ablations.py, 8 x 10 s): stacking the shifted inputs is as fast or up to 1.3x
# faster where a block's output is 256 or more wide, and 0.67x at 64 wide.
_STACKED_TRANSPOSE_MIN_WIDTH = 256


def transpose_blocks_valid(x: jax.Array, w: jax.Array) -> jax.Array:
    """The output blocks whose inputs all lie in `x`: block t (t = blocks - 1 ... T - 1) is the sum
    over k of `x[t - k] @ w[k]`, `[B, T - blocks + 1, width]`. Streaming calls it with the
    previous `blocks - 1` inputs in front of a chunk. The products of `conv_transpose1d`, as
    matmuls (one over the stacked shifted inputs where blocks are wide, else one per block,
    summed in block order), so the sums may round differently from its convolution."""
    blocks, c_in, width = w.shape
    steps = x.shape[1] - blocks + 1
    shifted = [x[:, blocks - 1 - k : blocks - 1 - k + steps] for k in range(blocks)]
    if width >= _STACKED_TRANSPOSE_MIN_WIDTH:
        return jnp.concatenate(shifted, axis=-1) @ w.reshape(blocks * c_in, width)
    out = None
    for k in range(blocks):
        y = shifted[k] @ w[k]
        out = y if out is None else out + y
    return out


def group_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float = 1e-5) -> jax.Array:
    """GroupNorm with a single group over `[B, T, C]`: statistics over time and channels."""
    mean = jnp.mean(x, axis=(1, 2), keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=(1, 2), keepdims=True)
    return (x - mean) * lax.rsqrt(var + eps) * scale + bias


def lstm_layer(
    x: jax.Array, w_ih: jax.Array, w_hh: jax.Array, b_ih: jax.Array, b_hh: jax.Array
) -> jax.Array:
    """One unidirectional LSTM layer over `[B, T, C]` from a zero state, PyTorch gate order i,f,g,o.

    The input projection does not depend on the recurrence: on the CPU the kernel computes it
    for a few steps at a time between them; elsewhere it is one large matmul before the scan, and
    only `h @ w_hh.T` stays inside the loop.
    """
    return _lstm_layer(x, w_ih.T, w_hh.T, b_ih + b_hh)


def lstm_scan(
    x: jax.Array,
    w_ih_t: jax.Array,
    w_hh_t: jax.Array,
    bias: jax.Array,
    packed: tuple[jax.Array, jax.Array] | None,
    state: tuple[jax.Array, jax.Array],
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """One LSTM layer over `[B, T, C]` from `state` = (h, c), each `[B, H]`, with the weights
    transposed (`w_ih_t` `[C, 4H]`, `w_hh_t` `[H, 4H]`) and the two biases summed: (outputs
    `[B, T, H]`, final (h, c)). Streaming carries the final state into the next chunk, with the
    weights laid out once (`packed`: `lstm_packed_weights(w_ih_t, w_hh_t)`, or None to pack on
    every call). The arithmetic of `lstm_layer` (from a zero state) step for step, forward only:
    streaming needs no gradient, so it runs the layer directly rather than through its
    hand-written gradient.
    """
    state, hs, _, _ = _lstm_forward(x, w_ih_t, w_hh_t, bias, state, packed, False)
    return hs, state


def lstm_packed_weights(w_ih_t: jax.Array, w_hh_t: jax.Array) -> tuple[jax.Array, jax.Array] | None:
    """The weights `[C, 4H]` and `[H, 4H]` laid out for the CPU kernel (`cpu_lstm.pack`), or
    None where the layer will run as a scan (no kernel compiled, not a CPU backend, or not
    float32)."""
    float32 = w_ih_t.dtype == w_hh_t.dtype == jnp.float32
    if cpu_lstm.available and jax.default_backend() == "cpu" and float32:
        return cpu_lstm.pack(w_ih_t), cpu_lstm.pack(w_hh_t)
    return None


@jax.custom_vjp
def _lstm_layer(x: jax.Array, w_ih_t: jax.Array, w_hh_t: jax.Array, bias: jax.Array) -> jax.Array:
    """`lstm_layer` with the weights transposed and the biases summed: hidden states `[B, T, H]`.

    Its gradient is written out (`_lstm_layer_bwd`) because the one JAX derives from the scan
    adds each step's outer product into the `[H, 4H]` weight gradient inside the loop, a full
    pass over the weights per step (most of a training step's time on a CPU for the 1024-wide
    LSTMs); here the loop only carries the state, and the weight gradients are one matmul each
    over all steps after it.
    """
    return _lstm_forward(x, w_ih_t, w_hh_t, bias, training=False)[1]


def _lstm_forward(x, w_ih_t, w_hh_t, bias, state=None, packed=None, training=True):
    """(final (h, c), hidden states, and with `training` the cell states and gate
    pre-activations, else None and None), the last three `[B, T, ...]`, from `state` = (h, c) or
    zeros.

    On a CPU, in float32, with the extension compiled, the layer is `cpu_lstm`'s custom call
    (2x the scan from batch 4; `benchmarks/RESULTS.md`); elsewhere a matmul and a `lax.scan`.
    The two round differently (summation order, sigmoid and tanh), each the same way for every
    batch size and position in the batch."""
    hidden = w_hh_t.shape[0]
    if state is None:
        zeros = jnp.zeros((x.shape[0], hidden), x.dtype)
        state = (zeros, zeros)

    def scan():
        gates_x = (x @ w_ih_t).swapaxes(0, 1) + bias  # [T, B, 4H]
        final, hs, cs, gates = _xla_lstm_scan(gates_x, w_hh_t, state)
        hs, cs, gates = (a.swapaxes(0, 1) for a in (hs, cs, gates))
        return (final, hs, cs, gates) if training else (final, hs, None, None)

    arrays = (x, w_ih_t, w_hh_t, bias, *state)
    if not cpu_lstm.available or any(a.dtype != jnp.float32 for a in arrays):
        return scan()

    def kernel():
        # Without weights packed beforehand, the call packs them itself (cpu_lstm.layer).
        weights = (w_ih_t, w_hh_t) if packed is None else packed
        hs, c_last, cs, gates = cpu_lstm.layer(
            x, weights, bias, state, training, packed=packed is not None
        )
        final = (hs[:, -1], c_last) if x.shape[1] else state
        return final, hs, cs, gates

    return lax.platform_dependent(cpu=kernel, default=scan)


def _xla_lstm_scan(gates_x: jax.Array, w_hh_t: jax.Array, state):
    """The recurrence as a `lax.scan` over time-major input projections `[T, B, 4H]` with the
    bias added: every backend, every dtype. (final (h, c), hs, cs, gates), the last three
    `[T, B, ...]`."""
    recurrent_product = _recurrent_product(gates_x.shape[1], w_hh_t)

    def step(carry, gx):
        gates = gx + recurrent_product(carry[0])
        h, c = lstm_cell(gates, carry[1])
        return (h, c), (h, c, gates)

    state, (hs, cs, gates) = lax.scan(step, state, gates_x)
    return state, hs, cs, gates


def _recurrent_product(batch: int, w_hh_t: jax.Array):
    """`h [B, H] -> h @ w_hh_t [B, 4H]` in the form measured fastest for this static batch size.

    At batch 1 a matrix-vector product of the `[4H, H]` weight (rows contiguous along the
    contraction, XLA's tiled gemv) takes 0.12 ms per step at 1024 units against 0.15-0.23 ms for
    `h @ w_hh_t` (512 units: 0.037 against 0.038-0.053 ms); at batch 2 and 4 it is 1.8-2.2x
    slower than the dot, which wins from there on (`benchmarks/RESULTS.md`, "The recurrent
    product: forms measured"). The forms sum in different orders (outputs differ by ~4e-7), so
    the choice is made once per traced shape and a batch always gets the same numbers. Other
    forms measured and rejected there: multiply-reduce (XLA now rewrites it into the same dot),
    the weight in column tiles, split contractions.
    """
    if batch == 1:
        w_hh = w_hh_t.T  # [4H, H]; loop-invariant, and transpose(transpose(w)) folds away
        return lambda h: (w_hh @ h[0])[None]
    return lambda h: h @ w_hh_t


def _lstm_layer_fwd(x, w_ih_t, w_hh_t, bias):
    _, hs, cs, gates = _lstm_forward(x, w_ih_t, w_hh_t, bias)
    return hs, (x, hs, cs, gates, w_ih_t, w_hh_t)


def _lstm_layer_bwd(residuals, d_hs):
    x, hs, cs, gates, w_ih_t, w_hh_t = residuals
    # The loop runs over time: the saved arrays are batch-major, [B, T, ...].
    hs, cs, gates, d_hs = (a.swapaxes(0, 1) for a in (hs, cs, gates, d_hs))
    zeros = jnp.zeros_like(hs[0])
    h_prev = jnp.concatenate([zeros[None], hs[:-1]])
    c_prev = jnp.concatenate([zeros[None], cs[:-1]])

    def step(carry, inputs):
        dh_next, dc_next = carry
        d_h, c, c_before, pre = inputs
        i, f, g, o = jnp.split(pre, 4, axis=-1)
        i, f, g, o = jax.nn.sigmoid(i), jax.nn.sigmoid(f), jnp.tanh(g), jax.nn.sigmoid(o)
        dh = d_h + dh_next
        tanh_c = jnp.tanh(c)
        dc = dc_next + dh * o * (1 - tanh_c * tanh_c)
        d_gates = jnp.concatenate(
            [
                dc * g * i * (1 - i),
                dc * c_before * f * (1 - f),
                dc * i * (1 - g * g),
                dh * tanh_c * o * (1 - o),
            ],
            axis=-1,
        )
        return (d_gates @ w_hh_t.T, dc * f), d_gates

    _, d_gates = lax.scan(step, (zeros, zeros), (d_hs, cs, c_prev, gates), reverse=True)
    d_w_hh = h_prev.reshape(-1, h_prev.shape[-1]).T @ d_gates.reshape(-1, d_gates.shape[-1])
    d_gates = d_gates.swapaxes(0, 1)  # [B, T, 4H]
    d_x = d_gates @ w_ih_t.T
    d_w_ih = x.reshape(-1, x.shape[-1]).T @ d_gates.reshape(-1, d_gates.shape[-1])
    return d_x, d_w_ih, d_w_hh, jnp.sum(d_gates, axis=(0, 1))


_lstm_layer.defvjp(_lstm_layer_fwd, _lstm_layer_bwd)


def lstm_cell(gates: jax.Array, c: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One LSTM step from its summed gate pre-activations `[B, 4H]` (order i, f, g, o): (h, c)."""
    i, f, g, o = jnp.split(gates, 4, axis=-1)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    return jax.nn.sigmoid(o) * jnp.tanh(c), c


def nearest_code(x: jax.Array, embed: jax.Array) -> jax.Array:
    """Index of the nearest codebook vector for each row of `x` `[..., D]`; embed `[bins, D]`.

    The distance is written exactly as the reference writes it, `-(|x|^2 - 2 x.E + |E|^2)`, and
    argmax keeps the first index on ties: near-ties are common in trained codebooks, and any
    reformulation (dropping the constant `|x|^2`, say) flips some of them.
    """
    dist = -(
        jnp.sum(x * x, axis=-1, keepdims=True) - 2 * x @ embed.T + jnp.sum(embed * embed, axis=-1)
    )
    return jnp.argmax(dist, axis=-1).astype(jnp.int32)


def rvq_encode(x: jax.Array, embeds: jax.Array) -> jax.Array:
    """Residual vector quantization. x: `[B, T, D]`; embeds: `[n_q, bins, D]` -> `[B, n_q, T]`."""

    def step(residual, embed):
        codes = nearest_code(residual, embed)
        return residual - embed[codes], codes

    _, codes = lax.scan(step, x, embeds)
    return codes.transpose(1, 0, 2)


def rvq_decode(codes: jax.Array, embeds: jax.Array) -> jax.Array:
    """Sum of the looked-up vectors, in codebook order. codes: `[B, n_q, T]` -> `[B, T, D]`."""

    def step(total, inputs):
        embed, idx = inputs
        return total + embed[idx], None

    start = jnp.zeros((*codes.shape[::2], embeds.shape[-1]), embeds.dtype)
    total, _ = lax.scan(step, start, (embeds, codes.transpose(1, 0, 2)))
    return total


def torch_linspace(start: float, end: float, steps: int) -> np.ndarray:
    """`torch.linspace(start, end, steps)` in float32, bit for bit.

    PyTorch does not compute `start + i * step` throughout: the upper half counts down from `end`,
    which rounds differently from the naive formula.
    """
    if steps == 1:
        return np.array([start], np.float32)
    start32, end32 = np.float32(start), np.float32(end)
    step = (end32 - start32) / np.float32(steps - 1)
    i = np.arange(steps)
    low = start32 + step * i.astype(np.float32)
    high = end32 - step * (steps - 1 - i).astype(np.float32)
    return np.where(i < steps // 2, low, high).astype(np.float32)


def overlap_add_weight(frame_length: int) -> np.ndarray:
    """Triangle window of the reference's linear overlap-add, peak in the middle of the frame."""
    t = torch_linspace(0.0, 1.0, frame_length + 2)[1:-1]
    return (np.float32(0.5) - np.abs(t - np.float32(0.5))).astype(np.float32)


def overlap_add(frames: jax.Array, lengths: Sequence[int], stride: int) -> jax.Array:
    """Linear overlap-add of decoded chunks, in the reference's order of float operations.

    frames: `[n, ..., F]`, chunk i valid for its first `lengths[i]` samples (the rest is ignored);
    chunk i starts at `i * stride`. The window is the triangle over the first chunk's length, cut
    to each chunk's own length; the result is the weighted sum divided by the summed weights.
    Returns `[..., stride * (n - 1) + lengths[-1]]`.
    """
    n, frame_len = frames.shape[0], frames.shape[-1]
    total = stride * (n - 1) + lengths[-1]
    window = overlap_add_weight(lengths[0])
    window = np.pad(window, (0, frame_len - len(window)))
    valid = np.arange(frame_len)[None, :] < np.asarray(lengths)[:, None]
    weights = jnp.asarray(np.where(valid, window[None, :], np.float32(0)))  # [n, F]
    buffer_len = stride * (n - 1) + frame_len
    out = jnp.zeros((*frames.shape[1:-1], buffer_len), frames.dtype)
    sum_weight = jnp.zeros((buffer_len,), frames.dtype)
    batch_zeros = (0,) * (frames.ndim - 2)

    def add_frame(i, carry):
        out, sum_weight = carry
        start = i * stride
        part = lax.dynamic_slice_in_dim(out, start, frame_len, axis=-1)
        out = lax.dynamic_update_slice(out, part + weights[i] * frames[i], (*batch_zeros, start))
        part_w = lax.dynamic_slice_in_dim(sum_weight, start, frame_len)
        sum_weight = lax.dynamic_update_slice(sum_weight, part_w + weights[i], (start,))
        return out, sum_weight

    out, sum_weight = lax.fori_loop(0, n, add_frame, (out, sum_weight))
    return out[..., :total] / sum_weight[:total]


def chunk_bounds(
    length: int, chunk_length: int | None, stride: int | None
) -> list[tuple[int, int]]:
    """(start, length) of each chunk the reference encodes: starts at `range(0, length, stride)`.

    Without chunking the whole input is one chunk. The last chunk (and, for the last chunk shorter
    than `chunk_length - stride`, the one before it) is shorter than `chunk_length`.
    """
    if chunk_length is None or stride is None:
        return [(0, length)]
    return [(s, min(chunk_length, length - s)) for s in range(0, length, stride)]


def num_frames(length: int, hop_length: int) -> int:
    """Frames the encoder makes from `length` samples: each strided conv rounds up."""
    return math.ceil(length / hop_length)


def group_chunks(
    bounds: Sequence[tuple[int, int]], batch: int, max_rows: int | None
) -> list[tuple[int, list[int]]]:
    """(length, chunk indices) of each batched call over chunks `(start, length)` of a batch of
    `batch` items: chunks of one length go together, at most `max_rows // batch` of them (at
    least one) per call, so no call runs more than `max(max_rows, batch)` rows; `max_rows` None:
    no limit."""
    groups: dict[int, list[int]] = {}
    for i, (_, length) in enumerate(bounds):
        groups.setdefault(length, []).append(i)
    per_call = len(bounds) if max_rows is None else max(1, max_rows // batch)
    return [
        (length, indices[start : start + per_call])
        for length, indices in groups.items()
        for start in range(0, len(indices), per_call)
    ]
