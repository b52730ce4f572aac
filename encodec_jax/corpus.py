"""Opening a corpus: which kind of source a spec names (a folder, Parquet or tar files, a saved
or Hub dataset) and its reader (`sources` for folders, `tables`, `webdataset`), behind one call.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

from .sources import (
    KINDS,
    Source,
    SourceError,
    filesystem,
    folder_source,
    has_pattern,
    match_files,
    shard_extension,
)
from .tables import table_source
from .webdataset import tar_source


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
        return folder_source(spec, exclude)
    if kind == "webdataset":
        if id_column is not None:
            raise SourceError(
                "tar shards key their items themselves: --id-column applies to tables"
            )
        return tar_source(spec, audio_column, keep)
    return table_source(
        kind,
        spec,
        split=split,
        config=config,
        audio_column=audio_column,
        id_column=id_column,
        keep=keep,
    )


def _detect(spec: str) -> str:
    if has_pattern(spec):
        paths = match_files(spec)
        exts = {shard_extension(p) for p in paths}
        if exts == {".parquet"}:
            return "parquet"
        if exts == {".tar"}:
            return "webdataset"
        raise SourceError(
            f"{spec} matches {', '.join(sorted(e or '(no extension)' for e in exts))} files: a "
            f"pattern must match only .parquet or only .tar files"
        )
    fs, path = filesystem(spec)
    if fs.isdir(path):
        names = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)}
        if {"state.json", "dataset_info.json"} <= names or "dataset_dict.json" in names:
            return "saved"
        return "folder"
    if fs.isfile(path):
        ext = shard_extension(path)
        if ext in (".parquet", ".tar"):
            return "parquet" if ext == ".parquet" else "webdataset"
        raise SourceError(
            f"{spec} is a {ext or 'extensionless'} file: tokenize reads a folder of audio files, "
            f".parquet or .tar shards, or a dataset (for one audio file use encodec-jax encode)"
        )
    if "://" not in spec and re.fullmatch(r"[\w.-]+(/[\w.-]+)?", spec) and not spec.startswith("."):
        return "hf"  # not a local path: a Hub dataset id
    raise SourceError(f"{spec} does not exist (no such file, folder or Hub dataset id)")
