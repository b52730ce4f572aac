"""encodec-jax against transformers' EncodecModel: same weights, same batch, one process.

    python benchmarks/benchmark.py [--models 24khz 32khz 48khz] [--batch 8] [--seconds 10]
        [--repeats 5]

For each published architecture (random weights, and codebooks filled from the model's own
residuals so that codes vary; speed does not depend on the values) it times encode (SEANet
encoder + quantizer, at the largest bandwidth) and decode, each implementation in its own block
of repeats after a warm-up call, and prints medians as x realtime (seconds of audio per second),
the ratio to transformers, and, when `onnxruntime` imports (`pip install
encodec-jax[benchmarks]`), to ONNX Runtime fp32 running transformers' model exported with
`torch.onnx.export` (encode and decode as two graphs, opset 17, all graph optimisations, 2
intra-op threads like torch's), how many codes differ between them; encodec-jax's
first-call (compile) time, the peak memory of each implementation (resident memory on the CPU,
device memory on a GPU, measured in a fresh child process each), and the share of this machine's
measured float32 matmul rate that the compiled encoder reaches (its FLOPs from XLA's cost
analysis over its time). When JAX runs on a GPU, transformers runs on the same GPU and ONNX
Runtime (a CPU build) is left out. Timings on shared machines are noisy: compare ratios measured
in the same run, never absolute numbers across runs.
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

_REUSE_FREED_MEMORY = False  # --reuse-freed-memory took effect
# Where transformers runs: "cuda" when JAX runs on a GPU (a GPU against a CPU measures nothing).
_TORCH_DEVICE = "cpu"

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.reference

PRESET_NAMES = {"24khz": "ENCODEC_24KHZ", "32khz": "ENCODEC_32KHZ", "48khz": "ENCODEC_48KHZ"}


def build_pair(name: str, directory: Path):
    """transformers' model with random weights, saved, and the same weights loaded in
    encodec-jax. Its codebooks are filled from its own residuals (the parity tests' reference
    model): fresh ones are all zeros, every code would be 0, and the codes check would say
    nothing."""
    import encodec_jax
    from encodec_jax import EncodecModel
    from tests.reference import make_hf_model

    config = getattr(encodec_jax, PRESET_NAMES[name])
    reference = make_hf_model(config, seed=0)
    reference.save_pretrained(directory)
    return config, reference, EncodecModel.from_pretrained(directory)


def matmul_rate(n: int = 2048, repeats: int = 5, precision: str = "highest") -> float:
    """This machine's float32 matmul rate through XLA at `precision` (the codec's default is
    "highest"; a GPU's "default" is TF32), in FLOP/s (median of repeats)."""
    import jax
    import jax.numpy as jnp

    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), np.float32))
    f = jax.jit(lambda a: jnp.matmul(a, a, precision=precision))
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
    """Like `run_jax`: the input's copy to the device is timed, the output stays there."""
    import torch

    def sync():
        if _TORCH_DEVICE == "cuda":
            torch.cuda.synchronize()

    with torch.no_grad():
        start = time.perf_counter()
        enc = model.encode(torch.from_numpy(x).to(_TORCH_DEVICE), bandwidth=bandwidth)
        sync()
        mid = time.perf_counter()
        model.decode(enc.audio_codes, enc.audio_scales, last_frame_pad_length=enc[2])
        sync()
    return mid - start, time.perf_counter() - mid


