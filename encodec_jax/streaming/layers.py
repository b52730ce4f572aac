"""Each SEANet layer as a stream: a static plan, laid-out weights, a state, a step and a flush.

A layer's offline output is a function of the whole signal. Streamed, the signal arrives in
chunks of whole steps of the layer's input (`[B, m, C]`, channels last) and each call must give
exactly the outputs that the offline layer gives, as soon as they can be computed, keeping only
a fixed amount of its input between calls. What it keeps and how long it waits follow from its
receptive field (`modules.ReceptiveField`):

- a convolution (kernel k, stride s, dilation d) reads `left` inputs before its stride block and
  `right - (s - 1)` after it (its look-ahead: 0 when causal). It keeps the inputs it will read
  again, and lags by its look-ahead, rounded up to whole output steps.
- a transposed convolution (stride u, kernel blocks * u) makes output block t from inputs
  t - blocks + 1 ... t: it keeps the previous `blocks - 1` inputs. Its trim on the left (the
  right side of its field) shifts its output by `trim_left` samples: a lag, like a look-ahead.
- the LSTM keeps (h, c) per layer; ELU keeps nothing; a residual block delays its faster branch
  (the shortcut) so that both branches line up.

Lag. In the k-th call a layer emits output steps [k * m' - lag_out, (k+1) * m' - lag_out) for
chunks of m' output steps: the first `lag_out` entries of the first call precede the signal
(placeholders that no exact output ever reads). Its input is lagged likewise by `lag_in`, the
lag of the layer before it. Lags are static, so every call has fixed shapes.

The two ends of the signal. Offline, each convolution pads its own input (reflect, replicate or
zeros; `ops.pad1d`), so its first outputs depend on its own later inputs ("reflect": x[P]..x[1]).
The first call (`first=True`) fills the positions before the signal from the chunk itself, which
needs enough signal in the first chunk (`Plan.need` in the layer's input steps; `Plan.frames` in
frames, for a whole stack). `flush` takes the last inputs with a traced count of real entries,
pads the right end as offline, and returns every output still owed with its traced count: one
compiled flush serves every tail length.

Circular padding wraps the end of the signal to its start and `time_group_norm` normalises over
the whole signal: neither can stream, and `plan` refuses both.

Weights are laid out once for small calls (`weights`): convolutions as one `[K * Cin, Cout]`
matrix (`ops.conv1d_matmul`), transposed ones as kernel blocks, the LSTM's transposed. Laid out
on every call, as the offline layers do, a one-frame step of the 24 kHz model spends most of
its time moving weights. Nothing here touches a module after `plan` and `weights`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .. import ops
from ..modules import (
    ELU,
    EncodecConv1d,
    EncodecConvTranspose1d,
    EncodecLSTM,
    EncodecResnetBlock,
    Identity,
)

State = Any  # a pytree of arrays (None for a layer without state)
Weights = Any  # a pytree of arrays (None for a layer without weights)


class StreamingError(ValueError):
    """A model, layer, chunk or call that cannot stream as asked; the message says why."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """How one layer (or a stack of layers) streams: static, hashable, computed once.

    Attributes:
        kind: "conv", "transposed", "lstm", "elu", "identity", "residual" or "stack".
        lag_in: placeholder entries at the start of the first input chunk.
        lag_out: placeholder entries at the start of the first output chunk.
        keep: input entries carried from one call to the next (a residual block: the delay of
            its shortcut, in output entries).
        need: signal entries (after `lag_in`) the first input chunk must hold for an exact start.
        rate: output entries per input entry.
        frames: the fewest frames the first call can take (`per_frame` input entries a frame).
        per_frame: input entries per frame.
        in_channels, out_channels: 0 where a layer keeps whatever it gets (ELU).
        kernel, stride, dilation, pad_mode: a convolution's settings (stride: a transposed
            convolution's upsampling factor).
        lstm_layers: an LSTM's stacked layers.
        parts: a stack's layers; a residual block's block (a stack) and shortcut.
        delay_block: a residual block's delay of its block branch.
    """

    kind: str
    lag_in: int
    lag_out: int
    keep: int = 0
    need: int = 0
    rate: Fraction = Fraction(1)
    frames: int = 1
    per_frame: Fraction = Fraction(1)
    in_channels: int = 0
    out_channels: int = 0
    kernel: int = 1
    stride: int = 1
    dilation: int = 1
    pad_mode: str = "constant"
    lstm_layers: int = 0
    parts: tuple[Plan, ...] = ()
    delay_block: int = 0


# ---- planning ----
def plan(layers: Sequence[nnx.Module] | nnx.Module, per_frame: int | Fraction, lag_in: int = 0):
    """The `Plan` of a layer or a stack of layers whose input has `per_frame` entries per frame
    (the hop length for an encoder, 1 for a decoder) and lags by `lag_in`.

    Raises:
        StreamingError: for a layer that cannot stream (circular padding, time_group_norm).
    """
    per_frame = Fraction(per_frame)
    if not isinstance(layers, (list, tuple, nnx.List)):
        return _plan_layer(layers, lag_in, per_frame)
    parts, lag, rate, frames, width = [], lag_in, Fraction(1), 1, per_frame
    for layer in layers:
        part = _plan_layer(layer, lag, width)
        parts.append(part)
        lag, rate, width = part.lag_out, rate * part.rate, width * part.rate
        frames = max(frames, part.frames)
    # The first call must also give at least one real output of the whole stack.
    frames = max(frames, math.ceil((lag + 1) / width))
    channels = [p.in_channels for p in parts if p.in_channels]
    out_channels = [p.out_channels for p in parts if p.out_channels]
    return Plan(
        "stack",
        lag_in,
        lag,
        rate=rate,
        frames=frames,
        per_frame=per_frame,
        in_channels=channels[0] if channels else 0,
        out_channels=out_channels[-1] if out_channels else 0,
        parts=tuple(parts),
    )


def _frames_for(need: int, lag_in: int, per_frame: Fraction) -> int:
    return max(1, math.ceil((need + lag_in) / per_frame))


def _plan_layer(layer: nnx.Module, lag_in: int, per_frame: Fraction) -> Plan:
    if isinstance(layer, EncodecConv1d):
        check_settings(layer.norm is not None, layer.pad_mode)
        s = layer.stride
        field = layer.receptive_field
        left, lookahead = int(field.left), int(field.right) - (s - 1)
        lag_out = -(-(lag_in + lookahead) // s)
        if layer.pad_mode == "reflect":
            # The left pad reflects inputs 1..left; the right pad (look-ahead plus up to s - 1
            # to complete the last stride) must reflect within the signal too, as offline.
            need = max(left, lookahead + s - 1) + 1
        else:
            need = 1 if layer.pad_mode == "replicate" else 0
        c_out, c_in, _ = _weight_shape(layer)
        return Plan(
            "conv",
            lag_in,
            lag_out,
            keep=lag_out * s + left - lag_in,
            need=need,
            rate=Fraction(1, s),
            frames=_frames_for(need, lag_in, per_frame),
            per_frame=per_frame,
            in_channels=c_in,
            out_channels=c_out,
            kernel=layer.kernel_size,
            stride=s,
            dilation=layer.dilation,
            pad_mode=layer.pad_mode,
        )
    if isinstance(layer, EncodecConvTranspose1d):
        check_settings(layer.norm is not None, None)
        u, kernel = layer.stride, layer.kernel_size
        if kernel % u:
            raise StreamingError(
                f"a transposed convolution streams when its kernel is a multiple of its stride; "
                f"got kernel {kernel}, stride {u}"
            )
        trim_left = int(layer.receptive_field.right * u)  # the field's right side is the trim
        c_in, c_out, _ = _weight_shape(layer)
        return Plan(
            "transposed",
            lag_in,
            lag_in * u + trim_left,
            keep=kernel // u - 1,
            rate=Fraction(u),
            frames=_frames_for(0, lag_in, per_frame),
            per_frame=per_frame,
            in_channels=c_in,
            out_channels=c_out,
            kernel=kernel,
            stride=u,
        )
    if isinstance(layer, EncodecLSTM):
        dim = layer.lstm.weight_hh_l0.shape[1]
        return Plan(
            "lstm",
            lag_in,
            lag_in,
            frames=_frames_for(0, lag_in, per_frame),
            per_frame=per_frame,
            in_channels=dim,
            out_channels=dim,
            lstm_layers=layer.lstm.num_layers,
        )
    if isinstance(layer, (ELU, Identity)):
        kind = "elu" if isinstance(layer, ELU) else "identity"
        return Plan(kind, lag_in, lag_in, frames=_frames_for(0, lag_in, per_frame))
    if isinstance(layer, EncodecResnetBlock):
        block = plan(layer.block, per_frame, lag_in)
        shortcut = _plan_layer(layer.shortcut, lag_in, per_frame)
        lag_out = max(block.lag_out, shortcut.lag_out)
        return Plan(
            "residual",
            lag_in,
            lag_out,
            keep=lag_out - shortcut.lag_out,
            frames=max(block.frames, shortcut.frames),
            per_frame=per_frame,
            in_channels=block.in_channels,
            out_channels=block.out_channels,
            parts=(block, shortcut),
            delay_block=lag_out - block.lag_out,
        )
    raise StreamingError(f"no streaming form for the layer {type(layer).__name__}")


def check_settings(time_group_norm: bool, pad_mode: str | None) -> None:
    """Raise `StreamingError` for the layer settings that cannot stream."""
    if time_group_norm:
        raise StreamingError(
            "time_group_norm normalises each layer over the whole signal, so no output is "
            "final before the signal ends; such models stream in chunks (streaming.ChunkEncoder) "
            "when their config has chunk_length_s, and not at all otherwise"
        )
    if pad_mode == "circular":
        raise StreamingError(
            "circular padding wraps the end of the signal around to its start, so the first "
            "outputs depend on the last inputs: a model with pad_mode='circular' cannot stream"
        )


def _weight_shape(layer) -> tuple[int, ...]:
    weights = layer.conv
    return (weights.weight_v if weights.weight_norm else weights.weight).shape


# ---- weights, laid out once ----
def weights(layers, p: Plan) -> Weights:
    """The arrays a layer or stack streams with (laid out for small calls): conv (matrix
    `[K * Cin, Cout]`, bias), transposed (blocks `[K / u, Cin, u * Cout]`, bias), LSTM
    ((w_ih^T, w_hh^T, b_ih + b_hh, both weights packed for the CPU kernel or None) per
    layer); None for ELU and identity."""
    if p.kind == "stack":
        return tuple(weights(layer, part) for layer, part in zip(layers, p.parts, strict=True))
    layer = layers
    if p.kind == "conv":
        return ops.conv_matrix(layer.conv.kernel()), layer.conv.bias[...]
    if p.kind == "transposed":
        return ops.transpose_weight_blocks(layer.conv.kernel(), p.stride), layer.conv.bias[...]
    if p.kind == "lstm":
        per_layer = []
        for i in range(p.lstm_layers):
            w_ih, w_hh, b_ih, b_hh = layer.lstm.layer(i)
            w_ih_t, w_hh_t = w_ih.T, w_hh.T
            packed = ops.lstm_packed_weights(w_ih_t, w_hh_t)
            per_layer.append((w_ih_t, w_hh_t, b_ih + b_hh, packed))
        return tuple(per_layer)
    if p.kind == "residual":
        return weights(layer.block, p.parts[0]), weights(layer.shortcut, p.parts[1])
    return None


# ---- state ----
def init(p: Plan, batch: int, dtype) -> State:
    """The state before the first call: zeros of fixed shapes (`[B, keep, Cin]` per
    convolution, (h, c) `[B, H]` per LSTM layer, the delay lines of residual blocks)."""
    if p.kind == "stack":
        return tuple(init(part, batch, dtype) for part in p.parts)
    if p.kind in ("conv", "transposed"):
        return jnp.zeros((batch, p.keep, p.in_channels), dtype)
    if p.kind == "lstm":
        zeros = jnp.zeros((batch, p.out_channels), dtype)
        return tuple((zeros, zeros) for _ in range(p.lstm_layers))
    if p.kind == "residual":
        block, shortcut = p.parts
        return (
            init(block, batch, dtype),
            init(shortcut, batch, dtype),
            jnp.zeros((batch, p.delay_block, p.out_channels), dtype),
            jnp.zeros((batch, p.keep, p.out_channels), dtype),
        )
    return None


# ---- one call ----
def step(p: Plan, w: Weights, state: State, x: jax.Array, first: bool) -> tuple[State, jax.Array]:
    """Stream one chunk `x` `[B, m, C]`: (new state, output chunk `[B, m * rate, C']`).

    `first`: the first call, whose input must hold `p.need` signal entries after its
    `p.lag_in` placeholders (static: the first call compiles its own program)."""
    if p.kind == "stack":
        states = []
        for part, part_w, st in zip(p.parts, w, state, strict=True):
            st, x = step(part, part_w, st, x, first)
            states.append(st)
        return tuple(states), x
    if p.kind == "conv":
        data = jnp.concatenate([state, x], axis=1)
        if first:
            data = _fill_start(data, p.keep + p.lag_in, p.pad_mode)
        y = ops.conv1d_matmul(data, *w, p.kernel, p.stride, p.dilation)
        return data[:, data.shape[1] - p.keep :], y
    if p.kind == "transposed":
        data = jnp.concatenate([state, x], axis=1)
        if first:  # nothing precedes the signal: the first block sees zeros before it
            data = _zero_from(data, 0, p.keep + p.lag_in)
        return data[:, data.shape[1] - p.keep :], _transpose(w, data)
    if p.kind == "lstm":
        h, states = x, []
        for layer_w, layer_state in zip(w, state, strict=True):
            if first and p.lag_in:  # the placeholders must not reach the LSTM's state
                out, st = ops.lstm_scan(h[:, p.lag_in :], *layer_w, layer_state)
                placeholders = jnp.zeros((out.shape[0], p.lag_in, out.shape[2]), out.dtype)
                out = jnp.concatenate([placeholders, out], axis=1)
            else:
                out, st = ops.lstm_scan(h, *layer_w, layer_state)
            h = out
            states.append(st)
        return tuple(states), h + x
    if p.kind == "elu":
        return state, jax.nn.elu(x)
    if p.kind == "identity":
        return state, x
    if p.kind == "residual":
        block_state, shortcut_state, delay_block, delay_shortcut = state
        block_state, h = step(p.parts[0], w[0], block_state, x, first)
        shortcut_state, s = step(p.parts[1], w[1], shortcut_state, x, first)
        h, delay_block = _delay(delay_block, h)
        s, delay_shortcut = _delay(delay_shortcut, s)
        return (block_state, shortcut_state, delay_block, delay_shortcut), s + h
    raise StreamingError(f"unknown plan kind {p.kind!r}")


def flush(p: Plan, w: Weights, state: State, x: jax.Array, valid) -> tuple[jax.Array, jax.Array]:
    """The end of the signal: the last input chunk `x` `[B, M, C]`, whose first `valid` entries
    (traced) are real, padded on the right as offline. Returns (outputs `[B, M', C']`, traced
    count of real outputs): every output the layer still owes."""
    valid = jnp.asarray(valid, jnp.int32)
    if p.kind == "stack":
        for part, part_w, st in zip(p.parts, w, state, strict=True):
            x, valid = flush(part, part_w, st, x, valid)
        return x, valid
    if p.kind == "conv":
        s, k_eff = p.stride, (p.kernel - 1) * p.dilation + 1
        out_max = -(-(x.shape[1] - p.lag_in) // s) + p.lag_out
        data = jnp.concatenate([state, x], axis=1)
        data = _pad_to(data, (out_max - 1) * s + k_eff)
        data = _fill_end(data, p.keep + valid, p.pad_mode)
        y = ops.conv1d_matmul(data, *w, p.kernel, s, p.dilation)
        return y, -((p.lag_in - valid) // s) + p.lag_out
    if p.kind == "transposed":
        # Offline the input simply ends: zeros after it, as far as the trimmed output reaches.
        data = jnp.concatenate([state, x], axis=1)
        data = _pad_to(data, data.shape[1] + p.keep)
        data = _zero_from(data, p.keep + valid, data.shape[1])
        return _transpose(w, data), valid * p.stride + (p.lag_out - p.lag_in * p.stride)
    if p.kind in ("lstm", "elu", "identity"):
        return step(p, w, state, x, first=False)[1], valid
    if p.kind == "residual":
        block_state, shortcut_state, delay_block, delay_shortcut = state
        h, valid_h = flush(p.parts[0], w[0], block_state, x, valid)
        s, _ = flush(p.parts[1], w[1], shortcut_state, x, valid)
        h = jnp.concatenate([delay_block, h], axis=1)
        s = jnp.concatenate([delay_shortcut, s], axis=1)
        if h.shape != s.shape:  # both branches owe the same outputs, so this cannot happen
            raise AssertionError(f"residual branches out of step: {h.shape} != {s.shape}")
        return s + h, valid_h + p.delay_block
    raise StreamingError(f"unknown plan kind {p.kind!r}")


# ---- helpers ----
def _transpose(w: Weights, data: jax.Array) -> jax.Array:
    """Output blocks of a transposed conv for the entries of `data` after its first
    `blocks - 1` (the kept previous inputs): `[B, (T - blocks + 1) * stride, Cout]`."""
    blocks, bias = w
    y = ops.transpose_blocks_valid(data, blocks)
    return y.reshape(y.shape[0], -1, bias.shape[0]) + bias


def _delay(buffer: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`x` delayed by the buffer's length: (output, new buffer)."""
    if buffer.shape[1] == 0:
        return x, buffer
    data = jnp.concatenate([buffer, x], axis=1)
    return data[:, : x.shape[1]], data[:, x.shape[1] :]


