"""Every file reader fed damaged and hostile files: the table of readers and the fuzz harness.

Each row of `READERS` names a reader and says how to make a valid file for it, how to read a
file, which error classes the reader documents, and where its file keeps the fields worth
mutating. The harness (`fuzz`) mutates the valid file with hypothesis (seeded: `derandomize`)
and asserts, for every case:

- the reader returns, or raises one of its documented error classes with a one-line message
  that is not about memory; any other exception (a KeyError, a struct.error, a MemoryError) is a
  failure;
- memory stays bounded: all cases run in one child process whose address space is limited with
  `RLIMIT_AS` to `MEMORY_BOUND` (below), so an allocation a file's claims ask for fails loudly;
- nothing hangs: each case has `CASE_TIMEOUT_S` seconds, the child as a whole a timeout too;
- the valid file still reads, with the same result, after all cases.

Mutations: truncation at any byte, bit flips, overwritten, inserted, deleted and duplicated
byte runs, garbage appended, header fields (binary ones, given as `Field`s) set to 0, -1,
their maximum and random values, and for formats built on a document (JSON, YAML, a pickle's
integers, an .npz's arrays), values replaced by hostile ones of every type and keys duplicated
or dropped.

To add a reader: write `make(directory) -> path of a valid file`, `read(path)`, list its error
classes as "module.Class" strings (imported in the child only), and add a `Reader` row (give
`needs=("torch",)` for readers that need an optional package). A format with a JSON or YAML
document gets its semantic mutations from `json_document(...)`/`yaml_document(...)`; binary
headers list their `Field`s. `tests/test_fuzz.py` runs every row.

Run one reader by hand: `python -m tests.fuzz_readers codes-ecdc-48khz --examples 2000`.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib
import importlib.util
import io
import json
import math
import pickle
import pickletools
import re
import resource
import signal
import struct
import sys
import tempfile
import time
import traceback
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

# The memory bound: the child's address space may grow this much past its baseline (measured
# after importing the reader and reading the valid file once, so libraries are mapped), plus
# 64 times the largest file it is given. Valid files here are a few KB, so a claim of more than
# the margin (a 10^12-sample header, a billion-element shape) fails under the limit.
MEMORY_MARGIN = 256 << 20
MEMORY_PER_FILE_BYTE = 64
CASE_TIMEOUT_S = 10
# Mutations never grow a file by more than this.
MAX_GROWTH = 4096


@dataclasses.dataclass(frozen=True)
class Field:
    """An integer field of a binary header: `size` bytes at `offset`, in `order`."""

    offset: int
    size: int
    order: str = "little"


@dataclasses.dataclass(frozen=True)
class Reader:
    """One row of the table.

    Attributes:
        name: for test ids and the command line.
        make: writes a valid file into the given directory and returns its path (the reader may
            need other files beside it; only this one is mutated).
        read: reads the file at a path (the same path `make` returned).
        errors: the documented error classes, "module.Class".
        fields: binary header fields worth setting to extreme values.
        document: mutations that understand the format: valid bytes -> strategy of bytes.
        needs: modules that must be importable, else the reader is skipped.
    """

    name: str
    make: Callable[[Path], Path]
    read: Callable[[Path], Any]
    errors: tuple[str, ...]
    fields: tuple[Field, ...] = ()
    document: Callable[[bytes], st.SearchStrategy[bytes]] | None = None
    needs: tuple[str, ...] = ()

    def available(self) -> bool:
        return all(importlib.util.find_spec(m) is not None for m in self.needs)


# ---- mutations ----
@st.composite
def _byte_mutation(draw, data: bytes) -> bytes:
    n = len(data)
    kind = draw(st.sampled_from(["truncate", "flip", "overwrite", "insert", "delete", "copy"]))
    if n == 0 or kind == "insert":
        pos = draw(st.integers(0, n))
        extra = draw(st.binary(min_size=1, max_size=64))
        return data[:pos] + extra + data[pos:]
    pos = draw(st.integers(0, n - 1))
    if kind == "truncate":
        return data[:pos]
    if kind == "flip":
        bit = draw(st.integers(0, 7))
        return data[:pos] + bytes([data[pos] ^ (1 << bit)]) + data[pos + 1 :]
    length = draw(st.integers(1, min(16, n - pos)))
    if kind == "overwrite":
        fill = draw(
            st.one_of(
                st.just(b"\x00" * length),
                st.just(b"\xff" * length),
                st.binary(min_size=length, max_size=length),
            )
        )
        return data[:pos] + fill + data[pos + length :]
    if kind == "delete":
        return data[:pos] + data[pos + length :]
    # copy: a run of the file duplicated elsewhere (a repeated chunk, a doubled entry)
    to = draw(st.integers(0, n))
    return data[:to] + data[pos : pos + length] + data[to:]


def _field_values(size: int) -> st.SearchStrategy[int]:
    top = (1 << (8 * size)) - 1
    return st.one_of(
        st.sampled_from([0, 1, top, top >> 1, (top >> 1) + 1, top - 1]),
        st.integers(0, top),
    )


@st.composite
def _field_mutation(draw, data: bytes, fields: tuple[Field, ...]) -> bytes:
    field = draw(st.sampled_from([f for f in fields if f.offset + f.size <= len(data)]))
    value = draw(_field_values(field.size)).to_bytes(field.size, field.order)  # type: ignore
    return data[: field.offset] + value + data[field.offset + field.size :]


def mutations(reader: Reader, data: bytes) -> st.SearchStrategy[bytes]:
    """Damaged versions of the valid file `data`: one to three mutations applied in turn."""
    single = [_byte_mutation(data)]
    if any(f.offset + f.size <= len(data) for f in reader.fields):
        single.append(_field_mutation(data, reader.fields))
    if reader.document is not None:
        single.append(reader.document(data))
    first = st.one_of(single)
    return first.flatmap(
        lambda once: st.one_of(st.just(once), _byte_mutation(once), _byte_mutation(once))
    )


HOSTILE = st.one_of(
    st.sampled_from(
        [0, -1, 1, 2**31, 2**63, -(2**63), 10**30, 10**400, 1e308, -1e308, 0.5, -0.0, True, False]
    ),
    st.sampled_from([None, "", "x" * 1000, [], {}, [[[]]], [0] * 100, {"a": {"b": None}}]),
    st.sampled_from([math.nan, math.inf, -math.inf]),
    st.integers(),
    st.floats(),
    st.text(max_size=20),
    st.lists(st.integers(-5, 10**6), max_size=8),
)
_DUPLICATE = "\x00duplicate\x00"


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path into a JSON-like document, the root included."""
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


