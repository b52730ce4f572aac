"""Side-by-side timings of the choices made in encodec_jax/ops.py, at the 32 kHz model's shapes
(batch 8 x 10 s), each against the straightforward alternative, in one run.

    python benchmarks/ablations.py [--repeats 5]

Prints median times and the speed-up of the chosen form. Results go in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from encodec_jax import ops


def median_time(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def lstm_projection_in_loop(x, w_ih, w_hh, b_ih, b_hh):
    """The LSTM with the input projection inside the scan, as a direct port would write it."""
    hidden = w_hh.shape[1]

    def step(carry, xt):
        h, c = ops.lstm_cell(xt @ w_ih.T + b_ih + carry[0] @ w_hh.T + b_hh, carry[1])
        return (h, c), h

    zeros = jnp.zeros((x.shape[0], hidden), x.dtype)
    _, hs = lax.scan(step, (zeros, zeros), x.swapaxes(0, 1))
    return hs.swapaxes(0, 1)


def conv_transpose_dilated(x, weight, bias, stride):
    """Transposed conv as XLA's dilated convolution (lax.conv_transpose's lowering)."""
    kernel = weight.shape[2]
    flipped = jnp.flip(weight, axis=2).transpose(1, 0, 2)
    y = lax.conv_general_dilated(
        x,
        flipped,
        window_strides=(1,),
        padding=[(kernel - 1, kernel - 1)],
        lhs_dilation=(stride,),
        dimension_numbers=("NWC", "OIW", "NWC"),
    )
    return y + bias


def transpose_forced(form):
    """ops.conv_transpose1d with its block sum forced to one form, whatever the shape."""

    def conv(x, weight, bias, stride):
        out = form(x, ops.transpose_weight_blocks(weight, stride))
        return out.reshape(x.shape[0], -1, weight.shape[1]) + bias

    return conv


def blocks_as_matmuls(x, w):
    """The block sum as matmuls (the form before the convolution; streaming keeps it): the
    padded input through `ops.transpose_blocks_valid`."""
    edge = w.shape[0] - 1
    return ops.transpose_blocks_valid(jnp.pad(x, ((0, 0), (edge, edge), (0, 0))), w)


def elu_exp(x):
    """ELU as exp(x) - 1 below zero: a cheaper exp than XLA's expm1, less accurate near zero."""
    return jnp.where(x > 0, x, jnp.exp(jnp.minimum(x, 0)) - 1)


def conv_xla(x, weight, bias):
    return (
        lax.conv_general_dilated(x, weight, (1,), "VALID", dimension_numbers=("NWC", "OIW", "NWC"))
        + bias
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)

    def arr(*shape, scale=0.05):
        return jnp.asarray(scale * rng.standard_normal(shape), jnp.float32)

    rows = []
    # LSTM of the 32 kHz encoder: 1024 units, 500 frames (10 s at 50 Hz), batch 8.
    x, w_ih, w_hh, b = arr(8, 500, 1024), arr(4096, 1024), arr(4096, 1024), arr(4096)
    rows.append(
        (
            "LSTM layer: input projection hoisted out of the scan",
            median_time(
                jax.jit(lstm_projection_in_loop), x, w_ih, w_hh, b, b, repeats=args.repeats
            ),
            median_time(jax.jit(ops.lstm_layer), x, w_ih, w_hh, b, b, repeats=args.repeats),
        )
    )

    # The transposed convs of the 32 and 24 kHz decoders, each after its ELU as in the model.
    def after_elu(conv):
        return jax.jit(lambda x, w, b, stride: conv(jax.nn.elu(x), w, b, stride), static_argnums=3)

    matmuls = after_elu(transpose_forced(blocks_as_matmuls))
    dilated, chosen = after_elu(conv_transpose_dilated), after_elu(ops.conv_transpose1d)
    decoders = {
        "32 kHz": [(500, 1024, 8), (4000, 512, 5), (20000, 256, 4), (80000, 128, 4)],
        "24 kHz": [(750, 512, 8), (6000, 256, 5), (30000, 128, 4), (120000, 64, 2)],
    }
    for model_name, layers in decoders.items():
        total_dilated = total_chosen = 0.0
        for steps, c_in, stride in layers:
            x, w, b = arr(8, steps, c_in), arr(c_in, c_in // 2, 2 * stride), arr(c_in // 2)
            rows.append(
                (
                    f"{model_name} ConvTranspose1d {c_in}->{c_in // 2} x{stride} "
                    f"({stride * c_in // 2} wide): block matmuls vs one convolution",
                    median_time(matmuls, x, w, b, stride, repeats=args.repeats),
                    median_time(chosen, x, w, b, stride, repeats=args.repeats),
                )
            )
            total_dilated += median_time(dilated, x, w, b, stride, repeats=args.repeats)
            total_chosen += median_time(chosen, x, w, b, stride, repeats=args.repeats)
        rows.append(
            (
                f"{model_name} decoder's 4 ConvTranspose1d vs dilated conv",
                total_dilated,
                total_chosen,
            )
        )
    # ELU over the 32 kHz model's full-rate activations (64 channels, 320,000 steps).
    x = arr(8, 320_000, 64, scale=1.0)
    rows.append(
        (
            "ELU at full rate: exp(x) - 1 vs jax.nn.elu (expm1; kept, see RESULTS.md)",
            median_time(jax.jit(jax.nn.elu), x, repeats=args.repeats),
            median_time(jax.jit(elu_exp), x, repeats=args.repeats),
        )
    )
    # Last conv of the 32 kHz decoder: 64 -> 1 channel, kernel 7, 320,000 steps.
    x, w, b = arr(8, 320_006, 64), arr(1, 64, 7), arr(1)
    rows.append(
        (
            "Conv1d 64->1, kernel 7: matmul + shifted sum vs XLA conv",
            median_time(jax.jit(conv_xla), x, w, b, repeats=args.repeats),
            median_time(jax.jit(ops.conv1d), x, w, b, repeats=args.repeats),
        )
    )
    print(f"{'change':72} {'before s':>9} {'after s':>8} {'speed-up':>8}")
    for name, before, after in rows:
        print(f"{name:72} {before:9.3f} {after:8.3f} {before / after:7.2f}x")


if __name__ == "__main__":
    main()
