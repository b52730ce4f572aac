"""`encodec-jax eval`: how much of the audio a codec keeps at each bandwidth.

For every file, every model and every bandwidth: the file is read at the model's rate and channel
count, encoded and decoded exactly as `encodec-jax reconstruct` does, and compared with what was
read (`metrics.reconstruction_metrics`: SI-SNR, multi-scale mel and STFT distances, L1; with
`speech`, PESQ, STOI and ViSQOL at 16 kHz). The codes are counted per codebook, giving each
codebook's usage and perplexity and the bitrate an ideal entropy coder would reach
(`metrics.entropy_kbps`) beside the nominal one.

A file is encoded once, at the largest bandwidth asked for: residual vector quantization codes a
smaller bandwidth as the first codebooks of a larger one (each codebook quantizes what the ones
before it left), so the codes of every bandwidth are a prefix of those, and each bandwidth is
decoded from its prefix. The test suite checks that these equal `EncodecModel.encode` at that
bandwidth. (Asking for fewer bandwidths compiles a different encoder program, whose float32
rounding can move a metric in its 7th digit.)

A row of the results is the mean over files of each per-file value, for one (model, bandwidth);
only files that every model evaluated count, so the models are compared on the same audio. A
file that cannot be read, encoded or scored is reported with the reason and skipped. The results
depend only on the input and the settings: items are taken in the source's fixed order and
nothing is random.

The audio comes from any source `encodec-jax tokenize` reads (`corpus.open_source`: a folder,
Parquet files, a saved or Hub dataset, WebDataset shards), or one audio file; each item is read
once and converted to every model's rate and channel count.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from . import metrics
from .atomic import atomic_write
from .audio import AUDIO_EXTENSIONS, AudioError
from .corpus import open_source
from .model import EncodecModel
from .sources import (
    Audio,
    ShardError,
    Source,
    SourceError,
    audio_file_source,
    first_line,
    read_audio,
)

RESULTS_FORMAT = "encodec-jax-eval"
RESULTS_VERSION = 1
EXIT_SOME_FAILED = 3
JSON_NAME, CSV_NAME, PLOT_NAME = "eval.json", "eval.csv", "eval.png"
# The columns of eval.csv before the metrics, in order.
ROW_KEYS = ("model", "bandwidth", "n_q", "kbps", "kbps_entropy", "entropy_saving", "files")
# Per-codebook lists of a row (in eval.json; eval.csv holds their means).
CODEBOOK_KEYS = ("usage", "perplexity", "entropy_bits")
_LABELS = {
    "si_snr": "SI-SNR (dB)",
    "mel_distance": "mel distance",
    "stft_distance": "STFT distance",
    "l1": "L1",
    "pesq": "PESQ (wide band)",
    "stoi": "STOI",
    "visqol": "ViSQOL (speech)",
    "kbps_entropy": "entropy-coded kbps",
}


class EvalError(ValueError):
    """An evaluation that cannot start or produced nothing (bad data, bandwidth or output)."""


# ---- the data ----
@dataclasses.dataclass(frozen=True)
class EvalItem:
    """One input of an evaluation.

    Attributes:
        key: the item's name in the results: a file's path relative to the folder; for tables
            and tar shards, `shard:key` (the shard's name, then the item's key in it).
        audio: `[channels, samples]` float32 at `sample_rate`, or None if it failed.
        sample_rate: Hz.
        error: why the item could not be read (then `audio` is None).
        notes: conversions made while reading (resampling, channel mixing).
    """

    key: str
    audio: np.ndarray | None
    sample_rate: int
    error: str | None = None
    notes: tuple[str, ...] = ()


def open_eval_data(data: str | os.PathLike | Source, **source_options) -> Source:
    """The source an evaluation reads: `data` itself if it is an opened `Source`, one local audio
    file as a source of one item, else `corpus.open_source(data, **source_options)` (a folder,
    Parquet or tar files, a saved or Hub dataset).

    Raises:
        EvalError: `data` cannot be opened; the message says what is accepted.
    """
    if isinstance(data, Source):
        return data
    path = os.fspath(data)
    if os.path.isfile(path) and os.path.splitext(path)[1].lower() in AUDIO_EXTENSIONS:
        return audio_file_source(path)
    try:
        return open_source(path, **source_options)
    except SourceError as err:
        raise EvalError(str(err)) from None


def count_eval_items(source: Source) -> int | None:
    """How many items `source` holds (None where a shard cannot tell cheaply)."""
    counts = [shard.count() for shard in source.shards]
    return None if None in counts else sum(counts)


def _source_items(source: Source) -> Iterator[tuple[str, Audio | None, str | None]]:
    """(key, audio, error) of every item of `source`, in its fixed order; a damaged shard is one
    error under the shard's name, after the items read before the damage."""
    for shard in source.shards:
        try:
            for item in shard.items():
                if source.kind == "folder" or item.key is None:
                    key = shard.name
                else:
                    key = f"{shard.name}:{item.key}"
                yield key, item.audio, item.error
        except ShardError as err:
            yield shard.name, None, f"damaged shard: {first_line(err)}"


