"""Training data: random segments of every audio file under a folder, deterministic for a seed.

Example `i` of the run (counting over all steps and all processes) is a pure function of the
seed and `i`: a file drawn with probability proportional to its duration (as audiocraft samples
its manifests), a uniformly random start, `segment` seconds read from there (a short file is
zero-padded at the end), mixed to the model's channels and resampled with soxr. So a resumed run
sees exactly the batches an uninterrupted one would, whatever the number of workers, and each
process of a multi-host job reads only its own slice of every global batch.

Decoding and resampling run in background processes (`grain`'s `mp_prefetch`) while the device
trains. Files whose header cannot be read are reported once when the folder is scanned and never
drawn; a file that fails later, while reading a segment, is logged and replaced by the next file
of the draw.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Iterator

import numpy as np

from ..audio import AudioError, audio_info, load_audio
from ..tokenize import find_audio_files

log = logging.getLogger(__name__)


class DataError(ValueError):
    """A data folder that cannot be trained on (missing, or no readable audio)."""


@dataclasses.dataclass(frozen=True)
class AudioFolder:
    """The readable audio files of a folder and their lengths (from their headers).

    Attributes:
        root: the folder.
        paths: relative paths, sorted.
        frames: length of each file in its own frames.
        rates: sample rate of each file.
        skipped: (path, reason) of the files whose header could not be read.
    """

    root: str
    paths: tuple[str, ...]
    frames: tuple[int, ...]
    rates: tuple[int, ...]
    skipped: tuple[tuple[str, str], ...]

    @classmethod
    def scan(cls, root: str | os.PathLike) -> AudioFolder:
        """Every audio file under `root` (see `tokenize.find_audio_files`) with its header.

        Raises:
            DataError: `root` is not a folder, or holds no readable audio.
        """
        root = os.fspath(root)
        if not os.path.isdir(root):
            raise DataError(f"data folder {root} does not exist or is not a folder")
        paths, frames, rates, skipped = [], [], [], []
        for rel in find_audio_files(root):
            try:
                n, rate = audio_info(os.path.join(root, *rel.split("/")))
            except AudioError as err:
                skipped.append((rel, str(err)))
                continue
            if n <= 0:
                skipped.append((rel, "holds no samples"))
                continue
            paths.append(rel)
            frames.append(n)
            rates.append(rate)
        if not paths:
            found = f"{len(skipped)} unreadable audio files" if skipped else "no audio files"
            raise DataError(f"data folder {root} has {found}; nothing to train on")
        return cls(root, tuple(paths), tuple(frames), tuple(rates), tuple(skipped))

    @property
    def seconds(self) -> float:
        return float(sum(n / r for n, r in zip(self.frames, self.rates, strict=True)))


class SegmentSource:
    """Examples `[channels, segment_samples]` float32 at the model's rate, drawn from a folder.

    Picklable (grain copies it into its worker processes).
    """

    def __init__(
        self, folder: AudioFolder, sample_rate: int, channels: int, segment: float, seed: int
    ):
        self.folder = folder
        self.sample_rate = sample_rate
        self.channels = channels
        self.length = max(1, round(segment * sample_rate))
        self.seed = seed
        seconds = np.array(folder.frames, np.float64) / np.array(folder.rates, np.float64)
        self._cumulative = np.cumsum(seconds / seconds.sum())

    def train_example(self, index: int) -> np.ndarray:
        """The `index`-th training example of the run: a random segment of a random file."""
        rng = np.random.default_rng([self.seed, int(index)])
        first = int(np.searchsorted(self._cumulative, rng.random(), side="right"))
        position = rng.random()
        for attempt in range(len(self.folder.paths)):
            i = (min(first, len(self.folder.paths) - 1) + attempt) % len(self.folder.paths)
            try:
                return self._segment(i, position)
            except AudioError as err:
                log.warning("skipping %s: %s", self.folder.paths[i], err)
        raise DataError(f"no file of {self.folder.root} could be read")

    def valid_example(self, index: int, count: int) -> np.ndarray:
        """Validation example `index` of `count`: fixed segments spread evenly over the files
        and, within each file, over its length."""
        files = len(self.folder.paths)
        i = index % files
        repeats = math.ceil(count / files)
        position = ((index // files) + 0.5) / repeats
        return self._segment(i, position)

    def _segment(self, i: int, position: float) -> np.ndarray:
        """`segment` seconds of file i from `position` (0..1) of the part where it fits."""
        rate = self.folder.rates[i]
        source_frames = math.ceil(self.length * rate / self.sample_rate)
        start = int(position * max(0, self.folder.frames[i] - source_frames))
        path = os.path.join(self.folder.root, *self.folder.paths[i].split("/"))
        audio, _ = load_audio(path, self.sample_rate, self.channels, start, source_frames)
        out = np.zeros((self.channels, self.length), np.float32)
        n = min(self.length, audio.shape[-1])
        out[:, :n] = audio[:, :n]
        return out


def train_batches(
    source: SegmentSource,
    *,
    global_batch: int,
    first_step: int,
    steps: int,
    process_index: int = 0,
    process_count: int = 1,
    workers: int = 0,
) -> Iterator[np.ndarray]:
    """This process's part `[global_batch / process_count, C, S]` of each global batch, for steps
    `first_step` ... `steps - 1`, decoded `workers` processes ahead (0: in this process)."""
    import grain

    if global_batch % process_count:
        raise DataError(
            f"the batch size ({global_batch}) must divide evenly over {process_count} processes"
        )
    local = global_batch // process_count
    dataset = (
        grain.MapDataset.range(first_step * local, steps * local)
        .map(_LocalExample(source, global_batch, local, process_index))
        .batch(local)
        .to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))
    )
    if workers > 0:
        _absl_flags_ready()
        dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    return iter(dataset)


def _absl_flags_ready() -> None:
    """grain's worker processes read absl flags, which only `absl.app` programs parse; any other
    program (a notebook, this package's command line, pytest) would fail with
    UnparsedFlagAccessError. Flags that nobody parsed take their defaults."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


@dataclasses.dataclass(frozen=True)
class _LocalExample:
    """Local example j of this process -> its example of the run (picklable for the workers)."""

    source: SegmentSource
    global_batch: int
    local: int
    process_index: int

    def __call__(self, j: int) -> np.ndarray:
        step, row = divmod(j, self.local)
        index = step * self.global_batch + self.process_index * self.local + row
        return self.source.train_example(index)


def valid_batches(source: SegmentSource, count: int, batch: int) -> list[np.ndarray]:
    """The fixed validation segments in batches of at most `batch` (decoded once, kept)."""
    examples = [source.valid_example(k, count) for k in range(count)]
    return [np.stack(examples[k : k + batch]) for k in range(0, count, batch)]
