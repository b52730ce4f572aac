"""Encode an audio file to EnCodec codes and decode it back: the library's main job in a script.

    python examples/reconstruct.py INPUT.wav OUTPUT.wav [--model facebook/encodec_24khz]
        [--bandwidth 6.0] [--codes codes.npz]

The input must already be at the model's sampling rate (24/32/48 kHz for the published models);
mono input is duplicated for the stereo 48 kHz model and stereo is averaged for mono models.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import soundfile as sf

from encodec_jax import EncodecModel


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input", help="audio file soundfile can read (wav, flac, ogg, ...)")
    parser.add_argument("output", help="where to write the decoded audio (.wav)")
    parser.add_argument("--model", default="facebook/encodec_24khz", help="Hub id or directory")
    parser.add_argument("--bandwidth", type=float, default=None, help="kbps; default: smallest")
    parser.add_argument("--codes", default=None, help="also save the codes to this .npz file")
    args = parser.parse_args(argv)

    model = EncodecModel.from_pretrained(args.model)
    config = model.config
    audio, rate = sf.read(args.input, dtype="float32", always_2d=True)  # [samples, channels]
    if rate != config.sampling_rate:
        print(
            f"error: {args.input} is at {rate} Hz; this model takes {config.sampling_rate} Hz "
            f"audio (resample it first)",
            file=sys.stderr,
        )
        return 2
    if audio.shape[1] != config.audio_channels:
        print(f"note: converting {audio.shape[1]} channel(s) to {config.audio_channels}")
        mono = audio.mean(axis=1, keepdims=True)
        audio = np.repeat(mono, config.audio_channels, axis=1)
    x = audio.T[None]  # [1, channels, samples]

    start = time.perf_counter()
    encoded = model.encode(x, bandwidth=args.bandwidth)
    decoded = model.decode(
        encoded.audio_codes, encoded.audio_scales, chunk_frames=encoded.chunk_frames
    ).audio_values
    decoded = np.asarray(decoded)[0, :, : x.shape[-1]]
    seconds = time.perf_counter() - start

    sf.write(args.output, decoded.T, config.sampling_rate)
    codes = np.asarray(encoded.audio_codes)
    if args.codes:
        scales = [np.asarray(s) if s is not None else np.zeros(0) for s in encoded.audio_scales]
        np.savez(args.codes, audio_codes=codes, audio_scales=np.stack(scales), length=x.shape[-1])
    duration = x.shape[-1] / config.sampling_rate
    print(
        f"{args.input}: {duration:.2f} s -> codes {codes.shape} (chunks, batch, codebooks, "
        f"frames) -> {args.output} in {seconds:.2f} s (first call includes compilation)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