def _read_item(key: str, audio, error: str | None, sample_rate: int, channels: int) -> EvalItem:
    if error is not None:
        return EvalItem(key, None, sample_rate, error=error)
    try:
        array, notes = read_audio(audio, sample_rate, channels, key)
    except (AudioError, ValueError, RuntimeError, MemoryError) as err:  # the item's own fault
        return EvalItem(key, None, sample_rate, error=first_line(err))
    return EvalItem(key, array, sample_rate, notes=tuple(notes))


def iter_eval_items(
    data: str | os.PathLike | Source, sample_rate: int, channels: int, **source_options
) -> Iterator[EvalItem]:
    """The items of `data` (see `open_eval_data`) at one rate and channel count, in the
    source's fixed order; an item that cannot be read is yielded with its error.

    Args:
        data: a source, a path or spec `corpus.open_source` takes, or one audio file.
        sample_rate: Hz to resample to.
        channels: channel count to mix to.
        **source_options: passed to `open_source` (kind, split, audio_column, ...).

    Yields:
        `EvalItem`s.
    """
    source = open_eval_data(data, **source_options)
    for key, audio, error in _source_items(source):
        yield _read_item(key, audio, error, sample_rate, channels)


# ---- the results ----
@dataclasses.dataclass
class EvalResult:
    """What an evaluation measured.

    Attributes:
        rows: one dict per (model, bandwidth), in model then bandwidth order: `ROW_KEYS`, the
            mean of each metric over the files, and the per-codebook lists `CODEBOOK_KEYS`.
        per_file: one dict per (file, model, bandwidth) with every metric of that file.
        errors: `{"key", "error"}` for every item that failed (and was skipped).
        metrics: the metric names measured, in column order.
        notes: `{"key", "note"}`: conversions made while reading.
    """

    rows: list[dict]
    per_file: list[dict]
    errors: list[dict]
    metrics: list[str]
    notes: list[dict] = dataclasses.field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "format": RESULTS_FORMAT,
            "version": RESULTS_VERSION,
            "metrics": self.metrics,
            "rows": self.rows,
            "per_file": self.per_file,
            "errors": self.errors,
            "notes": self.notes,
        }

    def csv_columns(self) -> list[str]:
        return [*ROW_KEYS, *self.metrics, "usage_mean", "perplexity_mean"]

    def to_csv(self) -> str:
        out = io.StringIO()
        writer = csv.DictWriter(out, self.csv_columns(), lineterminator="\n")
        writer.writeheader()
        for row in self.rows:
            flat = {k: row[k] for k in (*ROW_KEYS, *self.metrics)}
            flat["usage_mean"] = float(np.mean(row["usage"]))
            flat["perplexity_mean"] = float(np.mean(row["perplexity"]))
            writer.writerow(flat)
        return out.getvalue()


