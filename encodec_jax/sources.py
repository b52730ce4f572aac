"""Where `tokenize` reads audio from: one small interface over a folder of audio files, Parquet
files, Hugging Face datasets (a `save_to_disk` folder, or anything `datasets.load_dataset`
streams) and WebDataset tar shards, on local disk or behind any fsspec URL (gs://, s3://, hf://,
https://, ...).

A `Source` lists its `Shard`s in a fixed order; a shard yields its `Item`s in a fixed order, from
any item index on (so a run can resume in the middle of a shard): the item's key, its audio
(encoded bytes, a file to read, or decoded samples with their rate) and the extra columns asked
for. `read_audio` turns that audio into what the model takes. Shards are what a process of a
`jax.distributed` job takes its share of, so that hosts never read each other's data.

| source | shards | item key | audio |
|---|---|---|---|
| folder | one per audio file (sorted) | its relative path | the file |
| Parquet files (glob) | the files | `--id-column`, else the row number | `--audio-column` |
| `save_to_disk` folder | its `.arrow` files | as Parquet | as Parquet |
| `load_dataset(streaming=True)` | the dataset's shards | as Parquet | as Parquet |
| WebDataset `.tar` files | the files | WebDataset's `__key__` | the audio member |

A table's audio column may hold encoded bytes (`binary`, or the `{bytes, path}` struct of the
`datasets` `Audio` feature; a null `bytes` reads `path`, relative to the shard), a file path, or
decoded samples (`{array, sampling_rate}` structs, or a list column beside a `sampling_rate`
column; arrays are `[samples]` or `[channels, samples]`).

Damaged shard content (not a Parquet/tar/Arrow file, a damaged header or page, a truncated tar)
raises `ShardError` from `Shard.items` at the point where reading stopped; failures of the storage
itself (network, permissions) raise what the file system raised, so that a run stops and can be
resumed instead of recording good data as bad. No reader allocates more than the file's size
justifies: every read of a shard is clamped to the bytes the file has left. Memory: a Parquet
shard is read a row group at a time (pyarrow decodes a row group whole; with the batch of
BATCH_ROWS rows being handed on, about one row group and a batch), an `.arrow` file one
record batch at a time (`datasets` writes both in groups of 100 rows for audio), a tar shard one
sample at a time.
"""

from __future__ import annotations

import dataclasses
import glob as glob_module
import hashlib
import io
import json
import os
import re
import tarfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from .audio import AUDIO_EXTENSIONS, AudioError, convert_audio, decode_audio, load_audio

KINDS = ("folder", "parquet", "webdataset", "saved", "hf")
BATCH_ROWS = 64  # rows per Arrow batch read from a table: a few MB of encoded audio
PARQUET_BUFFER = 1 << 20  # bytes: column chunks are read through a buffer of this size
MAX_SHARDS = 1_000_000  # a brace pattern may not expand to more
# Packages that fsspec protocols need, for the error when one is missing.
_BACKENDS = {
    "gs": "gcsfs",
    "gcs": "gcsfs",
    "s3": "s3fs",
    "s3a": "s3fs",
    "az": "adlfs",
    "abfs": "adlfs",
    "abfss": "adlfs",
    "hf": "huggingface_hub",
    "http": "aiohttp",
    "https": "aiohttp",
}
# WebDataset skips these names (its `meta_prefix`/`meta_suffix` and `skip_meta`).
_WDS_META = re.compile(r"__[^/]*__($|/)")
# WebDataset's base_plus_ext: the key is everything up to the first dot of the last path
# component, the extension everything after it.
_WDS_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


class SourceError(ValueError):
    """A source that cannot be opened: bad pattern, nothing found, a missing column or package."""


class ShardError(Exception):
    """A shard's content is damaged; the message says where. Items yielded before it are good."""


# ---- what a shard yields ----
@dataclasses.dataclass(frozen=True)
class AudioFile:
    """An audio file to read: a local path (`fs` None) or a path on an fsspec file system."""

    path: str
    fs: Any = None


@dataclasses.dataclass(frozen=True)
class Samples:
    """Decoded audio: `[samples]` or `[channels, samples]` floats at `rate` Hz."""

    array: np.ndarray
    rate: int


Audio = bytes | AudioFile | Samples


@dataclasses.dataclass(frozen=True)
class Item:
    """One item of a shard.

    Attributes:
        key: the item's key in source terms (see the module docstring); None only with `error`.
        audio: its audio, or None with `error`.
        columns: the kept columns' values, by name.
        error: why the item cannot be read (known before decoding), or None.
    """

    key: str | None
    audio: Audio | None
    columns: dict[str, Any]
    error: str | None = None


class Shard:
    """A unit of a source: one file (or one shard of a streamed dataset).

    Attributes:
        name: stable and unique within the source (a path relative to the source's root, or a
            URL): it goes into manifests and output rows.
        size: bytes, when known (part of the source's fingerprint).
    """

    name: str
    size: int | None = None

    def count(self) -> int | None:
        """Items in the shard, when that is cheap to know; else None."""
        return None

    def items(self, start: int = 0) -> Iterator[Item]:
        """The shard's items from index `start` on.

        Raises:
            ShardError: damaged content, after the items before the damage.
        """
        raise NotImplementedError


