"""Audio files in and out: any format libsndfile reads, resampled and channel-converted to what
the model takes, with a human-readable note for every conversion made."""

from __future__ import annotations

import io
import os

import numpy as np
import soundfile as sf
import soxr

from .atomic import atomic_write

# Extensions `tokenize` treats as audio when it walks a directory (lower case). Formats outside
# this list still load when named explicitly, as long as libsndfile reads them.
AUDIO_EXTENSIONS = frozenset(
    ".wav .wave .flac .ogg .oga .opus .mp3 .aiff .aif .aifc .au .snd .caf .w64 .rf64".split()
)

# Resampling to the model's rate lengthens audio at most this much (8 kHz -> 512 kHz): a file
# claiming a lower rate would make a small file a huge array.
MAX_RESAMPLE_RATIO = 64
_BLOCK_FRAMES = 1 << 16

# libsndfile format names for the extensions whose upper-cased spelling is not one.
_WRITE_FORMATS = {".wave": "WAV", ".aif": "AIFF", ".aifc": "AIFF", ".oga": "OGG", ".snd": "AU"}


class AudioError(ValueError):
    """An audio file that cannot be read or written; the message names the file."""


def audio_info(path: str | os.PathLike) -> tuple[int, int]:
    """(frames, sample rate) of an audio file from its header, without decoding it.

    Raises:
        AudioError: if the file is missing or not audio libsndfile reads.
    """
    _check_exists(path, f"audio file {path}")
    try:
        info = sf.info(os.fspath(path))
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as err:
        raise AudioError(f"cannot read audio file {path}: {_reason(err)}") from None
    return int(info.frames), int(info.samplerate)


def load_audio(
    path: str | os.PathLike,
    sample_rate: int,
    channels: int,
    start: int = 0,
    frames: int = -1,
    *,
    name: str | None = None,
) -> tuple[np.ndarray, list[str]]:
    """Read an audio file (or a window of it) as the model takes it.

    Stereo (or more) is mixed down to mono by averaging, mono is duplicated for stereo models,
    and files with more channels than a stereo model takes keep their first two (as the
    `encodec` package's `convert_audio` does). Resampling uses soxr at high quality.

    Args:
        path: any file libsndfile reads (wav, flac, ogg/vorbis/opus, mp3, aiff, ...).
        sample_rate: the model's sampling rate in Hz.
        channels: the model's channel count (1 or 2).
        start, frames: the window to read, in the file's own frames (its sample rate): from
            `start`, `frames` of them (-1: to the end). A window past the end is cut short.
        name: what error messages call the file (default "audio file PATH").

    Returns:
        (audio `[channels, samples]` float32, notes): one note per conversion, e.g.
        "resampled 44100 -> 24000 Hz", "mixed 2 channels down to mono".

    Memory follows the samples the file really decodes to, never the length its header claims,
    and resampling may lengthen the audio at most `MAX_RESAMPLE_RATIO` times.

    Raises:
        AudioError: a missing, unreadable, corrupt or empty file, one holding NaN/Inf, or one
            whose sample rate is so low that resampling would multiply its size beyond bounds.
    """
    name = name or f"audio file {path}"
    _check_exists(path, name)
    return _read(os.fspath(path), sample_rate, channels, name, start=start, frames=frames)


def decode_audio(
    data: bytes, sample_rate: int, channels: int, name: str = "audio"
) -> tuple[np.ndarray, list[str]]:
    """`load_audio` for the bytes of an audio file held in memory (a Parquet cell, a tar member).

    Args:
        data: the whole file (wav, flac, ogg/vorbis/opus, mp3, aiff, ...: what libsndfile
            reads; not m4a/aac or wma).
        sample_rate, channels: the model's.
        name: what the error messages call it.

    Raises:
        AudioError: empty, unrecognised or corrupt data, no samples, NaN/Inf, a sample rate too
            low to resample (as `load_audio`).
    """
    if len(data) == 0:
        raise AudioError(f"cannot read {name}: it is empty (0 bytes)")
    return _read(io.BytesIO(data), sample_rate, channels, name, data[:16])


def convert_audio(
    samples: np.ndarray, rate: int, sample_rate: int, channels: int, name: str = "audio"
) -> tuple[np.ndarray, list[str]]:
    """Decoded samples (`[samples]` or `[channels, samples]`, float) at `rate` as the model takes
    them: resampled and channel-converted as `load_audio` does.

    Raises:
        AudioError: a bad layout, rate or dtype, no samples, NaN/Inf, a rate too low to
            resample (as `load_audio`).
    """
    data = np.asarray(samples)
    if data.ndim == 1:
        data = data[None]
    if data.ndim != 2 or data.shape[0] == 0:
        raise AudioError(
            f"{name}: expected samples as [samples] or [channels, samples], got shape {data.shape}"
        )
    if not np.issubdtype(data.dtype, np.floating):
        raise AudioError(f"{name}: expected floating-point samples, got {data.dtype}")
    if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)) or rate < 1:
        raise AudioError(f"{name}: expected a positive integer sampling rate, got {rate!r}")
    _check_rate(int(rate), sample_rate, name)
    return _convert(data.T.astype(np.float32), int(rate), sample_rate, channels, name)


def _read(
    file,
    sample_rate: int,
    channels: int,
    name: str,
    head: bytes | None = None,
    start: int = 0,
    frames: int = -1,
) -> tuple[np.ndarray, list[str]]:
    """A file (path or file object) decoded as `load_audio` describes; `head` (the first bytes
    of data held in memory) lets the error say why libsndfile does not know the format."""
    try:
        with sf.SoundFile(file) as f:
            rate = f.samplerate
            _check_rate(rate, sample_rate, name)
            if start:
                f.seek(start)
            data = _read_blocks(f, frames)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as err:
        if isinstance(err, AudioError):
            raise
        reason = _reason(err)
        if head is not None and "not recognised" in reason:
            reason += _unsupported_hint(head)
        raise AudioError(f"cannot read {name}: {reason}") from None
    return _convert(data, rate, sample_rate, channels, name)


