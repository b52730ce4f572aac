"""Live streams on the host: push audio or codes as they arrive, get what is ready.

    enc = Encoder(model, bandwidth=6.0, batch_size=1)  # frame streams: 24 / 32 kHz models
    for chunk in microphone_chunks():                   # [B, C, samples], any length
        codes = enc.push(chunk)                         # [B, n_q, frames ready]
    codes = enc.flush()                                 # the rest, as offline encoding ends

    dec = Decoder(model, batch_size=1)
    audio = dec.push(codes)                             # [B, C, samples ready]
    audio = dec.flush()

`Encoder` and `Decoder` run the pure steps of `streaming.codec` on fixed chunks of
`chunk_frames` frames: one compiled program per chunk size, plus one for the first step (which
needs the model's warmup frames; the stream buffers until it has them) and one for the flush.
Partial frames are kept until the next push completes them; whatever a push brings, the steps
run on whole chunks, so memory stays flat however long the stream. `compile()` compiles all
three before the stream starts.

Models that code fixed chunks (the 48 kHz model: 1 s chunks, each normalised by its own RMS)
stream chunk by chunk with `ChunkEncoder` / `ChunkDecoder`, which give exactly what offline
encoding gives per chunk, and overlap-add as offline decoding does.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple

import jax
import numpy as np

from .. import functional, ops
from . import codec as stream_codec
from .layers import StreamingError

if TYPE_CHECKING:
    from ..model import EncodecModel

_encode_step = jax.jit(stream_codec.encode_step, static_argnums=3)
_encode_flush = jax.jit(stream_codec.encode_flush, static_argnums=4)
_decode_step = jax.jit(stream_codec.decode_step)
_decode_flush = jax.jit(stream_codec.decode_flush)
# One chunk of a chunked model, exactly as offline encoding and decoding run each chunk.
_chunk_encode = jax.jit(functional.encode, static_argnums=2)
_chunk_decode = jax.jit(functional.decode)


class _Stream:
    """What encoder and decoder streams share: a pending buffer of whole frames, stepped in
    chunks of `chunk_frames` (the first chunk large enough for the warmup), and the closing."""

    def __init__(self, model, batch_size: int, chunk_frames: int, warmup_frames: int):
        for name, value in (("batch_size", batch_size), ("chunk_frames", chunk_frames)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.model = model
        self.batch_size = int(batch_size)
        self.chunk_frames = int(chunk_frames)
        # The first step takes whole chunks, as many as the warmup needs.
        self.first_frames = math.ceil(warmup_frames / chunk_frames) * chunk_frames
        self.closed = False

    @property
    def started(self) -> bool:
        """Whether the first step has run (before it, pushes only buffer)."""
        return self._state.started

    @property
    def state(self):
        """The pure steps' `StreamState` (a pytree of fixed shapes) as of the last step."""
        return self._state

    def _check_open(self, what: str) -> None:
        if self.closed:
            raise StreamingError(
                f"{what} after flush: the stream has ended; start a new {type(self).__name__}"
            )