@dataclasses.dataclass
class Source:
    """A corpus to tokenize.

    Attributes:
        kind: one of KINDS.
        name: what the user gave (path, pattern, URL or dataset id).
        shards: in their fixed order.
        options: the reading options that change the items (columns, split, ...), for manifests.
        column_types: the kept columns in order, with their Arrow types.
    """

    kind: str
    name: str
    shards: list[Shard]
    options: dict[str, Any]
    column_types: dict[str, Any]

    def fingerprint(self, shards: Sequence[Shard]) -> str:
        """A hash of these shards' names and sizes and the options: a resumed run must read the
        same input."""
        digest = hashlib.sha256(json.dumps(self.options, sort_keys=True).encode())
        for shard in shards:
            digest.update(f"{shard.name}\0{shard.size}\n".encode())
        return digest.hexdigest()


def read_audio(audio: Audio, sample_rate: int, channels: int, name: str = "audio") -> np.ndarray:
    """An item's audio as the model takes it: `[channels, samples]` float32 at `sample_rate`.

    `name` is what error messages call it.

    Raises:
        AudioError: undecodable, empty or non-finite audio, or a file that does not exist.
        OSError: the storage failed (not the data): worth a retry.
    """
    if isinstance(audio, bytes):
        return decode_audio(audio, sample_rate, channels, name)[0]
    if isinstance(audio, Samples):
        return convert_audio(audio.array, audio.rate, sample_rate, channels, name)[0]
    if audio.fs is None:
        return load_audio(audio.path, sample_rate, channels, name)[0]
    try:
        with audio.fs.open(audio.path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise AudioError(f"cannot read {name}: no such file {audio.path}") from None
    return decode_audio(data, sample_rate, channels, name)[0]


# ---- opening a source ----
def open_source(
    spec: str | os.PathLike,
    *,
    kind: str = "auto",
    split: str | None = None,
    config: str | None = None,
    audio_column: str | None = None,
    id_column: str | None = None,
    keep_columns: Sequence[str] = (),
    exclude: str | os.PathLike | None = None,
) -> Source:
    """Open what `tokenize` reads.

    Args:
        spec: a folder of audio files; Parquet or WebDataset tar files (a path, glob or brace
            pattern such as `shards/train-{000000..000099}.tar`); a `save_to_disk` folder; or
            a Hugging Face dataset id (or a local dataset repository with kind "hf"). Paths may
            be fsspec URLs (gs://, s3://, hf://, https://, memory://, file://).
        kind: "auto" (by what `spec` is), or one of KINDS.
        split: the split of a Hugging Face dataset (default "train").
        config: the configuration of a Hugging Face dataset.
        audio_column: the table column holding the audio (default "audio"); for tar shards, the
            extension of the audio member (default: the one member whose extension is audio).
        id_column: the table column whose value is each item's key (default: the row number).
        keep_columns: columns (tar: member extensions) copied into the output rows.
        exclude: a folder not to look into (the output, when it lies inside the input).

    Raises:
        SourceError: a source that cannot be used as asked, with what to do instead.
    """
    spec = os.fspath(spec)
    if kind not in ("auto", *KINDS):
        raise SourceError(f"unknown source type {kind!r} (use one of auto, {', '.join(KINDS)})")
    keep = tuple(keep_columns)
    if len(set(keep)) != len(keep) or not all(keep):
        raise SourceError(f"--keep-columns must name distinct columns, got {','.join(keep)}")
    if kind == "auto":
        kind = _detect(spec)
    if split is not None and kind not in ("hf", "saved"):
        raise SourceError(f"--split applies to Hugging Face datasets only, not to a {kind} source")
    if config is not None and kind != "hf":
        raise SourceError(f"--config applies to Hub datasets only, not to a {kind} source")
    if kind == "folder":
        if audio_column is not None or id_column is not None or keep:
            raise SourceError(
                "a folder of audio files has no columns: --audio-column, --id-column and "
                "--keep-columns apply to tables and tar shards"
            )
        return _folder_source(spec, exclude)
    if kind == "webdataset":
        if id_column is not None:
            raise SourceError(
                "tar shards key their items themselves: --id-column applies to tables"
            )
        return _tar_source(spec, audio_column, keep)
    columns = _Columns(audio_column or "audio", id_column, keep)
    if kind == "parquet":
        return _parquet_source(spec, columns)
    if kind == "saved":
        return _saved_source(spec, split, columns)
    return _hub_source(spec, config, split or "train", columns)


def _detect(spec: str) -> str:
    if _has_pattern(spec):
        paths = _expand(spec)
        exts = {_shard_extension(p) for p in paths}
        if exts == {".parquet"}:
            return "parquet"
        if exts == {".tar"}:
            return "webdataset"
        raise SourceError(
            f"{spec} matches {', '.join(sorted(e or '(no extension)' for e in exts))} files: a "
            f"pattern must match only .parquet or only .tar files"
        )
    fs, path = _filesystem(spec)
    if fs.isdir(path):
        names = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)}
        if {"state.json", "dataset_info.json"} <= names or "dataset_dict.json" in names:
            return "saved"
        return "folder"
    if fs.isfile(path):
        ext = _shard_extension(path)
        if ext in (".parquet", ".tar"):
            return "parquet" if ext == ".parquet" else "webdataset"
        raise SourceError(
            f"{spec} is a {ext or 'extensionless'} file: tokenize reads a folder of audio files, "
            f".parquet or .tar shards, or a dataset (for one audio file use encodec-jax encode)"
        )
    if "://" not in spec and re.fullmatch(r"[\w.-]+(/[\w.-]+)?", spec) and not spec.startswith("."):
        return "hf"  # not a local path: a Hub dataset id
    raise SourceError(f"{spec} does not exist (no such file, folder or Hub dataset id)")


