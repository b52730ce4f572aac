"""encodec-jax against transformers' EncodecModel: same weights, same batch, one process.

    python benchmarks/benchmark.py [--models 24khz 32khz 48khz] [--batch 8] [--seconds 10]
        [--repeats 5]

For each published architecture (random weights: speed does not depend on their values) it
times encode (SEANet encoder + quantizer, at the largest bandwidth) and decode, interleaving the
two implementations repeat by repeat, and prints medians as x realtime (seconds of audio per
second), the ratio to transformers, encodec-jax's first-call (compile) time, the peak resident
memory of each implementation (measured in a fresh child process each), and the share of this
machine's measured float32 matmul rate that the compiled encoder reaches (its FLOPs from XLA's
cost analysis over its time). Timings on shared machines are noisy: compare ratios measured in
the same run, never absolute numbers across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PRESET_NAMES = {"24khz": "ENCODEC_24KHZ", "32khz": "ENCODEC_32KHZ", "48khz": "ENCODEC_48KHZ"}


def build_pair(name: str, directory: Path):
    """A random transformers model and the same weights loaded in encodec-jax."""
    import torch
    import transformers

    import encodec_jax
    from encodec_jax import EncodecModel

    config = getattr(encodec_jax, PRESET_NAMES[name])
    torch.manual_seed(0)
    reference = transformers.EncodecModel(transformers.EncodecConfig(**config.to_hf_config()))
    reference.eval()
    reference.save_pretrained(directory)
    return config, reference, EncodecModel.from_pretrained(directory)


def matmul_rate(n: int = 2048, repeats: int = 5) -> float:
    """This machine's float32 matmul rate through XLA, in FLOP/s (median of repeats)."""
    import jax
    import jax.numpy as jnp

    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), np.float32))
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        f(a).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times)


def run_jax(model, x: np.ndarray, bandwidth: float):
    import jax

    start = time.perf_counter()
    enc = model.encode(x, bandwidth=bandwidth)
    jax.block_until_ready(enc.audio_codes)
    mid = time.perf_counter()
    audio = model.decode(enc.audio_codes, enc.audio_scales, chunk_frames=enc.chunk_frames)
    jax.block_until_ready(audio.audio_values)
    return mid - start, time.perf_counter() - mid


def run_torch(model, x: np.ndarray, bandwidth: float):
    import torch

    xt = torch.from_numpy(x)
    with torch.no_grad():
        start = time.perf_counter()
        enc = model.encode(xt, bandwidth=bandwidth)
        mid = time.perf_counter()
        model.decode(enc.audio_codes, enc.audio_scales, last_frame_pad_length=enc[2])
    return mid - start, time.perf_counter() - mid


def encoder_flops(model, x: np.ndarray) -> float:
    """FLOPs of the compiled encoder program for this input, from XLA's cost analysis."""
    import jax
    import jax.numpy as jnp

    from encodec_jax import functional

    compiled = jax.jit(functional.embed).lower(model, jnp.asarray(x)).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost["flops"])