def _pad_to(data: jax.Array, length: int) -> jax.Array:
    if data.shape[1] >= length:
        return data
    return jnp.pad(data, ((0, 0), (0, length - data.shape[1]), (0, 0)))


def _zero_from(data: jax.Array, start, stop) -> jax.Array:
    index = jnp.arange(data.shape[1])[None, :, None]
    return jnp.where((index >= start) & (index < stop), jnp.zeros((), data.dtype), data)


def _fill_start(data: jax.Array, zero: int, mode: str) -> jax.Array:
    """The entries before index `zero` (the signal's first sample) as offline padding makes
    them: the reflection of the signal, its first sample repeated, or zeros. Static indices."""
    if mode == "constant":
        return _zero_from(data, 0, zero)
    index = np.arange(data.shape[1])
    source = np.where(index < zero, 2 * zero - index if mode == "reflect" else zero, index)
    return jnp.take(data, np.clip(source, 0, data.shape[1] - 1), axis=1)


def _fill_end(data: jax.Array, end: jax.Array, mode: str) -> jax.Array:
    """The entries from index `end` (traced: one past the signal's last sample) as offline
    padding makes them."""
    if mode == "constant":
        return _zero_from(data, end, data.shape[1])
    index = jnp.arange(data.shape[1])
    pad = 2 * (end - 1) - index if mode == "reflect" else jnp.broadcast_to(end - 1, index.shape)
    source = jnp.clip(jnp.where(index < end, index, pad), 0, data.shape[1] - 1)
    return jnp.take(data, source, axis=1)