# ---- file systems and patterns ----
def _filesystem(url: str):
    """(fsspec file system, path on it) for a path or URL, with a clear error for a missing
    backend."""
    import fsspec

    protocol = url.split("://", 1)[0] if "://" in url else "file"
    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as err:
        package = _BACKENDS.get(protocol)
        if isinstance(err, ImportError) or package:
            hint = f"pip install {package}" if package else "install its fsspec backend"
            raise SourceError(
                f"cannot open {url}: {protocol}:// needs a package ({hint})"
            ) from None
        raise SourceError(f"cannot open {url}: {err}") from None


def _is_local(fs) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)


def _has_pattern(spec: str) -> bool:
    return glob_module.has_magic(spec) or re.search(r"\{[^{}]*(,|\.\.)[^{}]*\}", spec) is not None


def expand_braces(pattern: str) -> list[str]:
    """WebDataset's brace patterns: `{000..099}` (zero-padded to the wider bound when either is
    padded) and `{a,b,c}`, nested or several, in order.

    Raises:
        SourceError: a pattern expanding to more than MAX_SHARDS names.
    """
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    body, head, tail = match.group(1), pattern[: match.start()], pattern[match.end() :]
    bounds = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if bounds:
        a, b = bounds.groups()
        width = max(len(a), len(b)) if a.startswith("0") or b.startswith("0") else 0
        lo, hi = int(a), int(b)
        if abs(hi - lo) >= MAX_SHARDS:
            raise SourceError(f"{pattern} names more than {MAX_SHARDS} shards")
        step = 1 if hi >= lo else -1
        options = [str(i).zfill(width) for i in range(lo, hi + step, step)]
    elif "," in body:
        options = body.split(",")
    else:  # braces without a list or range are literal, as in braceexpand
        return [head + "{" + body + "}" + p for p in expand_braces(tail)]
    out: list[str] = []
    for option in options:
        out.extend(expand_braces(head + option + tail))
        if len(out) > MAX_SHARDS:
            raise SourceError(f"{pattern} names more than {MAX_SHARDS} shards")
    return out


def _expand(spec: str) -> list[tuple[str, int | None]]:
    """The files a path, glob or brace pattern names: [(path, size)], sorted, without repeats.

    Paths are on the spec's file system (`_filesystem(spec)[0]`)."""
    fs, _ = _filesystem(spec)
    found: dict[str, int | None] = {}
    literal = []
    for pattern in expand_braces(spec):
        _, path = _filesystem(pattern)
        if glob_module.has_magic(path):
            for name, info in fs.glob(path, detail=True).items():
                if info.get("type") != "directory":
                    found[name] = info.get("size")
        else:
            literal.append(path)

    def info(path):
        try:
            return path, fs.info(path)
        except FileNotFoundError:
            return path, None

    with ThreadPoolExecutor(16) as pool:  # one request each on object stores
        for path, entry in pool.map(info, literal):
            if entry is None:
                raise SourceError(f"{spec}: {path} does not exist")
            if entry.get("type") == "directory":
                raise SourceError(f"{spec}: {path} is a folder, not a shard file")
            found[path] = entry.get("size")
    if not found:
        raise SourceError(f"{spec} matches no files")
    return sorted(found.items())


def _shard_extension(path) -> str:
    name = path[0] if isinstance(path, tuple) else path
    name = name.rstrip("/").rsplit("/", 1)[-1].lower()
    for ext in (".tar.gz", ".tgz", ".parquet", ".tar"):
        if name.endswith(ext):
            return ext
    return os.path.splitext(name)[1]


def _relative_names(paths: Sequence[str]) -> tuple[str, list[str]]:
    """(common folder, each path relative to it) for shard names that do not depend on where
    the corpus lives."""
    folders = [p.rsplit("/", 1)[0] + "/" if "/" in p else "" for p in paths]
    base = os.path.commonprefix(folders)
    base = base[: base.rfind("/") + 1]
    return base, [p[len(base) :] for p in paths]


