"""Codes files: encodec-jax's .npz and the encodec package's .ecdc, byte for byte.

The .ecdc tests drive the package's own writer and reader (`compress_to_file`,
`decompress_from_file`) with a stand-in model that hands out or collects given codes, so the
format is checked exactly, chunking and scales included, without building a network.
"""

from __future__ import annotations

import io
import json
import struct
import sys

import numpy as np
import pytest

try:
    import torch

    from tests.reference import import_encodec
except ImportError:  # the tests that need them are skipped
    pass

from encodec_jax import ENCODEC_24KHZ, ENCODEC_32KHZ, ENCODEC_48KHZ
from encodec_jax.codes import (
    Codes,
    CodesError,
    check_codes_fit,
    codes_format,
    ecdc_model_name,
    expected_chunk_frames,
    load_codes,
    read_ecdc,
    save_codes,
    write_ecdc,
)

from .requires import needs_torch

PACKAGE_CONFIGS = {"encodec_24khz": ENCODEC_24KHZ, "encodec_48khz": ENCODEC_48KHZ}


def random_codes(name: str, length: int, n_q: int, seed: int = 0) -> Codes:
    """Codes of the package model `name` for `length` samples, with random values."""
    config = PACKAGE_CONFIGS[name]
    rng = np.random.default_rng(seed)
    frames = expected_chunk_frames(config, length)
    codes = np.zeros((len(frames), n_q, max(frames)), np.int32)
    for chunk, f in enumerate(frames):
        codes[chunk, :, :f] = rng.integers(0, config.codebook_size, (n_q, f))
    scales = rng.uniform(0.01, 1.0, len(frames)).astype(np.float32) if config.normalize else None
    return Codes(
        model=f"facebook/{name}",
        sample_rate=config.sampling_rate,
        channels=config.audio_channels,
        num_samples=length,
        bandwidth=6.0,
        codebook_size=config.codebook_size,
        audio_codes=codes,
        audio_scales=scales,
        chunk_frames=frames,
    )


class StandInModel:
    """Just what the package's compress/decompress use of a model: hands out `codes` from
    `encode` and keeps what `decode` is given."""

    def __init__(self, name: str, codes: Codes):
        config = PACKAGE_CONFIGS[name]
        self.name = name
        self.bits_per_codebook = 10
        self.sample_rate = config.sampling_rate
        self.frame_rate = config.frame_rate
        self.normalize = config.normalize
        self.segment_length = config.chunk_length
        self.segment_stride = config.chunk_stride
        self.frames = [
            (
                torch.from_numpy(codes.audio_codes[c : c + 1, :, :f].astype(np.int64)),
                None if codes.audio_scales is None else torch.tensor([[codes.audio_scales[c]]]),
            )
            for c, f in enumerate(codes.chunk_frames)
        ]
        self.decoded = None

    def encode(self, wav):
        return self.frames

    def to(self, device):
        return self

    def decode(self, frames):
        self.decoded = frames
        return torch.zeros(1, 2, 10**6)


@pytest.fixture(scope="module")
def package_compress():
    import_encodec()
    return sys.modules["encodec.compress"]  # `encodec.compress` is shadowed by a function


CASES = [
    ("encodec_24khz", 72_017, 8),  # one chunk
    ("encodec_24khz", 5, 32),  # one frame, every codebook
    ("encodec_24khz", 6_720, 2),  # the package's own reader miscounts this length's frames
    ("encodec_48khz", 97_234, 4),  # three chunks, a short last one
    ("encodec_48khz", 95_047, 2),  # the last two chunks both short
    ("encodec_48khz", 48_000, 16),
]


@needs_torch
@pytest.mark.parametrize("name,length,n_q", CASES)
def test_ecdc_is_byte_identical_to_the_package(package_compress, name, length, n_q):
    codes = random_codes(name, length, n_q)
    model = StandInModel(name, codes)
    theirs = io.BytesIO()
    channels = PACKAGE_CONFIGS[name].audio_channels
    package_compress.compress_to_file(model, torch.zeros(channels, length), theirs, use_lm=False)
    ours = io.BytesIO()
    write_ecdc(ours, codes, name)
    assert ours.getvalue() == theirs.getvalue()

    back = read_ecdc(io.BytesIO(theirs.getvalue()))
    assert back.model == name and back.num_samples == length and back.n_q == n_q
    assert back.chunk_frames == codes.chunk_frames
    np.testing.assert_array_equal(back.audio_codes, codes.audio_codes)
    if codes.audio_scales is None:
        assert back.audio_scales is None
    else:
        np.testing.assert_array_equal(back.audio_scales, codes.audio_scales)


@needs_torch
@pytest.mark.parametrize("name,length,n_q", [c for c in CASES if c[1] != 6_720])
def test_package_reads_our_ecdc(package_compress, monkeypatch, name, length, n_q):
    codes = random_codes(name, length, n_q, seed=1)
    model = StandInModel(name, codes)
    monkeypatch.setitem(package_compress.MODELS, name, lambda: model)
    buffer = io.BytesIO()
    write_ecdc(buffer, codes, name)
    package_compress.decompress_from_file(io.BytesIO(buffer.getvalue()))
    assert len(model.decoded) == len(codes.chunk_frames)
    for (got, scale), (want, want_scale) in zip(model.decoded, model.frames, strict=True):
        np.testing.assert_array_equal(got.numpy(), want.numpy())
        assert (scale is None) == (want_scale is None)
        if scale is not None:
            assert float(scale) == float(want_scale)


def test_ecdc_bandwidth_from_codebooks():
    for n_q, bandwidth in [(2, 1.5), (4, 3.0), (8, 6.0), (16, 12.0), (32, 24.0)]:
        buffer = io.BytesIO()
        write_ecdc(buffer, random_codes("encodec_24khz", 1000, n_q), "encodec_24khz")
        assert read_ecdc(io.BytesIO(buffer.getvalue())).bandwidth == bandwidth


