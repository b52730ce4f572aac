"""The CPU LSTM kernel (`encodec_jax.cpu_lstm`, `_lstm_cpu.cc`) against a float64 NumPy LSTM and
against the `lax.scan` it replaces on the CPU; its properties (row independence, threads,
padding, saturation, NaN) and its use through jit, vmap, grad and streaming."""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from encodec_jax import cpu_lstm, ops

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="a CPU kernel")


def test_the_kernel_is_built():
    """The extension is optional at install time (no compiler: the scan serves); the project's own
    install must have it, or every other test here would only test the scan."""
    assert cpu_lstm.available, "encodec_jax._lstm_cpu did not build: see `pip install -v -e .`"


def _problem(rng, steps, batch, hidden, scale=1.0, inputs=None):
    """An LSTM layer's arguments for `cpu_lstm.layer` (weights unpacked): x `[B, T, C]`, w_ih^T,
    w_hh^T, the summed bias and the initial (h, c)."""
    inputs = hidden if inputs is None else inputs
    x = scale * rng.standard_normal((batch, steps, inputs)).astype(np.float32)
    w_ih_t = (rng.standard_normal((inputs, 4 * hidden)) / np.sqrt(inputs)).astype(np.float32)
    w_hh_t = (rng.standard_normal((hidden, 4 * hidden)) / np.sqrt(hidden)).astype(np.float32)
    h0 = (0.5 * rng.standard_normal((batch, hidden))).astype(np.float32)
    c0 = rng.standard_normal((batch, hidden)).astype(np.float32)
    bias = (0.5 * rng.standard_normal(4 * hidden)).astype(np.float32)
    return x, w_ih_t, w_hh_t, bias, (h0, c0)


def _reference(x, w_ih_t, w_hh_t, bias, state):
    """The layer in float64 NumPy: (hs, cs, gate pre-activations), each `[B, T, ...]`."""
    w = w_hh_t.astype(np.float64)
    gates_x = x.astype(np.float64) @ w_ih_t.astype(np.float64) + bias
    h, c = (a.astype(np.float64) for a in state)
    hs, cs, pres = [], [], []
    for gx in gates_x.swapaxes(0, 1):
        pre = gx + h @ w
        i, f, g, o = np.split(pre, 4, axis=-1)
        sigmoid = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
        c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
        h = sigmoid(o) * np.tanh(c)
        hs.append(h), cs.append(c), pres.append(pre)
    if not hs:  # no steps
        empty = np.zeros((x.shape[0], 0, 4 * w.shape[0]))
        return empty[..., : w.shape[0]], empty[..., : w.shape[0]], empty
    return tuple(np.array(a).swapaxes(0, 1) for a in (hs, cs, pres))


@functools.partial(jax.jit, static_argnames="kernel")
def _kernel(x, w_ih_t, w_hh_t, bias, state, kernel=None):
    """The kernel as training runs it: (hs, cs, gate pre-activations), each `[B, T, ...]`."""
    packed = (cpu_lstm.pack(w_ih_t, kernel), cpu_lstm.pack(w_hh_t, kernel))
    hs, _, cs, gates = cpu_lstm.layer(x, packed, bias, state, True, kernel)
    return hs, cs, gates


@functools.partial(jax.jit, static_argnames="kernel")
def _inference_kernel(x, w_ih_t, w_hh_t, bias, state, kernel=None):
    """The kernel as inference runs it: (hs, the last cell state)."""
    packed = (cpu_lstm.pack(w_ih_t, kernel), cpu_lstm.pack(w_hh_t, kernel))
    hs, c_last, cs, gates = cpu_lstm.layer(x, packed, bias, state, False, kernel)
    assert cs is None and gates is None
    return hs, c_last


