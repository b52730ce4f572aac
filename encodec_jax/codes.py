"""Codes files: EnCodec codes of one audio item with what is needed to decode them.

Two formats, chosen by the file's extension:

- `.npz` (encodec-jax's own, any model): NumPy arrays `audio_codes` `[chunks, n_q, frames]`
  (int32; a short chunk is padded with 0), `audio_scales` `[chunks]` (float32, only for models
  that normalise), `chunk_frames` `[chunks]`, and scalars `format`, `version`, `model`,
  `sample_rate`, `channels`, `num_samples`, `bandwidth`, `n_q`, `codebook_size`. Read with
  `np.load(path)`; no pickles.
- `.ecdc`, the original `encodec` package's compressed format without its entropy-coding
  language model, readable and writable by that package: the `ECDC` magic, version 0 and a JSON
  header `{"m": name, "al": num_samples, "nc": n_q, "lm": false}`, then per chunk an optional
  big-endian float32 scale and the codes bit-packed LSB first at log2(codebook_size) bits each,
  frame by frame, padded to a whole byte at the end of the chunk. The header names the model
  instead of describing it, so only the package's two models can be stored:
  'encodec_24khz' and 'encodec_48khz'.

Both readers treat the file as untrusted (`encodec_jax.untrusted`): anything damaged or hostile
is a `CodesError` naming the file, and every length the file claims is checked against the bytes
it holds before anything is allocated.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
import zipfile
import zlib
from typing import IO

import numpy as np

from . import ops
from .atomic import atomic_write
from .config import ENCODEC_24KHZ, ENCODEC_48KHZ, EncodecConfig
from .untrusted import check_zip_members, parse_json_object

FORMAT_NAME = "encodec-jax-codes"
FORMAT_VERSION = 1
FORMATS = ("npz", "ecdc")
# The models the `encodec` package knows by name, and so the only ones .ecdc can hold.
ECDC_MODELS: dict[str, EncodecConfig] = {
    "encodec_24khz": ENCODEC_24KHZ,
    "encodec_48khz": ENCODEC_48KHZ,
}
_ECDC_MAGIC = b"ECDC"
_ECDC_HEADER = struct.Struct("!4sBI")  # magic, version, JSON size
_ECDC_SCALE = struct.Struct("!f")


class CodesError(ValueError):
    """A codes file that cannot be read, written or decoded with the given model."""


@dataclasses.dataclass(frozen=True)
class Codes:
    """The codes of one audio item and what decoding them needs.

    Attributes:
        model: the model that made them: the Hub id or directory given (for .ecdc files, the
            `encodec` package's model name).
        sample_rate: the model's sampling rate in Hz.
        channels: the model's channel count.
        num_samples: length of the encoded audio in samples (at `sample_rate`).
        bandwidth: kbps.
        codebook_size: entries per codebook.
        audio_codes: `[chunks, n_q, frames]` int32; chunks shorter than `frames` padded with 0.
        audio_scales: `[chunks]` float32 for models that normalise, else None.
        chunk_frames: the real frame count of every chunk.
    """

    model: str
    sample_rate: int
    channels: int
    num_samples: int
    bandwidth: float
    codebook_size: int
    audio_codes: np.ndarray
    audio_scales: np.ndarray | None
    chunk_frames: tuple[int, ...]

    def __post_init__(self) -> None:
        codes = np.asarray(self.audio_codes)
        if codes.ndim != 3 or 0 in codes.shape or not np.issubdtype(codes.dtype, np.integer):
            raise CodesError(
                f"audio_codes must be integers [chunks, n_q, frames], got {codes.dtype} "
                f"{codes.shape}"
            )
        object.__setattr__(self, "audio_codes", codes.astype(np.int32, copy=False))
        frames = tuple(int(f) for f in self.chunk_frames)
        object.__setattr__(self, "chunk_frames", frames)
        if len(frames) != codes.shape[0] or max(frames) != codes.shape[2] or min(frames) < 1:
            raise CodesError(f"chunk_frames {frames} do not fit audio_codes of shape {codes.shape}")
        if self.audio_scales is not None:
            scales = np.asarray(self.audio_scales, dtype=np.float32).reshape(-1)
            if scales.shape != (codes.shape[0],):
                raise CodesError(
                    f"audio_scales must hold one scale per chunk ({codes.shape[0]}), got "
                    f"{scales.shape[0]}"
                )
            if not np.isfinite(scales).all():
                raise CodesError("audio_scales must be finite numbers, got NaN or Inf")
            object.__setattr__(self, "audio_scales", scales)
        if self.num_samples < 1:
            raise CodesError(f"num_samples must be positive, got {self.num_samples}")
        low, high = int(codes.min()), int(codes.max())
        if low < 0 or high >= self.codebook_size:
            raise CodesError(
                f"codes must lie in [0, {self.codebook_size}), got values in [{low}, {high}]"
            )

    @property
    def n_q(self) -> int:
        """Codebooks per frame."""
        return int(self.audio_codes.shape[1])

    def decode_args(self) -> dict:
        """Keyword arguments for `EncodecModel.decode` (a batch of one)."""
        scales = None if self.audio_scales is None else self.audio_scales[:, None, None]
        return {
            "audio_codes": self.audio_codes[:, None],
            "audio_scales": scales,
            "chunk_frames": self.chunk_frames,
        }


def codes_from_encoding(
    encoded, config: EncodecConfig, model: str, bandwidth: float | None, num_samples: int
) -> Codes:
    """`Codes` from `EncodecModel.encode`'s output for a batch of one, or a `BatchCodec` item.

    Args:
        encoded: an `EncodecEncoderOutput` (batch 1) or an `EncodedItem`.
        config: the model's config.
        model: the model's Hub id or directory, recorded in the file.
        bandwidth: the bandwidth passed to encode (None: the model's smallest).
        num_samples: the encoded audio's length.

    Returns:
        The `Codes`.
    """
    codes = np.asarray(encoded.audio_codes)
    scales = encoded.audio_scales
    if codes.ndim == 4:  # [chunks, batch, n_q, frames] from EncodecModel.encode
        if codes.shape[1] != 1:
            raise CodesError(f"expected the codes of one item, got a batch of {codes.shape[1]}")
        codes = codes[:, 0]
        if scales is not None and all(s is None for s in scales):
            scales = None
        if scales is not None:
            scales = np.array([np.asarray(s).reshape(-1)[0] for s in scales], np.float32)
    if bandwidth is None:
        bandwidth = config.target_bandwidths[0]
    frames = encoded.chunk_frames
    if frames is None:
        frames = expected_chunk_frames(config, num_samples)
    return Codes(
        model=str(model),
        sample_rate=config.sampling_rate,
        channels=config.audio_channels,
        num_samples=int(num_samples),
        bandwidth=float(bandwidth),
        codebook_size=config.codebook_size,
        audio_codes=codes,
        audio_scales=scales,
        chunk_frames=tuple(frames),
    )


def expected_chunk_frames(config: EncodecConfig, num_samples: int) -> tuple[int, ...]:
    """Frames of each chunk the model makes from `num_samples` samples."""
    bounds = ops.chunk_bounds(num_samples, config.chunk_length, config.chunk_stride)
    return tuple(ops.num_frames(length, config.hop_length) for _, length in bounds)


def check_codes_fit(codes: Codes, config: EncodecConfig, model: str) -> None:
    """Raise `CodesError` unless `model` (with `config`) can decode `codes`.

    Args:
        codes: read from a file.
        config: the decoding model's config.
        model: its name as the user gave it, for the message.
    """
    problems = []
    if codes.model in ECDC_MODELS and config != ECDC_MODELS[codes.model]:
        problems.append(f"the file was written by the encodec package's {codes.model}")
    if codes.sample_rate != config.sampling_rate:
        problems.append(f"sample rate {codes.sample_rate} Hz, model {config.sampling_rate} Hz")
    if codes.channels != config.audio_channels:
        problems.append(f"{codes.channels} channel(s), model {config.audio_channels}")
    if codes.codebook_size != config.codebook_size:
        problems.append(f"codebook size {codes.codebook_size}, model {config.codebook_size}")
    if codes.n_q > config.num_quantizers:
        problems.append(f"{codes.n_q} codebooks, model at most {config.num_quantizers}")
    if (codes.audio_scales is not None) != config.normalize:
        problems.append("scales " + ("present" if codes.audio_scales is not None else "missing"))
    # The chunk count in O(1) first: the list of expected chunk frames has one entry per chunk,
    # and a damaged file may claim any number of samples.
    chunks = -(-codes.num_samples // (config.chunk_stride or codes.num_samples))
    if not problems and chunks != len(codes.chunk_frames):
        problems.append(
            f"{len(codes.chunk_frames)} chunk(s), model {chunks} for {codes.num_samples} samples"
        )
    if not problems and codes.chunk_frames != expected_chunk_frames(config, codes.num_samples):
        problems.append(
            f"chunk frames {codes.chunk_frames}, model "
            f"{expected_chunk_frames(config, codes.num_samples)} for {codes.num_samples} samples"
        )
    if problems:
        if codes.model == model:
            raise CodesError(
                f"these codes say they were made by {model}, but they do not fit it: "
                f"{'; '.join(problems)}"
            )
        raise CodesError(
            f"these codes were made by {codes.model}, not by a model like {model}: "
            f"{'; '.join(problems)}"
        )


# ---- files ----
def codes_format(path: str | os.PathLike) -> str:
    """ "npz" or "ecdc" from the file's extension.

    Raises:
        CodesError: for any other extension.
    """
    ext = os.path.splitext(os.fspath(path))[1].lower().lstrip(".")
    if ext not in FORMATS:
        raise CodesError(
            f"unknown codes format {'.' + ext if ext else '(no extension)'!r} for {path}: "
            f"use .npz or .ecdc"
        )
    return ext


def save_codes(path: str | os.PathLike, codes: Codes, config: EncodecConfig | None = None) -> None:
    """Write `codes` to `path` (.npz or .ecdc by extension); the file appears complete or not
    at all.

    Args:
        path: output file.
        codes: what to store.
        config: the model's config; .ecdc needs it to name the model.

    Raises:
        CodesError: for an unknown extension, or .ecdc with a model the encodec package does
            not know.
    """
    fmt = codes_format(path)
    if fmt == "ecdc":
        name = ecdc_model_name(config)
        with atomic_write(path) as f:
            write_ecdc(f, codes, name)
    else:
        with atomic_write(path) as f:
            write_npz(f, codes)


def load_codes(path: str | os.PathLike) -> Codes:
    """Read a codes file (.npz or .ecdc by extension).

    Raises:
        CodesError: for a missing, unreadable, malformed, damaged or hostile file, naming it.
    """
    fmt = codes_format(path)
    if not os.path.isfile(path):
        raise CodesError(f"cannot read codes file {path}: no such file")
    try:
        with open(path, "rb") as f:
            if fmt == "ecdc":
                return read_ecdc(f, name=os.fspath(path))
            return read_npz(f, name=os.fspath(path))
    except OSError as err:
        raise CodesError(f"cannot read codes file {path}: {err.strerror or err}") from None


def write_npz(f: IO[bytes], codes: Codes) -> None:
    """Write `codes` as encodec-jax's .npz to the binary file object `f`."""
    arrays = {
        "format": np.array(FORMAT_NAME),
        "version": np.array(FORMAT_VERSION),
        "model": np.array(codes.model),
        "sample_rate": np.array(codes.sample_rate),
        "channels": np.array(codes.channels),
        "num_samples": np.array(codes.num_samples),
        "bandwidth": np.array(codes.bandwidth),
        "n_q": np.array(codes.n_q),
        "codebook_size": np.array(codes.codebook_size),
        "audio_codes": codes.audio_codes,
        "chunk_frames": np.array(codes.chunk_frames, np.int64),
    }
    if codes.audio_scales is not None:
        arrays["audio_scales"] = codes.audio_scales
    np.savez_compressed(f, **arrays)


def read_npz(f: IO[bytes], name: str = "codes file") -> Codes:
    """Read encodec-jax's .npz from the seekable binary file object `f` (`name` is for messages).

    Only the documented arrays are read, each after checking that the shape its header claims
    is what its bytes hold; object (pickled) arrays are refused.

    Raises:
        CodesError: for anything but a well-formed codes .npz.
    """
    size = f.seek(0, os.SEEK_END)
    f.seek(0)
    try:
        with zipfile.ZipFile(f) as archive:
            members = check_zip_members(archive, size, f"codes file {name}", CodesError)
            arrays = {
                info.filename[: -len(".npy")]: _read_npy(archive, info, name)
                for info in members
                if info.filename[: -len(".npy")] in _NPZ_KEYS and info.filename.endswith(".npy")
            }
    except CodesError:
        raise
    except (
        zipfile.BadZipFile,
        zlib.error,
        EOFError,
        OSError,
        ValueError,
        struct.error,
        NotImplementedError,  # a zip version zipfile does not read
    ) as err:
        raise CodesError(f"cannot read codes file {name}: not a valid .npz ({err})") from None
    form = arrays.get("format")
    if form is None or form.shape != () or form.dtype.kind != "U" or str(form) != FORMAT_NAME:
        raise CodesError(f"{name} is not an encodec-jax codes file (no format '{FORMAT_NAME}')")
    version = _npz_int(arrays, "version", name) if "version" in arrays else 0
    if version > FORMAT_VERSION:
        raise CodesError(
            f"{name} is codes format version {version}; this encodec-jax reads "
            f"up to version {FORMAT_VERSION}"
        )
    missing = [key for key in _NPZ_REQUIRED if key not in arrays]
    if missing:
        raise CodesError(f"codes file {name} lacks {', '.join(missing)}")
    numbers = {
        key: _npz_int(arrays, key, name)
        for key in ("sample_rate", "channels", "num_samples", "n_q", "codebook_size")
    }
    for key, value in numbers.items():
        if value < 1:
            raise CodesError(f"codes file {name} is malformed: {key} must be positive, got {value}")
    bandwidth = _npz_float(arrays, "bandwidth", name)
    frames = arrays["chunk_frames"]
    if frames.ndim != 1 or frames.dtype.kind not in "iu":
        raise CodesError(
            f"codes file {name} is malformed: chunk_frames must be a list of integers, got "
            f"{frames.dtype} {frames.shape}"
        )
    try:
        codes = Codes(
            model=_npz_text(arrays, "model", name),
            sample_rate=numbers["sample_rate"],
            channels=numbers["channels"],
            num_samples=numbers["num_samples"],
            bandwidth=bandwidth,
            codebook_size=numbers["codebook_size"],
            audio_codes=arrays["audio_codes"],
            audio_scales=arrays.get("audio_scales"),
            chunk_frames=tuple(int(x) for x in frames),
        )
    except (TypeError, ValueError) as err:
        raise CodesError(f"codes file {name} is malformed: {err}") from None
    if codes.n_q != numbers["n_q"]:
        raise CodesError(f"codes file {name} is malformed: n_q does not match audio_codes")
    return codes


_NPZ_REQUIRED = (
    "model sample_rate channels num_samples bandwidth n_q codebook_size audio_codes chunk_frames"
).split()
_NPZ_KEYS = frozenset(["format", "version", "audio_scales", *_NPZ_REQUIRED])
# The dtype kinds a codes .npz holds: signed and unsigned integers, floats, text.
_NPZ_KINDS = "iufU"


def _read_npy(archive: zipfile.ZipFile, info: zipfile.ZipInfo, name: str) -> np.ndarray:
    """One .npy member, allocated only once its header's shape matches its size."""
    key = info.filename[: -len(".npy")]
    with archive.open(info) as member:
        version = np.lib.format.read_magic(member)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(member)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(member)
        else:
            raise CodesError(f"codes file {name} is malformed: {key} is .npy version {version}")
        if dtype.hasobject or dtype.kind not in _NPZ_KINDS or dtype.itemsize == 0:
            raise CodesError(f"codes file {name} is malformed: {key} has dtype {dtype}")
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes != info.file_size - member.tell():
            raise CodesError(
                f"codes file {name} is corrupt: its {key} claims shape {shape} of {dtype} "
                f"({nbytes} bytes) but holds {info.file_size - member.tell()} bytes"
            )
        data = member.read(nbytes)
    if len(data) != nbytes:
        raise CodesError(f"codes file {name} is truncated: {key} ends early")
    order = "F" if fortran else "C"
    return np.frombuffer(data, dtype).reshape(shape, order=order).copy()


def _npz_scalar(arrays: dict[str, np.ndarray], key: str, name: str, kinds: str, what: str):
    value = arrays[key]
    if value.shape != () or value.dtype.kind not in kinds:
        raise CodesError(
            f"codes file {name} is malformed: {key} must be {what}, got {value.dtype} {value.shape}"
        )
    return value.item()


def _npz_int(arrays: dict[str, np.ndarray], key: str, name: str) -> int:
    return int(_npz_scalar(arrays, key, name, "iu", "one integer"))


def _npz_float(arrays: dict[str, np.ndarray], key: str, name: str) -> float:
    value = float(_npz_scalar(arrays, key, name, "iuf", "one number"))
    if not math.isfinite(value) or value <= 0:
        raise CodesError(f"codes file {name} is malformed: {key} must be positive, got {value}")
    return value


def _npz_text(arrays: dict[str, np.ndarray], key: str, name: str) -> str:
    return str(_npz_scalar(arrays, key, name, "U", "text"))


# ---- .ecdc, the encodec package's format ----
def ecdc_model_name(config: EncodecConfig | None) -> str:
    """The encodec package's name for a model with `config`.

    Raises:
        CodesError: for any model other than the package's 24 and 48 kHz ones.
    """
    for name, known in ECDC_MODELS.items():
        if config == known:
            return name
    raise CodesError(
        ".ecdc files name the encodec package's model instead of describing it, so they can "
        "only hold codes of encodec_24khz or encodec_48khz (the architecture of "
        "facebook/encodec_24khz or facebook/encodec_48khz); use .npz for this model"
    )


def write_ecdc(f: IO[bytes], codes: Codes, name: str) -> None:
    """Write `codes` as the encodec package writes them with `use_lm=False`.

    Args:
        f: binary file object.
        codes: codes of the model `name`.
        name: 'encodec_24khz' or 'encodec_48khz'.
    """
    config = ECDC_MODELS[name]
    check_codes_fit(codes, config, name)
    # Same keys, order and json.dumps defaults as the package, so the bytes are identical.
    meta = json.dumps({"m": name, "al": codes.num_samples, "nc": codes.n_q, "lm": False})
    meta_bytes = meta.encode("utf-8")
    f.write(_ECDC_HEADER.pack(_ECDC_MAGIC, 0, len(meta_bytes)))
    f.write(meta_bytes)
    bits = _ecdc_bits(config)
    for chunk, frames in enumerate(codes.chunk_frames):
        if codes.audio_scales is not None:
            f.write(_ECDC_SCALE.pack(float(codes.audio_scales[chunk])))
        # frame-major: all codebooks of frame 0, then of frame 1, ...
        values = codes.audio_codes[chunk, :, :frames].T.reshape(-1)
        f.write(_pack_bits(values, bits))


def read_ecdc(f: IO[bytes], name: str = "codes file") -> Codes:
    """Read an .ecdc file (without entropy coding) from the binary file object `f`.

    Chunk boundaries and frame counts follow from the header's audio length as in the
    package's `decompress`; frames are counted exactly (ceil(samples / hop)), which is what the
    encoder emits. The bytes the header's length calls for are checked against the file before
    anything is allocated.

    Raises:
        CodesError: for anything but a well-formed .ecdc file without entropy coding.
    """
    data = f.read()
    if len(data) < _ECDC_HEADER.size:
        raise CodesError(f"cannot read codes file {name}: too short for an .ecdc header")
    magic, version, meta_size = _ECDC_HEADER.unpack_from(data)
    if magic != _ECDC_MAGIC:
        raise CodesError(f"cannot read codes file {name}: not an .ecdc file (no ECDC magic)")
    if version != 0:
        raise CodesError(f"cannot read codes file {name}: .ecdc version {version} unsupported")
    offset = _ECDC_HEADER.size + meta_size
    if offset > len(data):
        raise CodesError(
            f"cannot read codes file {name}: truncated .ecdc header (it claims {meta_size} "
            f"bytes, the file holds {len(data) - _ECDC_HEADER.size} after the first "
            f"{_ECDC_HEADER.size})"
        )
    try:
        meta = parse_json_object(data[_ECDC_HEADER.size : offset], "it", ValueError)
    except ValueError as err:
        raise CodesError(f"cannot read codes file {name}: bad .ecdc header ({err})") from None
    model, length, n_q, use_lm = (meta.get(key) for key in ("m", "al", "nc", "lm"))
    if not isinstance(model, str) or model not in ECDC_MODELS:
        raise CodesError(
            f"{name} was written by model {model!r}; .ecdc files name encodec_24khz or "
            f"encodec_48khz"
        )
    if use_lm is not False:
        raise CodesError(
            f"{name} is entropy-coded with the encodec package's language model (lm: true), "
            "which encodec-jax does not implement; decode it with the encodec package"
        )
    config = ECDC_MODELS[model]
    valid_int = all(isinstance(v, int) and not isinstance(v, bool) for v in (length, n_q))
    if not valid_int or length < 1 or not 1 <= n_q <= config.num_quantizers:
        raise CodesError(f"{name} has a bad .ecdc header: {meta}")
    bits = _ecdc_bits(config)
    payload = len(data) - offset
    # Chunks cover every sample, so the codes take at least this many bytes. Checked before the
    # chunk list (one entry per chunk) and the code array are made: the header may claim any
    # length.
    chunks = -(-length // (config.chunk_stride or length))
    least = math.ceil(ops.num_frames(length, config.hop_length) * n_q * bits / 8)
    least += _ECDC_SCALE.size * chunks if config.normalize else 0
    if least > payload:
        raise CodesError(
            f"{name} ends before its last chunk: truncated .ecdc file (its header claims "
            f"{length} samples, whose codes take at least {least} bytes; it holds {payload})"
        )
    frames = expected_chunk_frames(config, length)
    scale_size = _ECDC_SCALE.size if config.normalize else 0
    sizes = [scale_size + math.ceil(n * n_q * bits / 8) for n in frames]
    if sum(sizes) < payload:
        raise CodesError(f"{name} has data past the end of its last chunk: corrupt .ecdc file")
    if sum(sizes) > payload:
        raise CodesError(f"{name} ends before its last chunk: truncated .ecdc file")
    codes = np.zeros((len(frames), n_q, max(frames)), np.int32)
    scales = np.zeros(len(frames), np.float32) if config.normalize else None
    for chunk, (n_frames, size) in enumerate(zip(frames, sizes, strict=True)):
        if scales is not None:
            scales[chunk] = _ECDC_SCALE.unpack_from(data, offset)[0]
        packed = memoryview(data)[offset + scale_size : offset + size]
        codes[chunk, :, :n_frames] = (
            _unpack_bits(packed, n_frames * n_q, bits).reshape(n_frames, n_q).T
        )
        offset += size
    return Codes(
        model=model,
        sample_rate=config.sampling_rate,
        channels=config.audio_channels,
        num_samples=length,
        bandwidth=_bandwidth_for(config, n_q),
        codebook_size=config.codebook_size,
        audio_codes=codes,
        audio_scales=scales,
        chunk_frames=frames,
    )


def _ecdc_bits(config: EncodecConfig) -> int:
    return int(math.log2(config.codebook_size))


def _bandwidth_for(config: EncodecConfig, n_q: int) -> float:
    """The target bandwidth that uses n_q codebooks (else the bandwidth n_q codebooks carry)."""
    for bandwidth in config.target_bandwidths:
        if config.num_quantizers_for_bandwidth(bandwidth) == n_q:
            return bandwidth
    return n_q * config.frame_rate * config.codebook_nbits / 1000


def _pack_bits(values: np.ndarray, bits: int) -> bytes:
    """Values LSB first into a bit stream, the last byte zero-padded (the package's BitPacker
    followed by flush)."""
    stream = (values.astype(np.int64)[:, None] >> np.arange(bits)) & 1
    return np.packbits(stream.astype(np.uint8).reshape(-1), bitorder="little").tobytes()


def _unpack_bits(packed: bytes | memoryview, count: int, bits: int) -> np.ndarray:
    """`count` values of `bits` bits, LSB first, as int32 (the inverse of `_pack_bits`).

    Unpacked in blocks of whole bytes, so the bit array never exceeds one block.
    """
    out = np.empty(count, np.int32)
    weights = np.left_shift(1, np.arange(bits, dtype=np.int32))
    block = 8 * 8192  # values per block; a multiple of 8 starts every block on a byte
    for start in range(0, count, block):
        n = min(block, count - start)
        chunk = np.frombuffer(packed, np.uint8, math.ceil(n * bits / 8), start * bits // 8)
        stream = np.unpackbits(chunk, bitorder="little")[: n * bits].reshape(n, bits)
        out[start : start + n] = stream.astype(np.int32) @ weights
    return out