# ---- a folder of audio files ----
class _FileShard(Shard):
    def __init__(self, name: str, size: int | None, audio: AudioFile):
        self.name, self.size, self.audio = name, size, audio

    def count(self) -> int:
        return 1

    def items(self, start: int = 0) -> Iterator[Item]:
        if start == 0:
            yield Item(key=self.name, audio=self.audio, columns={})


def find_audio_files(
    spec: str | os.PathLike, exclude: str | os.PathLike | None = None
) -> list[tuple[str, int | None]]:
    """Audio files under a folder (recursively): sorted ('/'-separated relative path, size).

    A file counts as audio by its extension (`AUDIO_EXTENSIONS`, any case); hidden files and
    folders (name starting with '.') and the folder `exclude` are skipped.
    """
    fs, root = _filesystem(os.fspath(spec))
    root = root.rstrip("/")
    skip = None
    if exclude is not None:
        exclude_fs, skip = _filesystem(os.fspath(exclude))
        if type(exclude_fs) is not type(fs):
            skip = None
        else:
            skip = skip.rstrip("/")
    found = []
    for directory, subdirs, files in fs.walk(root, detail=True):
        directory = directory.rstrip("/")
        for name in [d for d in subdirs if d.startswith(".") or f"{directory}/{d}" == skip]:
            del subdirs[name]
        for name, info in files.items():
            if name.startswith(".") or os.path.splitext(name)[1].lower() not in AUDIO_EXTENSIONS:
                continue
            found.append((f"{directory}/{name}"[len(root) + 1 :], info.get("size")))
    return sorted(found)


def _folder_source(spec: str, exclude) -> Source:
    fs, root = _filesystem(spec)
    if not fs.isdir(root):
        raise SourceError(f"input folder {spec} does not exist or is not a folder")
    files = find_audio_files(spec, exclude)
    if not files:
        hint = ""
        root = root.rstrip("/")
        shards = sorted(
            p
            for depth in ("*", "*/*")
            for ext in (".parquet", ".tar")
            for p in fs.glob(f"{root}/{depth}{ext}")
        )
        if shards:
            folder, ext = shards[0][len(root) : shards[0].rfind("/")], _shard_extension(shards[0])
            pattern = f"{spec.rstrip('/')}{folder}/*{ext}"
            hint = f"; it holds {ext} files: name them with a pattern, e.g. '{pattern}'" + (
                ", or stream it as a dataset with --source-type hf" if ext == ".parquet" else ""
            )
        raise SourceError(
            f"no audio files under {spec} (looked for {' '.join(sorted(AUDIO_EXTENSIONS))}){hint}"
        )
    root = root.rstrip("/")
    local = _is_local(fs)
    shards: list[Shard] = [
        _FileShard(name, size, AudioFile(f"{root}/{name}", None if local else fs))
        for name, size in files
    ]
    return Source("folder", spec, shards, {}, {})


# ---- tables: Parquet, save_to_disk, load_dataset ----
@dataclasses.dataclass(frozen=True)
class _Columns:
    """Which columns of a table make an item."""

    audio: str
    id: str | None
    keep: tuple[str, ...]
    types: dict[str, Any] | None = None  # the kept columns' types, once known

    def options(self) -> dict[str, Any]:
        return {"audio_column": self.audio, "id_column": self.id, "keep_columns": list(self.keep)}

    def needed(self, schema) -> list[str]:
        names = [self.audio, *([self.id] if self.id else []), *self.keep]
        if _is_list(schema.field(self.audio).type) and "sampling_rate" in schema.names:
            names.append("sampling_rate")
        return list(dict.fromkeys(names))

    def problem(self, schema, where: str) -> str | None:
        """Why a table with this schema cannot be read, or None."""
        import pyarrow as pa

        missing = [c for c in (self.audio, self.id, *self.keep) if c and c not in schema.names]
        if missing:
            return (
                f"{where} has no column {', '.join(repr(c) for c in missing)} (its columns: "
                f"{', '.join(schema.names)})"
            )
        for c, expected in (self.types or {}).items():
            if schema.field(c).type != expected:
                return (
                    f"{where}: column {c!r} has type {schema.field(c).type}, not "
                    f"{expected} as in the first shard"
                )
        kind = schema.field(self.audio).type
        if pa.types.is_struct(kind):
            fields = {kind.field(i).name for i in range(kind.num_fields)}
            if "bytes" in fields or "path" in fields or {"array", "sampling_rate"} <= fields:
                return None
        elif pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or _is_string(kind):
            return None
        elif _is_list(kind):
            if "sampling_rate" in schema.names:
                return None
            return (
                f"{where}: column {self.audio!r} holds arrays but the table has no "
                f"'sampling_rate' column"
            )
        return (
            f"{where}: column {self.audio!r} has type {kind}; the audio column must hold encoded "
            f"audio (binary, or a datasets Audio struct {{bytes, path}}), file paths, or samples "
            f"({{array, sampling_rate}} structs, or lists beside a sampling_rate column)"
        )

    def items(self, batches, row: int, fs, folder: str) -> Iterator[Item]:
        """Items from Arrow record batches whose first row is row number `row` of the shard;
        relative audio paths are resolved against `folder` on `fs`."""
        for batch in batches:
            audios = _audio_values(batch, self.audio, fs, folder)
            ids = batch.column(self.id).to_pylist() if self.id else None
            kept = {c: batch.column(c).to_pylist() for c in self.keep}
            for i in range(batch.num_rows):
                columns = {c: values[i] for c, values in kept.items()}
                if ids is not None and ids[i] is None:
                    yield Item(None, None, columns, f"row {row}: the id column {self.id!r} is null")
                else:
                    key = str(row) if ids is None else str(ids[i])
                    audio = audios[i]
                    if isinstance(audio, str):
                        yield Item(key, None, columns, audio)
                    else:
                        yield Item(key, audio, columns)
                row += 1