def test_ecdc_only_for_the_package_models(tmp_path):
    assert ecdc_model_name(ENCODEC_24KHZ) == "encodec_24khz"
    assert ecdc_model_name(ENCODEC_48KHZ) == "encodec_48khz"
    with pytest.raises(CodesError, match="only hold codes of encodec_24khz or encodec_48khz"):
        ecdc_model_name(ENCODEC_32KHZ)
    codes = random_codes("encodec_24khz", 1000, 2)
    with pytest.raises(CodesError, match="use .npz"):
        save_codes(tmp_path / "x.ecdc", codes, ENCODEC_32KHZ)
    assert list(tmp_path.iterdir()) == []


def _ecdc_bytes(meta: dict, body: bytes = b"") -> bytes:
    raw = json.dumps(meta).encode()
    return struct.pack("!4sBI", b"ECDC", 0, len(raw)) + raw + body


@pytest.mark.parametrize(
    "data,message",
    [
        (b"", "too short"),
        (b"RIFF\x00\x00\x00\x00\x00", "no ECDC magic"),
        (struct.pack("!4sBI", b"ECDC", 1, 2) + b"{}", "version 1"),
        (struct.pack("!4sBI", b"ECDC", 0, 3) + b"{x}", "bad .ecdc header"),
        (_ecdc_bytes({"m": "encodec_96khz", "al": 10, "nc": 2, "lm": False}), "encodec_96khz"),
        (_ecdc_bytes({"m": "encodec_24khz", "al": 10, "nc": 2, "lm": True}), "language model"),
        (_ecdc_bytes({"m": "encodec_24khz", "al": 0, "nc": 2, "lm": False}), "bad .ecdc header"),
        (_ecdc_bytes({"m": "encodec_24khz", "al": 10, "nc": 33, "lm": False}), "bad .ecdc"),
        (_ecdc_bytes({"m": "encodec_24khz", "al": 640, "nc": 2, "lm": False}, b"\0"), "trunc"),
        (
            _ecdc_bytes({"m": "encodec_24khz", "al": 320, "nc": 4, "lm": False}, b"\0" * 6),
            "past the end",
        ),
    ],
)
def test_bad_ecdc_files(tmp_path, data, message):
    path = tmp_path / "bad.ecdc"
    path.write_bytes(data)
    with pytest.raises(CodesError, match=message) as info:
        load_codes(path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["encodec_24khz", "encodec_48khz"])
def test_npz_round_trip(tmp_path, name):
    codes = random_codes(name, 97_234, 4)
    save_codes(tmp_path / "a.npz", codes)
    back = load_codes(tmp_path / "a.npz")
    assert back.model == codes.model and back.chunk_frames == codes.chunk_frames
    assert (back.sample_rate, back.channels, back.num_samples, back.bandwidth) == (
        codes.sample_rate,
        codes.channels,
        codes.num_samples,
        codes.bandwidth,
    )
    np.testing.assert_array_equal(back.audio_codes, codes.audio_codes)
    if codes.audio_scales is not None:
        np.testing.assert_array_equal(back.audio_scales, codes.audio_scales)
    # plain NumPy reads it, without pickles, with the documented keys
    with np.load(tmp_path / "a.npz", allow_pickle=False) as data:
        assert data["audio_codes"].shape == codes.audio_codes.shape
        assert int(data["n_q"]) == 4 and int(data["codebook_size"]) == 1024
        assert str(data["model"]) == codes.model
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz"]  # no temporary left


def test_bad_npz_files(tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    with pytest.raises(CodesError, match="not a valid .npz"):
        load_codes(tmp_path / "junk.npz")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(CodesError, match="not an encodec-jax codes file"):
        load_codes(tmp_path / "other.npz")
    with pytest.raises(CodesError, match="no such file"):
        load_codes(tmp_path / "missing.npz")
    with pytest.raises(CodesError, match="unknown codes format '.wav'"):
        load_codes(tmp_path / "x.wav")
    assert codes_format("A.ECDC") == "ecdc"


def test_codes_validation():
    codes = random_codes("encodec_24khz", 1000, 2)
    bad = codes.audio_codes.copy()
    bad[0, 0, 0] = 1024
    with pytest.raises(CodesError, match=r"must lie in \[0, 1024\)"):
        Codes(**{**codes.__dict__, "audio_codes": bad})
    with pytest.raises(CodesError, match="chunk_frames"):
        Codes(**{**codes.__dict__, "chunk_frames": (2,)})


def test_check_codes_fit():
    codes = random_codes("encodec_24khz", 24_000, 2)
    check_codes_fit(codes, ENCODEC_24KHZ, "facebook/encodec_24khz")
    with pytest.raises(CodesError, match="sample rate 24000 Hz, model 32000 Hz"):
        check_codes_fit(codes, ENCODEC_32KHZ, "facebook/encodec_32khz")
    with pytest.raises(CodesError, match="1 channel.*model 2"):
        check_codes_fit(codes, ENCODEC_48KHZ, "facebook/encodec_48khz")
    too_many = Codes(**{**codes.__dict__, "audio_codes": np.zeros((1, 33, 75), np.int32)})
    with pytest.raises(CodesError, match="33 codebooks, model at most 32"):
        check_codes_fit(too_many, ENCODEC_24KHZ, "x")
    wrong_frames = Codes(**{**codes.__dict__, "num_samples": 48_000})
    with pytest.raises(CodesError, match="chunk frames"):
        check_codes_fit(wrong_frames, ENCODEC_24KHZ, "x")
