"""Loading and saving EnCodec weights in the Hugging Face layout.

A checkpoint is a flat dict of PyTorch-named tensors. Since the module tree mirrors transformers',
the only renames are between the two ways PyTorch stores weight norm; anything missing,
unexpected or mis-shaped is an error that names the tensors. The model is built abstractly
(`nnx.eval_shape`), so loading never allocates random weights first.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from .config import EncodecConfig
from .model import EncodecModel

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
PYTORCH_NAME = "pytorch_model.bin"

# Current PyTorch parametrizations name weight norm's magnitude and direction differently from
# the legacy `weight_g`/`weight_v` that the Hub's files (and this package) use.
_PARAMETRIZATION_NAMES = {
    "parametrizations.weight.original0": "weight_g",
    "parametrizations.weight.original1": "weight_v",
}


def rename_hf_key(key: str) -> str:
    """transformers key -> encodec-jax key (identical up to the weight-norm spelling)."""
    for old, new in _PARAMETRIZATION_NAMES.items():
        if key.endswith(old):
            return key[: -len(old)] + new
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


def model_from_state_dict(
    config: EncodecConfig,
    state_dict: Mapping[str, np.ndarray],
    rename: Callable[[str], str] = rename_hf_key,
) -> EncodecModel:
    """Build an `EncodecModel` for `config` holding exactly the tensors of `state_dict`.

    Raises:
        ValueError: naming every missing, unexpected and mis-shaped tensor.
    """
    abstract = nnx.eval_shape(lambda: EncodecModel(config, rngs=nnx.Rngs(0)))
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
        (path, var.replace(jnp.asarray(renamed[key], jnp.float32)))
        for key, (path, var) in expected.items()
    ]
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _listing(what: str, names: list[str], limit: int = 8) -> str:
    """`3 tensors missing: a, b, c` — every name when few, the first `limit` and a count else."""
    shown = ", ".join(names[:limit]) + (
        f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    )
    return f"{len(names)} tensors {what}: {shown}"


def state_dict_from_model(model: EncodecModel) -> dict[str, np.ndarray]:
    """The model's tensors under the Hub's names (weight norm as `weight_g`/`weight_v`)."""
    state = nnx.state(model)
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


def save_pretrained(model: EncodecModel, directory: str | os.PathLike) -> None:
    """Write config.json and model.safetensors as on the Hub; transformers loads the result.

    Each file is written to a temporary name and renamed, so a crash never leaves a half file.
    """
    from safetensors.numpy import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: np.ascontiguousarray(v) for k, v in state_dict_from_model(model).items()}
    with _atomic_path(directory / SAFETENSORS_NAME) as tmp:
        # transformers refuses safetensors files without a "format" entry.
        save_file(tensors, tmp, metadata={"format": "pt"})
    with _atomic_path(directory / CONFIG_NAME) as tmp:
        model.config.to_json_file(tmp)


class _atomic_path:
    """Context manager yielding a temporary path in the target's folder, renamed on success."""

    def __init__(self, target: Path):
        self.target = target

    def __enter__(self) -> str:
        fd, self.tmp = tempfile.mkstemp(dir=self.target.parent, prefix=f".{self.target.name}.")
        os.close(fd)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            os.replace(self.tmp, self.target)
        else:
            os.unlink(self.tmp)


# ---- from_pretrained ----
def resolve_pretrained(
    path_or_repo_id: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
) -> Path:
    """A local directory holding config.json and weights: the given directory, or the Hub
    snapshot folder of a repo id (downloaded, or found in the cache when offline)."""
    path = Path(path_or_repo_id)
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{path} is a file; from_pretrained takes a checkpoint directory")
    repo_id = str(path_or_repo_id)
    if not is_hub_id(repo_id):
        raise FileNotFoundError(f"No such checkpoint directory: {repo_id}")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    def download(filename: str) -> Path:
        return Path(
            hf_hub_download(
                repo_id,
                filename,
                revision=revision,
                cache_dir=cache_dir,
                local_files_only=local_files_only,
                token=token,
            )
        )

    config_path = download(CONFIG_NAME)
    try:
        download(SAFETENSORS_NAME)
    except EntryNotFoundError:
        download(PYTORCH_NAME)
    return config_path.parent


def is_hub_id(text: str) -> bool:
    """`owner/name` that is not a local path: no such file, and `owner` is no local folder
    (so a mistyped `checkpoints/model.th` is reported as missing, not looked up on the Hub)."""
    if re.fullmatch(r"[\w.-]+/[\w.-]+", text) is None or text.startswith("."):
        return False
    return not Path(text).exists() and not Path(text).parent.is_dir()


def load_pretrained(path_or_repo_id: str | os.PathLike, **hub_kwargs) -> EncodecModel:
    """`EncodecModel.from_pretrained`: config.json plus weights from a directory or the Hub."""
    directory = resolve_pretrained(path_or_repo_id, **hub_kwargs)
    if not (directory / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"No {CONFIG_NAME} in {directory}")
    config = EncodecConfig.from_json_file(directory / CONFIG_NAME)
    return model_from_state_dict(config, read_state_dict(directory))