def resolve_bandwidths(
    model: EncodecModel, bandwidths: Sequence[float] | str | None, name: str = "the model"
) -> list[float]:
    """The bandwidths to evaluate a model at: all of its own for None or "all", else the given
    ones, each of which must be one of the model's (sorted, duplicates dropped).

    Raises:
        EvalError: for a bandwidth the model does not offer.
    """
    offered = list(model.config.target_bandwidths)
    if bandwidths is None or bandwidths == "all":
        return sorted(set(offered))
    if isinstance(bandwidths, str):
        raise EvalError(f"bandwidths must be numbers or 'all', got {bandwidths!r}")
    chosen = sorted({float(b) for b in bandwidths})
    if not chosen:
        raise EvalError("no bandwidth to evaluate")
    missing = [b for b in chosen if b not in offered]
    if missing:
        raise EvalError(
            f"{name} has no bandwidth {', '.join(f'{b:g}' for b in missing)} kbps "
            f"(it offers {', '.join(f'{b:g}' for b in offered)})"
        )
    return chosen


def evaluate(
    models: Mapping[str, EncodecModel],
    data: str | os.PathLike,
    *,
    bandwidths: Sequence[float] | str | None = None,
    speech: bool = False,
    visqol: bool | None = None,
    progress: bool = True,
    source_options: Mapping[str, object] | None = None,
) -> EvalResult:
    """Evaluate each model at each bandwidth on every item of `data`.

    Args:
        models: {name: model}; the name labels the rows (a Hub id or a directory, say).
        data: an opened `sources.Source`, anything `corpus.open_source` opens (a folder of
            audio files, Parquet or tar shards, a saved or Hub dataset), or one audio file.
        bandwidths: kbps to evaluate, each offered by every model; None or "all": each model's
            own `target_bandwidths`.
        speech: also compute PESQ (wide band), STOI and, see `visqol`, ViSQOL, at 16 kHz.
        visqol: with `speech`, compute ViSQOL; None: when `visqol-python` is installed.
        progress: a tqdm progress bar on stderr.
        source_options: passed to `open_source` (kind, split, config, audio_column, id_column).

    Returns:
        An `EvalResult`.

    Raises:
        EvalError: no model, a bandwidth a model lacks, no audio in `data`, or no item that
            every model could evaluate.
    """
    if not models:
        raise EvalError("no model to evaluate")
    if visqol is None:
        visqol = speech and metrics.visqol_available()
    elif visqol and not speech:
        raise EvalError("ViSQOL is a speech metric here: it needs speech=True")
    elif visqol and not metrics.visqol_available():
        raise EvalError("ViSQOL needs visqol-python: pip install 'visqol-python[lattice]'")
    names = [*metrics.AUDIO_METRICS]
    if speech:
        names += ["pesq", "stoi"] + (["visqol"] if visqol else [])
    evaluators = [
        _ModelEval(name, model, resolve_bandwidths(model, bandwidths, name), names)
        for name, model in models.items()
    ]
    formats = sorted({(e.config.sampling_rate, e.config.audio_channels) for e in evaluators})
    source = open_eval_data(data, **(source_options or {}))
    bar = _progress_bar(count_eval_items(source), progress)
    per_file: list[dict] = []
    errors: list[dict] = []
    notes: list[dict] = []
    for key, audio, error in _source_items(source):
        items = [_read_item(key, audio, error, rate, channels) for rate, channels in formats]
        by_format = dict(zip(formats, items, strict=True))
        failed = next((item.error for item in items if item.error is not None), None)
        if failed is None:
            try:
                outcomes = [
                    e.evaluate(by_format[e.config.sampling_rate, e.config.audio_channels].audio)
                    for e in evaluators
                ]
            except Exception as err:  # any failure is the file's: reported and skipped
                failed = f"cannot evaluate: {first_line(err)}"
        if failed is not None:
            errors.append({"key": key, "error": failed})
        else:
            # Committed only when every model succeeded: all rows mean over the same files.
            for evaluator, (values, counts) in zip(evaluators, outcomes, strict=True):
                evaluator.add(counts)
                for bandwidth, file_values in values.items():
                    per_file.append(
                        {"key": key, "model": evaluator.name, "bandwidth": bandwidth} | file_values
                    )
            seen = set()
            for item in items:
                for note in item.notes:
                    if note not in seen:
                        seen.add(note)
                        notes.append({"key": key, "note": note})
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"{len(errors)} failed", refresh=False)
    if bar is not None:
        bar.close()
    if not per_file:
        raise EvalError(
            f"no item of {source.name} could be evaluated"
            + (f" (first error: {errors[0]['key']}: {errors[0]['error']})" if errors else "")
        )
    rows = [row for e in evaluators for row in e.rows(per_file)]
    return EvalResult(rows=rows, per_file=per_file, errors=errors, metrics=names, notes=notes)


