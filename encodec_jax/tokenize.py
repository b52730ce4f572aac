"""Tokenize a corpus (a folder of audio files, Parquet files, a Hugging Face dataset, WebDataset
tar shards; local or behind an fsspec URL: see `sources`) into Parquet shards of EnCodec codes,
resumably.

Layout of the output directory (one process; under `jax.distributed` every name carries the
process index, e.g. `shard-p001-00000.parquet`, `manifest-p001.json`, `errors-p001.jsonl`):

- `shard-00000.parquet`, ...: one row per item, in source order: `path` (the source shard the
  item came from: for a folder, the file relative to it, '/'-separated), `key` (the item's key:
  see `sources`), `codes` (`[chunks, n_q, frames]` nested lists of int; short chunks padded with
  0), `chunk_frames`, `audio_scales` (one per chunk, or null for models that do not normalise),
  `sample_rate`, `num_samples` (at the model's rate), `bandwidth`, `model`, then the kept
  columns. `datasets.load_dataset("parquet", data_files="OUT/shard-*.parquet")` reads them.
- `errors.jsonl`: `{"path": ..., "key": ..., "error": ...}` for every item that could not be
  tokenized (and every damaged shard, with key null).
- `manifest.json`: the settings of the run and, for each output shard done, the source positions
  (source shard and item index in it) where it starts and ends.

Determinism and resumption: this process's share of the source shards (`pipeline.share_of`) is
read in order as one stream of items, and output shard k holds the stream's items k * shard_size ...
(k + 1) * shard_size - 1 that did not fail, so a shard's content depends only on the input and
the settings. Every file is written whole (a temporary name, fsynced and renamed into place; one
upload on object stores), and the manifest is updated after each shard with where the next one
starts in the source, so a run killed at any moment (SIGKILL included) and started again with
the same arguments redoes at most the shards it was working on, reading from the source position
recorded, and every good item ends up in exactly one shard.

Pipeline (`pipeline`): a reader thread walks the source a bounded number of items ahead; a
thread pool decodes and resamples them; the main thread groups decoded items by length bucket
and encodes each bucket as soon as it holds a full batch (`BatchCodec`), so batches are as full
as when encoding the whole list at once. At most `2 * workers + batch_size` items are being
read or decoded and `batch_size * (len(buckets) + 1)` decoded items wait for a batch; nothing
else of the source is held in memory besides the Parquet row group, Arrow record batch or tar
sample being read.

Codes: an item's codes depend only on its own audio and its bucket. They equal
`EncodecModel.encode` of the item alone except at its end: encoded alone, the model pads a
partial last frame by reflection where the batch holds zeros, so the last frame can differ (and,
for non-causal models, the frames whose receptive field reaches past the end). `exact=True`
(`--exact`) pads nothing and matches exactly, at the cost of one compiled program per distinct
length.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np

from .atomic import TEMP_SUFFIX, atomic_write, temp_prefix
from .batching import BatchCodec, EncodedItem, round_bucket
from .model import EncodecModel
from .pipeline import Pipeline, Prefetch, records, share_of
from .sources import Source, SourceError
from .untrusted import is_finite, parse_json_object

MANIFEST_FORMAT = "encodec-jax-tokenize"
MANIFEST_VERSION = 2
EXIT_SOME_FAILED = 3
_SHARD_KEYS = frozenset({"file", "rows", "items", "audio_seconds", "start", "end", "errors"})
_ERROR_KEYS = frozenset({"path", "key", "error"})
# The columns tokenize writes; kept columns may not reuse these names.
ROW_COLUMNS = (
    "path",
    "key",
    "codes",
    "chunk_frames",
    "audio_scales",
    "sample_rate",
    "num_samples",
    "bandwidth",
    "model",
)


class TokenizeError(ValueError):
    """A tokenize run that cannot start (bad input or output, changed settings, a damaged
    manifest)."""


@dataclasses.dataclass
class TokenizeResult:
    """What a run did.

    Attributes:
        items: items in this process's share (all runs), or None if the source has not been
            read to its end.
        failed: how many items could not be tokenized (this run and earlier ones).
        shards: shard files written in total.
        processed_items: items processed by this run (not counting resumed ones).
        audio_seconds: seconds of audio this run tokenized.
        seconds: wall time of this run.
        errors_path: the errors file, or None if no item failed.
    """

    items: int
    failed: int
    shards: int
    processed_items: int
    audio_seconds: float
    seconds: float
    errors_path: str | None


def output_names(process_index: int, process_count: int) -> tuple[str, str, str]:
    """(shard name pattern with one `{}` for the shard number, manifest name, errors name)."""
    if process_count == 1:
        return "shard-{:05d}.parquet", "manifest.json", "errors.jsonl"
    tag = f"p{process_index:03d}"
    return f"shard-{tag}-{{:05d}}.parquet", f"manifest-{tag}.json", f"errors-{tag}.jsonl"


def tokenize_source(
    model: EncodecModel,
    source: Source,
    output: str | os.PathLike,
    *,
    model_name: str,
    bandwidth: float | None = None,
    batch_size: int = 8,
    shard_size: int = 1000,
    buckets: Sequence[int] | None = None,
    exact: bool = False,
    workers: int | None = None,
    progress: bool = True,
) -> TokenizeResult:
    """Encode every item of `source` into Parquet shards in `output`.

    Args:
        model: the codec.
        source: what to read (`corpus.open_source`).
        output: output directory, local or an fsspec URL (made if missing); an earlier run's
            output there is resumed when its settings are the same, and an error otherwise.
        model_name: the model's Hub id or directory, stored in every row.
        bandwidth: kbps, as in `EncodecModel.encode`.
        batch_size: items per compiled call.
        shard_size: items per output shard (failed items leave a shard that much shorter).
        buckets: padded lengths in samples (rounded up to whole frames, or chunk strides);
            default `batching.default_buckets`.
        exact: group equal lengths only, so that every item's codes equal what
            `EncodecModel.encode` gives for it alone (one compiled program per distinct length).
        workers: threads that decode and resample audio; default min(8, CPUs).
        progress: show a tqdm progress bar on stderr.

    Returns:
        A `TokenizeResult`.

    Raises:
        TokenizeError: if nothing can be done (an unusable or foreign output directory, an
            earlier run there with other settings, a kept column named like an output column).
        OSError: the storage failed while reading or writing; run again to resume.
    """
    start = time.perf_counter()
    config = model.config
    if shard_size < 1:
        raise TokenizeError(f"shard size must be at least 1, got {shard_size}")
    clash = [c for c in source.column_types if c in ROW_COLUMNS]
    if clash:
        raise TokenizeError(
            f"--keep-columns: {', '.join(clash)} would overwrite the column tokenize writes "
            f"under that name ({', '.join(ROW_COLUMNS)})"
        )
    if buckets is not None:
        buckets = sorted({round_bucket(config, int(b)) for b in buckets})
    codec = BatchCodec(
        model, bandwidth=bandwidth, batch_size=batch_size, buckets=buckets, exact=exact
    )
    share = share_of(source)
    process_index, process_count = jax.process_index(), jax.process_count()
    shard_pattern, manifest_name, errors_name = output_names(process_index, process_count)
    settings = {
        "model": str(model_name),
        "config_sha256": _sha256(json.dumps(config.to_hf_config(), sort_keys=True)),
        "bandwidth": config.target_bandwidths[0] if bandwidth is None else float(bandwidth),
        "n_q": codec.num_quantizers,
        "shard_size": int(shard_size),
        "buckets": list(codec.buckets),
        "exact": bool(exact),
        "process_index": process_index,
        "process_count": process_count,
        "source": {"kind": source.kind, **source.options},
        "source_split": "by item" if share.by_item else "by shard",
        "source_shards": len(share.shards),
        "source_sha256": source.fingerprint(share.shards),
    }
    out = _Output(output)
    run = _Run(out, shard_pattern, manifest_name, errors_name, settings, share.shards)
    run.open()
    table_meta = {
        **settings,
        "sample_rate": config.sampling_rate,
        "channels": config.audio_channels,
    }
    bar = _progress_bar(share.count(), run.items_done(), progress)
    done = {"items": 0, "seconds": 0.0}

    def advance(items: int, seconds: float) -> None:
        done["items"] += items
        done["seconds"] += seconds
        if bar is not None:
            elapsed = time.perf_counter() - start
            bar.set_postfix_str(
                f"{done['seconds'] / 3600:.2f} h audio, "
                f"{done['seconds'] / max(elapsed, 1e-9):.1f}x realtime",
                refresh=False,
            )
            bar.update(items)

    workers = workers or min(8, os.cpu_count() or 1)
    total = run.num_shards  # known once a run has read the whole share
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tokenize-decode") as pool:
        pipeline = Pipeline(codec, pool, workers, advance)
        k = 0
        while True:
            while str(k) in run.shards:
                k += 1
            if total is not None and k >= total:
                break
            stream = Prefetch(records(share, run.start_of(k)), pipeline.decoding_limit)
            try:
                for j, outcomes in pipeline.shards(stream, k, shard_size, run.is_done):
                    run.finish_shard(j, outcomes, model_name, codec, table_meta, source)
            finally:
                stream.close()
            k = pipeline.next_shard
            if pipeline.source_ended:
                total = k
                break
    if bar is not None:
        bar.close()
    run.complete(total)
    failed = sum(len(s["errors"]) for s in run.shards.values())
    return TokenizeResult(
        items=run.items_done(),
        failed=failed,
        shards=sum(1 for s in run.shards.values() if s["file"] is not None),
        processed_items=done["items"],
        audio_seconds=done["seconds"],
        seconds=time.perf_counter() - start,
        errors_path=out.display(errors_name) if failed else None,
    )


# ---- the output directory ----
class _Output:
    """The output directory, local or on an fsspec file system. Every file appears whole: local
    files through `atomic_write`, remote ones in one upload (`pipe_file`), which object stores
    make visible only once complete."""

    def __init__(self, url: str | os.PathLike):
        from .sources import filesystem, is_local

        self.url = os.fspath(url).rstrip("/") or os.fspath(url)
        try:
            fs, path = filesystem(self.url)
        except SourceError as err:
            raise TokenizeError(str(err).replace("cannot open", "cannot write to")) from None
        self.fs, self.local = fs, is_local(fs)
        self.path = path.rstrip("/") if len(path) > 1 else path

    def display(self, name: str) -> str:
        """`name` inside the output, as the user gave the output."""
        if self.local and "://" not in self.url:
            return os.path.join(self.url, name)
        return f"{self.url}/{name}"

    def _join(self, name: str) -> str:
        return os.path.join(self.path, name) if self.local else f"{self.path}/{name}"

    def prepare(self) -> None:
        if self.fs.exists(self.path) and not self.fs.isdir(self.path):
            raise TokenizeError(f"output {self.url} exists and is not a directory")
        self.fs.makedirs(self.path, exist_ok=True)

    def names(self) -> list[str]:
        if self.local:
            return os.listdir(self.path) if os.path.isdir(self.path) else []
        try:
            listing = self.fs.ls(self.path, detail=False)
        except FileNotFoundError:
            return []
        return [p.rstrip("/").rsplit("/", 1)[-1] for p in listing]

    def exists(self, name: str) -> bool:
        return self.fs.exists(self._join(name))

    def read(self, name: str, limit: int) -> bytes:
        """The file's bytes; TokenizeError if it holds more than `limit` (nothing read)."""
        path = self._join(name)
        size = self.fs.size(path)
        if size is not None and size > limit:
            raise TokenizeError(f"{self.display(name)} is {size} bytes, more than it can be")
        with self.fs.open(path, "rb") as f:
            return f.read()

    def write(self, name: str, data: bytes) -> None:
        if self.local:
            with atomic_write(self._join(name)) as f:
                f.write(data)
        else:
            self.fs.pipe_file(self._join(name), data)

    def remove(self, name: str) -> None:
        try:
            self.fs.rm_file(self._join(name))
        except FileNotFoundError:
            pass


