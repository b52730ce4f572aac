"""Crash-safe writes: a file or a directory appears under its final name complete or not at all.

Every file encodec-jax writes goes through `atomic_write`: the data is written to a hidden
temporary file next to the target, flushed to disk, then renamed over the target (a rename within
one directory is atomic on POSIX file systems), so a reader, or a run resumed after a crash or a
SIGKILL, never sees a half-written file. `atomic_directory` does the same for a directory.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

TEMP_SUFFIX = ".tmp"


def temp_prefix(name: str) -> str:
    """The prefix of the temporary files `atomic_write` makes for a target called `name`."""
    return f".{name}."


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file that replaces `path` when the `with` block ends without error.

    Args:
        path: the final file name. Its directory must exist.
        mode: "wb" or "w" (text, UTF-8).

    Yields:
        The open temporary file. On an exception it is deleted and `path` is left untouched.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(
        dir=directory, prefix=temp_prefix(os.path.basename(path)), suffix=TEMP_SUFFIX
    )
    try:
        # mkstemp makes the file private (0600); give the result the permissions a plain
        # open() would have.
        os.fchmod(fd, 0o666 & ~_umask())
        encoding = None if "b" in mode else "utf-8"
        with os.fdopen(fd, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_directory(directory)


def atomic_directory(
    directory: str | os.PathLike, write: Callable[[Path], object], force: bool = False
) -> None:
    """Run `write(tmp_dir)` and move the result to `directory` only if it succeeded.

    A failure leaves nothing behind; an existing `directory` is replaced only with `force`, and
    then only after the new one is complete.

    Raises:
        FileExistsError: `directory` exists and `force` is false.
    """
    target = Path(directory)
    if target.exists() and not force:
        raise FileExistsError(f"{target} exists; pass --force to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        write(staging / "out")
        if target.exists():
            os.replace(target, staging / "old")
        os.replace(staging / "out", target)
        fsync_directory(target.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def fsync_directory(directory: str | os.PathLike) -> None:
    """Make a rename inside `directory` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    # The only portable way to read the umask is to set it; set it straight back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
