"""Checkpoint tensors: reading them, renaming their keys, loading them into NNX modules, saving.

A checkpoint is a flat dict of PyTorch-named tensors. The module trees mirror PyTorch's, so a key
is the path of the parameter here, up to one small pure rename per source (the two ways PyTorch
stores weight norm; the `encodec` package's and audiocraft's extra nesting). Loading builds the
module abstractly (`nnx.eval_shape`, no random weights allocated) and fills it; anything missing,
unexpected or mis-shaped is an error that names the tensors. Nothing here knows the codec: the
model (`EncodecModel.from_pretrained`) and the training discriminator load through the same code.
"""

from __future__ import annotations

import io
import os
import pickle
import pickletools
import re
import struct
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import NamedTuple, TypeVar

import jax.numpy as jnp
import numpy as np
from flax import nnx

from .atomic import atomic_write
from .hub import checkpoint_file
from .untrusted import check_zip_members, parse_json_object

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
PYTORCH_NAME = "pytorch_model.bin"
# Where the weights may be, in the order they are looked for.
WEIGHTS_NAMES = (SAFETENSORS_NAME, SAFETENSORS_INDEX_NAME, PYTORCH_NAME)

# Weight norm's magnitude and direction: the legacy names (the Hub's files, the `encodec`
# package, audiocraft, and this package) and the names of current PyTorch parametrizations,
# which current transformers saves.
WEIGHT_NORM_NAMES = {
    "weight_g": "parametrizations.weight.original0",
    "weight_v": "parametrizations.weight.original1",
}


def rename_hf_key(key: str) -> str:
    """transformers key -> encodec-jax key (identical up to the weight-norm spelling)."""
    for legacy, parametrization in WEIGHT_NORM_NAMES.items():
        if key.endswith("." + parametrization):
            return key[: -len(parametrization)] + legacy
    return key


def to_parametrization_key(key: str) -> str:
    """encodec-jax key -> the key current transformers (PyTorch parametrizations) saves."""
    for legacy, parametrization in WEIGHT_NORM_NAMES.items():
        if key.endswith("." + legacy):
            return key[: -len(legacy)] + parametrization
    return key


# The original `encodec` package and audiocraft wrap each conv twice (SConv1d -> NormConv1d ->
# nn.Conv1d) and keep the layers in `.model`; transformers flattened both. Applied in order.
_ORIGINAL_RENAMES = (
    (re.compile(r"^(encoder|decoder)\.model\."), r"\1.layers."),
    (re.compile(r"\.(conv|convtr)\.(conv|convtr)\."), ".conv."),
    (re.compile(r"\.(conv|convtr)\.norm\."), ".norm."),
    (re.compile(r"^quantizer\.vq\.layers\.(\d+)\._codebook\."), r"quantizer.layers.\1.codebook."),
)


def rename_original_key(key: str) -> str:
    """`encodec` package / audiocraft key -> encodec-jax key.

    `encoder.model.0.conv.conv.weight_g` -> `encoder.layers.0.conv.weight_g`,
    `decoder.model.3.convtr.norm.weight` -> `decoder.layers.3.norm.weight`,
    `quantizer.vq.layers.0._codebook.embed` -> `quantizer.layers.0.codebook.embed`.
    """
    for pattern, replacement in _ORIGINAL_RENAMES:
        key = pattern.sub(replacement, key)
    return rename_hf_key(key)


M = TypeVar("M", bound=nnx.Module)