class _Run:
    """The output directory of one process: its manifest, shards and errors file."""

    MANIFEST_LIMIT = 1 << 30  # bytes read of a manifest at most (a million shards is ~300 MB)

    def __init__(self, out: _Output, shard_pattern, manifest_name, errors_name, settings, shards):
        self.out = out
        self.shard_pattern = shard_pattern
        self.manifest_name, self.errors_name = manifest_name, errors_name
        self.own_names = (shard_pattern.split("{")[0], manifest_name, errors_name)
        self.settings = settings
        self.source_shards = shards
        self.index_of = {shard.name: i for i, shard in enumerate(shards)}
        self.shards: dict[str, dict] = {}
        self.num_shards: int | None = None

    # positions in source terms: {"shard": name (null past the last one), "item": index}
    def _position(self, position: tuple[int, int]) -> dict:
        s, j = position
        name = self.source_shards[s].name if s < len(self.source_shards) else None
        return {"shard": name, "item": j}

    def start_of(self, k: int) -> tuple[int, int]:
        """The source position where output shard k starts (shard k - 1 must be done)."""
        if k == 0:
            return (0, 0)
        end = self.shards[str(k - 1)]["end"]
        s = len(self.source_shards) if end["shard"] is None else self.index_of[end["shard"]]
        return (s, end["item"])

    def is_done(self, k: int) -> bool:
        return str(k) in self.shards

    def open(self) -> None:
        """Start a new run or pick up an earlier one with the same settings."""
        self.out.prepare()
        self._remove_stale_temp_files()
        if self.out.exists(self.manifest_name):
            manifest = self._read_manifest()
            old = manifest["settings"]
            changed = sorted(
                k for k in set(old) | set(self.settings) if old.get(k) != self.settings.get(k)
            )
            if changed:
                raise TokenizeError(
                    f"{self.out.url} holds a tokenize run with other settings or input "
                    f"(differs in: {', '.join(changed)}); use a new output directory"
                )
            self.shards = manifest["shards"]
            self.num_shards = manifest["num_shards"]
            # A completed shard whose file was deleted is simply made again.
            present = set(self.out.names())
            for k, shard in list(self.shards.items()):
                if shard["file"] is not None and shard["file"] not in present:
                    del self.shards[k]
        else:
            names = self.out.names()
            foreign = [n for n in names if not _is_tokenize_output(n)]
            own = [n for n in names if n.startswith(self.own_names[0])]
            if foreign or own:
                raise TokenizeError(
                    f"output directory {self.out.url} is not empty and holds no tokenize "
                    f"manifest ({(foreign or own)[0]}, ...); use a new or empty directory"
                )
            self._write_manifest()
        self._write_errors()

    def items_done(self) -> int:
        return sum(s["items"] for s in self.shards.values())

    def finish_shard(self, k, outcomes, model_name, codec, table_meta, source: Source) -> None:
        """Write shard k (if any item of it succeeded), then record it in the manifest."""
        rows = [(r, o) for r, o in outcomes if isinstance(o, EncodedItem)]
        errors = [
            {"path": r.path, "key": r.key, "error": o} for r, o in outcomes if isinstance(o, str)
        ]
        name = None
        if rows:
            import pyarrow.parquet as pq

            name = self.shard_pattern.format(k)
            table = _shard_table(rows, model_name, codec, table_meta, source.column_types)
            buffer = io.BytesIO()
            pq.write_table(table, buffer, compression="zstd")
            self.out.write(name, buffer.getvalue())
        audio_seconds = sum(item.num_samples for _, item in rows) / codec.config.sampling_rate
        self.shards[str(k)] = {
            "file": name,
            "rows": len(rows),
            "items": len(outcomes),
            "audio_seconds": audio_seconds,
            "start": self._position(outcomes[0][0].at),
            "end": self._position(outcomes[-1][0].after),
            "errors": errors,
        }
        self._write_manifest()
        if errors:
            self._write_errors()

    def complete(self, num_shards: int | None) -> None:
        self.num_shards = num_shards
        self._write_manifest()

    def _read_manifest(self) -> dict:
        path = self.out.display(self.manifest_name)
        manifest = parse_json_object(
            self.out.read(self.manifest_name, self.MANIFEST_LIMIT), path, TokenizeError
        )
        if manifest.get("format") != MANIFEST_FORMAT:
            raise TokenizeError(f"{path} is not an encodec-jax tokenize manifest")
        if manifest.get("version") != MANIFEST_VERSION:
            raise TokenizeError(
                f"{path} was written by another version of encodec-jax tokenize (manifest "
                f"version {manifest.get('version')!r}, this one reads {MANIFEST_VERSION}); use "
                f"a new output directory"
            )
        problem = _manifest_problem(manifest, self.shard_pattern, self.index_of)
        if problem:
            raise TokenizeError(
                f"{path} is damaged ({problem}); delete it and the shards to start over"
            )
        return manifest

    def _write_manifest(self) -> None:
        ordered = dict(sorted(self.shards.items(), key=lambda kv: int(kv[0])))
        manifest = {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "settings": self.settings,
            "num_shards": self.num_shards,
            "shards": ordered,
        }
        self.out.write(self.manifest_name, (json.dumps(manifest, indent=1) + "\n").encode())

    def _write_errors(self) -> None:
        """errors.jsonl is derived from the manifest, so it never holds an item twice."""
        errors = [
            e
            for _, shard in sorted(self.shards.items(), key=lambda kv: int(kv[0]))
            for e in shard["errors"]
        ]
        if not errors:
            if self.out.exists(self.errors_name):
                self.out.remove(self.errors_name)
            return
        self.out.write(self.errors_name, "".join(json.dumps(e) + "\n" for e in errors).encode())

    def _remove_stale_temp_files(self) -> None:
        """Temporary files a killed run of this process left behind (local output only)."""
        if not self.out.local:
            return
        shard_prefix, manifest_name, errors_name = self.own_names
        # atomic_write's temporary names: "." + target name + "." + random + ".tmp"
        prefixes = ("." + shard_prefix, temp_prefix(manifest_name), temp_prefix(errors_name))
        for name in self.out.names():
            if name.startswith(prefixes) and name.endswith(TEMP_SUFFIX):
                self.out.remove(name)


