"""Tables as a `sources.Source`: Parquet files, `save_to_disk` folders (Arrow IPC streams) and
datasets streamed by `datasets.load_dataset(..., streaming=True)`.

An item is a row: its key the `--id-column` value (else the row number in its shard), its audio
the `--audio-column`: encoded bytes (`binary`, or the `{bytes, path}` struct of the `datasets`
`Audio` feature; a null `bytes` reads `path`, relative to the shard), a file path, or decoded
samples (`{array, sampling_rate}` structs, or a list column beside a `sampling_rate` column;
`[samples]` or `[channels, samples]`); the kept columns keep their Arrow types.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterator
from typing import Any

import numpy as np

from .sources import (
    Audio,
    AudioFile,
    FileShard,
    Item,
    Samples,
    Shard,
    ShardError,
    Source,
    SourceError,
    TrackedFile,
    damage_types,
    filesystem,
    first_line,
    is_local,
    match_files,
    relative_names,
)

BATCH_ROWS = 64  # rows per Arrow batch read from a table: a few MB of encoded audio
PARQUET_BUFFER = 1 << 20  # bytes: column chunks are read through a buffer of this size
_ARROW_NAME = re.compile(r"(?!\.)[^/\\]+\.arrow")


def table_source(
    kind: str,
    spec: str,
    *,
    split: str | None,
    config: str | None,
    audio_column: str | None,
    id_column: str | None,
    keep: tuple[str, ...],
) -> Source:
    """A "parquet", "saved" or "hf" source (see `corpus.open_source`)."""
    columns = _Columns(audio_column or "audio", id_column, keep)
    if kind == "parquet":
        return _parquet_source(spec, columns)
    if kind == "saved":
        return _saved_source(spec, split, columns)
    return _hub_source(spec, config, split or "train", columns)


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
            # An IPC file's buffers are taken as they are: damaged offsets would point outside
            # them (reading far beyond the data, or allocating what they claim). ArrowInvalid
            # is damage to the caller.
            batch.validate(full=True)
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
        file_fs, file_path = filesystem(path)
        return AudioFile(file_path, None if is_local(file_fs) else file_fs)
    if is_local(fs):
        return AudioFile(path if os.path.isabs(path) else os.path.join(folder, path))
    return AudioFile(path if path.startswith("/") else f"{folder}/{path}", fs)


class _ParquetShard(FileShard):
    def __init__(self, fs, path, name, size, columns: _Columns):
        super().__init__(fs, path, name, size)
        self.columns = columns
        self._rows: int | None = None

    def count(self) -> int | None:
        if self._rows is None and is_local(self.fs):
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


class _ArrowStreamShard(FileShard):
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
            f = TrackedFile(raw, fs.size(path))
            if kind == "parquet":
                schema = pq.ParquetFile(f).schema_arrow
            else:
                schema = pa.ipc.open_stream(f).schema
            _decode_names(schema)
            return schema
    except damage_types() as err:
        raise SourceError(f"cannot read {path}: {first_line(err)}") from None


def _decode_names(schema) -> None:
    """Read every field name once: pyarrow decodes them lazily, so names that are not UTF-8
    would raise (UnicodeDecodeError) wherever the schema is used next."""
    import pyarrow as pa

    def walk(kind) -> None:
        if pa.types.is_struct(kind):
            for i in range(kind.num_fields):
                kind.field(i).name  # noqa: B018
                walk(kind.field(i).type)
        elif _is_list(kind):
            walk(kind.value_type)

    for field in schema:
        field.name  # noqa: B018
        walk(field.type)


def _parquet_source(spec: str, columns: _Columns) -> Source:
    fs, _ = filesystem(spec)
    files = match_files(spec)
    _, names = relative_names([p for p, _ in files])
    return _files_source(
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
    fs, root = filesystem(spec)
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
    bad = next((n for n in names if not _is_arrow_name(n)), None)
    if bad is not None:
        raise SourceError(
            f"{root}/state.json names {bad[:100]!r}, not an .arrow file in the folder"
        )
    shards = []
    for name in names:
        try:
            size = fs.size(f"{root}/{name}")
        except FileNotFoundError:
            raise SourceError(f"{spec}: {name}, listed in state.json, is missing") from None
        shards.append((f"{root}/{name}", name, size))
    return _files_source("saved", spec, fs, shards, columns, _ArrowStreamShard, {"split": split})


def _files_source(kind, spec, fs, files, columns: _Columns, shard_class, extra) -> Source:
    schema = _table_schema(fs, files[0][0], kind)
    problem = columns.problem(schema, files[0][1])
    if problem:
        raise SourceError(problem + " (choose the columns with --audio-column, --id-column, "
                          "--keep-columns)")  # fmt: skip
    types = {c: schema.field(c).type for c in columns.keep}
    columns = dataclasses.replace(columns, types=types)
    shards: list[Shard] = [shard_class(fs, p, n, s, columns) for p, n, s in files]
    return Source(kind, spec, shards, {**columns.options(), **extra}, types)


def _is_arrow_name(name: str) -> bool:
    """Whether a state.json may list this file: a plain name in the folder (datasets writes
    data-00000-of-00001.arrow), printable (no control characters or lone surrogates, which the
    OS refuses) and short enough for any file system."""
    return bool(_ARROW_NAME.fullmatch(name)) and name.isprintable() and len(name.encode()) <= 200


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
            raise ShardError(first_line(err)) from None


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
        raise SourceError(f"cannot stream the dataset {spec}: {first_line(err)}") from None
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
        _, names = relative_names([f.split("::")[0] for f in files])
        if len(set(names)) == count:
            return names
    return [f"shard-{i:05d}-of-{count:05d}" for i in range(count)]