class _EncodeForOnnx:
    """transformers' encode as a module with tensor outputs: codes `[chunks, B, n_q, frames]`,
    and for the normalising (48 kHz) model the scales `[chunks, B, 1]`."""

    def __new__(cls, model, bandwidth: float):
        import torch

        class Encode(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.model = model

            def forward(self, x):
                codes, scales, _ = self.model.encode(x, bandwidth=bandwidth, return_dict=False)
                if scales[0] is None:
                    return codes
                return codes, torch.stack(scales)

        return Encode().eval()


class _DecodeForOnnx:
    """transformers' decode as a module of tensors (codes, and scales where the model has them)."""

    def __new__(cls, model, last_frame_pad_length: int):
        import torch

        class Decode(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.model = model

            def forward(self, codes, scales=None):
                scales = [None] if scales is None else list(scales)
                return self.model.decode(
                    codes, scales, last_frame_pad_length=last_frame_pad_length, return_dict=False
                )[0]

        return Decode().eval()


def export_onnx(model, x: np.ndarray, bandwidth: float, directory: Path) -> bool:
    """Export transformers' encode and decode to `directory` (encode.onnx, decode.onnx) at this
    input's shape; False when onnxruntime or onnx is missing."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    import warnings

    import torch

    xt = torch.from_numpy(x)
    with torch.no_grad():
        codes, scales, pad = model.encode(xt, bandwidth=bandwidth, return_dict=False)
    decode_args = (codes,) if scales[0] is None else (codes, torch.stack(scales))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        # The TorchScript exporter: it traces the chunk loop at this shape and emits ONNX's LSTM
        # operator, ONNX Runtime's own LSTM kernel.
        torch.onnx.export(
            _EncodeForOnnx(model, bandwidth),
            (xt,),
            str(directory / "encode.onnx"),
            opset_version=17,
            dynamo=False,
        )
        torch.onnx.export(
            _DecodeForOnnx(model, pad),
            decode_args,
            str(directory / "decode.onnx"),
            opset_version=17,
            dynamo=False,
        )
    return True


class OrtCodec:
    """ONNX Runtime sessions for the exported encode and decode (fp32, CPU)."""

    def __init__(self, directory: Path):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = 2
        options.inter_op_num_threads = 1
        providers = ["CPUExecutionProvider"]
        self.encoder = ort.InferenceSession(
            str(directory / "encode.onnx"), options, providers=providers
        )
        self.decoder = ort.InferenceSession(
            str(directory / "decode.onnx"), options, providers=providers
        )

    def encode(self, x: np.ndarray) -> list[np.ndarray]:
        return self.encoder.run(None, {self.encoder.get_inputs()[0].name: x})

    def decode(self, encoded: list[np.ndarray]) -> np.ndarray:
        names = [i.name for i in self.decoder.get_inputs()]
        return self.decoder.run(None, dict(zip(names, encoded, strict=True)))[0]


def run_ort(codec: OrtCodec, x: np.ndarray):
    start = time.perf_counter()
    encoded = codec.encode(x)
    mid = time.perf_counter()
    codec.decode(encoded)
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
    """Peak memory (GiB) of one encode + decode in a fresh child process: resident memory on the
    CPU, the framework's peak device allocation on a GPU."""
    here = str(Path(__file__).parent)
    reuse = "import encodec_jax; encodec_jax.reuse_freed_memory(); " if _REUSE_FREED_MEMORY else ""
    code = (
        f"{reuse}import sys; sys.path.insert(0, {here!r}); import benchmark as b; "
        f"b._TORCH_DEVICE = {_TORCH_DEVICE!r}; "
        f"b._memory_child({impl!r}, {name!r}, {batch}, {seconds!r}, {directory!r}); "
        f"print(b.peak_kib({impl!r}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    return int(out.strip().splitlines()[-1]) / 2**20


def peak_kib(impl: str) -> int:
    """This process's peak memory where `impl` ran: device memory on a GPU, else resident."""
    if _TORCH_DEVICE == "cuda" and impl == "torch":
        import torch

        return torch.cuda.max_memory_allocated() // 1024
    if _TORCH_DEVICE == "cuda" and impl == "jax":
        import jax

        return jax.devices()[0].memory_stats()["peak_bytes_in_use"] // 1024
    return peak_rss_kib()


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
    elif impl == "ort":
        run_ort(OrtCodec(Path(directory)), x)
    else:
        import transformers

        model = transformers.EncodecModel.from_pretrained(directory).eval().to(_TORCH_DEVICE)
        run_torch(model, x, bandwidth)


def _audio(batch: int, config, seconds: float) -> np.ndarray:
    rng = np.random.default_rng(0)
    shape = (batch, config.audio_channels, int(config.sampling_rate * seconds))
    return (0.1 * rng.standard_normal(shape)).astype(np.float32)


def bench(
    name: str,
    batch: int,
    seconds: float,
    repeats: int,
    rate: float,
    precision: str = "highest",
    with_memory: bool = True,
) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        config, reference, model = build_pair(name, Path(tmp))
        model.settings = model.settings.replace(matmul_precision=precision)
        reference.to(_TORCH_DEVICE)
        x = _audio(batch, config, seconds)
        bandwidth = config.target_bandwidths[-1]
        start = time.perf_counter()
        run_jax(model, x, bandwidth)
        first_call = time.perf_counter() - start
        ort_codec = None
        # ONNX Runtime's CPU build only: against encodec-jax on a GPU it would measure nothing.
        if _TORCH_DEVICE == "cpu" and export_onnx(reference, x, bandwidth, Path(tmp)):
            ort_codec = OrtCodec(Path(tmp))
        codes_differing = _codes_differing(model, reference, ort_codec, x, bandwidth)
        # Each implementation timed in its own block after a warm-up call, not interleaved
        # repeat by repeat: the first encodec-jax call after an ONNX Runtime run measured 1.7-2x
        # slower than the next one (32 kHz, 4 x 10 s: 3.3-3.9 s, then 1.7-2.2 s), ONNX Runtime's
        # pool threads and freed arenas disturbing whoever runs next in the process.
        times = {"jax": ([], []), "torch": ([], []), "ort": ([], [])}
        for impl, run, args in (
            ("jax", run_jax, (model, x, bandwidth)),
            ("torch", run_torch, (reference, x, bandwidth)),
            ("ort", run_ort, (ort_codec, x)),
        ):
            if impl == "ort" and ort_codec is None:
                continue
            run(*args)  # warm-up
            for _ in range(repeats):
                e, d = run(*args)
                times[impl][0].append(e)
                times[impl][1].append(d)
        flops = encoder_flops(model, x)
        import jax

        from encodec_jax import functional

        embed = jax.jit(functional.embed)
        embed_times = []
        for _ in range(repeats):
            start = time.perf_counter()
            embed(model, x)[0].block_until_ready()
            embed_times.append(time.perf_counter() - start)
        memory = {
            impl: peak_memory(impl, name, batch, seconds, tmp) if with_memory else float("nan")
            for impl in ("jax", "torch", "ort")
            if impl != "ort" or ort_codec
        }
    audio_seconds = batch * seconds
    med = statistics.median
    jax_enc, jax_dec = (med(t) for t in times["jax"])
    torch_enc, torch_dec = (med(t) for t in times["torch"])
    result = {
        "model": name,
        "batch": f"{batch} x {seconds:g} s",
        "encode_x_realtime": audio_seconds / jax_enc,
        "encode_ratio": torch_enc / jax_enc,
        "decode_x_realtime": audio_seconds / jax_dec,
        "decode_ratio": torch_dec / jax_dec,
        "transformers_encode_x_realtime": audio_seconds / torch_enc,
        "transformers_decode_x_realtime": audio_seconds / torch_dec,
        "first_call_s": first_call,
        "peak_mem_gib": memory["jax"],
        "transformers_peak_mem_gib": memory["torch"],
        "encoder_matmul_share": flops / med(embed_times) / rate,
        "codes_differing_hf_ort": codes_differing,
    }
    if ort_codec:
        ort_enc, ort_dec = (med(t) for t in times["ort"])
        result.update(
            ort_encode_x_realtime=audio_seconds / ort_enc,
            ort_decode_x_realtime=audio_seconds / ort_dec,
            encode_ratio_ort=ort_enc / jax_enc,
            decode_ratio_ort=ort_dec / jax_dec,
            ort_peak_mem_gib=memory["ort"],
        )
    return result


def _codes_differing(model, reference, ort_codec, x: np.ndarray, bandwidth: float) -> str:
    """How many of encodec-jax's codes differ from transformers' and, where it runs, ONNX
    Runtime's: "jax/ORT of total" (0/0: all three identical). Random audio at the largest
    bandwidth meets near-ties (`benchmarks/precision.py` checks that flips are ties)."""
    import torch

    jax_codes = np.asarray(model.encode(x, bandwidth=bandwidth).audio_codes)
    with torch.no_grad():
        xt = torch.from_numpy(x).to(_TORCH_DEVICE)
        torch_codes = reference.encode(xt, bandwidth=bandwidth)[0].cpu().numpy()
    others = [torch_codes] + ([ort_codec.encode(x)[0]] if ort_codec else [])
    counts = [
        str(int((c != jax_codes).sum())) if c.shape == jax_codes.shape else "shape" for c in others
    ]
    return f"{'/'.join(counts)} of {jax_codes.size}"


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
    parser.add_argument(
        "--no-memory", action="store_true", help="skip the peak memory (its child processes)"
    )
    parser.add_argument(
        "--reuse-freed-memory",
        action="store_true",
        help="the whole process (all three implementations, and the memory children) runs with "
        "encodec_jax.reuse_freed_memory(), as the encodec-jax command does",
    )
    parser.add_argument(
        "--precision",
        choices=("highest", "default"),
        default="highest",
        help="on a GPU: 'highest' runs both in full float32 (transformers with TF32 off), "
        "'default' lets both use TF32 (encodec-jax's matmul_precision='default', torch's "
        "allow_tf32), whose codes are not expected to agree; the CPU has no TF32",
    )
    args = parser.parse_args()
    if args.reuse_freed_memory:
        global _REUSE_FREED_MEMORY
        from encodec_jax import memory

        _REUSE_FREED_MEMORY = memory.reuse_freed_memory()  # before JAX's first computation

    import jax
    import torch

    global _TORCH_DEVICE
    if jax.default_backend() == "gpu":
        if not torch.cuda.is_available():
            raise SystemExit("JAX runs on a GPU but torch sees none: nothing to compare against")
        _TORCH_DEVICE = "cuda"
        tf32 = args.precision == "default"
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32

    if args.memory_only:
        for name in args.models:
            with tempfile.TemporaryDirectory() as tmp:
                config, reference, _ = build_pair(name, Path(tmp))
                x = _audio(args.batch, config, args.seconds)
                has_ort = export_onnx(reference, x, config.target_bandwidths[-1], Path(tmp))
                jax_gib = peak_memory("jax", name, args.batch, args.seconds, tmp)
                torch_gib = peak_memory("torch", name, args.batch, args.seconds, tmp)
                ort = (
                    f", ONNX Runtime {peak_memory('ort', name, args.batch, args.seconds, tmp):.2f}"
                    " GiB"
                    if has_ort
                    else ""
                )
            print(
                f"{name} {args.batch} x {args.seconds:g} s: peak memory encodec-jax "
                f"{jax_gib:.2f} GiB, transformers {torch_gib:.2f} GiB{ort}",
                flush=True,
            )
        return
    from encodec_jax import cpu_lstm

    # A GPU needs a larger product to reach its rate than the CPU's 2048.
    rate = matmul_rate(8192 if _TORCH_DEVICE == "cuda" else 2048, precision=args.precision)
    device = jax.devices()[0]
    torch_on = (
        f"{torch.cuda.get_device_name()} (TF32 {'on' if args.precision == 'default' else 'off'})"
        if _TORCH_DEVICE == "cuda"
        else f"the CPU with {torch.get_num_threads()} threads"
    )
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"jax {jax.__version__} on {device.platform} ({device.device_kind}), matmul precision "
        f"{args.precision}, torch {torch.__version__} on {torch_on}; float32 matmul rate "
        f"{rate / 1e9:.1f} GFLOP/s; LSTM kernel {(cpu_lstm.KERNELS or ('none',))[0]}"
    )
    header = (
        f"{'model':7} {'batch':10} {'enc xRT':>8} {'vs HF':>6} {'dec xRT':>8} {'vs HF':>6} "
        f"{'HF enc':>7} {'HF dec':>7} {'compile s':>9} {'mem GiB':>7} {'HF GiB':>6} "
        f"{'matmul %':>8} {'codes differ HF/ORT':>19} {'ORT enc':>7} {'vs ORT':>6} "
        f"{'ORT dec':>7} {'vs ORT':>6} {'ORT GiB':>7}"
    )
    print(header)
    results = []
    for name in args.models:
        r = bench(
            name, args.batch, args.seconds, args.repeats, rate, args.precision, not args.no_memory
        )
        results.append(r)
        print(
            f"{r['model']:7} {r['batch']:10} {r['encode_x_realtime']:8.1f} "
            f"{r['encode_ratio']:5.2f}x {r['decode_x_realtime']:8.1f} {r['decode_ratio']:5.2f}x "
            f"{r['transformers_encode_x_realtime']:7.1f} "
            f"{r['transformers_decode_x_realtime']:7.1f} {r['first_call_s']:9.1f} "
            f"{r['peak_mem_gib']:7.2f} {r['transformers_peak_mem_gib']:6.2f} "
            f"{100 * r['encoder_matmul_share']:7.1f}% "
            f"{r['codes_differing_hf_ort']:>19}"
            + (
                f" {r['ort_encode_x_realtime']:7.1f} {r['encode_ratio_ort']:5.2f}x "
                f"{r['ort_decode_x_realtime']:7.1f} {r['decode_ratio_ort']:5.2f}x "
                f"{r['ort_peak_mem_gib']:7.2f}"
                if "ort_encode_x_realtime" in r
                else ""
            ),
            flush=True,
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"matmul_flops": rate, "results": results}, indent=2))


if __name__ == "__main__":
    main()
