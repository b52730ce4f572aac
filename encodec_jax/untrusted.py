"""Reading files that may be damaged or hostile: the checks every reader shares.

Codes files, checkpoints and configs travel between people, so each reader treats its file as
untrusted: it raises its own documented error class with a one-line message, and it allocates
no more than the file's own size justifies. Lengths, counts and shapes a file claims are checked
against the bytes it holds before anything is allocated. Compressed content (a deflated zip
member) may expand up to deflate's own limit and no further.

NumPy and the standard library only (PyYAML only inside `yaml_loader`), so that every reader can
use it.
"""

from __future__ import annotations

import json
import math
import zipfile
from typing import Any

# Deflate emits at most 258 bytes per 2 bits of a back-reference, so no valid deflate stream
# expands by more than this; a zip member claiming more is damaged or a decompression bomb.
DEFLATE_MAX_RATIO = 1032


def parse_json_object(data: bytes | str, what: str, error: type[Exception]) -> dict[str, Any]:
    """The JSON object in `data`, or `error` saying in one line what is wrong with it.

    Refused: bytes that are not UTF-8, text that is not JSON, JSON that is not an object, nesting
    too deep to parse, and a key given twice in one object (the file is ambiguous: JSON readers
    differ in which of the two they keep).

    Args:
        data: the file's content.
        what: names the file in messages (e.g. "config.json at /x").
        error: the reader's documented error class.
    """
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as err:
            bad = err.object[err.start]
            raise error(f"{what} is not UTF-8 text (byte {err.start} is {bad:#04x})") from None
    try:
        value = json.loads(data, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as err:
        raise error(f"{what} is not valid JSON: {err}") from None
    except _DuplicateKey as err:
        raise error(f"{what} gives the key {err.args[0]!r} twice") from None
    except RecursionError:
        raise error(f"{what} is nested too deeply to be a valid file") from None
    if not isinstance(value, dict):
        raise error(f"{what} holds a JSON {type(value).__name__}, not an object")
    return value


class _DuplicateKey(Exception):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


# Deeper YAML is refused as it is read. A config nests a few levels; without a limit, a 10 kB
# file of nested brackets took PyYAML about 1 s to refuse (its scanner's time grows with the
# square of the nesting, and only the composer's recursion limit stopped it).
MAX_YAML_DEPTH = 64


def yaml_loader(aliases: bool) -> type:
    """A `yaml.SafeLoader` (it builds no objects) for untrusted text that refuses nesting deeper
    than MAX_YAML_DEPTH and, unless `aliases`, anchors and aliases (whose sharing can make a small
    file expand without bound when it is walked), each with a `yaml.YAMLError` that names the
    line. `yaml.load(text, Loader=yaml_loader(...))`; PyYAML is imported only here."""
    import yaml

    class UntrustedLoader(yaml.SafeLoader):
        depth = 0

        def fetch_flow_collection_start(self, token_class):
            # The scanner reads a run of `[` or `{` to its end before the composer sees the
            # first one (each may open a key), so brackets are counted here, as they are read.
            if self.flow_level >= MAX_YAML_DEPTH:
                message = f"brackets nested deeper than {MAX_YAML_DEPTH} levels"
                raise yaml.scanner.ScannerError(None, None, message, self.get_mark())
            super().fetch_flow_collection_start(token_class)

        def compose_node(self, parent, index):
            mark = self.peek_event().start_mark
            if not aliases and self.check_event(yaml.AliasEvent):
                message = "aliases (*name) are not accepted"
                raise yaml.composer.ComposerError(None, None, message, mark)
            if self.depth >= MAX_YAML_DEPTH:
                raise yaml.composer.ComposerError(
                    None, None, f"nested deeper than {MAX_YAML_DEPTH} levels", mark
                )
            self.depth += 1
            try:
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1

    return UntrustedLoader


def is_finite(value: Any) -> bool:
    """Whether a number (int or float) is finite as a float: an int too large for a float is
    not (math.isfinite would raise OverflowError)."""
    try:
        return math.isfinite(value)
    except (OverflowError, TypeError):
        return False


def check_zip_members(
    archive: zipfile.ZipFile, archive_size: int, what: str, error: type[Exception]
) -> list[zipfile.ZipInfo]:
    """The archive's members, after checking that the sizes they claim are possible.

    Every member's compressed size must fit in the archive, a stored member's size must equal its
    compressed size, and a deflated member may expand at most `DEFLATE_MAX_RATIO` times; the
    same name twice, encrypted members and compression methods other than stored and deflate
    are refused. zipfile itself never returns more than a member's claimed size, so reading any
    member then allocates at most `DEFLATE_MAX_RATIO` times the archive's size.

    Args:
        archive: the open archive.
        archive_size: its size in bytes on disk.
        what: names the archive in messages.
        error: the reader's documented error class.
    """
    members = archive.infolist()
    seen: set[str] = set()
    for info in members:
        name = info.filename
        if name in seen:
            raise error(f"{what} holds {name} twice")
        seen.add(name)
        if info.flag_bits & 0x1:
            raise error(f"{what} has an encrypted member ({name})")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise error(f"{what} uses an unsupported zip compression method for {name}")
        limit = info.compress_size * (
            1 if info.compress_type == zipfile.ZIP_STORED else DEFLATE_MAX_RATIO
        )
        if info.compress_size > archive_size or info.file_size > limit:
            raise error(
                f"{what} is corrupt: its member {name} claims {info.file_size} bytes, more "
                f"than the archive ({archive_size} bytes) can hold"
            )
    return members


__all__ = ["DEFLATE_MAX_RATIO", "check_zip_members", "is_finite", "parse_json_object"]