def _get(doc: Any, path: tuple) -> Any:
    for key in path:
        doc = doc[key]
    return doc


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _edit(doc: Any, path: tuple, action: str, value: Any) -> Any:
    """A copy of `doc` with the node at `path` set, deleted or its key duplicated."""
    doc = json.loads(json.dumps(doc))
    if not path:
        return value if action == "set" else doc
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    key = path[-1]
    if action == "set":
        parent[key] = value
    elif action == "delete":
        del parent[key]
    elif isinstance(parent, dict):
        parent[_DUPLICATE + key] = value  # becomes a second `key` when dumped
    return doc


# Lengths, counts and shapes a file claims: the values that ask a reader to allocate.
CLAIMS = st.sampled_from([0, -1, 2**31, 2**32 + 1, 10**9, 10**12, 2**63, 10**30])


@st.composite
def _document_edit(draw, doc: Any) -> Any:
    paths = _paths(doc)
    numbers = [p for p in paths if _is_count(_get(doc, p))]
    if numbers and draw(st.booleans()):
        return _edit(doc, draw(st.sampled_from(numbers)), "set", draw(CLAIMS))
    path = draw(st.sampled_from(paths))
    action = draw(st.sampled_from(["set", "set", "delete", "duplicate"]))
    return _edit(doc, path, action, draw(HOSTILE))


def json_document(data: bytes, prefix: bytes = b"", suffix: bytes = b"") -> st.SearchStrategy:
    """Mutations of a JSON document that is the whole file (or sits between `prefix` and
    `suffix`): hostile values, deleted keys, duplicated keys."""
    doc = json.loads(data[len(prefix) : len(data) - len(suffix)])

    def dump(edited: Any) -> bytes:
        text = json.dumps(edited)
        text = text.replace(json.dumps(_DUPLICATE)[:-1], '"')  # '"\u0000dup...' -> '"'
        return prefix + text.encode() + suffix

    return _document_edit(doc).map(dump)


def yaml_document(data: bytes) -> st.SearchStrategy[bytes]:
    """Mutations of a YAML document, plus the YAML-only hostile shapes: alias bombs, an alias
    holding itself, deep nesting."""
    import yaml

    doc = yaml.safe_load(data)

    def dump(edited: Any) -> bytes:
        text = yaml.safe_dump(edited, sort_keys=False)
        return text.replace(_DUPLICATE, "").encode()

    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
        for p, c in zip("abcdefgh", "bcdefghi", strict=True)
    )
    specials = [
        (data.decode() + "\nseanet2: " + "[" * 5000 + "]" * 5000 + "\n").encode(),
        (bomb + "seanet: *i\nencodec: *i\nrvq: *i\n").encode(),
        b"seanet: &s\n  ratios: *s\n  n_filters: 1\nencodec: {}\nrvq: {}\n",
        b"seanet: &s [*s]\nencodec: *s\nrvq: *s\n",
    ]
    return st.one_of(_document_edit(doc).map(dump), st.sampled_from(specials))


# ---- the child process ----
def _vm_size() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


class _Hang(BaseException):
    """Not an Exception, so that no reader's broad `except Exception` turns it into an error
    it documents."""


def _on_alarm(signum, frame):
    raise _Hang(f"a case ran longer than {CASE_TIMEOUT_S} s")


def _digest(value: Any) -> str:
    """A stable fingerprint of what a reader returned."""
    h = hashlib.sha256()

    def walk(v: Any) -> None:
        if isinstance(v, np.ndarray):
            h.update(f"{v.dtype}{v.shape}".encode() + np.ascontiguousarray(v).tobytes())
        elif dataclasses.is_dataclass(v) and not isinstance(v, type):
            walk({f.name: getattr(v, f.name) for f in dataclasses.fields(v)})
        elif isinstance(v, dict):
            for k in sorted(v, key=str):
                h.update(repr(k).encode())
                walk(v[k])
        elif isinstance(v, (list, tuple)):
            for x in v:
                walk(x)
        else:
            h.update(repr(v).encode())

    walk(value)
    return h.hexdigest()