def _check_rate(rate: int, sample_rate: int, name: str) -> None:
    if sample_rate > MAX_RESAMPLE_RATIO * rate:
        raise AudioError(
            f"{name} has a sample rate of {rate} Hz; resampling it to {sample_rate} Hz would "
            f"make it {sample_rate / rate:.0f} times longer (at most {MAX_RESAMPLE_RATIO} is "
            f"accepted)"
        )


def _read_blocks(f: sf.SoundFile, frames: int = -1) -> np.ndarray:
    """`frames` frames of `f` from where it stands (-1: to its end) as float32 `[frames,
    channels]`, read block by block: a header may claim any length, and reading it at once
    would allocate the claim."""
    blocks, left = [], frames
    while left != 0:
        size = _BLOCK_FRAMES if left < 0 else min(_BLOCK_FRAMES, left)
        block = f.read(size, dtype="float32", always_2d=True)
        if block.shape[0] == 0:
            break
        blocks.append(block)
        left = left - block.shape[0] if left > 0 else left
    if not blocks:
        return np.zeros((0, f.channels), np.float32)
    return blocks[0] if len(blocks) == 1 else np.concatenate(blocks)


def _convert(
    data: np.ndarray, rate: int, sample_rate: int, channels: int, name: str
) -> tuple[np.ndarray, list[str]]:
    """`[frames, source channels]` float32 at `rate` -> `[channels, samples]` at sample_rate."""
    if data.shape[0] == 0:
        raise AudioError(f"{name} holds no samples")
    if not np.isfinite(data).all():
        raise AudioError(f"{name} holds NaN or Inf samples")
    notes: list[str] = []
    source_channels = data.shape[1]
    # Mix down before resampling and duplicate after it: both are linear, so the order does not
    # change the result, and this way soxr processes as few channels as possible.
    if channels == 1 and source_channels > 1:
        data = data.mean(axis=1, keepdims=True, dtype=np.float32)
        notes.append(f"mixed {source_channels} channels down to mono")
    elif channels < source_channels:
        data = data[:, :channels]
        notes.append(f"kept the first {channels} of {source_channels} channels")
    if rate != sample_rate:
        data = soxr.resample(data, rate, sample_rate, quality="HQ")
        notes.append(f"resampled {rate} -> {sample_rate} Hz")
        if data.shape[0] == 0:
            raise AudioError(f"{name} is too short to resample to {sample_rate} Hz")
    if channels > data.shape[1]:
        data = np.repeat(data, channels, axis=1)
        notes.append(f"duplicated mono to {channels} channels")
    return np.ascontiguousarray(data.T, dtype=np.float32), notes


def _unsupported_hint(head: bytes) -> str:
    """Why libsndfile may not know these bytes, from the file's first bytes."""
    if head[4:8] == b"ftyp":
        return " (an MP4/M4A container: AAC is not among libsndfile's formats; convert it first)"
    is_mp3 = head[:3] == b"ID3" or (len(head) > 1 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0)
    if is_mp3 and "MP3" not in sf.available_formats():
        return (
            f" (MP3: this libsndfile, {sf.__libsndfile_version__}, was built without it; "
            f"1.1.0 and later have it)"
        )
    return ""


def check_writable_format(path: str | os.PathLike) -> str:
    """The libsndfile format for `path`'s extension (e.g. "WAV").

    Raises:
        AudioError: for an extension libsndfile cannot write.
    """
    ext = os.path.splitext(os.fspath(path))[1].lower()
    fmt = _WRITE_FORMATS.get(ext, ext[1:].upper())
    if not ext or fmt not in sf.available_formats():
        raise AudioError(
            f"cannot write audio to {path}: unknown audio format {ext or '(no extension)'!r} "
            f"(use .wav, .flac or .ogg)"
        )
    return fmt


def save_audio(path: str | os.PathLike, audio: np.ndarray, sample_rate: int) -> None:
    """Write `[channels, samples]` float audio to `path`, in the format its extension names.

    WAV is written as 16-bit PCM (libsndfile's default for the format; samples beyond [-1, 1]
    are clipped). The file appears complete or not at all.

    Args:
        path: output file (.wav, .flac, .ogg, ...).
        audio: `[channels, samples]` (or `[samples]`) float array.
        sample_rate: in Hz.

    Raises:
        AudioError: for an extension libsndfile cannot write.
    """
    fmt = check_writable_format(path)
    data = np.asarray(audio, dtype=np.float32)
    data = data[None] if data.ndim == 1 else data
    with atomic_write(path) as f:
        sf.write(f, data.T, sample_rate, format=fmt)


def _check_exists(path: str | os.PathLike, name: str) -> None:
    if os.path.isdir(path):
        raise AudioError(f"cannot read {name}: it is a directory")
    if not os.path.exists(path):
        raise AudioError(f"cannot read {name}: no such file")
    if os.path.getsize(path) == 0:
        raise AudioError(f"cannot read {name}: the file is empty (0 bytes)")


def _reason(err: Exception) -> str:
    # libsndfile's messages start with the file name (which we already give) and may span
    # several lines; keep the first line of what it says about the content.
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    for sep in (": ", "\n"):
        head, _, tail = text.partition(sep)
        if tail and head.startswith(("Error opening", "<")):
            return tail
    return text