def _manifest_problem(manifest: dict, shard_pattern: str, index_of: dict[str, int]) -> str | None:
    """What is wrong with a manifest's structure (a shard entry this run could not have
    written), or None. The settings are compared with the run's by the caller."""
    if not isinstance(manifest.get("settings"), dict):
        return "its settings are no object"
    if "num_shards" not in manifest:
        return "it has no num_shards"
    total = manifest["num_shards"]
    if total is not None and not _is_count(total):
        return f"num_shards is {total!r}"
    shards = manifest.get("shards")
    if not isinstance(shards, dict):
        return "its shards are no object"
    for k, shard in shards.items():
        # at most 12 digits: int() of a long digit string is slow, or refused (a ValueError)
        if not (k.isascii() and k.isdigit() and len(k) <= 12 and str(int(k)) == k):
            return f"shard {k!r} is not a shard number"
        if total is not None and int(k) >= total:
            return f"shard {k} is not a number below {total}"
        if not isinstance(shard, dict) or set(shard) != _SHARD_KEYS:
            return f"shard {k} does not hold exactly {', '.join(sorted(_SHARD_KEYS))}"
        name = shard["file"]
        if name is not None and name != shard_pattern.format(int(k)):
            return f"shard {k} names the file {name!r}"
        if not _is_count(shard["rows"]) or not _is_count(shard["items"]):
            return f"shard {k} has {shard['rows']!r} rows of {shard['items']!r} items"
        seconds = shard["audio_seconds"]
        if not isinstance(seconds, (int, float)) or isinstance(seconds, bool):
            return f"shard {k} has {seconds!r} seconds of audio"
        if not is_finite(seconds) or seconds < 0:
            return f"shard {k} has {seconds!r} seconds of audio"
        errors = shard["errors"]
        if not isinstance(errors, list) or not all(_is_error_entry(e) for e in errors):
            return f"shard {k}'s errors are not a list of path, key and error"
        if shard["rows"] + len(errors) != shard["items"] or (name is None) != (shard["rows"] == 0):
            return f"shard {k}: its rows, errors and items disagree"
        for end in ("start", "end"):
            position = shard[end]
            if (
                not isinstance(position, dict)
                or set(position) != {"shard", "item"}
                or not _is_count(position["item"])
                or not (position["shard"] is None or _is_key(position["shard"], index_of))
            ):
                return f"shard {k}: its {end} is not a position in this source"
    return None


