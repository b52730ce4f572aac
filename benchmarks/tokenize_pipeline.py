"""Pipeline efficiency of `encodec-jax tokenize`: its throughput over `BatchCodec.encode`'s on the
same audio, measured side by side in one process.

    python benchmarks/tokenize_pipeline.py [--preset 24khz] [--items 48] [--repeats 3]
        [--sources folder parquet]

A random model of the preset (speed does not depend on the weights) is saved and loaded as a
user would. The corpus is `--items` mono recordings of 2-12 s, a third each at the model's rate,
44.1 kHz and 16 kHz (so two thirds need resampling), stored as FLAC: as files in a folder, and
as the same bytes in a Parquet file with a `datasets` `Audio` column. The reference is
`BatchCodec.encode` on the whole list of the same audio already decoded and resampled in memory
(what tokenize's output equals); tokenize reads, decodes, resamples, encodes and writes the
shards. Everything is compiled before timing; the repeats are interleaved and the medians
reported. Efficiency = tokenize throughput / encode throughput (1.0: reading costs nothing).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PRESET_NAMES = {"24khz": "ENCODEC_24KHZ", "32khz": "ENCODEC_32KHZ", "48khz": "ENCODEC_48KHZ"}


def make_corpus(
    root: Path, sample_rate: int, items: int, seconds: tuple[float, float], seed: int = 0
) -> list[Path]:
    """FLAC files of `seconds` (min, max) at three rates; returns their paths, sorted."""
    import soundfile as sf

    rng = np.random.default_rng(seed)
    folder = root / "folder"
    folder.mkdir()
    paths = []
    for i in range(items):
        rate = (sample_rate, 44_100, 16_000)[i % 3]
        n = int(rng.uniform(*seconds) * rate)
        t = np.arange(n) / rate
        audio = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 1000) * t) + rng.normal(0, 0.05, n)
        path = folder / f"item{i:04d}.flac"
        sf.write(path, audio.astype(np.float32), rate)
        paths.append(path)
    return sorted(paths)


def write_parquet(paths: list[Path], out: Path, rows_per_group: int = 16) -> None:
    """The same FLAC bytes as a Parquet file laid out as `datasets` writes an `Audio` column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    audio = pa.array(
        [{"bytes": p.read_bytes(), "path": p.name} for p in paths],
        pa.struct({"bytes": pa.binary(), "path": pa.string()}),
    )
    table = pa.table({"audio": audio, "id": [p.stem for p in paths]})
    table = table.replace_schema_metadata(
        {"huggingface": '{"info": {"features": {"audio": {"_type": "Audio"}, "id": '
         '{"dtype": "string", "_type": "Value"}}}}'}
    )  # fmt: skip
    pq.write_table(table, out, row_group_size=rows_per_group)


def run_tokenize(model, source: str, out: Path, args) -> float:
    """Seconds for one tokenize run of `source` into a fresh `out` (the library call the
    command line makes, with the model already loaded)."""
    import encodec_jax.tokenize as tok

    shutil.rmtree(out, ignore_errors=True)
    kwargs = dict(
        model_name="benchmark",
        batch_size=args.batch_size,
        workers=args.workers,
        progress=False,
    )
    start = time.perf_counter()
    if hasattr(tok, "tokenize_source"):
        from encodec_jax.sources import open_source

        result = tok.tokenize_source(model, open_source(source), out, **kwargs)
    else:  # before the reading layer: folders only
        result = tok.tokenize_directory(model, source, out, **kwargs)
    seconds = time.perf_counter() - start
    assert result.failed == 0
    return seconds


def decode_rate(source: str, config, workers: int, seconds_of_audio: float) -> float:
    """x realtime of reading, decoding and resampling alone (no model), on `workers` threads."""
    from concurrent.futures import ThreadPoolExecutor

    from encodec_jax.sources import open_source, read_audio

    items = [item for shard in open_source(source).shards for item in shard.items()]
    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(
            pool.map(
                lambda it: read_audio(it.audio, config.sampling_rate, config.audio_channels),
                items,
            )
        )
    return seconds_of_audio / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESET_NAMES), default="24khz")
    parser.add_argument("--items", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--seconds", type=float, nargs=2, default=(2.0, 12.0), metavar=("MIN", "MAX")
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--sources", nargs="+", default=["folder", "parquet"])
    args = parser.parse_args()

    import jax

    import encodec_jax
    from encodec_jax import EncodecModel
    from encodec_jax.audio import load_audio
    from encodec_jax.batching import BatchCodec
    from encodec_jax.testing import random_model

    config = getattr(encodec_jax, PRESET_NAMES[args.preset])
    root = Path(tempfile.mkdtemp(prefix="tokenize-pipeline-"))
    try:
        random_model(config, seed=0).save_pretrained(root / "model")
        model = EncodecModel.from_pretrained(root / "model")
        paths = make_corpus(root, config.sampling_rate, args.items, tuple(args.seconds))
        sources = {"folder": str(root / "folder")}
        if "parquet" in args.sources:
            (root / "parquet").mkdir()
            write_parquet(paths, root / "parquet" / "train-00000.parquet")
            sources["parquet"] = str(root / "parquet" / "*.parquet")
        audios = [load_audio(p, config.sampling_rate, config.audio_channels)[0] for p in paths]
        seconds_of_audio = sum(a.shape[-1] for a in audios) / config.sampling_rate
        codec = BatchCodec(model, batch_size=args.batch_size)

        # compile every program either path uses, and check they agree
        reference = codec.encode(audios)
        for name in args.sources:
            try:
                run_tokenize(model, sources[name], root / "out", args)
            except Exception as err:  # a source this version cannot read
                print(f"{name}: not measured ({type(err).__name__}: {err})")
                sources.pop(name)
        del reference

        times: dict[str, list[float]] = {"encode": [], **{name: [] for name in sources}}
        for _ in range(args.repeats):
            start = time.perf_counter()
            codec.encode(audios)
            times["encode"].append(time.perf_counter() - start)
            for name, source in sources.items():
                times[name].append(run_tokenize(model, source, root / "out", args))

        print(
            f"{args.preset}, {args.items} items, {seconds_of_audio:.0f} s of audio, batch "
            f"{args.batch_size}, {os.cpu_count()} CPUs, {jax.devices()[0].platform}, "
            f"medians of {args.repeats}"
        )
        encode_rate = seconds_of_audio / statistics.median(times["encode"])
        spread = {n: " ".join(f"{t:.1f}" for t in ts) for n, ts in times.items()}
        print(f"{'BatchCodec.encode':<20} {encode_rate:6.1f}x realtime   (s: {spread['encode']})")
        for name in sources:
            rate = seconds_of_audio / statistics.median(times[name])
            print(
                f"{'tokenize ' + name:<20} {rate:6.1f}x realtime   efficiency "
                f"{rate / encode_rate:.0%}   (s: {spread[name]})"
            )
        if importlib.util.find_spec("encodec_jax.sources") is not None:
            # reading alone, for scale: how much of the CPU it takes beside encoding
            threads = args.workers or min(8, os.cpu_count() or 1)
            for name, source in sources.items():
                rates = [decode_rate(source, config, n, seconds_of_audio) for n in (1, threads)]
                print(
                    f"{'read+decode ' + name:<20} {rates[0]:6.1f}x realtime on 1 thread, "
                    f"{rates[1]:.1f}x on {threads}"
                )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