def _is_list(kind) -> bool:
    import pyarrow as pa

    return (
        pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)
    )


def _is_string(kind) -> bool:
    import pyarrow as pa

    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def _audio_values(batch, column: str, fs, folder: str) -> list[Audio | str]:
    """Each row's audio, or a message saying why the row has none."""
    import pyarrow as pa

    values = batch.column(column)
    kind = values.type
    n = batch.num_rows
    if pa.types.is_struct(kind):
        fields = {kind.field(i).name for i in range(kind.num_fields)}
        valid = values.is_valid().to_pylist()
        if "array" in fields and "bytes" not in fields:
            arrays = values.field("array")
            rates = values.field("sampling_rate").to_pylist()
            return [
                _samples(arrays[i], rates[i]) if valid[i] else "the audio is null" for i in range(n)
            ]
        data = values.field("bytes") if "bytes" in fields else pa.nulls(n)
        paths = values.field("path").to_pylist() if "path" in fields else [None] * n
        out: list[Audio | str] = []
        for i in range(n):
            blob = data[i].as_py() if valid[i] else None
            if blob is not None:
                out.append(blob)
            elif valid[i] and paths[i]:
                out.append(_audio_file(paths[i], fs, folder))
            else:
                out.append("the audio is null (no bytes and no path)")
        return out
    if _is_string(kind):
        return [
            "the audio path is null" if p is None else _audio_file(p, fs, folder)
            for p in values.to_pylist()
        ]
    if _is_list(kind):
        rates = batch.column("sampling_rate").to_pylist()
        return [
            _samples(values[i], rates[i]) if values[i].is_valid else "the audio is null"
            for i in range(n)
        ]
    return [b if b is not None else "the audio is null" for b in values.to_pylist()]


def _samples(scalar, rate) -> Samples | str:
    """`[samples]` or `[channels, samples]` from a list (of lists) scalar."""
    import pyarrow as pa

    if not scalar.is_valid:
        return "the audio array is null"
    if rate is None:
        return "the sampling rate is null"
    values = scalar.values
    if _is_list(values.type):
        rows = [values[c].values.to_numpy(zero_copy_only=False) for c in range(len(values))]
        if not rows or len({len(r) for r in rows}) != 1:
            return "the channels of the audio array differ in length"
        return Samples(np.stack(rows), rate)
    if not (pa.types.is_floating(values.type) or pa.types.is_integer(values.type)):
        return f"the audio array holds {values.type}, not numbers"
    return Samples(values.to_numpy(zero_copy_only=False), rate)


def _audio_file(path: str, fs, folder: str) -> AudioFile:
    """A path found in a table: a URL, an absolute local path, or relative to the shard."""
    if "://" in path or "::" in path:
        file_fs, file_path = _filesystem(path)
        return AudioFile(file_path, None if _is_local(file_fs) else file_fs)
    if _is_local(fs):
        return AudioFile(path if os.path.isabs(path) else os.path.join(folder, path))
    return AudioFile(path if path.startswith("/") else f"{folder}/{path}", fs)


class _TrackedFile(io.RawIOBase):
    """A shard file as a parser reads it: every read is clamped to what the file has left (a
    damaged header cannot make a reader allocate more), and a failure of the storage itself is
    remembered, so that the parser's own error is not mistaken for damaged data."""

    def __init__(self, f, size: int | None):
        super().__init__()
        self._f = f
        self._size = size
        self.failed: BaseException | None = None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def _call(self, method, *args):
        try:
            return method(*args)
        except Exception as err:
            self.failed = err
            raise

    def read(self, n: int = -1) -> bytes:
        if self._size is not None:
            left = max(0, self._size - self.tell())
            n = left if n is None or n < 0 else min(n, left)
        return self._call(self._f.read, n)

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def readall(self) -> bytes:
        return self.read(-1)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._call(self._f.seek, offset, whence)

    def tell(self) -> int:
        return self._call(self._f.tell)


