"""Checkpoint tensors: reading them, renaming their keys, loading them into NNX modules, saving.

A checkpoint is a flat dict of PyTorch-named tensors. The module trees mirror PyTorch's, so a key
is the path of the parameter here, up to one small pure rename per source (the two ways PyTorch
stores weight norm; the `encodec` package's and audiocraft's extra nesting). Loading builds the
module abstractly (`nnx.eval_shape`, no random weights allocated) and fills it; anything missing,
unexpected or mis-shaped is an error that names the tensors. Nothing here knows the codec: the
model (`EncodecModel.from_pretrained`) and the training discriminator load through the same code.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

import jax.numpy as jnp
import numpy as np
from flax import nnx

from .atomic import atomic_write
from .hub import checkpoint_file

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
    pytorch_model.bin (needs torch)."""
    directory = Path(directory)
    if (directory / SAFETENSORS_NAME).is_file():
        return _read_safetensors(directory / SAFETENSORS_NAME)
    if (directory / SAFETENSORS_INDEX_NAME).is_file():
        index = json.loads((directory / SAFETENSORS_INDEX_NAME).read_text())
        tensors: dict[str, np.ndarray] = {}
        for shard in sorted(set(index["weight_map"].values())):
            if not (directory / shard).is_file():
                raise FileNotFoundError(
                    f"{directory / shard}, listed in {SAFETENSORS_INDEX_NAME}, does not exist"
                )
            tensors.update(_read_safetensors(directory / shard))
        return tensors
    if (directory / PYTORCH_NAME).is_file():
        return read_torch_state_dict(directory / PYTORCH_NAME)
    raise FileNotFoundError(
        f"No weights in {directory}: expected {SAFETENSORS_NAME} or {PYTORCH_NAME}"
    )


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"Cannot read {path}: not a valid safetensors file ({err})") from err


def read_torch_state_dict(path: str | os.PathLike) -> dict:
    """Unpickle a PyTorch checkpoint with `torch.load(weights_only=True)`; tensors become NumPy.

    Raises ImportError with instructions when torch is not installed: PyTorch pickles cannot be
    read without it (safetensors files can).
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
    if not (magic.startswith(b"PK\x03\x04") or magic[:1] == b"\x80"):
        raise ValueError(f"{path} is not a PyTorch checkpoint (neither a zip archive nor a pickle)")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for corrupt or foreign files
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        reason = reason.split(". ")[0].rstrip(".")  # torch appends paragraphs of advice
        raise ValueError(f"Cannot read {path}: corrupt or not a checkpoint ({reason})") from err
    return _tensors_to_numpy(obj, torch)


def _tensors_to_numpy(obj, torch):
    if isinstance(obj, torch.Tensor):
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
