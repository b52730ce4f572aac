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

Folders are read here; tables (Parquet, `save_to_disk`, `load_dataset`) in `tables`, tar
shards in `webdataset`, each turning its files into shards of this interface; `corpus.open_source`
tells which kind a spec names and opens it.

Damaged shard content (not a Parquet/tar/Arrow file, a damaged header or page, a truncated tar)
raises `ShardError` from `Shard.items` at the point where reading stopped; failures of the storage
itself (network, permissions) raise what the file system raised, so that a run stops and can be
resumed instead of recording good data as bad. No reader allocates more than the file's size
justifies: every read of a shard is clamped to the bytes the file has left, a seek outside it is
damage, and Arrow batches are validated before use (`tables`). Memory: a Parquet shard is read a row
group at a time (pyarrow decodes a row group whole; with the batch of `tables.BATCH_ROWS` rows being
handed on, about one row group and a batch), an `.arrow` file one record batch at a time (`datasets`
writes both in groups of 100 rows for audio), a tar shard one sample at a time.
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


def read_audio(
    audio: Audio, sample_rate: int, channels: int, name: str = "audio"
) -> tuple[np.ndarray, list[str]]:
    """An item's audio as the model takes it: (`[channels, samples]` float32 at `sample_rate`,
    notes on the conversions made), as `audio.load_audio` returns them.

    `name` is what error messages and notes call it.

    Raises:
        AudioError: undecodable, empty or non-finite audio, or a file that does not exist.
        OSError: the storage failed (not the data): worth a retry.
    """
    if isinstance(audio, bytes):
        return decode_audio(audio, sample_rate, channels, name)
    if isinstance(audio, Samples):
        return convert_audio(audio.array, audio.rate, sample_rate, channels, name)
    if audio.fs is None:
        return load_audio(audio.path, sample_rate, channels, name=name)
    try:
        with audio.fs.open(audio.path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise AudioError(f"cannot read {name}: no such file {audio.path}") from None
    return decode_audio(data, sample_rate, channels, name)


# ---- file systems and patterns ----
def filesystem(url: str):
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


def is_local(fs) -> bool:
    """Whether an fsspec file system is the local disk (whose paths open directly)."""
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)


def has_pattern(spec: str) -> bool:
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


def match_files(spec: str) -> list[tuple[str, int | None]]:
    """The files a path, glob or brace pattern names: [(path, size)], sorted, without repeats.

    Paths are on the spec's file system (`filesystem(spec)[0]`)."""
    fs, _ = filesystem(spec)
    found: dict[str, int | None] = {}
    literal = []
    for pattern in expand_braces(spec):
        _, path = filesystem(pattern)
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


def shard_extension(path) -> str:
    name = path[0] if isinstance(path, tuple) else path
    name = name.rstrip("/").rsplit("/", 1)[-1].lower()
    for ext in (".tar.gz", ".tgz", ".parquet", ".tar"):
        if name.endswith(ext):
            return ext
    return os.path.splitext(name)[1]


def relative_names(paths: Sequence[str]) -> tuple[str, list[str]]:
    """(common folder, each path relative to it) for shard names that do not depend on where
    the corpus lives."""
    folders = [p.rsplit("/", 1)[0] + "/" if "/" in p else "" for p in paths]
    base = os.path.commonprefix(folders)
    base = base[: base.rfind("/") + 1]
    return base, [p[len(base) :] for p in paths]


# ---- a folder of audio files ----
class _AudioFileShard(Shard):
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
    fs, root = filesystem(os.fspath(spec))
    root = root.rstrip("/")
    skip = None
    if exclude is not None:
        exclude_fs, skip = filesystem(os.fspath(exclude))
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


def folder_source(spec: str, exclude) -> Source:
    fs, root = filesystem(spec)
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
            folder, ext = shards[0][len(root) : shards[0].rfind("/")], shard_extension(shards[0])
            pattern = f"{spec.rstrip('/')}{folder}/*{ext}"
            hint = f"; it holds {ext} files: name them with a pattern, e.g. '{pattern}'" + (
                ", or stream it as a dataset with --source-type hf" if ext == ".parquet" else ""
            )
        raise SourceError(
            f"no audio files under {spec} (looked for {' '.join(sorted(AUDIO_EXTENSIONS))}){hint}"
        )
    root = root.rstrip("/")
    local = is_local(fs)
    shards: list[Shard] = [
        _AudioFileShard(name, size, AudioFile(f"{root}/{name}", None if local else fs))
        for name, size in files
    ]
    return Source("folder", spec, shards, {}, {})


def audio_file_source(path: str | os.PathLike) -> Source:
    """One local audio file as a folder source of one item, keyed by its file name (what
    `encodec-jax eval` reads when given a file; `tokenize` takes folders)."""
    path = os.fspath(path)
    name = os.path.basename(path)
    shard = _AudioFileShard(name, os.path.getsize(path), AudioFile(path))
    return Source("folder", path, [shard], {}, {})


# ---- shards that are files ----
class TrackedFile(io.RawIOBase):
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
        if self._size is not None:
            # A parser seeks where the data says (a tar member's claimed size moves the next
            # header): past the end of the shard is damage, not a failure of the storage.
            target = offset + (0 if whence == 0 else self.tell() if whence == 1 else self._size)
            if not 0 <= target <= self._size:
                raise ShardError(
                    f"the data points to byte {target}, outside the shard ({self._size} bytes): "
                    f"the file is truncated or damaged"
                )
        return self._call(self._f.seek, offset, whence)

    def tell(self) -> int:
        return self._call(self._f.tell)


def damage_types() -> tuple[type[BaseException], ...]:
    """The errors a parser (pyarrow, tarfile, ours) raises for damaged content; they mean damage
    only when the storage itself did not fail (`TrackedFile.failed`)."""
    import pyarrow as pa

    return (pa.ArrowException, OSError, ValueError, EOFError, tarfile.TarError, ShardError)


class FileShard(Shard):
    """A shard that is one file on a file system, parsed by a subclass's `_parse(file, start)`
    (which yields the items from index `start` on): damage its parser meets becomes ShardError,
    storage failures propagate."""

    def __init__(self, fs, path: str, name: str, size: int | None):
        self.fs, self.path, self.name, self.size = fs, path, name, size

    def items(self, start: int = 0) -> Iterator[Item]:
        with self.fs.open(self.path, "rb") as raw:
            f = TrackedFile(raw, self.size)
            try:
                yield from self._parse(f, start)
            except damage_types() as err:
                if f.failed is not None:
                    raise  # the storage, not the data
                if isinstance(err, ShardError):
                    raise
                raise ShardError(first_line(err)) from None

    def _parse(self, f, start: int) -> Iterator[Item]:
        raise NotImplementedError

    def _folder(self) -> str:
        return self.path.rsplit("/", 1)[0] if "/" in self.path else ""


def first_line(err: BaseException) -> str:
    """An exception's message in one line (its type's name if it has none)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
