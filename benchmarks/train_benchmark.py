"""encodec-jax's training step against audiocraft's, side by side in one run.

    python benchmarks/train_benchmark.py [--configs tiny musicgen_32khz] [--steps 10]

The reference is the step the parity tests check against (tests/train_reference.py):
audiocraft 1.3.0's RVQ, MS-STFT discriminator, losses, balancer, Adam and EMA around
transformers' SEANet, on the same initial weights and the same batches. Both run on the CPU
with the machine's threads (torch's and XLA's own defaults). Steps alternate between the two
implementations; the script prints the median seconds per step of each, their ratio, the
first-step (compile) time, and the peak resident memory of each implementation measured in a
fresh child process. Timings on shared machines are noisy: compare the ratios of one run.

Configs: `tiny` (the preset: 2 x 0.25 s at 8 kHz) and `musicgen_32khz` (the
`encodec_musicgen_32khz` preset's architecture, 2 x 0.5 s at 32 kHz, with the 5-scale
discriminator of default.yaml).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def config_for(name: str):
    from encodec_jax.train.config import PRESETS

    if name == "tiny":
        base, batch, segment = PRESETS["tiny"], 2, 0.25
    elif name == "musicgen_32khz":
        base, batch, segment = PRESETS["encodec_musicgen_32khz"], 2, 0.5
    else:
        raise SystemExit(f"unknown config {name}; choose tiny or musicgen_32khz")
    return base.replace(data=dataclasses.replace(base.data, batch_size=batch, segment=segment))


def batches(config, n: int):
    from tests.test_train_step import batches as notes_batches

    return notes_batches(n, config, seed=0)


def peak_rss_gib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def run(name: str, steps: int, only: str | None = None) -> dict:
    """Both steps (or `only` one of them, for the memory children), `steps` each."""
    import jax

    from encodec_jax.train import step as step_module
    from tests.train_reference import make_pair

    config = config_for(name)
    reference, parts, state = make_pair(config)
    step_fn = step_module.make_step(parts)
    xs = batches(config, steps + 1)
    times = {"jax": [], "torch": []}
    start = time.perf_counter()
    if only != "torch":
        state, metrics = step_fn(state, xs[0], 0)
        jax.block_until_ready(metrics)
    first = time.perf_counter() - start
    if only != "jax":
        reference.step(xs[0])
    for step, x in enumerate(xs[1:], start=1):
        if only != "torch":
            start = time.perf_counter()
            state, metrics = step_fn(state, x, step)
            jax.block_until_ready(metrics)
            times["jax"].append(time.perf_counter() - start)
        if only != "jax":
            start = time.perf_counter()
            reference.step(x)
            times["torch"].append(time.perf_counter() - start)
    return {"first_step_s": first, **{k: statistics.median(v) for k, v in times.items() if v}}


def memory(name: str, impl: str, steps: int) -> float:
    code = (
        f"import sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); import train_benchmark "
        f"as b; b.run({name!r}, {steps}, only={impl!r}); print(b.peak_rss_gib())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=["tiny", "musicgen_32khz"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--no-memory", action="store_true")
    args = parser.parse_args()
    import jax

    print(
        f"jax {jax.__version__} on {jax.devices()[0].device_kind}, {jax.device_count()} device(s)"
    )
    for name in args.configs:
        result = run(name, args.steps)
        result["speedup"] = result["torch"] / result["jax"]
        if not args.no_memory:
            result["memory_gib"] = {i: memory(name, i, 3) for i in ("jax", "torch")}
        print(
            f"{name}: encodec-jax {result['jax'] * 1e3:.0f} ms/step, audiocraft "
            f"{result['torch'] * 1e3:.0f} ms/step: {result['speedup']:.2f}x; first step "
            f"(compile) {result['first_step_s']:.1f} s"
            + (
                f"; peak memory {result['memory_gib']['jax']:.2f} / "
                f"{result['memory_gib']['torch']:.2f} GiB"
                if "memory_gib" in result
                else ""
            )
        )
        print(json.dumps({name: result}))


if __name__ == "__main__":
    main()