@partial(jax.jit, static_argnames="sample_rate")
def _reconstruction_metrics(pred, target, sample_rate):
    return metrics.reconstruction_metrics(pred, jnp.broadcast_to(target, pred.shape), sample_rate)


_code_counts = jax.jit(metrics.code_counts, static_argnames="bins")


class _ModelEval:
    """One model: evaluates a file at every bandwidth and sums its code counts."""

    def __init__(self, name: str, model: EncodecModel, bandwidths: list[float], names):
        self.name, self.model, self.config = name, model, model.config
        self.bandwidths = bandwidths
        self.n_qs = [self.config.num_quantizers_for_bandwidth(b) for b in bandwidths]
        self.top = bandwidths[int(np.argmax(self.n_qs))]
        self.speech = [n for n in names if n in metrics.SPEECH_METRICS]
        self.counts = np.zeros((max(self.n_qs), self.config.codebook_size), np.int64)

    def evaluate(self, audio: np.ndarray) -> tuple[dict[float, dict], np.ndarray]:
        """({bandwidth: {metric: value}}, code counts `[n_q, bins]`) of one item `[C, T]`."""
        config, length = self.config, audio.shape[-1]
        encoded = self.model.encode(audio[None], bandwidth=self.top)
        codes = encoded.audio_codes  # [chunks, 1, n_q, frames]
        decoded = []
        for n_q in self.n_qs:
            out = self.model.decode(
                codes[:, :, :n_q], encoded.audio_scales, chunk_frames=encoded.chunk_frames
            ).audio_values
            decoded.append(out[0, :, :length])
        pred = jnp.stack(decoded)  # [bandwidths, C, T]
        values = jax.device_get(_reconstruction_metrics(pred, audio[None], config.sampling_rate))
        pred_host = np.asarray(pred)
        results: dict[float, dict] = {}
        for i, bandwidth in enumerate(self.bandwidths):
            row = {name: float(v[i]) for name, v in values.items()}
            if "pesq" in self.speech:
                row["pesq"] = metrics.pesq_wb(audio, pred_host[i], config.sampling_rate)
            if "stoi" in self.speech:
                row["stoi"] = metrics.stoi(audio, pred_host[i], config.sampling_rate)
            if "visqol" in self.speech:
                row["visqol"] = metrics.visqol_speech(audio, pred_host[i], config.sampling_rate)
            results[bandwidth] = row
        # A short last chunk is padded with code 0: count each chunk's real frames only.
        frames = np.arange(codes.shape[-1])[None, :] < np.array(encoded.chunk_frames)[:, None]
        counts = _code_counts(codes[:, 0], config.codebook_size, jnp.asarray(frames))
        return results, np.rint(np.asarray(counts)).astype(np.int64)

    def add(self, counts: np.ndarray) -> None:
        self.counts += counts

    def rows(self, per_file: list[dict]) -> list[dict]:
        config = self.config
        rows = []
        for bandwidth, n_q in zip(self.bandwidths, self.n_qs, strict=True):
            files = [r for r in per_file if r["model"] == self.name and r["bandwidth"] == bandwidth]
            counts = jnp.asarray(self.counts[:n_q], jnp.float32)
            kbps = metrics.nominal_kbps(n_q, config.codebook_size, config.frame_rate)
            kbps_entropy = float(metrics.entropy_kbps(counts, config.frame_rate))
            row = {
                "model": self.name,
                "bandwidth": bandwidth,
                "n_q": n_q,
                "kbps": kbps,
                "kbps_entropy": kbps_entropy,
                "entropy_saving": 1.0 - kbps_entropy / kbps,
                "files": len(files),
            }
            names = [k for k in files[0] if k not in ("key", "model", "bandwidth")]
            for name in names:
                row[name] = float(np.mean([f[name] for f in files]))
            row["usage"] = [float(u) for u in np.asarray(metrics.usage(counts))]
            row["perplexity"] = [float(p) for p in np.asarray(metrics.perplexity(counts))]
            row["entropy_bits"] = [float(h) for h in np.asarray(metrics.entropy_bits(counts))]
            rows.append(row)
        return rows