class Encoder(_Stream):
    """Encode `batch_size` live signals chunk by chunk into codes equal to offline encoding's.

    Args:
        model: an `EncodecModel` without chunking, input normalisation or time_group_norm
            (the 24 and 32 kHz presets; `ChunkEncoder` for the 48 kHz model).
        bandwidth: kbps, one of the model's (None: its smallest, as `encode`).
        batch_size: streams coded together.
        chunk_frames: frames per step. Codes of a chunk come out with the push that completes
            it (plus the model's look-ahead, `info.encoder_lag_frames`): 1 for the lowest
            latency, more for fewer, larger steps.

    Raises:
        StreamingError: for a model that does not stream frame by frame.
    """

    def __init__(
        self,
        model: EncodecModel,
        bandwidth: float | None = None,
        batch_size: int = 1,
        chunk_frames: int = 1,
    ):
        self.codec = stream_codec.prepare(model)
        self.info = stream_codec.info(self.codec)
        super().__init__(model, batch_size, chunk_frames, self.info.encoder_warmup_frames)
        self.bandwidth = bandwidth
        self.num_quantizers = model.config.num_quantizers_for_bandwidth(bandwidth)
        self.num_samples = 0  # pushed so far, per stream
        self._state = stream_codec.init_encoder_state(self.codec, self.batch_size)
        config = model.config
        self._pending = np.zeros((self.batch_size, config.audio_channels, 0), np.float32)

    def push(self, audio) -> np.ndarray:
        """Add `audio` `[batch_size, channels, samples]` (float, any number of samples) to the
        streams and return the codes that are ready, `[batch_size, n_q, frames]` int32 (frames
        may be 0: before the warmup, or while a chunk is incomplete)."""
        self._check_open("push")
        audio = _check_audio(audio, self.batch_size, self.model.config.audio_channels)
        self.num_samples += audio.shape[-1]
        self._pending = np.concatenate([self._pending, audio], axis=-1)
        hop = self.model.config.hop_length
        out = []
        while True:
            frames = self.chunk_frames if self.started else self.first_frames
            if self._pending.shape[-1] < frames * hop:
                break
            chunk, self._pending = np.split(self._pending, [frames * hop], axis=-1)
            self._state, codes = _encode_step(self.codec, self._state, chunk, self.num_quantizers)
            out.append(np.asarray(codes))
        return self._join(out)

    def flush(self) -> np.ndarray:
        """End the streams: the codes still owed, the last frame padded as offline encoding
        pads the whole signal's end. A stream shorter than the warmup is encoded offline, as
        a whole. After this, the encoder takes no more audio."""
        self._check_open("flush")
        self.closed = True
        pending = self._pending
        if not self.started:
            if pending.shape[-1] == 0:
                return self._join([])
            encoded = self.model.encode(pending, bandwidth=self.bandwidth)
            return np.asarray(encoded.audio_codes[0])
        tail = np.zeros((*pending.shape[:2], self.chunk_frames * self.model.config.hop_length))
        tail[..., : pending.shape[-1]] = pending
        codes, count = _encode_flush(
            self.codec, self._state, tail.astype(np.float32), pending.shape[-1], self.num_quantizers
        )
        return np.asarray(codes)[..., : int(count)]

    def compile(self) -> None:
        """Compile the first-step, step and flush programs now (on a scratch state), so that
        the stream's first pushes do not wait for the compiler."""
        hop, channels = self.model.config.hop_length, self.model.config.audio_channels
        state = stream_codec.init_encoder_state(self.codec, self.batch_size)
        for frames in (self.first_frames, self.chunk_frames):
            silence = np.zeros((self.batch_size, channels, frames * hop), np.float32)
            state, _ = _encode_step(self.codec, state, silence, self.num_quantizers)
        silence = np.zeros((self.batch_size, channels, self.chunk_frames * hop), np.float32)
        jax.block_until_ready(_encode_flush(self.codec, state, silence, 0, self.num_quantizers))

    def _join(self, parts: list[np.ndarray]) -> np.ndarray:
        if not parts:
            return np.zeros((self.batch_size, self.num_quantizers, 0), np.int32)
        return np.concatenate(parts, axis=-1)