def fuzz(reader: Reader, examples: int) -> dict:
    """Run `examples` cases of `reader` in this process (call it in a child: it limits memory).

    Returns statistics; raises AssertionError (hypothesis' report) on the first failure.
    """
    errors = tuple(_import(name) for name in reader.errors)
    with tempfile.TemporaryDirectory() as tmp:
        path = reader.make(Path(tmp))
        valid = path.read_bytes()
        expected = _digest(reader.read(path))
        baseline = _vm_size()
        limit = baseline + MEMORY_MARGIN + MEMORY_PER_FILE_BYTE * (len(valid) + MAX_GROWTH)
        hard = resource.getrlimit(resource.RLIMIT_AS)[1]
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
        signal.signal(signal.SIGALRM, _on_alarm)
        stats: dict[str, Any] = {"cases": 0, "read": 0, "refused": {}, "seconds": 0.0}
        start = time.perf_counter()

        @settings(
            max_examples=examples,
            derandomize=True,
            deadline=None,
            database=None,
            phases=(Phase.explicit, Phase.generate, Phase.shrink),
            suppress_health_check=list(HealthCheck),
            report_multiple_bugs=False,
        )
        @given(mutations(reader, valid))
        def case(data: bytes) -> None:
            stats["cases"] += 1
            path.write_bytes(data)
            signal.alarm(CASE_TIMEOUT_S)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    reader.read(path)
                stats["read"] += 1
            except errors as err:
                message = str(err)
                kind = type(err).__name__
                # A subclass the library did not define (UnicodeDecodeError, JSONDecodeError)
                # escaped from a library below: the reader's own message was skipped.
                assert type(err) in errors or type(err).__module__.startswith("encodec_jax"), (
                    f"{type(err).__module__}.{kind} escaped: {message}"
                )
                stats["refused"][kind] = stats["refused"].get(kind, 0) + 1
                assert message.strip(), f"{kind} without a message"
                assert "\n" not in message.strip(), f"{kind} message of several lines: {message}"
                lowered = message.lower()
                # Under the memory limit, an allocation a claim asked for fails; a reader that
                # wraps the failure still says so ("Unable to allocate", "alloc_cpu.cpp").
                assert "alloc" not in lowered and "memory" not in lowered, (
                    f"{kind} from a failed allocation: {message}"
                )
            finally:
                signal.alarm(0)

        try:
            case()
            path.write_bytes(valid)
            assert _digest(reader.read(path)) == expected, "the valid file reads differently now"
        finally:
            resource.setrlimit(resource.RLIMIT_AS, (hard, hard))
        stats["seconds"] = round(time.perf_counter() - start, 2)
        stats.update(
            reader=reader.name,
            file_bytes=len(valid),
            baseline_mib=baseline >> 20,
            limit_mib=limit >> 20,
            peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10,
        )
        return stats


def _import(dotted: str) -> type:
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


# ---- the readers ----
def _codes(name: str, length: int, n_q: int):
    from encodec_jax.codes import Codes, expected_chunk_frames
    from encodec_jax.config import PRESETS

    config = PRESETS[f"facebook/{name}"]
    rng = np.random.default_rng(0)
    frames = expected_chunk_frames(config, length)
    codes = np.zeros((len(frames), n_q, max(frames)), np.int32)
    for chunk, f in enumerate(frames):
        codes[chunk, :, :f] = rng.integers(0, config.codebook_size, (n_q, f))
    scales = rng.uniform(0.01, 1.0, len(frames)).astype(np.float32) if config.normalize else None
    return config, Codes(
        model=f"facebook/{name}",
        sample_rate=config.sampling_rate,
        channels=config.audio_channels,
        num_samples=length,
        bandwidth=config.target_bandwidths[0],
        codebook_size=config.codebook_size,
        audio_codes=codes,
        audio_scales=scales,
        chunk_frames=frames,
    )


def _make_codes(name: str, length: int, n_q: int, ext: str) -> Callable[[Path], Path]:
    def make(directory: Path) -> Path:
        from encodec_jax.codes import save_codes

        config, codes = _codes(name, length, n_q)
        path = directory / f"codes.{ext}"
        save_codes(path, codes, config)
        return path

    return make


def _read_codes(path: Path):
    """What `encodec-jax decode` does with the file before decoding: load it and check it fits
    the model it names."""
    from encodec_jax.codes import check_codes_fit, load_codes
    from encodec_jax.config import PRESETS

    codes = load_codes(path)
    name = codes.model if codes.model in PRESETS else f"facebook/{codes.model}"
    if name in PRESETS:
        check_codes_fit(codes, PRESETS[name], codes.model)
    return codes


def _ecdc_document(data: bytes) -> st.SearchStrategy[bytes]:
    size = struct.unpack_from("!I", data, 5)[0]
    header, rest = data[: 9 + size], data[9 + size :]

    def fix_length(mutated: bytes) -> bytes:
        body = mutated[9 : -len(rest)] if rest else mutated[9:]
        return mutated[:5] + struct.pack("!I", len(body)) + body + rest

    return json_document(header + rest, prefix=data[:9], suffix=rest).map(fix_length)


