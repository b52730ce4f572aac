"""Streaming a file or a pipe: read audio block by block, code it as it arrives, write as it goes.

This is what `encodec-jax stream` runs. The input is read in blocks (an audio file through
soundfile, or raw PCM from a binary stream such as stdin) and converted as `audio.load_audio`
converts a whole file: channels mixed down, kept or duplicated the same way, resampled with
soxr's streaming resampler at the same quality, which gives the same samples as resampling the
whole file. So streamed codes equal `encode`'s for the same input, and streamed audio equals
`reconstruct`'s to float32 rounding.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections import deque
from collections.abc import Iterator
from typing import IO, TYPE_CHECKING

import numpy as np
import soundfile as sf
import soxr

from ..atomic import atomic_write
from ..audio import AudioError, check_writable_format
from ..batching import EncodedItem
from ..codes import FORMATS, Codes, codes_from_encoding, save_codes
from .streams import ChunkDecoder, ChunkEncoder, Decoder, Encoder

if TYPE_CHECKING:
    from ..model import EncodecModel

PCM_FORMATS = {"s16": np.dtype("<i2"), "f32": np.dtype("<f4")}
# Steps timed for the latency figures: the last this many (a bounded record, so that memory
# stays flat however long the stream).
_TIMED_STEPS = 100_000


@dataclasses.dataclass(frozen=True)
class RawFormat:
    """Headerless PCM: `rate` Hz, `channels` interleaved, samples "s16" (little-endian 16-bit
    integers, full scale 32768) or "f32" (little-endian float32)."""

    rate: int
    channels: int
    sample_format: str = "s16"

    def __post_init__(self) -> None:
        if self.sample_format not in PCM_FORMATS:
            raise AudioError(
                f"unknown PCM format {self.sample_format!r}; use one of {sorted(PCM_FORMATS)}"
            )
        if self.rate < 1 or self.channels < 1:
            raise AudioError(f"raw PCM needs a positive rate and channel count, got {self}")


class AudioSource:
    """Audio blocks `[channels, n]` float32 at `sample_rate` Hz and `channels` channels, read
    from a file (any format libsndfile reads) or from raw PCM on a binary stream.

    Args:
        source: a path, or a binary file object (with `raw`).
        sample_rate, channels: what the model takes.
        raw: the PCM layout of a stream; None for a file.
        block_seconds: about how much to read at a time.

    Attributes:
        notes: one line per conversion made (as `load_audio` gives them).
        name: what to call the input in messages.
    """

    def __init__(
        self,
        source: str | os.PathLike | IO[bytes],
        sample_rate: int,
        channels: int,
        raw: RawFormat | None = None,
        block_seconds: float = 0.1,
    ):
        self.sample_rate, self.channels, self.raw = sample_rate, channels, raw
        self.block_seconds = block_seconds
        self.notes: list[str] = []
        if raw is None:
            from ..audio import audio_info

            self.name = os.fspath(source)
            _, self.source_rate = audio_info(source)  # raises AudioError for a bad file
            self.source_channels = sf.info(self.name).channels
        else:
            self.name = getattr(source, "name", "stdin")
            self.source_rate, self.source_channels = raw.rate, raw.channels
        self._source = source

    def __iter__(self) -> Iterator[np.ndarray]:
        resampler = None
        kept = 1 if self.channels == 1 else min(self.channels, self.source_channels)
        if self.source_rate != self.sample_rate:
            resampler = soxr.ResampleStream(
                self.source_rate, self.sample_rate, kept, dtype="float32", quality="HQ"
            )
        total = 0
        for block in self._read():
            data = self._mix(block)
            if resampler is not None:
                data = resampler.resample_chunk(data, last=False)
            total += len(data)
            if len(data):
                yield self._spread(data)
        if resampler is not None:
            data = resampler.resample_chunk(np.zeros((0, kept), np.float32), last=True)
            total += len(data)
            if len(data):
                yield self._spread(data)
        if total == 0:
            raise AudioError(f"{self.name} holds no samples")
        self._note_conversions()

    def _read(self) -> Iterator[np.ndarray]:
        """Blocks `[n, source channels]` float32, as read."""
        frames = max(1, round(self.block_seconds * self.source_rate))
        if self.raw is None:
            try:
                with sf.SoundFile(self.name) as f:
                    while True:
                        block = f.read(frames, dtype="float32", always_2d=True)
                        if not len(block):
                            return
                        yield self._finite(block)
            except (sf.LibsndfileError, RuntimeError) as err:
                raise AudioError(f"cannot read audio file {self.name}: {err}") from None
        dtype = PCM_FORMATS[self.raw.sample_format]
        frame_bytes = dtype.itemsize * self.raw.channels
        # read1 returns what a pipe has now (up to a block) instead of waiting for a full block.
        read = getattr(self._source, "read1", self._source.read)
        left = b""
        while True:
            data = read(frames * frame_bytes)
            if not data:
                break
            data = left + data
            whole = len(data) - len(data) % frame_bytes
            data, left = data[:whole], data[whole:]
            samples = np.frombuffer(data, dtype).reshape(-1, self.raw.channels)
            if self.raw.sample_format == "s16":
                block = samples.astype(np.float32) / np.float32(32768.0)
            else:
                block = samples.astype(np.float32)
            if len(block):
                yield self._finite(block)
        if left:
            raise AudioError(
                f"{self.name} ended inside a sample frame: {len(left)} bytes left over, frames "
                f"are {frame_bytes} bytes ({self.raw.channels} x {self.raw.sample_format})"
            )

    def _finite(self, block: np.ndarray) -> np.ndarray:
        if not np.isfinite(block).all():
            raise AudioError(f"{self.name} holds NaN or Inf samples")
        return block

    def _mix(self, data: np.ndarray) -> np.ndarray:
        """Channel conversion before resampling, as `load_audio` does it."""
        if self.channels == 1 and data.shape[1] > 1:
            return data.mean(axis=1, keepdims=True, dtype=np.float32)
        if self.channels < data.shape[1]:
            return data[:, : self.channels]
        return data

    def _spread(self, data: np.ndarray) -> np.ndarray:
        if self.channels > data.shape[1]:
            data = np.repeat(data, self.channels, axis=1)
        return np.ascontiguousarray(data.T, dtype=np.float32)

    def _note_conversions(self) -> None:
        n = self.source_channels
        if self.channels == 1 and n > 1:
            self.notes.append(f"mixed {n} channels down to mono")
        elif self.channels < n:
            self.notes.append(f"kept the first {self.channels} of {n} channels")
        if self.source_rate != self.sample_rate:
            self.notes.append(f"resampled {self.source_rate} -> {self.sample_rate} Hz")
        if self.channels > min(n, self.channels):
            self.notes.append(f"duplicated mono to {self.channels} channels")


@dataclasses.dataclass(frozen=True)
class StreamReport:
    """What a streamed run did and how fast.

    Attributes:
        codes: the codes of the whole input (also written when the output is a codes file).
        seconds_of_audio: the input's duration at the model's rate.
        compute_seconds: time spent coding (pushes and flush, compilation excluded).
        compile_seconds: compiling the programs before the stream started.
        step_ms_median, step_ms_p99: compute per step (a chunk of `chunk_frames` frames, or a
            chunk of a chunked model), encode (and decode, for audio output), after the start.
        steps: steps timed.
        latency_ms: from a chunk's first sample to its output, compute excluded: the chunk,
            the model's look-ahead (and the decoder's, for audio output).
        startup_ms: audio buffered before the first output (the warmup of reflect padding).
    """

    codes: Codes
    seconds_of_audio: float
    compute_seconds: float
    compile_seconds: float
    step_ms_median: float
    step_ms_p99: float
    steps: int
    latency_ms: float
    startup_ms: float

    @property
    def real_time_factor(self) -> float:
        """Compute time per second of audio (below 1: faster than real time)."""
        return self.compute_seconds / max(self.seconds_of_audio, 1e-12)


def stream(
    model: EncodecModel,
    model_name: str,
    source: AudioSource,
    output: str | os.PathLike,
    bandwidth: float | None = None,
    chunk_frames: int = 1,
) -> StreamReport:
    """Stream `source` through the model, writing `output` as it goes: codes for a codes file
    (.npz, .ecdc; the file `encode` writes, written when the stream ends), reconstructed audio
    for an audio file (.wav, .flac, .ogg; written block by block, complete under its name only
    at the end).

    Raises:
        AudioError, CodesError, StreamingError: with what was wrong.
    """
    output = os.fspath(output)
    ext = os.path.splitext(output)[1].lower().lstrip(".")
    audio_out = ext not in FORMATS
    if audio_out:
        fmt = check_writable_format(output)
    config = model.config
    if config.chunk_length is None:
        runner = _FrameRun(model, bandwidth, chunk_frames, audio_out)
    else:
        runner = _ChunkRun(model, bandwidth, audio_out)
    if not audio_out:
        for block in source:
            runner.feed(block)
        runner.finish()
        codes = runner.codes(model_name, bandwidth)
        save_codes(output, codes, config)
        return runner.report(codes, source)
    with atomic_write(output) as f:
        with sf.SoundFile(
            f, "w", samplerate=config.sampling_rate, channels=config.audio_channels, format=fmt
        ) as writer:
            runner.writer = writer
            for block in source:
                runner.feed(block)
            runner.finish()
    codes = runner.codes(model_name, bandwidth)
    return runner.report(codes, source)


class _Run:
    """Feeds blocks to the streams in whole steps, times them, collects codes, writes audio."""

    writer: sf.SoundFile | None = None

    def __init__(self, model, audio_out: bool, step_samples: int):
        self.model, self.audio_out, self.step_samples = model, audio_out, step_samples
        self.num_samples = 0  # read so far
        self.written = 0
        self.compute = 0.0
        self.times: deque[float] = deque(maxlen=_TIMED_STEPS)
        self._buffer: list[np.ndarray] = []
        self._buffered = 0
        start = time.perf_counter()
        self.compile()
        self.compile_seconds = time.perf_counter() - start

    def feed(self, block: np.ndarray) -> None:
        self.num_samples += block.shape[-1]
        self._buffer.append(block)
        self._buffered += block.shape[-1]
        while self._buffered >= self.step_samples:
            data = np.concatenate(self._buffer, axis=-1)
            chunk, rest = data[:, : self.step_samples], data[:, self.step_samples :]
            self._buffer, self._buffered = [rest], rest.shape[-1]
            start = time.perf_counter()
            stepped = self.push(chunk[None])
            elapsed = time.perf_counter() - start
            self.compute += elapsed
            if stepped:
                self.times.append(elapsed)

    def finish(self) -> None:
        start = time.perf_counter()
        if self._buffered:
            self.push(np.concatenate(self._buffer, axis=-1)[None])
        self.flush()
        self.compute += time.perf_counter() - start

    def write(self, audio: np.ndarray) -> None:
        """Write reconstructed audio `[1, C, n]`, never past the input's length."""
        n = min(audio.shape[-1], self.num_samples - self.written)
        if n > 0 and self.writer is not None:
            self.writer.write(audio[0, :, :n].T)
            self.written += n

    def report(self, codes: Codes, source: AudioSource) -> StreamReport:
        times = np.asarray(self.times) * 1000.0
        rate = self.model.config.sampling_rate
        return StreamReport(
            codes=codes,
            seconds_of_audio=self.num_samples / rate,
            compute_seconds=self.compute,
            compile_seconds=self.compile_seconds,
            step_ms_median=float(np.median(times)) if len(times) else math.nan,
            step_ms_p99=float(np.percentile(times, 99)) if len(times) else math.nan,
            steps=len(times),
            latency_ms=1000.0 * self.latency_samples() / rate,
            startup_ms=1000.0 * self.startup_samples() / rate,
        )