class Decoder(_Stream):
    """Decode `batch_size` live code streams chunk by chunk into audio equal to offline
    decoding's (to float32 rounding).

    Args:
        model: the model that made the codes (see `Encoder`).
        batch_size: streams decoded together.
        chunk_frames: code frames per step.
        num_quantizers: codebooks per frame; None: whatever the first push has (every push
            must then have the same).

    Raises:
        StreamingError: for a model that does not stream frame by frame.
    """

    def __init__(
        self,
        model: EncodecModel,
        batch_size: int = 1,
        chunk_frames: int = 1,
        num_quantizers: int | None = None,
    ):
        self.codec = stream_codec.prepare(model)
        self.info = stream_codec.info(self.codec)
        super().__init__(model, batch_size, chunk_frames, self.info.decoder_warmup_frames)
        limit = model.config.num_quantizers
        if num_quantizers is not None and not 1 <= num_quantizers <= limit:
            raise ValueError(f"num_quantizers must be in 1..{limit}, got {num_quantizers}")
        self.num_quantizers = num_quantizers
        self.num_frames = 0  # pushed so far, per stream
        self._state = stream_codec.init_decoder_state(self.codec, self.batch_size)
        self._pending = None  # codes [B, n_q, frames] not yet stepped

    def push(self, codes) -> np.ndarray:
        """Add codes `[batch_size, n_q, frames]` (integers from the same model) to the streams
        and return the audio that is ready, `[batch_size, channels, samples]` float32."""
        self._check_open("push")
        codes = self._check_codes(codes)
        self.num_frames += codes.shape[-1]
        self._pending = (
            codes if self._pending is None else np.concatenate([self._pending, codes], axis=-1)
        )
        out = []
        while True:
            frames = self.chunk_frames if self.started else self.first_frames
            if self._pending.shape[-1] < frames:
                break
            chunk, self._pending = np.split(self._pending, [frames], axis=-1)
            self._state, audio = _decode_step(self.codec, self._state, chunk)
            out.append(np.asarray(audio))
        return self._join(out)

    def flush(self) -> np.ndarray:
        """End the streams: the audio still owed (`frames * hop` samples in all, as offline
        decoding gives; cut the end to the encoded length). A stream shorter than the warmup
        is decoded offline, as a whole."""
        self._check_open("flush")
        self.closed = True
        pending = self._pending
        if not self.started:
            if pending is None or pending.shape[-1] == 0:
                return self._join([])
            return np.asarray(self.model.decode(pending[None], [None]).audio_values)
        tail = np.zeros((*pending.shape[:2], self.chunk_frames), np.int32)
        tail[..., : pending.shape[-1]] = pending
        audio, count = _decode_flush(self.codec, self._state, tail, pending.shape[-1])
        return np.asarray(audio)[..., : int(count)]

    def compile(self, num_quantizers: int | None = None) -> None:
        """Compile the first-step, step and flush programs now (on a scratch state) for codes
        of `num_quantizers` codebooks (default: the decoder's `num_quantizers`)."""
        n_q = num_quantizers or self.num_quantizers
        if n_q is None:
            raise ValueError("compile needs num_quantizers (give it here or to the Decoder)")
        state = stream_codec.init_decoder_state(self.codec, self.batch_size)
        for frames in (self.first_frames, self.chunk_frames):
            codes = np.zeros((self.batch_size, n_q, frames), np.int32)
            state, _ = _decode_step(self.codec, state, codes)
        codes = np.zeros((self.batch_size, n_q, self.chunk_frames), np.int32)
        jax.block_until_ready(_decode_flush(self.codec, state, codes, 0))

    def _check_codes(self, codes) -> np.ndarray:
        config = self.model.config
        codes = _check_code_array(codes, self.batch_size, config)
        if self.num_quantizers is None:
            self.num_quantizers = codes.shape[1]
        if codes.shape[1] != self.num_quantizers:
            raise StreamingError(
                f"codes have {codes.shape[1]} codebooks, the stream {self.num_quantizers}: "
                "every push of a stream must carry the same codebooks"
            )
        return codes

    def _join(self, parts: list[np.ndarray]) -> np.ndarray:
        if not parts:
            return np.zeros((self.batch_size, self.model.config.audio_channels, 0), np.float32)
        return np.concatenate(parts, axis=-1)


# ---- chunked models (48 kHz) ----
class EncodedChunk(NamedTuple):
    """The codes of one chunk of a chunked model: `codes` `[B, n_q, frames]` int32 and its
    `scale` `[B, 1]` float32 (None for models that do not normalise)."""

    codes: np.ndarray
    scale: np.ndarray | None