def _is_key(value, index_of: dict[str, int]) -> bool:
    return isinstance(value, str) and value in index_of


def _is_error_entry(entry) -> bool:
    return (
        isinstance(entry, dict)
        and set(entry) == _ERROR_KEYS
        and isinstance(entry["path"], str)
        and (entry["key"] is None or isinstance(entry["key"], str))
        and isinstance(entry["error"], str)
    )


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_tokenize_output(name: str) -> bool:
    if name.startswith(".") and name.endswith(TEMP_SUFFIX):
        return True
    return (
        (name.startswith("shard-") and name.endswith(".parquet"))
        or (name.startswith("manifest") and name.endswith(".json"))
        or (name.startswith("errors") and name.endswith(".jsonl"))
    )


def _shard_table(rows, model_name: str, codec: BatchCodec, meta, column_types: dict):
    """The Arrow table of one shard, built from flat arrays (no per-code Python objects)."""
    import pyarrow as pa

    config = codec.config
    code_type = pa.int16() if config.codebook_size <= 2**15 else pa.int32()
    items = [item for _, item in rows]
    n_q = codec.num_quantizers
    flat = np.concatenate([item.audio_codes.reshape(-1) for item in items])
    frames = np.concatenate(
        [np.full(item.audio_codes.shape[0] * n_q, item.audio_codes.shape[2]) for item in items]
    )
    if flat.size >= 2**31:
        raise TokenizeError("a shard holds more than 2^31 codes: use a smaller --shard-size")
    inner = pa.ListArray.from_arrays(
        pa.array(np.concatenate([[0], np.cumsum(frames)]).astype(np.int32)),
        pa.array(flat.astype(code_type.to_pandas_dtype())),
    )
    middle = pa.ListArray.from_arrays(
        pa.array(np.arange(0, len(frames) + 1, n_q, dtype=np.int32)), inner
    )
    chunks = np.array([item.audio_codes.shape[0] for item in items])
    codes = pa.ListArray.from_arrays(
        pa.array(np.concatenate([[0], np.cumsum(chunks)]).astype(np.int32)), middle
    )
    scales = pa.array(
        [None if item.audio_scales is None else item.audio_scales.tolist() for item in items],
        type=pa.list_(pa.float32()),
    )
    n = len(items)
    columns = {
        "path": pa.array([record.path for record, _ in rows], pa.string()),
        "key": pa.array([record.key for record, _ in rows], pa.string()),
        "codes": codes,
        "chunk_frames": pa.array([list(item.chunk_frames) for item in items], pa.list_(pa.int32())),
        "audio_scales": scales,
        "sample_rate": pa.array([config.sampling_rate] * n, pa.int32()),
        "num_samples": pa.array([item.num_samples for item in items], pa.int64()),
        "bandwidth": pa.array([meta["bandwidth"]] * n, pa.float32()),
        "model": pa.array([model_name] * n, pa.string()),
    }
    for name, kind in column_types.items():
        columns[name] = pa.array([record.columns.get(name) for record, _ in rows], kind)
    table = pa.table(columns)
    return table.replace_schema_metadata({"encodec_jax": json.dumps(meta, sort_keys=True)})


# ---- small helpers ----
def _progress_bar(total: int | None, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=initial,
        unit="item",
        desc="tokenize",
        file=sys.stderr,
        dynamic_ncols=True,
    )


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