def _npz_document(data: bytes) -> st.SearchStrategy[bytes]:
    """Codes .npz files rebuilt with one array replaced (hostile values, types, shapes), dropped,
    stored twice, or stored with a header claiming another shape."""
    with np.load(io.BytesIO(data)) as npz:
        arrays = {k: npz[k] for k in npz.files}
    values = st.one_of(
        HOSTILE.filter(lambda v: not isinstance(v, dict)).map(_as_array),
        st.sampled_from(
            [
                np.zeros((0,), np.int32),
                np.zeros((2, 0, 3), np.int32),
                np.full((1, 1, 1), 2**31 - 1, np.int32),
                np.array([1.5, np.nan], np.float32),
                np.array(["a", "b"]),
                np.zeros((3, 3), np.complex64),
                np.zeros((1, 1, 1), ">i4"),
            ]
        ),
    )

    @st.composite
    def edit(draw) -> bytes:
        key = draw(st.sampled_from(sorted(arrays)))
        action = draw(st.sampled_from(["set", "set", "delete", "twice", "claim"]))
        members = [(k, _npy_bytes(v)) for k, v in arrays.items()]
        if action == "set":
            members = [(k, _npy_bytes(draw(values)) if k == key else b) for k, b in members]
        elif action == "delete":
            members = [(k, b) for k, b in members if k != key]
        elif action == "twice":
            members.append((key, _npy_bytes(draw(values))))
        else:
            shape = draw(st.lists(st.sampled_from([0, 1, 7, 10**6, 10**12, 2**62]), max_size=3))
            members = [
                (k, _npy_bytes(arrays[k], claim=tuple(shape)) if k == key else b)
                for k, b in members
            ]
        compression = draw(st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED]))
        out = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Duplicate name"
            with zipfile.ZipFile(out, "w", compression) as archive:
                for k, b in members:
                    archive.writestr(k + ".npy", b)
        return out.getvalue()

    return edit()


def _as_array(value: Any) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            array = np.array(value)
    except (OverflowError, ValueError):
        return np.array(str(value)[:50])
    return array if array.dtype != object else np.array(str(value)[:50])


def _npy_bytes(array: np.ndarray, claim: tuple | None = None) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.asarray(array), allow_pickle=False)
    data = buffer.getvalue()
    if claim is None:
        return data
    header_len = struct.unpack_from("<H", data, 8)[0]
    header = data[10 : 10 + header_len].decode("latin1")
    start, end = header.index("'shape': (") + len("'shape': ("), header.index(")")
    inner = ", ".join(str(n) for n in claim) + ("," if len(claim) == 1 else "")
    header = (header[:start] + inner + header[end:]).rstrip()
    header += " " * (63 - (10 + len(header)) % 64) + "\n"
    return (
        data[:8]
        + struct.pack("<H", len(header))
        + header.encode("latin1")
        + data[10 + header_len :]
    )


def _make_config(directory: Path) -> Path:
    from encodec_jax.config import ENCODEC_48KHZ

    path = directory / "config.json"
    ENCODEC_48KHZ.to_json_file(path)
    return path


def _read_config(path: Path):
    from encodec_jax.config import EncodecConfig

    return EncodecConfig.from_json_file(path)


def _make_preprocessor(directory: Path) -> Path:
    from encodec_jax.config import ENCODEC_48KHZ
    from encodec_jax.feature_extraction import EncodecFeatureExtractor

    return Path(EncodecFeatureExtractor.from_config(ENCODEC_48KHZ).save_pretrained(directory))


def _read_preprocessor(path: Path):
    from encodec_jax.feature_extraction import EncodecFeatureExtractor

    return EncodecFeatureExtractor.from_pretrained(path.parent).to_dict()


_TENSORS = {
    "encoder.layers.0.conv.weight_v": np.arange(24, dtype=np.float32).reshape(2, 3, 4),
    "encoder.layers.0.conv.bias": np.ones(2, np.float16),
    "quantizer.layers.0.codebook.inited": np.ones(1, np.int64),
}


def _make_safetensors(directory: Path) -> Path:
    from encodec_jax.checkpoint import SAFETENSORS_NAME, write_safetensors

    write_safetensors(directory / SAFETENSORS_NAME, _TENSORS)
    return directory / SAFETENSORS_NAME


def _safetensors_document(data: bytes) -> st.SearchStrategy[bytes]:
    size = struct.unpack_from("<Q", data)[0]
    rest = data[8 + size :]

    def fix_length(mutated: bytes) -> bytes:
        header = mutated[8 : len(mutated) - len(rest)]
        return struct.pack("<Q", len(header)) + header + rest

    return json_document(data, prefix=data[:8], suffix=rest).map(fix_length)


def _make_index(directory: Path) -> Path:
    from encodec_jax.checkpoint import SAFETENSORS_INDEX_NAME, write_safetensors

    names = sorted(_TENSORS)
    weight_map = {}
    for i, part in enumerate((names[:1], names[1:])):
        shard = f"model-{i + 1:05d}-of-00002.safetensors"
        write_safetensors(directory / shard, {k: _TENSORS[k] for k in part})
        weight_map.update(dict.fromkeys(part, shard))
    path = directory / SAFETENSORS_INDEX_NAME
    path.write_text(json.dumps({"metadata": {"total_size": 134}, "weight_map": weight_map}))
    return path


def _read_weights(path: Path):
    from encodec_jax.checkpoint import read_state_dict

    return read_state_dict(path.parent)


def _make_torch(zip_format: bool) -> Callable[[Path], Path]:
    def make(directory: Path) -> Path:
        import torch

        from encodec_jax.checkpoint import PYTORCH_NAME

        state = {k: torch.from_numpy(v.copy()) for k, v in _TENSORS.items()}
        state["view"] = state["encoder.layers.0.conv.weight_v"][1]  # shares the storage
        path = directory / PYTORCH_NAME
        torch.save(state, path, _use_new_zipfile_serialization=zip_format)
        if not zip_format:
            path.write_bytes(_fixed_storage_keys(path.read_bytes()))
        return path

    return make