class _FrameRun(_Run):
    def __init__(self, model, bandwidth, chunk_frames: int, audio_out: bool):
        self.encoder = Encoder(model, bandwidth, 1, chunk_frames)
        self.decoder = None
        if audio_out:
            self.decoder = Decoder(model, 1, chunk_frames, self.encoder.num_quantizers)
        self._codes = _Growing((self.encoder.num_quantizers,), np.int32)
        super().__init__(model, audio_out, chunk_frames * model.config.hop_length)

    def compile(self) -> None:
        self.encoder.compile()
        if self.audio_out:
            self.decoder.compile()

    def push(self, audio: np.ndarray) -> bool:
        started = self.encoder.started
        codes = self.encoder.push(audio)
        self._take(codes)
        return started and codes.shape[-1] > 0

    def flush(self) -> None:
        self._take(self.encoder.flush())
        if self.audio_out:
            self.write(self.decoder.flush())

    def _take(self, codes: np.ndarray) -> None:
        self._codes.append(codes[0])
        if self.audio_out and codes.shape[-1]:
            self.write(self.decoder.push(codes))

    def codes(self, model_name: str, bandwidth) -> Codes:
        frames = self._codes.array()
        item = EncodedItem(frames[None], None, self.num_samples, (frames.shape[-1],))
        return codes_from_encoding(item, self.model.config, model_name, bandwidth, self.num_samples)

    def latency_samples(self) -> int:
        info = self.encoder.info
        if self.audio_out:
            return info.codec_latency_samples(self.encoder.chunk_frames)
        return info.encoder_latency_samples(self.encoder.chunk_frames)

    def startup_samples(self) -> int:
        return self.encoder.first_frames * self.model.config.hop_length


