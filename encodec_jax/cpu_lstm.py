"""An LSTM layer on the CPU as one XLA custom call (`_lstm_cpu.cc`).

XLA's CPU dot packs its right-hand operand on every call, and inside the LSTM's `lax.scan` that
operand is the same `[H, 4H]` recurrent weight on every step: a 1024-wide layer moves its 16 MB
weight about three times per step, and no form of the product written in JAX avoids it
(`benchmarks/RESULTS.md`, "The recurrent product: forms measured"). The custom call packs the
weights once per call (or takes them `pack`ed once for many calls) and reads the recurrent one
once per step, with the cell applied in the same pass; it computes the input projection too, a
chunk of steps at a time, with the same register tiles (faster than XLA's dot over all steps
from batch 8, and never written to memory as a `[B, T, 4H]` array).

The extension is compiled when the package is installed (`setup.py`; optional, so an install
without a C++ compiler still works). Where it is missing, on other backends (`ops._lstm_forward`
chooses per platform) and for dtypes other than float32, the layer runs as a matmul and a
`lax.scan`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

try:
    from encodec_jax import _lstm_cpu
except ImportError:  # not compiled: ops falls back to the scan
    _lstm_cpu = None

TARGET = "encodec_jax_lstm_layer"
PACKING_TARGET = "encodec_jax_lstm_layer_packing"
PACK_TARGET = "encodec_jax_lstm_pack"
PAD_TO = 16  # the hidden size runs padded to a multiple of the widest kernel's blocks

# The kernel's entry points this CPU runs, fastest first ("avx512", "avx2", "generic"), each with
# the width of its blocks of units (one vector register: 16, 8, 4): the extension checks the
# CPU's instruction sets when it loads. All sum in the same order; the two with fused
# multiply-adds give the same bits. Each has its layer (from packed weights, or packing them
# itself) and its packing of the weights.
_ENTRY_POINTS: dict = {}
for _name, (_layer, _packing, _pack, _width) in (_lstm_cpu.kernels if _lstm_cpu else {}).items():
    jax.ffi.register_ffi_target(f"{TARGET}_{_name}", _layer, platform="cpu")
    jax.ffi.register_ffi_target(f"{PACKING_TARGET}_{_name}", _packing, platform="cpu")
    jax.ffi.register_ffi_target(f"{PACK_TARGET}_{_name}", _pack, platform="cpu")
    _ENTRY_POINTS[_name] = (_layer, _width)
KERNELS: tuple[str, ...] = tuple(_ENTRY_POINTS)
available = bool(KERNELS)


def _lanes(kernel: str | None) -> tuple[str, int]:
    """(the kernel's name, its block width); None: the fastest this CPU runs."""
    kernel = KERNELS[0] if kernel is None and KERNELS else kernel
    if kernel not in _ENTRY_POINTS:
        raise ValueError(f"kernel {kernel!r}: this CPU runs {', '.join(KERNELS) or 'none'}")
    return kernel, _ENTRY_POINTS[kernel][1]


def padded(hidden: int) -> int:
    """The hidden size the kernel runs at: a multiple of 16."""
    return -(-hidden // PAD_TO) * PAD_TO


def packed_shape(contraction: int, hidden: int, kernel: str | None = None) -> tuple[int, int]:
    """The shape of a weight with `contraction` inputs per gate and `hidden` units once `pack`ed
    for `kernel`: `(4 * padded(contraction) * padded(hidden) / L, L)`, `L` its block width."""
    _, lanes = _lanes(kernel)
    return 4 * padded(contraction) * padded(hidden) // lanes, lanes


def pack(w_t: jax.Array, kernel: str | None = None) -> jax.Array:
    """An LSTM weight, input `[C, 4H]` or recurrent `[H, 4H]` (gate order i, f, g, o), laid out
    for `kernel` (default: the fastest), `packed_shape(C, H)`. The `padded(H)` units come in
    blocks of `L` (the kernel's block width) and the blocks in units of three (the last unit may
    hold fewer); unit `n` is `[4, padded(C), S, L]` (gate, input, block in the unit, lane), so a
    pass over one gate of a unit reads one stream of whole cache lines. Padding has zero
    weights, so padded units stay at zero and add nothing to the real units' sums."""
    kernel, _ = _lanes(kernel)
    contraction, hidden = w_t.shape[0], w_t.shape[1] // 4
    # The custom call reads PyTorch's `[4H, C]` layout: callers hold the weight transposed from
    # it, and XLA cancels the two transposes.
    call = jax.ffi.ffi_call(
        f"{PACK_TARGET}_{kernel}",
        jax.ShapeDtypeStruct(packed_shape(contraction, hidden, kernel), jnp.float32),
        vmap_method="sequential",
    )
    return call(w_t.T, hidden=padded(hidden), inputs=padded(contraction))


def layer(
    x: jax.Array,
    weights: tuple[jax.Array, jax.Array],
    bias: jax.Array,
    state: tuple[jax.Array, jax.Array],
    training: bool,
    kernel: str | None = None,
    packed: bool = True,
) -> tuple[jax.Array, jax.Array, jax.Array | None, jax.Array | None]:
    """One LSTM layer over `x` `[B, T, C]`: (hidden states `[B, T, H]`, last cell state `[B, H]`,
    every cell state `[B, T, H]`, summed gate pre-activations `[B, T, 4H]`), from the weights
    (w_ih^T, w_hh^T), the summed biases `bias` `[4H]` and the initial `state` (h, c) `[B, H]`.
    A step's pre-activations are `(x_t @ w_ih^T + bias) + h @ w_hh^T`. The last two results,
    which only the backward pass needs, are None unless `training`. float32 only. `kernel` names
    one of `KERNELS` (default: the fastest).

    `packed`: the weights come `pack`ed for `kernel` (once for many calls, as streaming does);
    else they are `[C, 4H]` and `[H, 4H]` as the model holds them, and the call packs them into
    buffers its thread keeps for the next call (32 MB for a 1024-unit layer): same results, and
    unlike a `pack` inside the same program, no fresh memory to fault in on every call."""
    kernel, lanes = _lanes(kernel)
    batch, steps, channels = x.shape
    hidden = bias.shape[0] // 4
    h0, c0 = state
    if steps == 0:
        empty = jnp.zeros((batch, 0, hidden), jnp.float32)
        gates = jnp.zeros((batch, 0, 4 * hidden), jnp.float32)
        return empty, c0, (empty if training else None), (gates if training else None)
    size, channels_size = padded(hidden), padded(channels)
    for name, weight, k in (("w_ih", weights[0], channels), ("w_hh", weights[1], hidden)):
        expected = packed_shape(k, hidden, kernel) if packed else (k, 4 * hidden)
        if weight.shape != expected:
            raise ValueError(
                f"{'packed ' if packed else ''}{name} of shape {weight.shape}: the {kernel!r} "
                f"kernel takes {expected}"
                + (f", from pack({name}_t, {kernel!r})" if packed else f" ({name}^T)")
            )
    if not packed:  # PyTorch's layouts, which the packing reads; XLA cancels the transposes
        weights = (weights[0].T, weights[1].T)
    pad = size - hidden
    bias = bias.reshape(4, hidden)
    if channels_size != channels:
        x = jnp.pad(x, ((0, 0), (0, 0), (0, channels_size - channels)))
    if pad:
        bias = jnp.pad(bias, ((0, 0), (0, pad)))
        h0, c0 = (jnp.pad(a, ((0, 0), (0, pad))) for a in (h0, c0))
    f32 = jnp.float32
    out_types = (
        jax.ShapeDtypeStruct((batch, steps, size), f32),
        jax.ShapeDtypeStruct((batch, steps if training else 1, size), f32),
        jax.ShapeDtypeStruct((batch, steps, 4, size) if training else (0,), f32),
    )
    # vmap: one call per mapped element, each the same arithmetic as an unmapped call.
    target = TARGET if packed else PACKING_TARGET
    call = jax.ffi.ffi_call(f"{target}_{kernel}", out_types, vmap_method="sequential")
    hs, cs, gates = call(x, *weights, bias, h0, c0, training=training)
    hs, cs = hs[..., :hidden], cs[..., :hidden]
    if not training:
        return hs, cs[:, 0], None, None
    gates = gates[..., :hidden].reshape(batch, steps, 4 * hidden)
    return hs, cs[:, -1], cs, gates