def _fixed_storage_keys(data: bytes) -> bytes:
    """The legacy format names storages by memory address and lists them (with their bytes
    after the pickles) in address order, which makes the seed file, and so every derandomized
    mutation of it, differ from run to run. Rename them k0, k1, ... in order of first
    appearance (BINUNICODE strings; nothing in the format points at byte offsets) and put the
    list and the bytes in that order."""
    from encodec_jax.checkpoint import _STORAGE_ITEMSIZE

    names: dict[bytes, bytes] = {}

    def rename(match: re.Match) -> bytes:
        if int.from_bytes(match.group(1), "little") != len(match.group(2)):
            return match.group(0)
        name = names.setdefault(match.group(2), b"k%d" % len(names))
        return b"X" + len(name).to_bytes(4, "little") + name

    data = re.sub(rb"X(.\x00\x00\x00)(\d{8,20})", rename, data, flags=re.DOTALL)
    stream, bounds = io.BytesIO(data), []
    for _ in range(5):
        start = stream.tell()
        for _ in pickletools.genops(stream):
            pass
        bounds.append((start, stream.tell()))
    kinds: dict[str, str] = {}

    class Kinds(pickle.Unpickler):
        def find_class(self, module, name):
            return name if name.endswith("Storage") else (lambda *args, **kwargs: None)

        def persistent_load(self, pid):
            kinds[pid[2]] = pid[1]
            return None

    Kinds(io.BytesIO(data[slice(*bounds[3])])).load()
    listed = pickle.loads(data[slice(*bounds[4])])
    blocks, offset = {}, bounds[4][1]
    for key in listed:
        count = int.from_bytes(data[offset : offset + 8], "little")
        end = offset + 8 + count * _STORAGE_ITEMSIZE[kinds[key]]
        blocks[key], offset = data[offset:end], end
    ordered = sorted(listed, key=lambda k: int(k[1:]))
    return (
        data[: bounds[3][1]]
        + pickle.dumps(ordered, protocol=2)
        + b"".join(blocks[k] for k in ordered)
    )


_INT_OPCODES = ("BININT", "BININT1", "BININT2", "LONG1", "LONG4", "INT", "LONG")


def _pickle_ints(data: bytes, pickles: int) -> list[tuple[int, int]]:
    """(start, end) of every integer opcode of the first `pickles` pickles in `data`."""
    stream = io.BytesIO(data)
    spots = []
    for _ in range(pickles):
        ops = list(pickletools.genops(stream))
        ends = [pos for _, _, pos in ops[1:]] + [stream.tell()]
        spots += [
            (pos, end)
            for (op, _, pos), end in zip(ops, ends, strict=True)
            if op.name in _INT_OPCODES
        ]
    return spots