@pytest.mark.parametrize("kernel", cpu_lstm.KERNELS)
def test_packing_in_the_call_equals_packed_weights(kernel):
    """The layer that packs the weights itself, into buffers its thread keeps between calls,
    gives the bits of the layer fed weights packed beforehand: in training and inference, with
    padded inputs and units, and when one thread's buffers are reused by layers of other sizes
    (larger, smaller, then the first size with other weights)."""

    @functools.partial(jax.jit, static_argnames=("training", "packed"))
    def run(x, w_ih_t, w_hh_t, bias, state, training, packed):
        weights = (
            (cpu_lstm.pack(w_ih_t, kernel), cpu_lstm.pack(w_hh_t, kernel))
            if packed
            else (w_ih_t, w_hh_t)
        )
        hs, c_last, cs, gates = cpu_lstm.layer(
            x, weights, bias, state, training, kernel, packed=packed
        )
        return hs, c_last, cs, gates

    rng = np.random.default_rng(11)
    for steps, batch, hidden, inputs in [
        (5, 3, 40, 24),
        (3, 2, 72, 80),
        (4, 1, 8, 5),
        (5, 3, 40, 24),
    ]:
        problem = _problem(rng, steps, batch, hidden, inputs=inputs)
        for training in (True, False):
            once = run(*problem, training=training, packed=True)
            in_call = run(*problem, training=training, packed=False)
            for a, b in zip(jax.tree.leaves(once), jax.tree.leaves(in_call), strict=True):
                np.testing.assert_array_equal(a, b)
    x, w_ih_t, w_hh_t, bias, state = _problem(rng, 2, 1, 32)
    with pytest.raises(ValueError, match=r"w_hh of shape \(16, 128\): .* takes \(32, 128\)"):
        cpu_lstm.layer(x, (w_ih_t, w_hh_t[:16]), bias, state, False, kernel, packed=False)


def test_the_cpu_picks_its_kernels():
    """The extension offers the entry points this CPU runs, fastest first, the generic one always;
    asking for one it cannot run is an error that names those it can."""
    assert cpu_lstm.KERNELS[-1] == "generic"
    assert set(cpu_lstm.KERNELS) <= {"avx512", "avx2", "generic"}
    problem = _problem(np.random.default_rng(0), 2, 1, 16)
    with pytest.raises(ValueError, match="this CPU runs .*generic"):
        _kernel(*problem, kernel="sve")
    # Each kernel's packed weight has its own block width; another's is refused, not misread.
    x, w_ih_t, w_hh_t, bias, state = _problem(np.random.default_rng(0), 2, 1, 32)
    for packed_for, kernel in itertools.pairwise(cpu_lstm.KERNELS):
        packed = (cpu_lstm.pack(w_ih_t, packed_for), cpu_lstm.pack(w_hh_t, packed_for))
        with pytest.raises(ValueError, match=f"packed w_ih .* the '{kernel}' kernel takes"):
            cpu_lstm.layer(x, packed, bias, state, False, kernel)


def _packed_reference(w_t, lanes):
    """`cpu_lstm.pack`'s layout from its docstring, in NumPy: the padded units in blocks of
    `lanes`, the blocks in units of three (the last may hold fewer), each `[gate, input, block in
    the unit, lane]`, the units one after another."""
    contraction, hidden = w_t.shape[0], w_t.shape[1] // 4
    size, k_size = cpu_lstm.padded(hidden), cpu_lstm.padded(contraction)
    w = np.zeros((k_size, 4, size), np.float32)  # [input, gate, unit], zero where padded
    w[:contraction, :, :hidden] = w_t.reshape(contraction, 4, hidden)
    blocks = size // lanes
    units = []
    for first in range(0, blocks, 3):
        unit = w[:, :, first * lanes : min(first + 3, blocks) * lanes]  # [input, gate, S * lanes]
        units.append(unit.transpose(1, 0, 2).reshape(-1))
    return np.concatenate(units).reshape(-1, lanes)


@pytest.mark.parametrize("kernel", cpu_lstm.KERNELS)
@pytest.mark.parametrize("inputs, hidden", [(3, 5), (16, 16), (20, 33), (40, 48), (512, 80)])
def test_pack_lays_out_the_weight_as_documented(inputs, hidden, kernel):
    """Units of three blocks and a shorter last one (hidden 16, 33, 80: 2, 3 or 4, 5 or 10 blocks
    of 8), padded inputs and units zero, under jit and from the transposed weight as callers
    hold it."""
    w_t = np.random.default_rng(inputs).standard_normal((inputs, 4 * hidden)).astype(np.float32)
    _, lanes = cpu_lstm._lanes(kernel)
    got = jax.jit(cpu_lstm.pack, static_argnames="kernel")(w_t, kernel=kernel)
    assert got.shape == cpu_lstm.packed_shape(inputs, hidden, kernel)
    np.testing.assert_array_equal(got, _packed_reference(w_t, lanes))