class ChunkEncoder:
    """Encode live signals with a chunked model (48 kHz: 1 s chunks with 1 % overlap), one
    chunk at a time as soon as it is complete: exactly the chunks, codes and scales of
    offline encoding. Latency: one chunk (`model.config.chunk_length` samples) plus compute.

    Args:
        model: an `EncodecModel` whose config has `chunk_length_s`.
        bandwidth: kbps, one of the model's (None: its smallest).
        batch_size: streams coded together.
    """

    def __init__(self, model: EncodecModel, bandwidth: float | None = None, batch_size: int = 1):
        config = model.config
        if config.chunk_length is None:
            raise StreamingError(
                "this model codes its input as one sequence, not in chunks: stream it frame by "
                "frame with streaming.Encoder"
            )
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.model, self.bandwidth, self.batch_size = model, bandwidth, batch_size
        self.num_quantizers = config.num_quantizers_for_bandwidth(bandwidth)
        self.num_samples = 0
        self.closed = False
        self._start = 0  # where the next chunk starts, in samples of the whole stream
        self._pending = np.zeros((batch_size, config.audio_channels, 0), np.float32)
        self._pending_start = 0  # the stream position of _pending's first sample

    def push(self, audio) -> list[EncodedChunk]:
        """Add `audio` `[batch_size, channels, samples]`; return the chunks completed by it."""
        if self.closed:
            raise StreamingError("push after flush: the stream has ended; start a new one")
        audio = _check_audio(audio, self.batch_size, self.model.config.audio_channels)
        self.num_samples += audio.shape[-1]
        self._pending = np.concatenate([self._pending, audio], axis=-1)
        length, stride = self.model.config.chunk_length, self.model.config.chunk_stride
        out = []
        while self._start + length <= self.num_samples:
            out.append(self._encode(self._start, length))
            self._start += stride
            self._drop_before(self._start)
        return out

    def flush(self) -> list[EncodedChunk]:
        """End the streams: the last chunks, each encoded at its own (shorter) length, as
        offline encoding ends (the reference's chunk starts: `range(0, samples, stride)`)."""
        if self.closed:
            raise StreamingError("flush after flush: the stream has already ended")
        self.closed = True
        stride = self.model.config.chunk_stride
        starts = range(self._start, self.num_samples, stride)
        return [
            self._encode(s, min(self.model.config.chunk_length, self.num_samples - s))
            for s in starts
        ]

    def _encode(self, start: int, length: int) -> EncodedChunk:
        offset = start - self._pending_start
        chunk = self._pending[..., offset : offset + length]
        codes, scale = _chunk_encode(self.model, chunk, self.num_quantizers)
        return EncodedChunk(np.asarray(codes), None if scale is None else np.asarray(scale))

    def _drop_before(self, position: int) -> None:
        cut = position - self._pending_start
        if cut > 0:
            self._pending = self._pending[..., cut:]
            self._pending_start = position


class ChunkDecoder:
    """Decode the chunks of a chunked model as they arrive and overlap-add them as offline
    decoding does: the audio of a chunk comes out with it, except the part that the next
    chunk overlaps (0.01 s at 48 kHz), which waits for that chunk (or the flush).

    Args:
        model: the model that made the chunks.
        batch_size: streams decoded together.
    """

    def __init__(self, model: EncodecModel, batch_size: int = 1):
        config = model.config
        if config.chunk_length is None:
            raise StreamingError(
                "this model codes its input as one sequence, not in chunks: stream it frame by "
                "frame with streaming.Decoder"
            )
        self.model, self.batch_size = model, batch_size
        self.num_chunks = 0
        self.closed = False
        self._window = None  # the overlap-add weights, from the first chunk's length
        self._sum = np.zeros((batch_size, config.audio_channels, 0), np.float32)
        self._weight = np.zeros((0,), np.float32)
        self._end = 0  # stream position one past the last chunk's end (for the flush)
        self._emitted = 0  # stream position of _sum's first sample
        self._num_quantizers = None

    def push(self, codes, scale=None) -> np.ndarray:
        """Decode one chunk's `codes` `[batch_size, n_q, frames]` with its `scale` `[batch_size,
        1]` (None for models that do not normalise); return the audio that is final,
        `[batch_size, channels, samples]` float32."""
        if self.closed:
            raise StreamingError("push after flush: the stream has ended; start a new one")
        config = self.model.config
        codes = _check_code_array(codes, self.batch_size, config)
        full = ops.num_frames(config.chunk_length, config.hop_length)
        if codes.shape[-1] > full:
            raise StreamingError(
                f"a chunk has at most {full} frames for this model, got {codes.shape[-1]}: "
                "push one chunk at a time"
            )
        if self._num_quantizers not in (None, codes.shape[1]):
            raise StreamingError(
                f"codes have {codes.shape[1]} codebooks, the stream {self._num_quantizers}"
            )
        self._num_quantizers = codes.shape[1]
        scale = _check_scale(scale, self.batch_size, config.normalize)
        audio = np.asarray(_chunk_decode(self.model, codes, scale))
        start = self.num_chunks * config.chunk_stride
        self.num_chunks += 1
        self._add(audio, start)
        # No later chunk starts before the next stride: everything before it is final.
        return self._take(min(start + config.chunk_stride, self._end))

    def flush(self) -> np.ndarray:
        """End the streams: the rest of the audio, up to the last chunk's end."""
        if self.closed:
            raise StreamingError("flush after flush: the stream has already ended")
        self.closed = True
        return self._take(self._end)

    def _add(self, audio: np.ndarray, start: int) -> None:
        length = audio.shape[-1]
        if self._window is None:
            self._window = ops.overlap_add_weight(length)
        weight = np.zeros(length, np.float32)
        n = min(length, len(self._window))
        weight[:n] = self._window[:n]
        self._end = start + length  # offline overlap-add ends with the last chunk
        stop = start + length - self._emitted
        if stop > self._sum.shape[-1]:
            grow = stop - self._sum.shape[-1]
            self._sum = np.pad(self._sum, ((0, 0), (0, 0), (0, grow)))
            self._weight = np.pad(self._weight, (0, grow))
        at = slice(start - self._emitted, stop)
        # The reference's order of float operations: sum of weight * frame, then the division.
        self._sum[..., at] = self._sum[..., at] + weight * audio
        self._weight[at] = self._weight[at] + weight

    def _take(self, position: int) -> np.ndarray:
        n = max(0, position - self._emitted)
        out = self._sum[..., :n] / self._weight[:n]
        self._sum, self._weight = self._sum[..., n:], self._weight[n:]
        self._emitted += n
        return out.astype(np.float32)


