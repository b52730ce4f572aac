"""Streaming speed: per-step latency of 1-frame steps and the real-time factor of batched streams.

    python benchmarks/streaming.py [--steps 400] [--batches 1 4 16] [--bandwidth 6.0]
        [--chunk-frames 1] [--json out.json]

The 24 kHz architecture with random weights (speed does not depend on their values), streamed
through the host streams a user calls (`streaming.Encoder.push` of one hop of audio,
`streaming.Decoder.push` of one frame of codes), so the figures include the host's buffering
and transfers. After `compile()` and a warm-up, it times every step:

- latency: median and p99 of one step (encode, decode, and encode then decode of the same
  frame) for one stream. The goal is a p99 of encode + decode below one hop (13.3 ms).
- real-time factor: compute time over audio time for 1, 4 and 16 streams batched (below 1:
  faster than real time; the batch runs in the same steps, so one number for all its streams).
- equality: 10 s streamed in 1-frame steps at the largest bandwidth against offline `encode`
  and `decode` of the whole signal (codes equal, largest audio difference).

Timings on a shared machine are noisy: run it when the machine is otherwise idle.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np


def build_model():
    import jax.numpy as jnp
    from flax import nnx

    from encodec_jax import ENCODEC_24KHZ, EncodecModel

    # Random values on the abstract model: initialising through nnx.Rngs compiles many small
    # programs, and speed does not depend on the values.
    abstract = nnx.eval_shape(lambda: EncodecModel(ENCODEC_24KHZ, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(0)
    flat = []
    for path, var in nnx.to_flat_state(state):
        scale = 1 / np.sqrt(max(1, np.prod(var.shape[1:])))
        flat.append((path, var.replace(jnp.asarray(rng.normal(0, scale, var.shape), jnp.float32))))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def percentiles(times: list[float]) -> tuple[float, float]:
    ms = np.asarray(times) * 1000.0
    return float(np.median(ms)), float(np.percentile(ms, 99))


def run(model, batch: int, steps: int, bandwidth: float, chunk_frames: int) -> dict:
    """Stream `steps` chunks of `chunk_frames` frames through an encoder and a decoder of
    `batch` streams; time each encode and decode push."""
    from encodec_jax import streaming

    config = model.config
    hop = config.hop_length * chunk_frames
    encoder = streaming.Encoder(model, bandwidth, batch, chunk_frames)
    decoder = streaming.Decoder(model, batch, chunk_frames, encoder.num_quantizers)
    encoder.compile()
    decoder.compile()
    rng = np.random.default_rng(batch)
    warmup = encoder.first_frames // chunk_frames + 10
    audio = (0.1 * rng.standard_normal((batch, 1, (warmup + steps) * hop))).astype(np.float32)
    encode_times, decode_times = [], []
    for i in range(warmup + steps):
        chunk = audio[..., i * hop : (i + 1) * hop]
        start = time.perf_counter()
        codes = encoder.push(chunk)
        middle = time.perf_counter()
        decoder.push(codes)
        end = time.perf_counter()
        if i >= warmup:
            encode_times.append(middle - start)
            decode_times.append(end - middle)
    both = [e + d for e, d in zip(encode_times, decode_times, strict=True)]
    seconds = steps * hop / config.sampling_rate
    result = {"batch": batch, "chunk_frames": chunk_frames, "steps": steps}
    for name, times in (("encode", encode_times), ("decode", decode_times), ("both", both)):
        median, p99 = percentiles(times)
        result[f"{name}_ms_median"] = median
        result[f"{name}_ms_p99"] = p99
        result[f"{name}_rtf"] = sum(times) / seconds
    return result


def equality(model, seconds: float, bandwidth: float) -> dict:
    """Stream `seconds` of audio in 1-frame steps and compare with offline `encode` / `decode`
    of the whole signal: codes equal (count), largest audio difference."""
    from encodec_jax import streaming
    from encodec_jax.testing import random_audio

    config = model.config
    audio = random_audio(1, 1, int(seconds * config.sampling_rate) + 123, seed=0)
    encoder = streaming.Encoder(model, bandwidth)
    codes = np.concatenate([encoder.push(audio), encoder.flush()], axis=-1)
    offline = np.asarray(model.encode(audio, bandwidth=bandwidth).audio_codes[0])
    decoder = streaming.Decoder(model)
    decoded = np.concatenate([decoder.push(offline), decoder.flush()], axis=-1)
    reference = np.asarray(model.decode(offline[None], [None]).audio_values)
    return {
        "codes_equal": int((codes == offline).sum()),
        "codes": int(offline.size),
        "max_audio_difference": float(np.abs(decoded - reference).max()),
        "audio_peak": float(np.abs(reference).max()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400, help="timed steps per batch size")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--bandwidth", type=float, default=6.0)
    parser.add_argument("--chunk-frames", type=int, default=1)
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument(
        "--equality-seconds",
        type=float,
        default=10.0,
        help="audio for the equality check (0: skip)",
    )
    args = parser.parse_args()

    import jax

    model = build_model()
    device = jax.devices()[0]
    hop_ms = 1000.0 * model.config.hop_length * args.chunk_frames / model.config.sampling_rate
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, jax "
        f"{jax.__version__} on {device.platform}; 24 kHz model, {args.bandwidth:g} kbps, steps "
        f"of {args.chunk_frames} frame(s) = {hop_ms:.1f} ms of audio"
    )
    print(
        f"{'streams':>7} {'enc med':>8} {'enc p99':>8} {'dec med':>8} {'dec p99':>8} "
        f"{'e+d med':>8} {'e+d p99':>8} {'enc RTF':>8} {'dec RTF':>8} {'e+d RTF':>8}"
    )
    results = []
    for batch in args.batches:
        r = run(model, batch, args.steps, args.bandwidth, args.chunk_frames)
        results.append(r)
        print(
            f"{batch:>7} {r['encode_ms_median']:>8.2f} {r['encode_ms_p99']:>8.2f} "
            f"{r['decode_ms_median']:>8.2f} {r['decode_ms_p99']:>8.2f} "
            f"{r['both_ms_median']:>8.2f} {r['both_ms_p99']:>8.2f} {r['encode_rtf']:>8.3f} "
            f"{r['decode_rtf']:>8.3f} {r['both_rtf']:>8.3f}",
            flush=True,
        )
    print("(ms per step; RTF = compute time / audio time, the same for every stream of a batch)")
    check = None
    if args.equality_seconds > 0:
        top = model.config.target_bandwidths[-1]
        check = equality(model, args.equality_seconds, top)
        print(
            f"streamed against offline, {args.equality_seconds:g} s at {top:g} kbps, 1-frame "
            f"steps: codes equal {check['codes_equal']} of {check['codes']}; audio (peak "
            f"{check['audio_peak']:.3f}) differs by at most {check['max_audio_difference']:.2e}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"latency": results, "equality": check}, f, indent=2)


if __name__ == "__main__":
    main()