@pytest.mark.parametrize("kernel", cpu_lstm.KERNELS)
@pytest.mark.parametrize(
    "steps, batch, hidden, inputs",
    [
        (7, 1, 16, 16),
        (7, 2, 16, 8),
        (9, 3, 20, 20),
        (1, 4, 33, 5),
        (7, 5, 16, 16),
        (5, 6, 48, 48),
        (6, 7, 16, 40),
        (5, 8, 16, 16),
        (5, 9, 48, 48),
        (3, 16, 16, 16),
        (3, 17, 20, 20),
        (0, 2, 16, 16),
        (60, 5, 16, 16),
    ],
)  # every register tile of 1-8 rows (four gates per pass at 1 row, two at 2, one from 3) and
# batches split into several (AVX2, tiles of up to 4: 5 = 3 + 2, 7 = 4 + 3, 9 = 3 + 3 + 3,
# 17 = 4 + 4 + 3 + 3 + 3; AVX-512, up to 8: 9 = 5 + 4, 17 = 6 + 6 + 5); hidden 20, 33 and
# inputs 5, 8, 20, 40: padded to 32, 48, 16, 16, 32, 48; hidden 16, 32, 48 make units of 2,
# 3 + 1 and 3 + 3 blocks of 8 (of 4: 3 + 1, 3 + 3 + 2, 3 + 3 + 3 + 3); 60 steps x 5 rows: the
# input projection in two chunks (52 + 8 steps)
def test_kernel_matches_a_float64_lstm(steps, batch, hidden, inputs, kernel):
    rng = np.random.default_rng(steps * 100 + batch)
    problem = _problem(rng, steps, batch, hidden, inputs=inputs)
    hs, cs, pre = (np.asarray(a) for a in _kernel(*problem, kernel=kernel))
    want = _reference(*problem)
    assert hs.shape == cs.shape == (batch, steps, hidden)
    assert pre.shape == (batch, steps, 4 * hidden)
    # float32 sums of up to 48 terms and sigmoid/tanh within a few 1e-8, over up to 60 steps:
    # atol 2e-6 on values of order 1 (measured: 1.0e-6).
    for got, expected in zip((hs, cs, pre), want, strict=True):
        np.testing.assert_allclose(got, expected, rtol=0, atol=2e-6)
    # Inference keeps only the last cell state (two alternating buffers): the same numbers.
    hs_inference, c_last = _inference_kernel(*problem, kernel=kernel)
    np.testing.assert_array_equal(hs_inference, hs)
    np.testing.assert_array_equal(c_last, cs[:, -1] if steps else problem[-1][1])