# Errors a parser raises for damaged content (when the storage did not fail).
def _damage_types():
    import pyarrow as pa

    return (pa.ArrowException, OSError, ValueError, EOFError, tarfile.TarError, ShardError)


class _FileShardBase(Shard):
    """A shard that is one file on a file system, parsed by `_parse(file, start)`."""

    def __init__(self, fs, path: str, name: str, size: int | None):
        self.fs, self.path, self.name, self.size = fs, path, name, size

    def items(self, start: int = 0) -> Iterator[Item]:
        with self.fs.open(self.path, "rb") as raw:
            f = _TrackedFile(raw, self.size)
            try:
                yield from self._parse(f, start)
            except _damage_types() as err:
                if f.failed is not None:
                    raise  # the storage, not the data
                if isinstance(err, ShardError):
                    raise
                raise ShardError(_first_line(err)) from None

    def _parse(self, f, start: int) -> Iterator[Item]:
        raise NotImplementedError

    def _folder(self) -> str:
        return self.path.rsplit("/", 1)[0] if "/" in self.path else ""


class _ParquetShard(_FileShardBase):
    def __init__(self, fs, path, name, size, columns: _Columns):
        super().__init__(fs, path, name, size)
        self.columns = columns
        self._rows: int | None = None

    def count(self) -> int | None:
        if self._rows is None and _is_local(self.fs):
            import pyarrow.parquet as pq

            try:
                self._rows = pq.ParquetFile(self.path).metadata.num_rows
            except Exception:  # damaged: reading it will say so
                return None
        return self._rows

    def _parse(self, f, start: int) -> Iterator[Item]:
        import pyarrow.parquet as pq

        # pyarrow decodes a whole row group at a time; buffered reads keep it from also
        # holding the raw column chunk (measured: 1x instead of 2x the row group's bytes)
        parquet = pq.ParquetFile(f, buffer_size=PARQUET_BUFFER)
        schema = parquet.schema_arrow
        problem = self.columns.problem(schema, self.name)
        if problem:
            raise ShardError(problem)
        meta = parquet.metadata
        groups, skip = [], start
        for g in range(meta.num_row_groups):
            rows = meta.row_group(g).num_rows
            if not groups and skip >= rows:
                skip -= rows
                continue
            groups.append(g)
        if not groups:
            return
        batches = parquet.iter_batches(
            batch_size=BATCH_ROWS, row_groups=groups, columns=self.columns.needed(schema)
        )
        yield from self.columns.items(_drop_rows(batches, skip), start, self.fs, self._folder())


class _ArrowStreamShard(_FileShardBase):
    """One `.arrow` file of a `save_to_disk` folder (Arrow IPC stream format)."""

    def __init__(self, fs, path, name, size, columns: _Columns):
        super().__init__(fs, path, name, size)
        self.columns = columns

    def _parse(self, f, start: int) -> Iterator[Item]:
        import pyarrow as pa

        reader = pa.ipc.open_stream(f)
        problem = self.columns.problem(reader.schema, self.name)
        if problem:
            raise ShardError(problem)
        needed = self.columns.needed(reader.schema)

        def batches():
            skip = start
            for batch in reader:
                if skip >= batch.num_rows:
                    skip -= batch.num_rows
                    continue
                batch = batch.select(needed)
                for offset in range(skip, batch.num_rows, BATCH_ROWS):
                    yield batch.slice(offset, BATCH_ROWS)
                skip = 0

        yield from self.columns.items(batches(), start, self.fs, self._folder())


def _drop_rows(batches, skip: int):
    for batch in batches:
        if skip >= batch.num_rows:
            skip -= batch.num_rows
            continue
        yield batch.slice(skip) if skip else batch
        skip = 0


