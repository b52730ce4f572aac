"""The 2-layer LSTM alone: encodec-jax against ONNX Runtime's LSTM kernel and torch's `nn.LSTM`.

    python benchmarks/lstm_benchmark.py [--hidden 512 1024] [--batch 1 4 8 16] [--steps 500]
        [--repeats 5] [--reuse-freed-memory]

Same random weights in all three, a `[B, T, C]` input of `--steps` frames (500: 10 s at the 50 Hz
frame rate of the 32 kHz model), both layers including their input projections, 2 threads
everywhere (torch.set_num_threads, ORT's intra-op threads; XLA uses the machine's 2 cores).
The three take turns (a shared machine's slow minutes then fall on all of them), each warmed up
in its turn. Prints median seconds per call and the largest difference from torch's output.
ONNX Runtime is skipped when `onnxruntime` or `onnx` does not import (`pip install
encodec-jax[benchmarks]`).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np


def interleaved_medians(calls: dict, repeats: int, pause: float = 0.3) -> dict:
    """Median seconds per call of each `name: fn` (no arguments), the implementations taking
    turns round by round, so that a slow minute on this shared machine slows all of them rather
    than whichever ran then. In its turn each is called once untimed, then timed: the first call
    after another implementation pays for that one's leftovers (ONNX Runtime's and torch's pool
    threads spinning down, freed memory paged back in), which `benchmark.py` measured at up to 2x
    on a whole codec. The pause lets those threads stop."""
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            time.sleep(pause)
            fn()
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def jax_call(fn, *args):
    return fn(*args).block_until_ready()


def ort_session(module, example, path: Path):
    """An ONNX Runtime session for `module` exported at `example`'s shape (opset 17, all graph
    optimisations, 2 intra-op threads), or None without onnxruntime."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, example, str(path), opset_version=17, dynamo=True, verbose=False)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = 2
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", nargs="+", type=int, default=[512, 1024])
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 4, 8, 16])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--reuse-freed-memory",
        action="store_true",
        help="run with encodec_jax.reuse_freed_memory(), as the encodec-jax command does",
    )
    args = parser.parse_args()
    if args.reuse_freed_memory:
        from encodec_jax import memory

        memory.reuse_freed_memory()  # before JAX's first computation

    import jax
    import jax.numpy as jnp
    import torch

    from encodec_jax import cpu_lstm, ops

    torch.set_num_threads(2)
    print(f"LSTM kernel: {cpu_lstm.KERNELS[0] if cpu_lstm.KERNELS else 'none (lax.scan)'}")

    @jax.jit
    def ours(x, params):
        for layer in params:
            x = ops.lstm_layer(x, *layer)
        return x

    print(
        f"{'hidden':>6} {'batch':>5} {'jax s':>7} {'ORT s':>7} {'torch s':>7} "
        f"{'ORT/jax':>7} {'torch/jax':>9} {'max |jax - torch|':>17}"
    )
    for hidden in args.hidden:
        torch.manual_seed(0)
        lstm = torch.nn.LSTM(hidden, hidden, 2, batch_first=True).eval()
        params = [
            tuple(
                jnp.asarray(getattr(lstm, f"{n}_l{i}").detach().numpy())
                for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
            )
            for i in range(2)
        ]
        for batch in args.batch:
            x = 0.1 * torch.randn(batch, args.steps, hidden)
            xj = jnp.asarray(x.numpy())
            with torch.no_grad():
                expected = lstm(x)[0].numpy()
            got = np.asarray(ours(xj, params))
            calls = {"jax": functools.partial(jax_call, ours, xj, params)}
            with torch.no_grad():
                calls["torch"] = functools.partial(lstm, x)
                with tempfile.TemporaryDirectory() as tmp:
                    session = ort_session(lstm, (x,), Path(tmp) / "lstm.onnx")
                if session is not None:
                    feed = {session.get_inputs()[0].name: x.numpy()}
                    calls["ORT"] = functools.partial(session.run, None, feed)
                medians = interleaved_medians(calls, args.repeats)
            del session
            t_jax, t_torch = medians["jax"], medians["torch"]
            t_ort = medians.get("ORT", float("nan"))
            print(
                f"{hidden:6} {batch:5} {t_jax:7.3f} {t_ort:7.3f} {t_torch:7.3f} "
                f"{t_ort / t_jax:6.2f}x {t_torch / t_jax:8.2f}x "
                f"{float(np.max(np.abs(got - expected))):17.2e}",
                flush=True,
            )


if __name__ == "__main__":
    main()