def module_from_state_dict(
    build: Callable[[], M],
    state_dict: Mapping[str, np.ndarray],
    rename: Callable[[str], str] = rename_hf_key,
) -> M:
    """The module `build()` makes, holding exactly the tensors of `state_dict`.

    Args:
        build: makes the module (with any initialisation: it is only traced, never run).
        state_dict: PyTorch-named tensors.
        rename: maps each checkpoint key to the module's path of that tensor (`a.b.0.weight`).

    Raises:
        ValueError: naming every missing, unexpected and mis-shaped tensor, and keys that two
            spellings in the checkpoint both rename to.
    """
    abstract = nnx.eval_shape(build)
    graphdef, abstract_state = nnx.split(abstract)
    expected = {_key(path): (path, var) for path, var in nnx.to_flat_state(abstract_state)}
    renamed: dict[str, np.ndarray] = {}
    sources: dict[str, str] = {}
    for key, value in state_dict.items():
        new_key = rename(key)
        if new_key in renamed:
            raise ValueError(
                f"Checkpoint holds {new_key} twice: as {sources[new_key]} and as {key}"
            )
        renamed[new_key], sources[new_key] = value, key
    missing = sorted(set(expected) - set(renamed))
    unexpected = sorted(set(renamed) - set(expected))
    misshaped = sorted(
        f"{k}: checkpoint {tuple(np.shape(renamed[k]))}, model {tuple(expected[k][1].shape)}"
        for k in set(expected) & set(renamed)
        if tuple(np.shape(renamed[k])) != tuple(expected[k][1].shape)
    )
    problems = [
        _listing(what, names)
        for what, names in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("of the wrong shape", misshaped),
        )
        if names
    ]
    if problems:
        hint = ""
        if len(missing) + len(unexpected) + len(misshaped) > 10:
            hint = " (do the weights and the config describe the same model?)"
        raise ValueError("Checkpoint does not fit the config" + hint + ": " + "; ".join(problems))
    flat = [
        (path, var.replace(jnp.asarray(renamed[key], var.dtype)))
        for key, (path, var) in expected.items()
    ]
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _listing(what: str, names: list[str], limit: int = 8) -> str:
    """`3 tensors missing: a, b, c` — every name when few, the first `limit` and a count else."""
    shown = ", ".join(names[:limit]) + (
        f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    )
    return f"{len(names)} tensors {what}: {shown}"


def state_dict_from_module(module: nnx.Module) -> dict[str, np.ndarray]:
    """The module's tensors under their PyTorch names (weight norm as `weight_g`/`weight_v`)."""
    state = nnx.state(module)
    return {_key(path): np.asarray(var.get_value()) for path, var in nnx.to_flat_state(state)}


def _key(path: tuple) -> str:
    return ".".join(str(p) for p in path)


# ---- files ----
def read_state_dict(directory: str | os.PathLike) -> dict[str, np.ndarray]:
    """Tensors of a local checkpoint directory: model.safetensors (or its sharded index), else
    pytorch_model.bin (needs torch).

    Raises:
        FileNotFoundError: no weights file, or a shard the index lists is missing.
        ValueError: a damaged or hostile weights file or index, naming it.
    """
    directory = Path(directory)
    if (directory / SAFETENSORS_NAME).is_file():
        return _read_safetensors(directory / SAFETENSORS_NAME)
    if (directory / SAFETENSORS_INDEX_NAME).is_file():
        tensors: dict[str, np.ndarray] = {}
        for shard in _index_shards(directory / SAFETENSORS_INDEX_NAME):
            if not (directory / shard).is_file():
                raise FileNotFoundError(
                    f"{directory / shard}, listed in {SAFETENSORS_INDEX_NAME}, does not exist"
                )
            tensors.update(_read_safetensors(directory / shard))
        return tensors
    if (directory / PYTORCH_NAME).is_file():
        state = read_torch_state_dict(directory / PYTORCH_NAME)
        if not isinstance(state, Mapping) or not all(isinstance(k, str) for k in state):
            raise ValueError(
                f"{directory / PYTORCH_NAME} holds a {type(state).__name__}, not a state dict "
                "(a mapping from tensor names to tensors)"
            )
        return dict(state)
    raise FileNotFoundError(
        f"No weights in {directory}: expected {SAFETENSORS_NAME} or {PYTORCH_NAME}"
    )


def _index_shards(path: Path) -> list[str]:
    """The shard files a safetensors index names, each a file beside the index."""
    index = parse_json_object(path.read_bytes(), str(path), ValueError)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not all(
        isinstance(shard, str) for shard in weight_map.values()
    ):
        raise ValueError(f"{path} has no weight_map from tensor names to shard file names")
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        # A hostile index must not make the loader read files outside the checkpoint.
        if not shard or Path(shard).name != shard or shard in (".", ".."):
            raise ValueError(f"{path} names the shard {shard!r}, not a file beside the index")
    return shards


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        # The library checks every tensor's extent against the file before reading it.
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, TypeError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"Cannot read {path}: not a valid safetensors file ({reason})") from None


