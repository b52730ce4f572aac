"""One small corpus in every form `encodec-jax tokenize` reads, for tests/test_sources.py,
tests/test_tokenize_sources.py and the distributed worker: a folder of files, Parquet written by
`datasets` (an `Audio` column of flac/wav/mp3/ogg bytes) and by pyarrow directly, a
`save_to_disk` folder, a local dataset repository for `load_dataset(..., streaming=True)`, and
WebDataset tar shards written with `tarfile`.

Every item has a key ("item00", ...), its encoded bytes, a transcript and a speaker id, so a test
can map any output row back to its item. Only NumPy, soundfile and pyarrow are imported at module
level (`datasets` inside the writers that need it).
"""

from __future__ import annotations

import dataclasses
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import soundfile as sf

# (format, rate, channels, length in 16 kHz samples): the tiny test model runs at 16 kHz with a
# hop of 32; three lengths keep the compiled programs few, two end in a partial frame.
LAYOUT = (
    ("FLAC", 16_000, 1, 5001),
    ("WAV", 44_100, 2, 8000),
    ("MP3", 16_000, 1, 6007),
    ("OGG", 48_000, 1, 8000),
    ("FLAC", 44_100, 2, 6007),
    ("WAV", 16_000, 1, 5001),
)
EXTENSIONS = {"FLAC": "flac", "WAV": "wav", "MP3": "mp3", "OGG": "ogg"}


@dataclasses.dataclass(frozen=True)
class CorpusItem:
    key: str
    ext: str
    data: bytes  # the encoded file
    text: str
    speaker: int


def make_items(count: int = 6, seed: int = 0) -> list[CorpusItem]:
    """`count` items cycling through LAYOUT: chirps plus noise, different for every item."""
    items = []
    for i in range(count):
        fmt, rate, channels, length = LAYOUT[i % len(LAYOUT)]
        t = np.arange(round(length * rate / 16_000)) / rate
        rng = np.random.default_rng(seed + i)
        chirp = 0.5 * np.sin(2 * np.pi * (200 + 150 * i) * t * (1 + t))
        audio = chirp[:, None] * np.linspace(1.0, 0.6, channels)[None]
        audio = (audio + rng.normal(0, 0.03, audio.shape)).astype(np.float32)
        buffer = io.BytesIO()
        sf.write(buffer, audio, rate, format=fmt)
        items.append(
            CorpusItem(
                key=f"item{i:02d}",
                ext=EXTENSIONS[fmt],
                data=buffer.getvalue(),
                text=f"utterance number {i}",
                speaker=i % 3,
            )
        )
    return items


def split(items: list, parts: int) -> list[list]:
    """`items` in `parts` consecutive runs of near-equal length."""
    bounds = np.linspace(0, len(items), parts + 1).round().astype(int)
    return [items[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def write_folder(root: Path, items: list[CorpusItem]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for item in items:
        (root / f"{item.key}.{item.ext}").write_bytes(item.data)
    return root


def _dataset(items: list[CorpusItem]):
    """A `datasets.Dataset` with an `Audio` column (bytes and the file name), like the Hub's."""
    from datasets import Audio, Dataset

    dataset = Dataset.from_dict(
        {
            "audio": [{"bytes": it.data, "path": f"{it.key}.{it.ext}"} for it in items],
            "id": [it.key for it in items],
            "text": [it.text for it in items],
            "speaker": [it.speaker for it in items],
        }
    )
    return dataset.cast_column("audio", Audio())


def write_parquet_datasets(root: Path, items: list[CorpusItem], shards: int = 2) -> str:
    """Parquet shards written by `datasets` (`Dataset.to_parquet`); returns their glob."""
    root.mkdir(parents=True, exist_ok=True)
    for s, part in enumerate(split(items, shards)):
        _dataset(part).to_parquet(str(root / f"train-{s:05d}-of-{shards:05d}.parquet"))
    return str(root / "train-*.parquet")


def write_parquet_arrow(
    root: Path, items: list[CorpusItem], shards: int = 2, row_group_size: int = 2
) -> str:
    """Parquet written with pyarrow: a plain `binary` column "wav" of encoded bytes, small row
    groups (so resuming seeks inside a file); returns a brace pattern naming the files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir(parents=True, exist_ok=True)
    for s, part in enumerate(split(items, shards)):
        table = pa.table(
            {
                "uid": pa.array([it.key for it in part]),
                "wav": pa.array([it.data for it in part], pa.binary()),
                "text": pa.array([it.text for it in part]),
                "speaker": pa.array([it.speaker for it in part], pa.int64()),
            }
        )
        pq.write_table(table, root / f"part-{s}.parquet", row_group_size=row_group_size)
    return str(root / f"part-{{0..{shards - 1}}}.parquet")


def write_saved(root: Path, items: list[CorpusItem], shards: int = 2) -> Path:
    """A `Dataset.save_to_disk` folder."""
    _dataset(items).save_to_disk(str(root), num_shards=shards)
    return root


def write_hub_repo(root: Path, items: list[CorpusItem], shards: int = 2) -> Path:
    """A dataset repository as on the Hub (data/train-*.parquet, no script), which
    `load_dataset(root, streaming=True)` streams like a Hub id."""
    write_parquet_datasets(root / "data", items, shards)
    return root


def write_tars(root: Path, items: list[CorpusItem], shards: int = 2) -> str:
    """WebDataset shards: members `<key>.<ext>`, `<key>.txt`, `<key>.json` in key order;
    returns a brace pattern naming them."""
    root.mkdir(parents=True, exist_ok=True)
    for s, part in enumerate(split(items, shards)):
        with tarfile.open(root / f"shard-{s:06d}.tar", "w") as tar:
            for it in part:
                meta = json.dumps({"speaker": it.speaker}).encode()
                for name, data in (
                    (f"{it.key}.{it.ext}", it.data),
                    (f"{it.key}.txt", it.text.encode()),
                    (f"{it.key}.json", meta),
                ):
                    add_member(tar, name, data)
    return str(root / f"shard-{{000000..{shards - 1:06d}}}.tar")


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # the same bytes every time
    tar.addfile(info, io.BytesIO(data))


def copy_to_fs(paths: list[Path], fs, folder: str) -> None:
    """Copy files into `folder` on an fsspec file system (e.g. memory://)."""
    for path in paths:
        fs.pipe_file(f"{folder}/{path.name}", path.read_bytes())