class _ChunkRun(_Run):
    def __init__(self, model, bandwidth, audio_out: bool):
        self.encoder = ChunkEncoder(model, bandwidth, 1)
        self.decoder = ChunkDecoder(model, 1)
        self._chunks: list = []
        # Whole chunks arrive a stride apart; push a hop at a time so a chunk codes as soon as
        # its last sample is in.
        super().__init__(model, audio_out, model.config.hop_length)

    def compile(self) -> None:
        pass  # one program per chunk length, compiled by the first full chunk

    def push(self, audio: np.ndarray) -> bool:
        chunks = self.encoder.push(audio)
        self._take(chunks)
        return bool(chunks)

    def flush(self) -> None:
        self._take(self.encoder.flush())
        if self.audio_out:
            self.write(self.decoder.flush())

    def _take(self, chunks) -> None:
        for chunk in chunks:
            self._chunks.append(chunk)
            if self.audio_out:
                self.write(self.decoder.push(chunk.codes, chunk.scale))

    def codes(self, model_name: str, bandwidth) -> Codes:
        config = self.model.config
        frames = [c.codes.shape[-1] for c in self._chunks]
        n_q = self.encoder.num_quantizers
        codes = np.zeros((len(frames), n_q, max(frames)), np.int32)
        for i, chunk in enumerate(self._chunks):
            codes[i, :, : frames[i]] = chunk.codes[0]
        scales = None
        if config.normalize:
            scales = np.array([c.scale.reshape(-1)[0] for c in self._chunks], np.float32)
        item = EncodedItem(codes, scales, self.num_samples, tuple(frames))
        return codes_from_encoding(item, config, model_name, bandwidth, self.num_samples)

    def latency_samples(self) -> int:
        return self.model.config.chunk_length

    def startup_samples(self) -> int:
        return self.model.config.chunk_length


class _Growing:
    """An array that grows along its last axis by doubling (compact, unlike a list of blocks)."""

    def __init__(self, shape: tuple[int, ...], dtype):
        self._data = np.zeros((*shape, 1024), dtype)
        self._size = 0

    def append(self, block: np.ndarray) -> None:
        need = self._size + block.shape[-1]
        if need > self._data.shape[-1]:
            size = max(need, 2 * self._data.shape[-1])
            grown = np.zeros((*self._data.shape[:-1], size), self._data.dtype)
            grown[..., : self._size] = self._data[..., : self._size]
            self._data = grown
        self._data[..., self._size : need] = block
        self._size = need

    def array(self) -> np.ndarray:
        return self._data[..., : self._size]
