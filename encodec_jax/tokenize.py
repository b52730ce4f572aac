"""Tokenize a directory of audio files into Parquet shards of EnCodec codes, resumably.

Layout of the output directory (one process; under `jax.distributed` every name carries the
process index, e.g. `shard-p001-00000.parquet`, `manifest-p001.json`, `errors-p001.jsonl`):

- `shard-00000.parquet`, ...: one row per audio file, in path order: `path` (relative to the
  input directory, '/'-separated), `codes` (`[chunks, n_q, frames]` nested lists of int; short
  chunks padded with 0), `chunk_frames`, `audio_scales` (one per chunk, or null for models that
  do not normalise), `sample_rate`, `num_samples` (at the model's rate), `bandwidth`, `model`.
  `datasets.load_dataset("parquet", data_files="OUT/shard-*.parquet")` reads them.
- `errors.jsonl`: `{"path": ..., "error": ...}` for every file that could not be tokenized.
- `manifest.json`: the settings of the run and the shards completed so far.

Determinism and resumption: the files are sorted, this process's share is taken round robin
(`process_share`), and shard k holds the share's files k * shard_size ... (k + 1) * shard_size
- 1 that did not fail, so a shard's content depends only on the input and the settings. Every
file is written under a temporary name, fsynced and renamed into place, and the manifest is
updated the same way after each shard, so a run killed at any moment (SIGKILL included) and
started again with the same arguments redoes at most the shard it was working on, and every good
file ends up in exactly one shard.

Codes: files are padded to length buckets and encoded in batches (`BatchCodec`), so a file's
codes depend only on its own audio and its bucket. They equal `EncodecModel.encode` of the file
alone except at its end: encoded alone, the model pads a partial last frame by reflection where
the batch holds zeros, so the last frame can differ (and, for non-causal models, the frames
whose receptive field reaches past the end). `exact=True` (`--exact`) pads nothing and matches
exactly, at the cost of one compiled program per distinct length.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import jax
import numpy as np

from .atomic import TEMP_SUFFIX, atomic_write, temp_prefix
from .audio import AUDIO_EXTENSIONS, audio_info, load_audio
from .batching import BatchCodec, EncodedItem, process_share, round_bucket
from .model import EncodecModel
from .untrusted import parse_json_object

MANIFEST_FORMAT = "encodec-jax-tokenize"
MANIFEST_VERSION = 1
EXIT_SOME_FAILED = 3
_SHARD_KEYS = frozenset({"file", "rows", "audio_seconds", "errors"})


class TokenizeError(ValueError):
    """A tokenize run that cannot start (bad input or output directory, changed settings, a
    damaged manifest)."""


@dataclasses.dataclass
class TokenizeResult:
    """What a run did.

    Attributes:
        files: files in this process's share.
        failed: how many of them could not be tokenized (this run and earlier ones).
        shards: shard files written in total.
        processed_files: files processed by this run (not counting resumed ones).
        audio_seconds: seconds of audio this run tokenized.
        seconds: wall time of this run.
        errors_path: the errors file, or None if no file failed.
    """

    files: int
    failed: int
    shards: int
    processed_files: int
    audio_seconds: float
    seconds: float
    errors_path: str | None


def find_audio_files(in_dir: str | os.PathLike, exclude: str | None = None) -> list[str]:
    """Audio files under `in_dir` (recursively), as sorted '/'-separated relative paths.

    A file counts as audio by its extension (`AUDIO_EXTENSIONS`, any case); hidden files and
    directories (name starting with '.') and the directory `exclude` are skipped.
    """
    root = os.path.abspath(in_dir)
    skip = os.path.abspath(exclude) if exclude is not None else None
    found = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = [
            d for d in subdirs if not d.startswith(".") and os.path.join(directory, d) != skip
        ]
        for name in files:
            if name.startswith(".") or os.path.splitext(name)[1].lower() not in AUDIO_EXTENSIONS:
                continue
            rel = os.path.relpath(os.path.join(directory, name), root)
            found.append(rel.replace(os.sep, "/"))
    return sorted(found)


def output_names(process_index: int, process_count: int) -> tuple[str, str, str]:
    """(shard name pattern with one `{}` for the shard number, manifest name, errors name)."""
    if process_count == 1:
        return "shard-{:05d}.parquet", "manifest.json", "errors.jsonl"
    tag = f"p{process_index:03d}"
    return f"shard-{tag}-{{:05d}}.parquet", f"manifest-{tag}.json", f"errors-{tag}.jsonl"


def tokenize_directory(
    model: EncodecModel,
    in_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
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
    """Encode every audio file under `in_dir` into Parquet shards in `out_dir`.

    Args:
        model: the codec.
        in_dir: directory searched recursively (see `find_audio_files`).
        out_dir: output directory (made if missing); an earlier run's output there is resumed
            when its settings are the same, and an error otherwise.
        model_name: the model's Hub id or directory, stored in every row.
        bandwidth: kbps, as in `EncodecModel.encode`.
        batch_size: items per compiled call.
        shard_size: files per shard (failed files leave a shard that much shorter).
        buckets: padded lengths in samples (rounded up to whole frames, or chunk strides);
            default `batching.default_buckets`.
        exact: group equal lengths only, so that every file's codes equal what
            `EncodecModel.encode` gives for it alone (one compiled program per distinct length).
        workers: threads that read and resample audio; default min(8, CPUs).
        progress: show a tqdm progress bar on stderr.

    Returns:
        A `TokenizeResult`.

    Raises:
        TokenizeError: if nothing can be done (no audio files, an unusable or foreign output
            directory, or an earlier run there with other settings).
    """
    start = time.perf_counter()
    config = model.config
    if not os.path.isdir(in_dir):
        raise TokenizeError(f"input directory {in_dir} does not exist or is not a directory")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise TokenizeError(f"output {out_dir} exists and is not a directory")
    if shard_size < 1:
        raise TokenizeError(f"shard size must be at least 1, got {shard_size}")
    everything = find_audio_files(in_dir, exclude=out_dir)
    if not everything:
        raise TokenizeError(f"no audio files under {in_dir} (looked for {_extensions()})")
    if buckets is not None:
        buckets = sorted({round_bucket(config, int(b)) for b in buckets})
    codec = BatchCodec(
        model, bandwidth=bandwidth, batch_size=batch_size, buckets=buckets, exact=exact
    )
    share = [everything[i] for i in process_share(len(everything))]
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
        "num_files": len(share),
        "files_sha256": _files_fingerprint(in_dir, share),
    }
    os.makedirs(out_dir, exist_ok=True)
    run = _Run(out_dir, shard_pattern, manifest_name, errors_name, settings)
    run.open()

    num_shards = math.ceil(len(share) / shard_size)
    todo = [k for k in range(num_shards) if str(k) not in run.shards]
    table_meta = {
        **settings,
        "sample_rate": config.sampling_rate,
        "channels": config.audio_channels,
    }
    bar = _progress_bar(len(share), run.files_done(), progress)
    done = {"files": 0, "seconds": 0.0}

    def advance(files: int, seconds: float) -> None:
        done["files"] += files
        done["seconds"] += seconds
        if bar is not None:
            elapsed = time.perf_counter() - start
            bar.set_postfix_str(
                f"{done['seconds'] / 3600:.2f} h audio, "
                f"{done['seconds'] / max(elapsed, 1e-9):.1f}x realtime",
                refresh=False,
            )
            bar.update(files)

    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        planner = _Planner(codec, in_dir, share, shard_size, pool, advance)
        for k, results in planner.shards(todo):
            rows, errors = [], []
            for index in range(k * shard_size, min((k + 1) * shard_size, len(share))):
                outcome = results[index]
                if isinstance(outcome, EncodedItem):
                    rows.append((share[index], outcome))
                else:
                    errors.append({"path": share[index], "error": outcome})
            shard_audio = sum(item.num_samples for _, item in rows) / config.sampling_rate
            run.finish_shard(k, rows, errors, shard_audio, model_name, codec, table_meta)
    if bar is not None:
        bar.close()
    run.complete()
    failed = sum(len(s["errors"]) for s in run.shards.values())
    return TokenizeResult(
        files=len(share),
        failed=failed,
        shards=sum(1 for s in run.shards.values() if s["file"] is not None),
        processed_files=done["files"],
        audio_seconds=done["seconds"],
        seconds=time.perf_counter() - start,
        errors_path=os.path.join(out_dir, errors_name) if failed else None,
    )


# ---- reading, resampling and encoding, overlapped ----
class _Planner:
    """Yields (shard number, {share index: EncodedItem or error message}) for each shard.

    Files are read and resampled by a thread pool, a few blocks ahead of the encoder. Inside a
    shard, files are encoded in blocks of files of similar length (by their headers), so the
    compiled batches are full; the codes of a file do not depend on which block it is in.
    """

    def __init__(self, codec: BatchCodec, in_dir, share, shard_size: int, pool, on_block):
        self.codec = codec
        self.on_block = on_block  # called with (files, seconds of audio) after each block
        self.in_dir = in_dir
        self.share = share
        self.shard_size = shard_size
        self.pool = pool
        self.block_size = codec.batch_size * 4
        self.ahead = 3  # blocks being read while one is encoded

    def shards(self, todo: Sequence[int]) -> Iterator[tuple[int, dict[int, EncodedItem | str]]]:
        rate = self.codec.config.sampling_rate
        blocks = self._blocks(todo)
        pending: deque = deque()
        results: dict[int, dict[int, EncodedItem | str]] = {}
        remaining: dict[int, int] = {}
        while True:
            while len(pending) < self.ahead:
                block = next(blocks, None)
                if block is None:
                    break
                k, indices, known = block
                results.setdefault(k, {}).update(known)
                remaining.setdefault(k, self._shard_length(k))
                loads = [self.pool.submit(self._load, i) for i in indices]
                pending.append((k, indices, loads, known))
            if not pending:
                return
            k, indices, loads, known = pending.popleft()
            encoded = self._encode(indices, loads)
            results[k].update(encoded)
            remaining[k] -= len(indices) + len(known)
            samples = sum(e.num_samples for e in encoded.values() if isinstance(e, EncodedItem))
            self.on_block(len(indices) + len(known), samples / rate)
            # Blocks come shard by shard, so shards complete in order.
            if remaining[k] == 0:
                del remaining[k]
                yield k, results.pop(k)

    def _shard_length(self, k: int) -> int:
        return min(self.shard_size, len(self.share) - k * self.shard_size)

    def _blocks(self, todo: Sequence[int]) -> Iterator[tuple[int, list[int], dict[int, str]]]:
        """(shard, indices to load and encode together, {index: error} found from headers)."""
        config = self.codec.config
        for k in todo:
            indices = range(k * self.shard_size, k * self.shard_size + self._shard_length(k))
            infos = list(self.pool.map(self._info, indices))
            failed = {
                i: info for i, info in zip(indices, infos, strict=True) if isinstance(info, str)
            }
            good = [
                (i, info)
                for i, info in zip(indices, infos, strict=True)
                if not isinstance(info, str)
            ]
            if not good:
                yield k, [], failed
                continue

            def key(entry, config=config):
                i, (frames, rate) = entry
                length = max(1, round(frames * config.sampling_rate / rate))
                return self.codec.padded_length(length), i

            ordered = [i for i, _ in sorted(good, key=key)]
            for b in range(0, len(ordered), self.block_size):
                yield k, ordered[b : b + self.block_size], failed if b == 0 else {}

    def _path(self, index: int) -> str:
        return os.path.join(self.in_dir, *self.share[index].split("/"))

    def _info(self, index: int) -> tuple[int, int] | str:
        try:
            frames, rate = audio_info(self._path(index))
        except Exception as err:  # any failure is the file's, recorded and skipped
            return _message(err)
        # Some headers do not know the length: only used for grouping, so any guess will do.
        return max(frames, 1), rate

    def _load(self, index: int) -> np.ndarray | str:
        config = self.codec.config
        try:
            audio, _ = load_audio(self._path(index), config.sampling_rate, config.audio_channels)
        except Exception as err:
            return _message(err)
        return audio

    def _encode(self, indices: list[int], loads: list[Future]) -> dict[int, EncodedItem | str]:
        out: dict[int, EncodedItem | str] = {}
        audios = {}
        for i, load in zip(indices, loads, strict=True):
            result = load.result()
            if isinstance(result, str):
                out[i] = result
            else:
                audios[i] = result
        if not audios:
            return out
        try:
            out.update(zip(audios, self.codec.encode(list(audios.values())), strict=True))
        except Exception:
            # One bad item fails its whole batch: encode one by one to find it. An item's codes
            # depend only on its own bucket, so the others come out the same.
            for i, audio in audios.items():
                try:
                    out[i] = self.codec.encode([audio])[0]
                except Exception as err:
                    out[i] = f"cannot encode {self._path(i)}: {_message(err)}"
        return out


# ---- the output directory ----
class _Run:
    """The output directory of one process: its manifest, shards and errors file."""

    def __init__(self, out_dir, shard_pattern, manifest_name, errors_name, settings):
        self.out_dir = os.fspath(out_dir)
        self.shard_pattern = shard_pattern
        self.manifest_path = os.path.join(self.out_dir, manifest_name)
        self.errors_path = os.path.join(self.out_dir, errors_name)
        self.own_names = (shard_pattern.split("{")[0], manifest_name, errors_name)
        self.settings = settings
        self.shards: dict[str, dict] = {}

    def open(self) -> None:
        """Start a new run or pick up an earlier one with the same settings."""
        self._remove_stale_temp_files()
        if os.path.exists(self.manifest_path):
            manifest = self._read_manifest()
            old = manifest.get("settings", {})
            changed = sorted(
                k for k in set(old) | set(self.settings) if old.get(k) != self.settings.get(k)
            )
            if changed:
                raise TokenizeError(
                    f"{self.out_dir} holds a tokenize run with other settings or input files "
                    f"(differs in: {', '.join(changed)}); use a new output directory"
                )
            self.shards = self._check_shards(manifest.get("shards", {}))
            # A completed shard whose file was deleted is simply made again.
            for k, shard in list(self.shards.items()):
                if shard["file"] is not None and not os.path.exists(
                    os.path.join(self.out_dir, shard["file"])
                ):
                    del self.shards[k]
        else:
            foreign = [n for n in os.listdir(self.out_dir) if not _is_tokenize_output(n)]
            own = [n for n in os.listdir(self.out_dir) if n.startswith(self.own_names[0])]
            if foreign or own:
                raise TokenizeError(
                    f"output directory {self.out_dir} is not empty and holds no tokenize "
                    f"manifest ({(foreign or own)[0]}, ...); use a new or empty directory"
                )
            self._write_manifest(complete=False)
        self._write_errors()

    def files_done(self) -> int:
        return sum(s["rows"] + len(s["errors"]) for s in self.shards.values())

    def finish_shard(self, k, rows, errors, audio_seconds, model_name, codec, table_meta):
        """Write shard k (if any file of it succeeded), then record it in the manifest."""
        name = None
        if rows:
            name = self.shard_pattern.format(k)
            table = _shard_table(rows, model_name, codec, table_meta)
            import pyarrow.parquet as pq

            with atomic_write(os.path.join(self.out_dir, name)) as f:
                pq.write_table(table, f, compression="zstd")
        self.shards[str(k)] = {
            "file": name,
            "rows": len(rows),
            "audio_seconds": audio_seconds,
            "errors": errors,
        }
        self._write_manifest(complete=False)
        if errors:
            self._write_errors()

    def complete(self) -> None:
        self._write_manifest(complete=True)

    def _read_manifest(self) -> dict:
        try:
            with open(self.manifest_path, "rb") as f:
                data = f.read()
        except OSError as err:
            raise TokenizeError(f"cannot read {self.manifest_path}: {err}") from None
        manifest = parse_json_object(data, self.manifest_path, TokenizeError)
        if manifest.get("format") != MANIFEST_FORMAT:
            raise TokenizeError(f"{self.manifest_path} is not an encodec-jax tokenize manifest")
        if not isinstance(manifest.get("settings", {}), dict):
            raise TokenizeError(f"{self.manifest_path} is damaged: its settings are no object")
        return manifest

    def _check_shards(self, shards) -> dict[str, dict]:
        """The manifest's shards, after checking each entry is one this run could have written
        (the settings, already compared, fix the shard count)."""
        count = math.ceil(self.settings["num_files"] / self.settings["shard_size"])

        def damaged(why: str) -> TokenizeError:
            return TokenizeError(
                f"{self.manifest_path} is damaged ({why}); delete it and the shards to start over"
            )

        if not isinstance(shards, dict):
            raise damaged("its shards are no object")
        for k, shard in shards.items():
            if not (k.isascii() and k.isdigit() and str(int(k)) == k and int(k) < count):
                raise damaged(f"shard {k!r} is not a number below {count}")
            if not isinstance(shard, dict) or set(shard) != _SHARD_KEYS:
                raise damaged(f"shard {k} does not hold exactly {', '.join(sorted(_SHARD_KEYS))}")
            name = shard["file"]
            if name is not None and name != self.shard_pattern.format(int(k)):
                raise damaged(f"shard {k} names the file {name!r}")
            rows, errors, seconds = shard["rows"], shard["errors"], shard["audio_seconds"]
            if not (isinstance(rows, int) and not isinstance(rows, bool) and rows >= 0):
                raise damaged(f"shard {k} has {rows!r} rows")
            if not isinstance(seconds, (int, float)) or isinstance(seconds, bool):
                raise damaged(f"shard {k} has {seconds!r} seconds of audio")
            if not isinstance(errors, list) or not all(
                isinstance(e, dict) and set(e) == {"path", "error"} for e in errors
            ):
                raise damaged(f"shard {k}'s errors are not a list of path and error")
        return shards

    def _write_manifest(self, complete: bool) -> None:
        ordered = dict(sorted(self.shards.items(), key=lambda kv: int(kv[0])))
        manifest = {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "settings": self.settings,
            "complete": complete,
            "shards": ordered,
        }
        with atomic_write(self.manifest_path, "w") as f:
            json.dump(manifest, f, indent=1)
            f.write("\n")

    def _write_errors(self) -> None:
        """errors.jsonl is derived from the manifest, so it never holds a file twice."""
        errors = [
            e
            for _, shard in sorted(self.shards.items(), key=lambda kv: int(kv[0]))
            for e in shard["errors"]
        ]
        if not errors:
            if os.path.exists(self.errors_path):
                os.remove(self.errors_path)
            return
        with atomic_write(self.errors_path, "w") as f:
            for entry in errors:
                f.write(json.dumps(entry) + "\n")

    def _remove_stale_temp_files(self) -> None:
        """Temporary files a killed run of this process left behind."""
        if not os.path.isdir(self.out_dir):
            return
        shard_prefix, manifest_name, errors_name = self.own_names
        # atomic_write's temporary names: "." + target name + "." + random + ".tmp"
        prefixes = ("." + shard_prefix, temp_prefix(manifest_name), temp_prefix(errors_name))
        for name in os.listdir(self.out_dir):
            if name.startswith(prefixes) and name.endswith(TEMP_SUFFIX):
                try:
                    os.remove(os.path.join(self.out_dir, name))
                except FileNotFoundError:
                    pass


def _is_tokenize_output(name: str) -> bool:
    if name.startswith(".") and name.endswith(TEMP_SUFFIX):
        return True
    return (
        (name.startswith("shard-") and name.endswith(".parquet"))
        or (name.startswith("manifest") and name.endswith(".json"))
        or (name.startswith("errors") and name.endswith(".jsonl"))
    )


def _shard_table(rows: list[tuple[str, EncodedItem]], model_name: str, codec: BatchCodec, meta):
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
    table = pa.table(
        {
            "path": pa.array([path for path, _ in rows], pa.string()),
            "codes": codes,
            "chunk_frames": pa.array(
                [list(item.chunk_frames) for item in items], pa.list_(pa.int32())
            ),
            "audio_scales": scales,
            "sample_rate": pa.array([config.sampling_rate] * n, pa.int32()),
            "num_samples": pa.array([item.num_samples for item in items], pa.int64()),
            "bandwidth": pa.array([meta["bandwidth"]] * n, pa.float32()),
            "model": pa.array([model_name] * n, pa.string()),
        }
    )
    return table.replace_schema_metadata({"encodec_jax": json.dumps(meta, sort_keys=True)})


# ---- small helpers ----
def _progress_bar(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=initial,
        unit="file",
        desc="tokenize",
        file=sys.stderr,
        dynamic_ncols=True,
    )


def _files_fingerprint(in_dir, share: list[str]) -> str:
    """A hash of the share's paths and sizes: a resumed run must see the same input."""
    digest = hashlib.sha256()
    for rel in share:
        try:
            size = os.path.getsize(os.path.join(in_dir, *rel.split("/")))
        except OSError:
            size = -1
        digest.update(f"{rel}\0{size}\n".encode())
    return digest.hexdigest()


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _message(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _extensions() -> str:
    return " ".join(sorted(AUDIO_EXTENSIONS))