def read_torch_state_dict(path: str | os.PathLike) -> dict:
    """Unpickle a PyTorch checkpoint with `torch.load(weights_only=True)`; tensors become NumPy.

    `weights_only` keeps a hostile pickle from running code. Allocation is bounded too: torch
    checks each storage of a zip archive against its record, and for the legacy format (no zip),
    which allocates every storage a pickle claims before reading it, the claims are checked
    against the file first. A tensor may not claim more elements than its storage holds.

    Raises:
        ImportError: with instructions when torch is not installed: PyTorch pickles cannot be
            read without it (safetensors files can).
        ValueError: for a damaged or hostile file, naming it.
    """
    try:
        import torch
    except ImportError as err:
        raise ImportError(
            f"Reading {path} needs PyTorch (it is a PyTorch pickle): pip install torch, or load "
            f"a safetensors checkpoint instead"
        ) from err
    with open(path, "rb") as f:
        magic = f.read(4)
    # torch.save writes a zip archive; older PyTorch wrote a bare pickle (protocol byte 0x80).
    if magic == b"PK\x03\x04":
        _check_torch_zip(path)
        source = str(path)
    elif magic[:1] == b"\x80":
        with open(path, "rb") as f:
            data = f.read()
        _check_legacy_torch_pickle(data, path)
        # From memory: torch would read each length the pickle claims from the file at once.
        source = io.BytesIO(data)
    else:
        raise ValueError(f"{path} is not a PyTorch checkpoint (neither a zip archive nor a pickle)")
    try:
        obj = torch.load(source, map_location="cpu", weights_only=True)
        return _tensors_to_numpy(obj, torch)
    except Exception as err:  # torch raises many types for corrupt or foreign files
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        reason = reason.split(". ")[0].rstrip(".")  # torch appends paragraphs of advice
        raise ValueError(f"Cannot read {path}: corrupt or not a checkpoint ({reason})") from None


def _check_torch_zip(path) -> None:
    try:
        archive = zipfile.ZipFile(path)
    except (
        zipfile.BadZipFile,
        OSError,
        EOFError,
        struct.error,
        ValueError,
        NotImplementedError,
    ) as err:
        # ValueError: a member name that is not UTF-8 though flagged so, a negative offset.
        raise ValueError(f"Cannot read {path}: corrupt zip archive ({err})") from None
    with archive:
        members = check_zip_members(archive, os.path.getsize(path), str(path), ValueError)
        for info in members:
            if info.filename.endswith("/data.pkl"):
                try:
                    _scan_torch_pickle(archive.read(info))
                except Exception as err:  # the pickle machinery raises many types
                    reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
                    raise ValueError(
                        f"Cannot read {path}: corrupt or not a checkpoint ({reason})"
                    ) from None


# Bytes per element of the storage types a legacy pickle names (`torch.FloatStorage`...).
_STORAGE_ITEMSIZE = {
    "DoubleStorage": 8,
    "FloatStorage": 4,
    "HalfStorage": 2,
    "BFloat16Storage": 2,
    "LongStorage": 8,
    "IntStorage": 4,
    "ShortStorage": 2,
    "CharStorage": 1,
    "ByteStorage": 1,
    "BoolStorage": 1,
    "ComplexFloatStorage": 8,
    "ComplexDoubleStorage": 16,
}


class _Name:
    """Whatever a pickle names, as an inert placeholder: scanning builds no real object."""

    def __init__(self, name: str = "") -> None:
        self.name = name

    def __call__(self, *args, **kwargs) -> _Name:
        return _Name()

    def __setitem__(self, key, value) -> None:
        pass

    def __setstate__(self, state) -> None:
        pass

    def append(self, value) -> None:
        pass

    def extend(self, values) -> None:
        pass


class _Storage(NamedTuple):
    numel: int
    itemsize: int


class _PickleScan(pickle.Unpickler):
    """Reads a torch pickle (a legacy file's object, or a zip's data.pkl) without building
    anything: notes the elements each storage claims, and checks that every tensor lies inside
    its storage (torch would grow the storage to fit a tensor reaching past it)."""

    def __init__(self, file) -> None:
        super().__init__(file)
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return self._rebuild_tensor
        return _Name(name)

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            return _Name()
        kind, key, numel = pid[1], str(pid[2]), pid[4]
        if not isinstance(numel, int) or numel < 0:
            raise ValueError(f"a storage claims {numel!r} elements")
        itemsize = _STORAGE_ITEMSIZE.get(getattr(kind, "name", ""), 16)
        # torch allocates a storage at the first claim of its key; later claims reuse it.
        return self.storages.setdefault(key, _Storage(numel, itemsize))

    @staticmethod
    def _rebuild_tensor(storage, offset, size, stride, *rest) -> _Name:
        if not isinstance(storage, _Storage):
            return _Name()
        numbers = [offset, *size, *stride]
        if not all(isinstance(n, int) and n >= 0 for n in numbers) or len(size) != len(stride):
            raise ValueError(f"a tensor claims offset {offset!r}, size {size!r}, stride {stride!r}")
        if 0 not in size:
            extent = offset + sum((n - 1) * st for n, st in zip(size, stride, strict=True)) + 1
            if extent > storage.numel:
                raise ValueError(
                    f"a tensor reaches element {extent} of a storage of {storage.numel} elements"
                )
        return _Name()


