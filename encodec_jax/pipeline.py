"""The engine of `tokenize`: a process's share of a source read as one ordered stream of items,
read ahead in a thread, decoded and resampled by a thread pool while the device encodes, and
grouped by length bucket so that every compiled batch is full.

Memory: at most `Pipeline.decoding_limit` (2 * workers + batch size) items are read ahead or
being decoded, and `Pipeline.waiting_limit` (batch size * (buckets + 1)) decoded items wait for
a batch; nothing else of the source is held besides the part a shard is reading (see
`sources`).
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np

from .audio import AudioError
from .batching import BatchCodec, EncodedItem, process_share
from .sources import Shard, ShardError, Source, first_line, read_audio


# ---- this process's share of the source, as one stream of records ----
@dataclasses.dataclass
class Share:
    """The shards this process reads. Under `jax.distributed` each process takes every
    process_count-th shard, so that hosts never read each other's data; a source with fewer
    shards than processes is shared by item instead (every process reads it all and keeps the
    items whose shard + item index is its own modulo the process count)."""

    shards: list[Shard]
    index: int
    processes: int
    by_item: bool

    def owns(self, shard: int, item: int) -> bool:
        return not self.by_item or (shard + item) % self.processes == self.index

    def count(self) -> int | None:
        """Items in the share, when every shard can say cheaply; else None."""
        if self.by_item:
            return None
        counts = [shard.count() for shard in self.shards]
        return None if any(c is None for c in counts) else sum(counts)


def share_of(source: Source) -> Share:
    """This process's share of `source`'s shards (all of them outside `jax.distributed`)."""
    index, count = jax.process_index(), jax.process_count()
    if count == 1 or len(source.shards) >= count:
        shards = [source.shards[i] for i in process_share(len(source.shards))]
        return Share(shards, index, count, by_item=False)
    return Share(list(source.shards), index, count, by_item=True)


@dataclasses.dataclass
class Record:
    """One item of the stream, with its source position (shard index, item index) and the one
    just after it."""

    path: str
    key: str | None
    audio: Any
    columns: dict[str, Any]
    error: str | None
    at: tuple[int, int]
    after: tuple[int, int]


def records(share: Share, start: tuple[int, int]) -> Iterator[Record]:
    """The share's items from source position `start` (shard index, item index) on. A damaged
    shard gives one error record where reading stopped, and the stream goes on with the next
    shard."""
    s, j = start
    while s < len(share.shards):
        shard = share.shards[s]
        position = j
        try:
            for item in shard.items(j):
                if share.owns(s, position):
                    yield Record(
                        shard.name,
                        item.key,
                        item.audio,
                        item.columns,
                        item.error,
                        (s, position),
                        (s, position + 1),
                    )
                position += 1
        except ShardError as err:
            if share.owns(s, position):
                message = f"cannot read {shard.name} from item {position} on: {err}"
                yield Record(shard.name, None, None, {}, message, (s, position), (s + 1, 0))
        s, j = s + 1, 0


class Prefetch:
    """Runs an iterator in a thread, at most `depth` items ahead of its consumer (reading the
    source while the device encodes). Exceptions reach the consumer; `close` stops the thread."""

    def __init__(self, iterator: Iterator, depth: int):
        self._iterator = iterator
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="tokenize-read", daemon=True)
        self._thread.start()

    def _put(self, entry) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _work(self) -> None:
        try:
            for value in self._iterator:
                if not self._put(("value", value)):
                    return
            self._put(("end", None))
        except BaseException as err:  # handed to the consumer
            self._put(("error", err))
        finally:
            close = getattr(self._iterator, "close", None)
            if close is not None:
                close()

    def __iter__(self):
        return self

    def __next__(self):
        kind, value = self._queue.get()
        if kind == "value":
            return value
        self._queue.put((kind, value))  # later calls see the same end
        if kind == "error":
            raise value
        raise StopIteration

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


# ---- decoding, resampling and encoding, overlapped ----
class Pipeline:
    """Turns a stream of records into output shards of outcomes (EncodedItem or error).

    Records are decoded by the pool (in order of arrival, up to `decoding_limit` at once) while
    the main thread encodes: decoded items wait in their length bucket until it holds a full
    batch. A bucket is encoded part-full only when the shard being finished needs its items,
    or when more than `waiting_limit` items wait (which bounds memory in `exact` mode, where
    every distinct length is a bucket). An item's codes do not depend on its batch.
    """

    def __init__(self, codec: BatchCodec, pool, workers: int, on_progress):
        self.codec = codec
        self.pool = pool
        self.on_progress = on_progress  # called with (items, seconds of audio)
        self.decoding_limit = 2 * workers + codec.batch_size
        self.waiting_limit = codec.batch_size * (len(codec.buckets) + 1)
        self.next_shard = 0
        self.source_ended = False

    def shards(
        self,
        records: Iterator[Record],
        first: int,
        shard_size: int,
        is_done: Callable[[int], bool],
    ) -> Iterator[tuple[int, list[tuple[Record, EncodedItem | str]]]]:
        """(k, [(record, outcome)] in stream order) for shards first, first + 1, ... of
        `records` (which start at shard `first`'s first item), until the records end
        (`source_ended`) or the next shard is done already. `next_shard` is then the shard
        after the last one yielded."""
        index = first * shard_size  # stream index of the next record
        self.next_shard, self.source_ended = first, False
        shard_records: dict[int, list[Record]] = {}
        self._outcomes: dict[int, EncodedItem | str] = {}
        self._waiting: dict[int, list[tuple[int, np.ndarray]]] = {}
        decoding: deque = deque()
        reading = True
        while True:
            while reading and len(decoding) < self.decoding_limit:
                if index % shard_size == 0 and index > first * shard_size:
                    if is_done(index // shard_size):
                        reading = False
                        break
                record = next(records, None)
                if record is None:
                    reading, self.source_ended = False, True
                    break
                shard_records.setdefault(index // shard_size, []).append(record)
                if record.error is not None:
                    self._outcomes[index] = record.error
                    self.on_progress(1, 0.0)
                else:
                    decoding.append((index, self.pool.submit(self._decode, record)))
                index += 1
            if decoding:
                i, future = decoding.popleft()
                self._add(i, future.result())
            # Finish the oldest open shard once all of its items are read and decoded.
            while self.next_shard in shard_records:
                end = (self.next_shard + 1) * shard_size
                if (reading and index < end) or (decoding and decoding[0][0] < end):
                    break
                for length in [n for n, items in self._waiting.items() if items[0][0] < end]:
                    self._encode(length)
                batch = shard_records.pop(self.next_shard)
                base = self.next_shard * shard_size
                yield (
                    self.next_shard,
                    [(r, self._outcomes.pop(base + t)) for t, r in enumerate(batch)],
                )
                self.next_shard += 1
            if not reading and not decoding and not shard_records:
                return

    def _decode(self, record: Record) -> np.ndarray | str:
        config = self.codec.config
        # errors.jsonl names the item: the message need not (nor say where the corpus lives)
        name = f"audio file {record.path}" if record.key == record.path else "the audio"
        try:
            return read_audio(record.audio, config.sampling_rate, config.audio_channels, name)[0]
        except (AudioError, ValueError, RuntimeError, MemoryError) as err:
            return first_line(err)  # the item's own fault; storage errors (OSError) stop the run

    def _add(self, index: int, audio: np.ndarray | str) -> None:
        if isinstance(audio, str):
            self._outcomes[index] = audio
            self.on_progress(1, 0.0)
            return
        length = self.codec.padded_length(audio.shape[-1])
        bucket = self._waiting.setdefault(length, [])
        bucket.append((index, audio))
        if len(bucket) >= self.codec.batch_size:
            self._encode(length)
        elif sum(len(b) for b in self._waiting.values()) > self.waiting_limit:
            oldest = min(self._waiting, key=lambda n: self._waiting[n][0][0])
            self._encode(oldest)

    def _encode(self, length: int) -> None:
        items = self._waiting.pop(length)
        audios = [audio for _, audio in items]
        try:
            encoded: list[EncodedItem | str] = list(self.codec.encode(audios))
        except Exception:
            # One bad item fails its whole batch: encode one by one to find it. An item's codes
            # depend only on its own bucket, so the others come out the same.
            encoded = []
            for audio in audios:
                try:
                    encoded.append(self.codec.encode([audio])[0])
                except Exception as err:
                    encoded.append(f"cannot encode: {first_line(err)}")
        seconds = 0.0
        for (index, _), outcome in zip(items, encoded, strict=True):
            self._outcomes[index] = outcome
            if isinstance(outcome, EncodedItem):
                seconds += outcome.num_samples / self.codec.config.sampling_rate
        self.on_progress(len(items), seconds)
