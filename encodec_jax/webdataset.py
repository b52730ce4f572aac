"""WebDataset tar shards as a `sources.Source`, read with `tarfile` from any fsspec file.

Samples are formed as WebDataset forms them (`base_plus_ext` and `group_by_keys` in its
`tariterators`): regular members only, `__meta__`-style names skipped, the key everything up to
the first dot of the member's file name (with its folder), the extension the rest (lower-cased),
consecutive members with the same key one sample. A sample's audio is its member with an audio
extension (or the extension `--audio-column` names); kept "columns" are other extensions, as
UTF-8 text. Only plain (uncompressed) tars, read forward once; member data is read only for the
members wanted, and never past the end of the file.
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Iterator

from .audio import AUDIO_EXTENSIONS
from .sources import (
    FileShard,
    Item,
    Shard,
    ShardError,
    Source,
    filesystem,
    match_files,
    relative_names,
)

# WebDataset skips these names (its `meta_prefix`/`meta_suffix` and `skip_meta`).
_WDS_META = re.compile(r"__[^/]*__($|/)")
# WebDataset's base_plus_ext: the key is everything up to the first dot of the last path
# component, the extension everything after it.
_WDS_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


class _TarShard(FileShard):
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


def tar_source(spec: str, audio_ext: str | None, keep: tuple[str, ...]) -> Source:
    """A "webdataset" source (see `corpus.open_source`)."""
    import pyarrow as pa

    fs, _ = filesystem(spec)
    files = match_files(spec)
    _, names = relative_names([p for p, _ in files])
    ext = audio_ext.lower().lstrip(".") if audio_ext else None
    keep = tuple(k.lower().lstrip(".") for k in keep)
    shards: list[Shard] = [
        _TarShard(fs, p, n, s, ext, keep) for (p, s), n in zip(files, names, strict=True)
    ]
    options = {"audio_column": ext, "keep_columns": list(keep)}
    return Source("webdataset", spec, shards, options, {k: pa.string() for k in keep})