_MEMO_OPS = frozenset({"PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET", "LONG_BINGET"})


def _check_pickle_ops(stream: io.BytesIO) -> None:
    """Reads one pickle's opcodes from `stream` without running them. pickletools reads every
    argument from the buffer, so a claimed length beyond the file is an error here, where an
    unpickler would allocate it first; and a memo index may not exceed the opcodes before it
    (an unpickler grows its memo table to the index: 2^32 entries for a hostile one)."""
    for count, (opcode, arg, _) in enumerate(pickletools.genops(stream)):
        if opcode.name in _MEMO_OPS and arg > count:
            raise ValueError(f"memo index {arg} at opcode {count}")


def _scan_torch_pickle(data: bytes) -> dict[str, int]:
    """{storage key: bytes claimed} of one pickle, after `_check_pickle_ops`' and
    `_PickleScan`'s checks."""
    _check_pickle_ops(io.BytesIO(data))
    scan = _PickleScan(io.BytesIO(data))
    scan.load()
    return {key: storage.numel * storage.itemsize for key, storage in scan.storages.items()}


def _check_legacy_torch_pickle(data: bytes, path) -> None:
    """Legacy layout: five pickles (magic number, protocol, system info, the object, the storage
    keys), then each storage's 8-byte size and bytes. Every length an opcode claims and every
    storage the object claims must fit in the file."""
    stream = io.BytesIO(data)
    storages: dict[str, int] = {}
    try:
        for i in range(5):
            start = stream.tell()
            _check_pickle_ops(stream)
            if i == 3:
                storages = _scan_torch_pickle(data[start : stream.tell()])
    except Exception as err:  # the pickle machinery raises many types for damaged data
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"Cannot read {path}: corrupt or not a checkpoint ({reason})") from None
    claimed = sum(storages.values()) + 8 * len(storages)
    if claimed > len(data) - stream.tell():
        raise ValueError(
            f"Cannot read {path}: corrupt checkpoint (its tensors claim {claimed} bytes, the "
            f"file holds {len(data) - stream.tell()} after its pickles)"
        )


def _tensors_to_numpy(obj, torch):
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage().nbytes()
        if obj.numel() * obj.element_size() > storage:
            # A view repeating its storage (stride 0) would grow when converted.
            raise ValueError(
                f"a tensor of shape {tuple(obj.shape)} claims more elements than its storage "
                f"({storage} bytes) holds: a view repeating its data, which a state dict of "
                "weights does not hold"
            )
        return obj.detach().to(torch.float32).numpy() if obj.is_floating_point() else obj.numpy()
    if isinstance(obj, Mapping):
        return {k: _tensors_to_numpy(v, torch) for k, v in obj.items()}
    return obj


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray]) -> None:
    """Write `tensors` as a safetensors file that transformers loads, complete or not at all."""
    from safetensors.numpy import save

    contiguous = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    with atomic_write(path) as f:
        # transformers refuses safetensors files without a "format" entry.
        f.write(save(contiguous, metadata={"format": "pt"}))


def resolve_pretrained(path_or_repo_id: str | os.PathLike, **hub_kwargs) -> Path:
    """A local directory holding config.json and the weights: the given directory, or the Hub
    snapshot of a repo id (downloaded, or found in the cache when offline).

    `hub_kwargs`: `revision`, `cache_dir`, `local_files_only`, `token` (see `hub.checkpoint_file`).
    """
    config_file = checkpoint_file(path_or_repo_id, [CONFIG_NAME], **hub_kwargs)
    if not Path(path_or_repo_id).is_dir():
        # A Hub snapshot: fetch the weights beside config.json.
        checkpoint_file(path_or_repo_id, [SAFETENSORS_NAME, PYTORCH_NAME], **hub_kwargs)
    return config_file.parent
