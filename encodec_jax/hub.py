"""Finding a checkpoint's files: in a local directory, or on the Hugging Face Hub.

The one place that talks to `huggingface_hub`, used by the model loader and the feature
extractor alike. It imports no JAX, so the NumPy-only feature extractor stays light.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path


def is_hub_id(text: str) -> bool:
    """`owner/name` that is not a local path: no such file, and `owner` is no local folder
    (so a mistyped `checkpoints/model.th` is reported as missing, not looked up on the Hub)."""
    if re.fullmatch(r"[\w.-]+/[\w.-]+", text) is None or text.startswith("."):
        return False
    return not Path(text).exists() and not Path(text).parent.is_dir()


def checkpoint_file(
    path_or_repo_id: str | os.PathLike,
    names: Sequence[str],
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
) -> Path:
    """The first of the files `names` that a checkpoint directory or Hub repository has.

    For a Hub id each name is downloaded into the Hub cache (or found there when offline or with
    `local_files_only`) until one exists; when none does, huggingface_hub's own error for the
    last name says why (not in the repository, not cached while offline, no network, no access).

    Raises:
        FileNotFoundError: a local directory holds none of the files, or `path_or_repo_id` is
            neither a directory nor a Hub id.
        ValueError: `path_or_repo_id` is a file, not a directory.
    """
    path = Path(path_or_repo_id)
    if path.is_dir():
        for name in names:
            if (path / name).is_file():
                return path / name
        if len(names) == 1:
            raise FileNotFoundError(f"No {names[0]} in {path}")
        raise FileNotFoundError(f"{path} has neither {' nor '.join(names)}")
    if path.exists():
        raise ValueError(f"{path} is a file; from_pretrained takes a directory or a Hub id")
    if not is_hub_id(str(path_or_repo_id)):
        raise FileNotFoundError(f"No such checkpoint directory: {path_or_repo_id}")
    from huggingface_hub import hf_hub_download

    # `huggingface_hub.utils` has exported this name in every release since 0.20 (the floor in
    # pyproject.toml); LocalEntryNotFoundError, "not in the cache while offline", subclasses it.
    from huggingface_hub.utils import EntryNotFoundError

    for i, name in enumerate(names):
        try:
            downloaded = hf_hub_download(
                str(path_or_repo_id),
                name,
                revision=revision,
                cache_dir=cache_dir,
                local_files_only=local_files_only,
                token=token,
            )
        except EntryNotFoundError:
            if i == len(names) - 1:
                raise
            continue
        return Path(downloaded)
    raise ValueError("checkpoint_file needs at least one file name")