def test_kernel_agrees_with_the_scan_it_replaces():
    """512 units, 50 steps: the kernel and `lax.scan` round differently (sum order, sigmoid, tanh),
    so they agree to float32 rounding, not bit for bit."""
    x, w_ih_t, w_hh_t, bias, state = _problem(np.random.default_rng(1), 50, 3, 512)
    gates_x = (x @ w_ih_t).swapaxes(0, 1) + bias
    _, hs_scan, cs_scan, _ = jax.jit(ops._xla_lstm_scan)(gates_x, w_hh_t, state)
    hs_scan, cs_scan = hs_scan.swapaxes(0, 1), cs_scan.swapaxes(0, 1)
    hs, cs, _ = _kernel(x, w_ih_t, w_hh_t, bias, state)
    # 512-term sums over 50 steps: atol 1e-5 (measured: 5.1e-7).
    np.testing.assert_allclose(hs, hs_scan, rtol=0, atol=1e-5)
    np.testing.assert_allclose(cs, cs_scan, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kernel", cpu_lstm.KERNELS)
def test_a_row_does_not_depend_on_its_batch_or_on_threads(kernel):
    """Bit-exact: a row alone (one thread: the helper task is only scheduled for larger steps; the
    input projection in one chunk) and the same row inside a batch of 7 (register tiles of 4 + 3
    rows, or one of 7, the blocks split between two threads, the projection in chunks of 37
    steps) give the same numbers, so codes never depend on how a corpus was batched."""
    x, w_ih_t, w_hh_t, bias, state = _problem(np.random.default_rng(2), 40, 7, 256)
    hs, cs, pre = _kernel(x, w_ih_t, w_hh_t, bias, state, kernel=kernel)
    for row in range(7):
        one_row = tuple(a[row : row + 1] for a in state)
        alone = _kernel(x[row : row + 1], w_ih_t, w_hh_t, bias, one_row, kernel=kernel)
        for got, batched in zip(alone, (hs, cs, pre), strict=True):
            np.testing.assert_array_equal(got[0], batched[row])


def test_saturation_and_nan():
    """Huge pre-activations saturate the gates to exactly 0 or 1 with no NaN; a NaN input stays
    NaN (it is not clamped into a finite value)."""
    x, w_ih_t, w_hh_t, bias, state = _problem(np.random.default_rng(3), 3, 2, 16)
    huge = np.sign(x) * np.float32(1e30)
    hs, cs, _ = (np.asarray(a) for a in _kernel(huge, w_ih_t, w_hh_t, bias, state))
    assert np.isfinite(hs).all() and np.isfinite(cs).all()
    assert np.all(np.abs(hs) <= 1)
    poisoned = x.copy()
    poisoned[0, 1, 5] = np.nan
    hs, _, _ = (np.asarray(a) for a in _kernel(poisoned, w_ih_t, w_hh_t, bias, state))
    assert np.isnan(hs[0, 1:]).any() and np.isfinite(hs[1]).all() and np.isfinite(hs[:, 0]).all()


def test_lstm_layer_runs_the_kernel_on_the_cpu_in_float32_only():
    x = jnp.ones((2, 5, 8), jnp.float32)
    weights = [jnp.full(s, 0.1, jnp.float32) for s in [(64, 8), (64, 16), (64,), (64,)]]
    text = jax.jit(ops.lstm_layer).lower(x, *weights).as_text()
    assert cpu_lstm.TARGET in text
    as_bf16 = [a.astype(jnp.bfloat16) for a in (x, *weights)]
    bf16 = jax.jit(ops.lstm_layer).lower(*as_bf16).as_text()
    assert cpu_lstm.TARGET not in bf16


def test_vmap_and_grad_through_the_kernel():
    """vmap runs one call per element (the same numbers as unmapped calls, bit for bit); the
    gradient (the hand-written backward of `_lstm_layer` over the kernel's saved gates) agrees
    with the gradient of the float64 scan."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 2, 6, 8)).astype(np.float32)
    shapes = [(80, 8), (80, 20), (80,), (80,)]
    weights = [(0.3 * rng.standard_normal(s)).astype(np.float32) for s in shapes]
    layer = jax.jit(ops.lstm_layer)
    mapped = jax.jit(jax.vmap(ops.lstm_layer, in_axes=(0, None, None, None, None)))(x, *weights)
    for i in range(3):
        np.testing.assert_array_equal(mapped[i], layer(x[i], *weights))

    probe = rng.standard_normal((2, 6, 20))

    def loss(x, *w):
        return jnp.sum(jnp.sin(ops.lstm_layer(x, *w)) * probe.astype(x.dtype))

    got = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(x[0], *weights)
    with jax.enable_x64(True):  # float64: the scan path
        expected = jax.grad(loss, argnums=(0, 1, 2, 3, 4))(
            x[0].astype(np.float64), *(w.astype(np.float64) for w in weights)
        )
    # float32 against float64 through 6 steps of 20 units: atol 1e-5 (measured: 3.5e-7).
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g, e, rtol=0, atol=1e-5)


def test_streaming_with_the_weight_packed_once_equals_packing_per_call():
    gates = np.random.default_rng(5).standard_normal
    x = gates((2, 4, 8)).astype(np.float32)
    w_ih_t, w_hh_t, bias = (gates(s).astype(np.float32) * 0.2 for s in [(8, 64), (16, 64), (64,)])
    state = (jnp.zeros((2, 16)), jnp.zeros((2, 16)))
    packed = ops.lstm_packed_weights(w_ih_t, w_hh_t)
    assert packed is not None
    once = jax.jit(ops.lstm_scan)(x, w_ih_t, w_hh_t, bias, packed, state)
    per_call = jax.jit(ops.lstm_scan)(x, w_ih_t, w_hh_t, bias, None, state)
    for a, b in zip(jax.tree.leaves(once), jax.tree.leaves(per_call), strict=True):
        np.testing.assert_array_equal(a, b)