def peak_memory(impl: str, name: str, batch: int, seconds: float, directory: str) -> float:
    """Peak resident memory (GiB) of one encode + decode in a fresh child process."""
    here = str(Path(__file__).parent)
    code = (
        f"import sys; sys.path.insert(0, {here!r}); import benchmark as b; "
        f"b._memory_child({impl!r}, {name!r}, {batch}, {seconds!r}, {directory!r}); "
        "print(b.peak_rss_kib())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    return int(out.strip().splitlines()[-1]) / 2**20


def peak_rss_kib() -> int:
    """This process's peak resident memory. Read from /proc (VmHWM) rather than getrusage:
    Linux keeps ru_maxrss across exec, so a child would report its parent's peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


def _memory_child(impl: str, name: str, batch: int, seconds: float, directory: str) -> None:
    import encodec_jax

    config = getattr(encodec_jax, PRESET_NAMES[name])
    x = _audio(batch, config, seconds)
    bandwidth = config.target_bandwidths[-1]
    if impl == "jax":
        run_jax(encodec_jax.EncodecModel.from_pretrained(directory), x, bandwidth)
    else:
        import transformers

        model = transformers.EncodecModel.from_pretrained(directory).eval()
        run_torch(model, x, bandwidth)


def _audio(batch: int, config, seconds: float) -> np.ndarray:
    rng = np.random.default_rng(0)
    shape = (batch, config.audio_channels, int(config.sampling_rate * seconds))
    return (0.1 * rng.standard_normal(shape)).astype(np.float32)


def bench(name: str, batch: int, seconds: float, repeats: int, rate: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        config, reference, model = build_pair(name, Path(tmp))
        x = _audio(batch, config, seconds)
        bandwidth = config.target_bandwidths[-1]
        start = time.perf_counter()
        run_jax(model, x, bandwidth)
        first_call = time.perf_counter() - start
        run_torch(reference, x, bandwidth)  # warm-up
        jax_enc, jax_dec, torch_enc, torch_dec = [], [], [], []
        for _ in range(repeats):
            e, d = run_jax(model, x, bandwidth)
            jax_enc.append(e)
            jax_dec.append(d)
            e, d = run_torch(reference, x, bandwidth)
            torch_enc.append(e)
            torch_dec.append(d)
        flops = encoder_flops(model, x)
        import jax

        from encodec_jax import functional

        embed = jax.jit(functional.embed)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            embed(model, x)[0].block_until_ready()
            times.append(time.perf_counter() - start)
        memory_jax = peak_memory("jax", name, batch, seconds, tmp)
        memory_torch = peak_memory("torch", name, batch, seconds, tmp)
    audio_seconds = batch * seconds
    med = statistics.median
    return {
        "model": name,
        "batch": f"{batch} x {seconds:g} s",
        "encode_x_realtime": audio_seconds / med(jax_enc),
        "encode_ratio": med(torch_enc) / med(jax_enc),
        "decode_x_realtime": audio_seconds / med(jax_dec),
        "decode_ratio": med(torch_dec) / med(jax_dec),
        "transformers_encode_x_realtime": audio_seconds / med(torch_enc),
        "transformers_decode_x_realtime": audio_seconds / med(torch_dec),
        "first_call_s": first_call,
        "peak_mem_gib": memory_jax,
        "transformers_peak_mem_gib": memory_torch,
        "encoder_matmul_share": flops / med(times) / rate,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(PRESET_NAMES), choices=PRESET_NAMES)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument(
        "--memory-only", action="store_true", help="only the peak memory of each implementation"
    )
    args = parser.parse_args()

    import jax
    import torch

    if args.memory_only:
        for name in args.models:
            with tempfile.TemporaryDirectory() as tmp:
                build_pair(name, Path(tmp))
                jax_gib = peak_memory("jax", name, args.batch, args.seconds, tmp)
                torch_gib = peak_memory("torch", name, args.batch, args.seconds, tmp)
            print(
                f"{name} {args.batch} x {args.seconds:g} s: peak memory encodec-jax "
                f"{jax_gib:.2f} GiB, transformers {torch_gib:.2f} GiB",
                flush=True,
            )
        return
    rate = matmul_rate()
    device = jax.devices()[0]
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"jax {jax.__version__} on {device.platform} ({device.device_kind}), torch "
        f"{torch.__version__} with {torch.get_num_threads()} threads; float32 matmul rate "
        f"{rate / 1e9:.1f} GFLOP/s"
    )
    header = (
        f"{'model':7} {'batch':10} {'enc xRT':>8} {'vs HF':>6} {'dec xRT':>8} {'vs HF':>6} "
        f"{'HF enc':>7} {'HF dec':>7} {'compile s':>9} {'mem GiB':>7} {'HF GiB':>6} "
        f"{'matmul %':>8}"
    )
    print(header)
    results = []
    for name in args.models:
        r = bench(name, args.batch, args.seconds, args.repeats, rate)
        results.append(r)
        print(
            f"{r['model']:7} {r['batch']:10} {r['encode_x_realtime']:8.1f} "
            f"{r['encode_ratio']:5.2f}x {r['decode_x_realtime']:8.1f} {r['decode_ratio']:5.2f}x "
            f"{r['transformers_encode_x_realtime']:7.1f} "
            f"{r['transformers_decode_x_realtime']:7.1f} {r['first_call_s']:9.1f} "
            f"{r['peak_mem_gib']:7.2f} {r['transformers_peak_mem_gib']:6.2f} "
            f"{100 * r['encoder_matmul_share']:7.0f}%",
            flush=True,
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"matmul_flops": rate, "results": results}, indent=2))


if __name__ == "__main__":
    main()