# ---- writing, printing, plotting ----
def write_results(result: EvalResult, out_dir: str | os.PathLike) -> dict[str, str]:
    """Write `eval.json`, `eval.csv` and the rate-distortion plot `eval.png` into `out_dir`
    (made if missing; each file replaced atomically). Returns {kind: path}."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise EvalError(f"output {out_dir} exists and is not a folder")
    os.makedirs(out_dir, exist_ok=True)
    paths = {
        "json": os.path.join(out_dir, JSON_NAME),
        "csv": os.path.join(out_dir, CSV_NAME),
        "plot": os.path.join(out_dir, PLOT_NAME),
    }
    figure = plot_rate_distortion(result)  # first: a missing matplotlib leaves no file behind
    with atomic_write(paths["json"], "w") as f:
        json.dump(result.to_json(), f, indent=1)
        f.write("\n")
    with atomic_write(paths["csv"], "w") as f:
        f.write(result.to_csv())
    with atomic_write(paths["plot"]) as f:
        figure.savefig(f, format="png", metadata={"Software": None})
    return paths


def format_table(result: EvalResult) -> str:
    """The rows as a plain-text table, one line per (model, bandwidth)."""
    header = ["model", "kbps", "entropy kbps", "saving", *result.metrics, "perplexity"]
    lines = [header]
    for row in result.rows:
        lines.append(
            [
                row["model"],
                f"{row['kbps']:g}",
                f"{row['kbps_entropy']:.2f}",
                f"{100 * row['entropy_saving']:.1f}%",
                *(f"{row[name]:.4g}" for name in result.metrics),
                f"{np.mean(row['perplexity']):.1f}",
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        )
        for line in lines
    )


def plot_rate_distortion(result: EvalResult, metric_names: Sequence[str] | None = None):
    """A matplotlib `Figure`: one panel per metric against the nominal kbps (log scale), one
    line per model; the last panel is the entropy-coded kbps against the nominal kbps. Built
    without pyplot, so it changes no global state; needs matplotlib.

    Args:
        result: an `EvalResult`.
        metric_names: the metrics to draw (default: all but L1).
    """
    from matplotlib.figure import Figure

    names = [m for m in result.metrics if m != "l1"] if metric_names is None else metric_names
    panels = [*names, "kbps_entropy"]
    columns = min(len(panels), 4 if len(panels) > 6 else 3)
    lines = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(4.2 * columns, 3.2 * lines), layout="constrained")
    axes = figure.subplots(lines, columns, squeeze=False).reshape(-1)
    models = list(dict.fromkeys(row["model"] for row in result.rows))
    ticks = sorted({row["kbps"] for row in result.rows})
    better = metrics.AUDIO_METRICS | metrics.SPEECH_METRICS
    for ax, name in zip(axes, panels, strict=False):
        for model in models:
            rows = sorted((r for r in result.rows if r["model"] == model), key=lambda r: r["kbps"])
            ax.plot([r["kbps"] for r in rows], [r[name] for r in rows], marker="o", label=model)
        if name == "kbps_entropy":
            ax.plot(ticks, ticks, color="gray", linestyle=":", label="nominal")
            ax.set_title("entropy-coded kbps")
        else:
            ax.set_title(
                f"{_LABELS.get(name, name)}, {'higher' if better[name] else 'lower'} is better"
            )
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [f"{k:g}" for k in ticks])
        ax.minorticks_off()
        ax.set_xlabel("kbps")
        ax.grid(True, alpha=0.3)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    axes[0].legend(fontsize="small")
    return figure


def _progress_bar(total: int | None, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="file", desc="eval", file=sys.stderr, dynamic_ncols=True)