def _table_schema(fs, path: str, kind: str):
    """The Arrow schema of a Parquet or `.arrow` file (for the kept columns' types)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with fs.open(path, "rb") as raw:
            f = _TrackedFile(raw, fs.size(path))
            if kind == "parquet":
                return pq.ParquetFile(f).schema_arrow
            return pa.ipc.open_stream(f).schema
    except _damage_types() as err:
        raise SourceError(f"cannot read {path}: {_first_line(err)}") from None


def _parquet_source(spec: str, columns: _Columns) -> Source:
    fs, _ = _filesystem(spec)
    files = _expand(spec)
    _, names = _relative_names([p for p, _ in files])
    return _table_source(
        "parquet",
        spec,
        fs,
        [(p, n, s) for (p, s), n in zip(files, names, strict=True)],
        columns,
        _ParquetShard,
        {},
    )


def _saved_source(spec: str, split: str | None, columns: _Columns) -> Source:
    """A folder written by `Dataset.save_to_disk` (or `DatasetDict.save_to_disk`, with a split)."""
    fs, root = _filesystem(spec)
    root = root.rstrip("/")
    if fs.exists(f"{root}/dataset_dict.json"):
        splits = _read_json(fs, f"{root}/dataset_dict.json").get("splits")
        if not isinstance(splits, list) or not all(isinstance(s, str) for s in splits):
            raise SourceError(f"{spec}/dataset_dict.json does not list the splits")
        chosen = split or ("train" if "train" in splits else None)
        if chosen not in splits:
            raise SourceError(
                f"{spec} holds the splits {', '.join(splits)}: choose one with --split"
            )
        root, split = f"{root}/{chosen}", chosen
    state = _read_json(fs, f"{root}/state.json")
    files = state.get("_data_files")
    if (
        not isinstance(files, list)
        or not files
        or not all(isinstance(f, dict) and isinstance(f.get("filename"), str) for f in files)
    ):
        raise SourceError(f"{root}/state.json does not list the dataset's .arrow files")
    names = [f["filename"] for f in files]
    if any("/" in n or n.startswith(".") for n in names):
        raise SourceError(f"{root}/state.json names files outside the folder")
    shards = []
    for name in names:
        try:
            size = fs.size(f"{root}/{name}")
        except FileNotFoundError:
            raise SourceError(f"{spec}: {name}, listed in state.json, is missing") from None
        shards.append((f"{root}/{name}", name, size))
    return _table_source("saved", spec, fs, shards, columns, _ArrowStreamShard, {"split": split})


def _table_source(kind, spec, fs, files, columns: _Columns, shard_class, extra) -> Source:
    schema = _table_schema(fs, files[0][0], kind)
    problem = columns.problem(schema, files[0][1])
    if problem:
        raise SourceError(problem + " (choose the columns with --audio-column, --id-column, "
                          "--keep-columns)")  # fmt: skip
    types = {c: schema.field(c).type for c in columns.keep}
    columns = dataclasses.replace(columns, types=types)
    shards: list[Shard] = [shard_class(fs, p, n, s, columns) for p, n, s in files]
    return Source(kind, spec, shards, {**columns.options(), **extra}, types)


def _read_json(fs, path: str) -> dict:
    try:
        if (fs.size(path) or 0) > 1 << 24:  # far more than these small files hold
            raise SourceError(f"{path} is too large to be a dataset's state file")
        with fs.open(path, "rb") as f:
            value = json.loads(f.read())
    except FileNotFoundError:
        raise SourceError(f"{path} is missing") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise SourceError(f"cannot read {path}: {err}") from None
    if not isinstance(value, dict):
        raise SourceError(f"{path} does not hold a JSON object")
    return value


class _HubShard(Shard):
    """One shard of a dataset streamed by `datasets.load_dataset(..., streaming=True)`."""

    def __init__(self, dataset, index: int, count: int, name: str, columns: _Columns):
        self.dataset, self.index, self.total = dataset, index, count
        self.name, self.columns = name, columns

    def items(self, start: int = 0) -> Iterator[Item]:
        import pyarrow as pa

        part = self.dataset.shard(num_shards=self.total, index=self.index)
        if start:
            part = part.skip(start)
        tables = part.with_format("arrow").iter(batch_size=BATCH_ROWS)
        try:
            batches = (batch for table in tables for batch in table.to_batches())
            yield from self.columns.items(batches, start, None, "")
        except pa.ArrowException as err:
            raise ShardError(_first_line(err)) from None


def _hub_source(spec: str, config: str | None, split: str, columns: _Columns) -> Source:
    try:
        import datasets
    except ImportError:
        raise SourceError(
            f"reading the Hugging Face dataset {spec} needs the datasets package "
            f"(pip install datasets)"
        ) from None
    from datasets import utils as datasets_utils

    quiet = datasets_utils.are_progress_bars_disabled()
    datasets_utils.disable_progress_bars()  # "Resolving data files": tokenize has its own bar
    try:
        dataset = datasets.load_dataset(spec, config, split=split, streaming=True)
    except Exception as err:  # the Hub's and the builders' errors, one line
        raise SourceError(f"cannot stream the dataset {spec}: {_first_line(err)}") from None
    finally:
        if not quiet:
            datasets_utils.enable_progress_bars()
    if not isinstance(dataset, datasets.IterableDataset):
        raise SourceError(f"{spec} did not load as one streamable split")
    features = dataset.features
    if features is not None:
        schema = features.arrow_schema
    else:  # the builder does not say: the first row does
        first = next(iter(dataset.with_format("arrow").iter(batch_size=1)), None)
        if first is None:
            raise SourceError(f"the dataset {spec} ({split}) is empty")
        schema = first.schema
    problem = columns.problem(schema, f"the dataset {spec} ({split})")
    if problem:
        raise SourceError(problem)
    count = dataset.num_shards
    names = _hub_shard_names(dataset, count)
    dataset = dataset.select_columns(columns.needed(schema))
    shards: list[Shard] = [_HubShard(dataset, i, count, names[i], columns) for i in range(count)]
    options = {**columns.options(), "dataset": spec, "config": config, "split": split}
    return Source("hf", spec, shards, options, {c: schema.field(c).type for c in columns.keep})


def _hub_shard_names(dataset, count: int) -> list[str]:
    """The data files behind the shards where `datasets` tells them (it does for file-based
    builders), else numbers."""
    files = getattr(getattr(dataset, "_ex_iterable", None), "kwargs", {}).get("files")
    if isinstance(files, list) and len(files) == count and all(isinstance(f, str) for f in files):
        _, names = _relative_names([f.split("::")[0] for f in files])
        if len(set(names)) == count:
            return names
    return [f"shard-{i:05d}-of-{count:05d}" for i in range(count)]


# ---- WebDataset tar shards ----
class _TarShard(_FileShardBase):
    def __init__(self, fs, path, name, size, audio_ext: str | None, keep: tuple[str, ...]):
        super().__init__(fs, path, name, size)
        self.audio_ext, self.keep = audio_ext, keep

    def _wanted(self, ext: str) -> bool:
        return ext in self.keep or self._is_audio(ext)

    def _is_audio(self, ext: str) -> bool:
        if self.audio_ext is not None:
            return ext == self.audio_ext
        return "." + ext.rsplit(".", 1)[-1] in AUDIO_EXTENSIONS

    def _parse(self, f, start: int) -> Iterator[Item]:
        head = f.read(2)
        f.seek(0)
        if head == b"\x1f\x8b":
            raise ShardError("a gzip-compressed tar: tokenize reads plain .tar shards")
        tar = tarfile.open(fileobj=f, mode="r:")
        for index, key, members in self._samples(tar, f, start):
            if index >= start:
                yield self._item(key, members)
        self._check_end(tar, f)

    def _samples(self, tar, f, start: int):
        """(sample index, key, {extension: bytes, or None where not read}), in tar order,
        grouped as WebDataset groups consecutive members with the same key."""
        key, members, index = None, {}, -1
        while True:
            info = tar.next()
            if info is None:
                break
            tar.members = []  # tarfile keeps every header otherwise
            name = info.name
            if not info.isreg() or _WDS_META.match(name):
                continue
            if "/" not in name and name.startswith("__") and name.endswith("__"):
                continue
            match = _WDS_KEY.match(name)
            if match is None:
                continue  # no extension: WebDataset ignores it too
            prefix, ext = match.group(1), match.group(2).lower()
            if prefix != key:
                if key is not None:
                    yield index, key, members
                key, members, index = prefix, {}, index + 1
            if ext in members:
                raise ShardError(f"{name}: a second .{ext} member for the key {key}")
            members[ext] = (
                self._read(tar, f, info) if index >= start and self._wanted(ext) else None
            )
        if key is not None:
            yield index, key, members

    def _read(self, tar, f, info) -> bytes:
        if self.size is not None and info.offset_data + info.size > self.size:
            raise ShardError(
                f"{info.name} claims {info.size} bytes, past the end of the shard "
                f"({self.size} bytes): the file is truncated or damaged"
            )
        member = tar.extractfile(info)
        return member.read()

    def _check_end(self, tar, f) -> None:
        """tarfile ends quietly at a damaged header or the end of the file: only a zero block
        (the end-of-archive marker) is a proper end."""
        f.seek(tar.offset)
        block = f.read(tarfile.BLOCKSIZE)
        if block == bytes(tarfile.BLOCKSIZE):
            return
        if not block:
            raise ShardError(
                f"the tar ends at byte {tar.offset} without its end-of-archive marker (truncated?)"
            )
        raise ShardError(f"damaged tar header at byte {tar.offset}")

    def _item(self, key: str, members: dict[str, bytes | None]) -> Item:
        audio = [ext for ext in members if self._is_audio(ext)]
        columns = {}
        for ext in self.keep:
            value = members.get(ext)
            if value is not None:
                try:
                    value = value.decode("utf-8")
                except UnicodeDecodeError:
                    return Item(key, None, {}, f"the .{ext} member is not UTF-8 text")
            columns[ext] = value
        if len(audio) != 1:
            if audio:
                why = f"several audio members ({', '.join(audio)}): choose one with --audio-column"
            else:
                want = f".{self.audio_ext}" if self.audio_ext else "audio"
                why = f"no {want} member (members: {', '.join(sorted(members)) or 'none'})"
            return Item(key, None, columns, why)
        return Item(key, members[audio[0]], columns)


def _tar_source(spec: str, audio_ext: str | None, keep: tuple[str, ...]) -> Source:
    import pyarrow as pa

    fs, _ = _filesystem(spec)
    files = _expand(spec)
    _, names = _relative_names([p for p, _ in files])
    ext = audio_ext.lower().lstrip(".") if audio_ext else None
    keep = tuple(k.lower().lstrip(".") for k in keep)
    shards: list[Shard] = [
        _TarShard(fs, p, n, s, ext, keep) for (p, s), n in zip(files, names, strict=True)
    ]
    options = {"audio_column": ext, "keep_columns": list(keep)}
    return Source("webdataset", spec, shards, options, {k: pa.string() for k in keep})


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
