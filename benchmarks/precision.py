"""How often the faster precisions give the same codes as full float32, on this machine's backend.

    python benchmarks/precision.py [--models 24khz 32khz 48khz] [--batch 2] [--seconds 3]

For each published architecture: transformers' model with random weights and codebooks filled
from its own residuals (the parity tests' reference models, so near-ties are as common as in a
trained model), saved and loaded through `EncodecModel.from_pretrained`. It encodes the same
audio at the largest bandwidth with encodec-jax's default settings (matmul precision "highest")
and with each faster setting, and prints:
- the share of codes equal to transformers' (CPU, float32) at "highest", and for every code that
  differs whether it is a float32 near-tie (the two codebook entries' float64 distances to the
  residual within 1e-5 of each other, relative) or a real disagreement;
- for "default" (TF32 on a GPU), "high" and bfloat16 activations: the share of all codes and of
  the first codebook's equal to the "highest" codes, and the largest difference of the decoded
  audio (from the same codes) relative to its peak.
On the CPU every precision is full float32, so only bfloat16 differs there.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PRESETS = ("24khz", "32khz", "48khz")
FASTER = {
    "default": {"matmul_precision": "default"},
    "high": {"matmul_precision": "high"},
    "bfloat16": {"compute_dtype": "bfloat16"},
}
TIE_GAP = 1e-5  # relative float64 distance gap under which a flipped code is a near-tie


def first_level_gaps(model, x: np.ndarray, codes: np.ndarray, expected: np.ndarray) -> list:
    """`testing.near_tie_gaps` (the gap at each differing frame) over every chunk of codes
    `[chunks, B, n_q, T]`."""
    from encodec_jax import ops
    from encodec_jax.testing import near_tie_gaps

    config = model.config
    bounds = ops.chunk_bounds(x.shape[-1], config.chunk_length, config.chunk_stride)
    gaps = []
    for chunk, (start, length) in enumerate(bounds):
        frames = ops.num_frames(length, config.hop_length)
        ours, theirs = codes[chunk, ..., :frames], expected[chunk, ..., :frames]
        audio = x[..., start : start + length]
        gaps += [gap for *_, gap in near_tie_gaps(model, audio, ours, theirs)]
    return gaps


def measure(name: str, batch: int, seconds: float) -> dict:
    import jax
    import torch

    import encodec_jax
    from encodec_jax import EncodecModel
    from encodec_jax.testing import random_audio
    from tests.reference import make_hf_model, save_hf_model

    config = getattr(encodec_jax, f"ENCODEC_{name.upper()}")
    reference = make_hf_model(config, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        save_hf_model(reference, Path(tmp))
        model = EncodecModel.from_pretrained(tmp)
    x = random_audio(batch, config.audio_channels, int(seconds * config.sampling_rate), seed=1)
    bandwidth = config.target_bandwidths[-1]
    with torch.no_grad():
        ref_codes = reference.encode(torch.from_numpy(x), bandwidth=bandwidth)[0].numpy()
    out = model.encode(x, bandwidth=bandwidth)
    codes = np.asarray(out.audio_codes)
    audio = np.asarray(model.decode(codes, out.audio_scales).audio_values)
    gaps = first_level_gaps(model, x, codes, ref_codes)
    result = {
        "model": name,
        "backend": jax.default_backend(),
        "codes": codes.size,
        "highest_vs_transformers": float(np.mean(codes == ref_codes)),
        "flipped_frames": len(gaps),
        "largest_gap": max(gaps, default=0.0),
        "near_ties": sum(g < TIE_GAP for g in gaps),
    }
    base_settings = model.settings
    for label, change in FASTER.items():
        model.settings = base_settings.replace(**change)
        fast = np.asarray(model.encode(x, bandwidth=bandwidth).audio_codes)
        fast_audio = np.asarray(model.decode(codes, out.audio_scales).audio_values)
        result[label] = {
            "all": float(np.mean(fast == codes)),
            "first": float(np.mean(fast[..., 0, :] == codes[..., 0, :])),
            "audio_error": float(np.abs(fast_audio - audio).max() / np.abs(audio).max()),
        }
    model.settings = base_settings
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(PRESETS), choices=PRESETS)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    import jax

    device = jax.devices()[0]
    print(f"jax {jax.__version__} on {device.platform} ({device.device_kind})")
    print(
        f"{'model':6} {'codes':>6} {'= HF':>8} {'flipped frames (near-ties, largest gap)':40} "
        + " ".join(f"{label + ' all / first / audio':>30}" for label in FASTER)
    )
    for name in args.models:
        r = measure(name, args.batch, args.seconds)
        flips = f"{r['flipped_frames']} ({r['near_ties']}, {r['largest_gap']:.1e})"
        print(
            f"{name:6} {r['codes']:6d} {100 * r['highest_vs_transformers']:7.3f}% {flips:40} "
            + " ".join(
                f"{100 * r[k]['all']:9.2f}% / {100 * r[k]['first']:6.2f}% / "
                f"{r[k]['audio_error']:.1e}"
                for k in FASTER
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