def _encode_int(name: str, value: int) -> bytes:
    if name == "BININT1" and 0 <= value < 256:
        return b"K" + bytes([value])
    if name == "BININT2" and 0 <= value < 65536:
        return b"M" + struct.pack("<H", value)
    if name == "BININT" and -(2**31) <= value < 2**31:
        return b"J" + struct.pack("<i", value)
    if name in ("INT", "LONG"):
        return (b"I" if name == "INT" else b"L") + str(value).encode() + b"\n"
    raw = value.to_bytes((value.bit_length() + 8) // 8 or 1, "little", signed=True)
    if name == "LONG4" or len(raw) > 255:
        return b"\x8b" + struct.pack("<i", len(raw)) + raw
    return b"\x8a" + bytes([len(raw)]) + raw


def _pickle_int_edit(data: bytes, value: int, pos: int, end: int) -> bytes:
    return data[:pos] + _encode_int("LONG1", value) + data[end:]


def _torch_zip_document(data: bytes) -> st.SearchStrategy[bytes]:
    """The archive rebuilt with one integer of data.pkl (a storage size, a shape, a stride, an
    offset) set to a hostile value."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        entries = [(info, archive.read(info)) for info in archive.infolist()]
    index = next(i for i, (info, _) in enumerate(entries) if info.filename.endswith("data.pkl"))
    pkl = entries[index][1]
    spots = _pickle_ints(pkl, 1)

    @st.composite
    def edit(draw) -> bytes:
        pos, end = draw(st.sampled_from(spots))
        value = draw(
            st.one_of(st.sampled_from([0, -1, 2**31, 2**40, 10**12, 2**63]), st.integers())
        )
        new = _pickle_int_edit(pkl, value, pos, end)
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
            for i, (info, content) in enumerate(entries):
                archive.writestr(info.filename, new if i == index else content)
        return out.getvalue()

    return edit()


def _torch_legacy_document(data: bytes) -> st.SearchStrategy[bytes]:
    spots = _pickle_ints(data, 5)

    @st.composite
    def edit(draw) -> bytes:
        pos, end = draw(st.sampled_from(spots))
        value = draw(
            st.one_of(st.sampled_from([0, -1, 2**31, 2**40, 10**12, 2**63]), st.integers())
        )
        return _pickle_int_edit(data, value, pos, end)

    return edit()


_XP_CFG = """\
sample_rate: 32000
channels: 1
compression_model: encodec
encodec:
  autoencoder: seanet
  quantizer: rvq
  sample_rate: ${sample_rate}
  channels: ${channels}
  causal: false
  renormalize: false
seanet:
  dimension: 128
  channels: ${channels}
  causal: ${encodec.causal}
  n_filters: 64
  n_residual_layers: 1
  ratios:
  - 8
  - 5
  - 4
  - 4
  activation: ELU
  activation_params:
    alpha: 1.0
  norm: weight_norm
  norm_params: {}
  kernel_size: 7
  residual_kernel_size: 3
  last_kernel_size: 7
  dilation_base: 2
  pad_mode: constant
  true_skip: true
  compress: 2
  lstm: 2
  disable_norm_outer_blocks: 0
  decoder:
    trim_right_ratio: 1.0
    final_activation: null
    final_activation_params: null
  encoder: {}
rvq:
  n_q: 4
  q_dropout: false
  bins: 2048
"""


def _make_xp_cfg(directory: Path) -> Path:
    path = directory / "xp.cfg"
    path.write_text(_XP_CFG)
    return path


def _read_xp_cfg(path: Path):
    from encodec_jax.convert import config_from_audiocraft_yaml

    # In a checkpoint xp.cfg is a str; a damaged one may hold any characters.
    return config_from_audiocraft_yaml(path.read_bytes().decode("utf-8", "replace"))


def _make_audio(ext: str, subtype: str | None = None) -> Callable[[Path], Path]:
    def make(directory: Path) -> Path:
        import soundfile as sf

        t = np.arange(1600) / 16000
        audio = 0.5 * np.stack([np.sin(2 * np.pi * 440 * t), np.sin(2 * np.pi * 660 * t)], 1)
        path = directory / f"audio.{ext}"
        sf.write(path, audio.astype(np.float32), 16000, subtype=subtype)
        return path

    return make


def _read_audio(path: Path):
    from encodec_jax.audio import audio_info, load_audio

    audio_info(path)
    return load_audio(path, 24000, 1)[0]


_WAV_FIELDS = (
    Field(4, 4),  # RIFF size
    Field(16, 4),  # fmt chunk size
    Field(20, 2),  # format tag
    Field(22, 2),  # channels
    Field(24, 4),  # sample rate
    Field(28, 4),  # byte rate
    Field(32, 2),  # block align
    Field(34, 2),  # bits per sample
    Field(40, 4),  # data size
)
# STREAMINFO: block sizes, frame sizes, then rate/channels/bits/total samples packed in 8 bytes.
_FLAC_FIELDS = tuple(
    Field(o, n, "big") for o, n in ((5, 3), (8, 2), (10, 2), (12, 3), (15, 3), (18, 4), (22, 4))
)


_MANIFEST_SETTINGS = {
    "model": "facebook/encodec_24khz",
    "config_sha256": "0" * 64,
    "bandwidth": 1.5,
    "n_q": 2,
    "shard_size": 2,
    "buckets": [24000],
    "exact": False,
    "process_index": 0,
    "process_count": 1,
    "source": {"kind": "webdataset", "audio_column": None, "keep_columns": []},
    "source_split": "by shard",
    "source_shards": 2,
    "source_sha256": "1" * 64,
}


def _manifest_run(directory: Path):
    from encodec_jax.sources import Shard
    from encodec_jax.tokenize import _Output, _Run, output_names

    shards = []
    for name in ("a.tar", "b.tar"):
        shard = Shard()
        shard.name = name
        shards.append(shard)
    pattern, manifest, errors = output_names(0, 1)
    return _Run(_Output(directory), pattern, manifest, errors, dict(_MANIFEST_SETTINGS), shards)


def _make_manifest(directory: Path) -> Path:
    out = directory / "out"
    out.mkdir()
    run = _manifest_run(out)
    run.open()
    error = {"path": "a.tar", "key": "x/1", "error": "cannot read the audio: not recognised"}
    run.shards = {
        "0": {
            "file": "shard-00000.parquet",
            "rows": 1,
            "items": 2,
            "audio_seconds": 1.5,
            "start": {"shard": "a.tar", "item": 0},
            "end": {"shard": "b.tar", "item": 0},
            "errors": [error],
        },
        "1": {
            "file": None,
            "rows": 0,
            "items": 1,
            "audio_seconds": 0.0,
            "start": {"shard": "b.tar", "item": 0},
            "end": {"shard": None, "item": 0},
            "errors": [{**error, "path": "b.tar", "key": None}],
        },
    }
    run.complete(2)
    (out / "shard-00000.parquet").write_bytes(b"")  # present, so the entry stands
    return out / "manifest.json"


def _read_manifest(path: Path):
    run = _manifest_run(path.parent)
    run.open()
    # where a resumed run reads on after each shard done (what tokenize_source asks)
    starts = [run.start_of(int(k) + 1) for k in run.shards]
    return run.shards, run.items_done(), run.num_shards, starts


# Corpus shards as `encodec-jax tokenize` reads them: a shard goes through `open_source`, every
# item's audio through `read_audio`, as the pipeline does (an item that fails does not stop the
# shard: the first item error is raised after the whole shard is read).
_SOURCE_ERRORS = (
    "encodec_jax.sources.SourceError",
    "encodec_jax.sources.ShardError",
    "encodec_jax.audio.AudioError",
)


def _corpus_items() -> list[tuple[str, bytes, str]]:
    """(key, encoded audio, transcript): three short clips, FLAC and WAV, 16 kHz and 8 kHz."""
    import soundfile as sf

    items = []
    for i, (fmt, rate) in enumerate((("FLAC", 16000), ("WAV", 8000), ("FLAC", 8000))):
        t = np.arange(rate // 20) / rate
        audio = (0.4 * np.sin(2 * np.pi * (300 + 200 * i) * t)).astype(np.float32)
        buffer = io.BytesIO()
        sf.write(buffer, audio, rate, format=fmt, subtype="PCM_16")
        items.append((f"clip{i}", buffer.getvalue(), f"transcript {i}"))
    return items


def _read_corpus(spec: str, **options):
    from encodec_jax.audio import AudioError
    from encodec_jax.corpus import open_source
    from encodec_jax.sources import read_audio

    source = open_source(spec, **options)
    out, failed = [], []
    for shard in source.shards:
        out.append((shard.name, shard.size, shard.count()))
        for item in shard.items():
            if item.error is not None:
                out.append((item.key, item.error, item.columns))
                continue
            try:
                out.append((item.key, read_audio(item.audio, 24000, 1)[0], item.columns))
            except AudioError as err:
                failed.append(err)
    if failed:
        raise failed[0]
    return out


def _make_parquet(directory: Path) -> Path:
    """Parquet as `datasets` writes an `Audio` column ({bytes, path} structs), two row groups."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    items = _corpus_items()
    audio = pa.array(
        [{"bytes": data, "path": f"{key}.flac"} for key, data, _ in items],
        pa.struct({"bytes": pa.binary(), "path": pa.string()}),
    )
    table = pa.table(
        {"audio": audio, "id": [k for k, _, _ in items], "text": [t for _, _, t in items]}
    )
    path = directory / "train-00000-of-00001.parquet"
    pq.write_table(table, path, row_group_size=2)
    return path


def _read_parquet(path: Path):
    return _read_corpus(str(path), id_column="id", keep_columns=["text"])


def _parquet_document(data: bytes) -> st.SearchStrategy[bytes]:
    """Parquet's footer: its length (the 4 bytes before the closing PAR1) set to a claim, or
    the Thrift metadata it frames (row counts, offsets and sizes of every page) damaged."""
    footer = int.from_bytes(data[-8:-4], "little")
    start = len(data) - 8 - footer

    def set_length(value: int) -> bytes:
        return data[:-8] + (value % 2**32).to_bytes(4, "little") + data[-4:]

    def in_footer(mutated: bytes) -> bytes:
        return data[:start] + mutated + data[-8:]

    return st.one_of(
        CLAIMS.map(set_length),
        _field_values(4).map(set_length),
        _byte_mutation(data[start:-8]).map(in_footer),
    )


def _make_tar(directory: Path) -> Path:
    """A WebDataset shard: <key>.flac or .wav with <key>.txt, one sample in a folder."""
    import tarfile

    path = directory / "shard-000000.tar"
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i, (key, data, text) in enumerate(_corpus_items()):
            name = f"speaker/{key}" if i == 1 else key
            ext = "wav" if i == 1 else "flac"
            for member, content in ((f"{name}.{ext}", data), (f"{name}.txt", text.encode())):
                info = tarfile.TarInfo(member)
                info.size, info.mtime = len(content), 0
                tar.addfile(info, io.BytesIO(content))
    return path


def _read_tar(path: Path):
    return _read_corpus(str(path), keep_columns=["txt"])


def _tar_headers(data: bytes) -> list[int]:
    """Offsets of the member headers of a plain tar."""
    import tarfile

    offsets, at = [], 0
    while at + 512 <= len(data) and data[at : at + 512] != bytes(512):
        offsets.append(at)
        size = int(data[at + 124 : at + 135].decode().strip("\0 ") or "0", 8)
        at += 512 + -(-size // 512) * 512
    assert offsets and tarfile.BLOCKSIZE == 512
    return offsets


def _tar_document(data: bytes) -> st.SearchStrategy[bytes]:
    """A member header, checksum fixed so that tarfile takes it, claiming a size (octal, or
    base-256 for the huge ones), or turned into a PAX or GNU long-name header: the header kinds
    whose data tarfile reads itself."""
    headers = _tar_headers(data)

    def rewrite(at: int, size: int | None, kind: bytes | None) -> bytes:
        header = bytearray(data[at : at + 512])
        if size is not None:
            if 0 <= size < 8**11:
                header[124:136] = f"{size:011o}".encode() + b"\0"
            else:  # GNU base-256: 0x80 then the value, big-endian
                header[124:136] = b"\x80" + (size % 2**88).to_bytes(11, "big")
        if kind is not None:
            header[156:157] = kind
        header[148:156] = b" " * 8
        header[148:156] = f"{sum(header):06o}".encode() + b"\0 "
        return data[:at] + bytes(header) + data[at + 512 :]

    return st.builds(
        rewrite,
        st.sampled_from(headers),
        st.one_of(st.none(), CLAIMS, st.integers(0, len(data) * 2)),
        st.one_of(st.none(), st.sampled_from([b"x", b"g", b"L", b"K", b"5", b"1", b"2", b"S"])),
    )


def _make_saved(directory: Path) -> Path:
    """A `Dataset.save_to_disk` folder (one .arrow file); the .arrow file is returned."""
    from datasets import Audio, Dataset
    from datasets.utils import disable_progress_bars

    disable_progress_bars()
    items = _corpus_items()
    dataset = Dataset.from_dict(
        {
            "audio": [{"bytes": data, "path": f"{key}.flac"} for key, data, _ in items],
            "id": [k for k, _, _ in items],
            "text": [t for _, _, t in items],
        }
    ).cast_column("audio", Audio())
    folder = directory / "saved"
    dataset.save_to_disk(str(folder))
    (arrow,) = sorted(folder.glob("*.arrow"))
    return arrow


def _make_saved_state(directory: Path) -> Path:
    return _make_saved(directory).parent / "state.json"


def _read_saved(path: Path):
    return _read_corpus(str(path.parent), id_column="id", keep_columns=["text"])


def _make_train_config(directory: Path) -> Path:
    from encodec_jax.train.config import PRESETS

    path = directory / "config.yaml"
    PRESETS["tiny"].to_yaml_file(path)
    return path


def _read_train_config(path: Path):
    from encodec_jax.train.config import load_config

    return load_config(None, path)


READERS: dict[str, Reader] = {
    r.name: r
    for r in [
        Reader(
            "codes-npz",
            _make_codes("encodec_48khz", 60_000, 4, "npz"),
            _read_codes,
            ("encodec_jax.codes.CodesError",),
            document=_npz_document,
        ),
        Reader(
            "codes-ecdc-24khz",
            _make_codes("encodec_24khz", 2_000, 4, "ecdc"),
            _read_codes,
            ("encodec_jax.codes.CodesError",),
            fields=(Field(4, 1, "big"), Field(5, 4, "big")),
            document=_ecdc_document,
        ),
        Reader(
            "codes-ecdc-48khz",
            _make_codes("encodec_48khz", 60_000, 4, "ecdc"),
            _read_codes,
            ("encodec_jax.codes.CodesError",),
            fields=(Field(4, 1, "big"), Field(5, 4, "big")),
            document=_ecdc_document,
        ),
        Reader(
            "config-json",
            _make_config,
            _read_config,
            ("builtins.ValueError",),
            document=json_document,
        ),
        Reader(
            "train-config-yaml",
            _make_train_config,
            _read_train_config,
            ("encodec_jax.train.config.TrainConfigError",),
            document=yaml_document,
            needs=("yaml",),
        ),
        Reader(
            "preprocessor-config-json",
            _make_preprocessor,
            _read_preprocessor,
            ("builtins.ValueError",),
            document=json_document,
        ),
        Reader(
            "safetensors",
            _make_safetensors,
            _read_weights,
            ("builtins.ValueError",),
            fields=(Field(0, 8),),
            document=_safetensors_document,
        ),
        Reader(
            "safetensors-index",
            _make_index,
            _read_weights,
            ("builtins.ValueError", "builtins.FileNotFoundError"),
            document=json_document,
        ),
        Reader(
            "pytorch-zip",
            _make_torch(zip_format=True),
            _read_weights,
            ("builtins.ValueError",),
            document=_torch_zip_document,
            needs=("torch",),
        ),
        Reader(
            "pytorch-legacy",
            _make_torch(zip_format=False),
            _read_weights,
            ("builtins.ValueError",),
            document=_torch_legacy_document,
            needs=("torch",),
        ),
        Reader(
            "audiocraft-xp-cfg",
            _make_xp_cfg,
            _read_xp_cfg,
            ("encodec_jax.convert.ConversionError",),
            document=yaml_document,
        ),
        Reader(
            "audio-wav",
            _make_audio("wav", "PCM_16"),
            _read_audio,
            ("encodec_jax.audio.AudioError",),
            fields=_WAV_FIELDS,
        ),
        Reader(
            "audio-flac",
            _make_audio("flac"),
            _read_audio,
            ("encodec_jax.audio.AudioError",),
            fields=_FLAC_FIELDS,
        ),
        Reader("audio-ogg", _make_audio("ogg"), _read_audio, ("encodec_jax.audio.AudioError",)),
        Reader(
            "tokenize-manifest",
            _make_manifest,
            _read_manifest,
            ("encodec_jax.tokenize.TokenizeError",),
            document=json_document,
        ),
        Reader(
            "corpus-parquet",
            _make_parquet,
            _read_parquet,
            _SOURCE_ERRORS,
            document=_parquet_document,
        ),
        Reader(
            "corpus-webdataset-tar", _make_tar, _read_tar, _SOURCE_ERRORS, document=_tar_document
        ),
        Reader(
            "corpus-saved-arrow",
            _make_saved,
            _read_saved,
            _SOURCE_ERRORS,
            # the IPC stream's first message: continuation marker, then its metadata length
            fields=(Field(0, 4), Field(4, 4)),
            needs=("datasets",),
        ),
        Reader(
            "corpus-saved-state",
            _make_saved_state,
            _read_saved,
            _SOURCE_ERRORS,
            document=json_document,
            needs=("datasets",),
        ),
    ]
}


def main(argv: list[str] | None = None) -> int:
    """Fuzz the named readers (default: every available one) one after the other, each under
    its own memory limit; print one `FUZZ-RESULT {json}` line per reader."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("readers", nargs="*", help=f"any of {', '.join(READERS)}")
    parser.add_argument("--examples", type=int, default=300)
    args = parser.parse_args(argv)
    unknown = sorted(set(args.readers) - set(READERS))
    if unknown:
        parser.error(f"unknown readers {unknown}")
    names = args.readers or [name for name, r in READERS.items() if r.available()]
    failed = 0
    for name in names:
        print(f"FUZZ-START {name}", flush=True)
        try:
            result = {"reader": name, "ok": True, **fuzz(READERS[name], args.examples)}
        except Exception as err:  # hypothesis' report of the failing case, shrunk
            failed += 1
            report = "".join(traceback.format_exception(err))
            result = {"reader": name, "ok": False, "failure": report[-6000:]}
        print("FUZZ-RESULT " + json.dumps(result), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