# ---- input checks ----
def _check_audio(audio, batch: int, channels: int) -> np.ndarray:
    if not hasattr(audio, "dtype"):
        audio = np.asarray(audio)
    if not np.issubdtype(np.dtype(audio.dtype), np.floating):
        raise StreamingError(
            f"audio must be floating point (e.g. float32 in [-1, 1]), got {audio.dtype}; convert "
            "integer PCM with x / 32768.0 first"
        )
    if audio.ndim != 3 or audio.shape[0] != batch or audio.shape[1] != channels:
        raise StreamingError(
            f"audio must be [batch, channels, samples] = [{batch}, {channels}, n] for this stream, "
            f"got shape {tuple(audio.shape)}"
        )
    audio = np.asarray(audio, np.float32)
    if not np.isfinite(audio).all():
        raise StreamingError("audio contains NaN or Inf")
    return audio


def _check_code_array(codes, batch: int, config) -> np.ndarray:
    if not hasattr(codes, "dtype"):
        codes = np.asarray(codes)
    if not np.issubdtype(np.dtype(codes.dtype), np.integer):
        raise StreamingError(f"codes must be integers, got dtype {codes.dtype}")
    if codes.ndim != 3 or codes.shape[0] != batch:
        raise StreamingError(
            f"codes must be [batch, n_q, frames] with batch {batch}, got shape {tuple(codes.shape)}"
        )
    if not 1 <= codes.shape[1] <= config.num_quantizers:
        raise StreamingError(
            f"codes have {codes.shape[1]} codebooks; this model has 1 to {config.num_quantizers}: "
            "are they codes of another model?"
        )
    codes = np.asarray(codes)
    if codes.size and (codes.min() < 0 or codes.max() >= config.codebook_size):
        raise StreamingError(
            f"codes must lie in [0, {config.codebook_size}) for this model, got values in "
            f"[{codes.min()}, {codes.max()}]: are they codes of another model?"
        )
    return codes.astype(np.int32, copy=False)


def _check_scale(scale, batch: int, normalize: bool) -> np.ndarray | None:
    if not normalize:
        if scale is not None:
            raise StreamingError("this model does not normalise its chunks: give no scale")
        return None
    if scale is None:
        raise StreamingError("this model normalises each chunk: give the chunk's scale")
    scale = np.asarray(scale, np.float32).reshape(-1)
    if scale.shape != (batch,) or not np.isfinite(scale).all():
        raise StreamingError(f"scale must be [batch, 1] finite, batch {batch}, got {scale.shape}")
    return scale[:, None]
