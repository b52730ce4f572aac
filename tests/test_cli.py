"""The `encodec-jax` command line and `encodec_jax.audio`: real files in every format soundfile
writes, resampling and channel conversion, codes equal to the library's, the encodec package's
.ecdc both ways, and one clear line for every error."""

from __future__ import annotations

import atexit
import functools
import io
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import soundfile as sf
import soxr
from flax import nnx

from encodec_jax import ENCODEC_24KHZ, EncodecConfig, EncodecModel
from encodec_jax.audio import AudioError, load_audio, save_audio
from encodec_jax.cli import main
from encodec_jax.codes import Codes, load_codes, save_codes

from .requires import needs_torch

# A codec small enough to compile in a second or two: 16 kHz, hop 32, 16-entry codebooks.
TINY = EncodecConfig(
    sampling_rate=16_000,
    upsampling_ratios=(4, 4, 2),
    num_filters=4,
    hidden_size=8,
    codebook_size=16,
    num_lstm_layers=1,
    target_bandwidths=(2.0, 4.0),
)


def random_model(config: EncodecConfig, seed: int = 0) -> EncodecModel:
    """A model with random weights whose codes vary (codebooks filled from its own encoder's
    output, as `tests/reference.py` does for the PyTorch models).

    Built from the abstract model with NumPy values: initialising through `nnx.Rngs` takes
    seconds per module tree on CPU.
    """
    abstract = nnx.eval_shape(lambda: EncodecModel(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(seed)
    flat = []
    for path, var in nnx.to_flat_state(state):
        name = str(path[-1])
        if name in ("weight_g", "weight"):
            value = np.ones(var.shape)
        elif "bias" in name:
            value = rng.normal(0, 0.01, var.shape)
        else:
            value = rng.normal(0, 1 / np.sqrt(max(1, np.prod(var.shape[1:]))), var.shape)
        flat.append((path, var.replace(jnp.asarray(value, jnp.float32))))
    model = nnx.merge(graphdef, nnx.from_flat_state(flat))
    # enough frames for every codebook entry to be a different one
    seconds = -(-config.codebook_size // config.frame_rate) + 1
    audio = rng.normal(0, 0.2, (1, config.sampling_rate * seconds, config.audio_channels))
    residual = np.asarray(jax.jit(lambda m, x: m.encoder(x))(model, jnp.asarray(audio)))[0]
    for layer in model.quantizer.layers:
        embed = residual[rng.choice(len(residual), config.codebook_size, replace=False)]
        embed = embed + rng.normal(0, 0.1 * residual.std(0), embed.shape)
        layer.codebook.embed[...] = jnp.asarray(embed, jnp.float32)
        nearest = ((residual[:, None] - embed[None]) ** 2).sum(-1).argmin(1)
        residual = residual - embed[nearest]
    return model


@functools.cache
def tiny_checkpoint() -> str:
    """A saved TINY model (built once per test session)."""
    root = tempfile.mkdtemp(prefix="encodec-jax-tiny-")
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    directory = os.path.join(root, "tiny")
    random_model(TINY).save_pretrained(directory)
    return directory


@functools.cache
def tiny_model() -> EncodecModel:
    return EncodecModel.from_pretrained(tiny_checkpoint())


def tone(seconds: float, rate: int, channels: int, seed: int = 0) -> np.ndarray:
    """`[samples, channels]` float32 test audio: a chirp plus a little noise, peak ~0.6."""
    t = np.arange(round(seconds * rate)) / rate
    rng = np.random.default_rng(seed)
    chirp = 0.5 * np.sin(2 * np.pi * (200 + 300 * seed) * t * (1 + t))
    data = chirp[:, None] * np.linspace(1.0, 0.6, channels)[None] + rng.normal(
        0, 0.03, (len(t), channels)
    )
    return data.astype(np.float32)


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `encodec-jax argv...` run in this process."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:  # argparse's usage errors
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and "error" in lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]


# ---- audio.py ----
@pytest.mark.parametrize("fmt", ["wav", "flac", "ogg"])
@pytest.mark.parametrize("rate", [16_000, 44_100, 48_000])
def test_load_audio_formats_and_rates(tmp_path, fmt, rate):
    data = tone(0.5, rate, 1)
    path = tmp_path / f"a.{fmt}"
    sf.write(path, data, rate)
    audio, notes = load_audio(path, 16_000, 1)
    assert audio.dtype == np.float32 and audio.shape[0] == 1
    assert audio.shape[1] == 8000  # 0.5 s at 16 kHz whatever the source rate
    if rate == 16_000:
        assert notes == []
    else:
        assert notes == [f"resampled {rate} -> 16000 Hz"]
    if fmt != "ogg":  # lossless: the samples are soxr's resampling of what was written
        source = sf.read(path, dtype="float32", always_2d=True)[0]
        expected = source if rate == 16_000 else soxr.resample(source, rate, 16_000, "HQ")
        np.testing.assert_allclose(audio, expected.T, atol=1e-6)
    else:  # Vorbis is lossy: just close to the resampled input
        reference = data if rate == 16_000 else soxr.resample(data, rate, 16_000, "HQ")
        assert np.abs(audio - reference.T).max() < 0.1


def test_load_audio_channels(tmp_path):
    stereo = tone(0.25, 16_000, 2)
    sf.write(tmp_path / "stereo.wav", stereo, 16_000, subtype="FLOAT")
    mono, notes = load_audio(tmp_path / "stereo.wav", 16_000, 1)
    assert notes == ["mixed 2 channels down to mono"]
    np.testing.assert_allclose(mono[0], stereo.mean(axis=1), atol=1e-7)

    sf.write(tmp_path / "mono.flac", stereo[:, :1], 48_000)
    both, notes = load_audio(tmp_path / "mono.flac", 24_000, 2)
    assert notes == ["resampled 48000 -> 24000 Hz", "duplicated mono to 2 channels"]
    assert both.shape == (2, 2000)
    np.testing.assert_array_equal(both[0], both[1])

    six = np.repeat(stereo[:, :1], 6, axis=1) * np.arange(1, 7)[None]
    sf.write(tmp_path / "six.wav", six.astype(np.float32) / 6, 16_000, subtype="FLOAT")
    two, notes = load_audio(tmp_path / "six.wav", 16_000, 2)
    assert notes == ["kept the first 2 of 6 channels"]
    np.testing.assert_allclose(two, six[:, :2].T / 6, atol=1e-7)


@pytest.mark.skipif("MP3" not in sf.available_formats(), reason="libsndfile without MP3")
def test_load_audio_mp3(tmp_path):
    sf.write(tmp_path / "a.mp3", tone(0.5, 44_100, 2), 44_100)
    audio, notes = load_audio(tmp_path / "a.mp3", 16_000, 1)
    assert audio.shape[0] == 1 and abs(audio.shape[1] - 8000) < 1200  # mp3 adds priming
    assert notes == ["mixed 2 channels down to mono", "resampled 44100 -> 16000 Hz"]


def test_load_audio_errors(tmp_path):
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunkjunk")
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "text.txt").write_text("hello")
    sf.write(tmp_path / "silent.wav", np.zeros((0, 1), np.float32), 16_000)
    sf.write(tmp_path / "nan.wav", np.full((10, 1), np.nan, np.float32), 16_000, subtype="FLOAT")
    cases = {
        "corrupt.wav": "cannot read audio file",
        "empty.wav": "the file is empty",
        "text.txt": "Format not recognised",
        "silent.wav": "holds no samples",
        "nan.wav": "NaN or Inf",
        "missing.wav": "no such file",
        ".": "is a directory",
    }
    for name, message in cases.items():
        path = tmp_path / name
        with pytest.raises(AudioError, match=message) as info:
            load_audio(path, 16_000, 1)
        assert str(path) in str(info.value)


def test_save_audio(tmp_path):
    audio = tone(0.25, 16_000, 2).T
    save_audio(tmp_path / "out.flac", audio, 16_000)
    back, rate = sf.read(tmp_path / "out.flac", dtype="float32", always_2d=True)
    assert rate == 16_000 and back.shape == (4000, 2)
    np.testing.assert_allclose(back.T, audio, atol=1e-4)
    with pytest.raises(AudioError, match="unknown audio format '.xyz'"):
        save_audio(tmp_path / "out.xyz", audio, 16_000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.flac"]


# ---- encode / decode / reconstruct ----
def test_encode_decode_npz(tmp_path, capsys):
    sf.write(tmp_path / "in.wav", tone(1.0, 44_100, 2), 44_100)
    code, out, err = run_cli(
        capsys,
        "encode",
        tmp_path / "in.wav",
        "-o",
        tmp_path / "in.npz",
        "--model",
        tiny_checkpoint(),
        "--bandwidth",
        "4",
    )
    assert code == 0, err
    assert "mixed 2 channels down to mono" in out and "resampled 44100 -> 16000 Hz" in out
    codes = load_codes(tmp_path / "in.npz")
    audio, _ = load_audio(tmp_path / "in.wav", 16_000, 1)
    model = tiny_model()
    expected = model.encode(audio[None], bandwidth=4.0)
    np.testing.assert_array_equal(codes.audio_codes, np.asarray(expected.audio_codes)[:, 0])
    assert (codes.n_q, codes.num_samples, codes.bandwidth) == (2, 16_000, 4.0)
    assert codes.model == tiny_checkpoint() and codes.sample_rate == 16_000

    # decode with the model the file names (no --model), to FLOAT wav for an exact comparison
    code, out, err = run_cli(capsys, "decode", tmp_path / "in.npz", "-o", tmp_path / "dec.flac")
    assert code == 0, err
    decoded, rate = sf.read(tmp_path / "dec.flac", dtype="float32", always_2d=True)
    reference = np.asarray(model.decode(expected.audio_codes, expected.audio_scales).audio_values)
    assert rate == 16_000 and decoded.shape == (16_000, 1)
    np.testing.assert_allclose(decoded[:, 0], reference[0, 0, :16_000], atol=2e-4)

    code, out, err = run_cli(
        capsys, "reconstruct", tmp_path / "in.wav", "-o", tmp_path / "rec.wav", "--model",
        tiny_checkpoint(), "--bandwidth", "4",
    )  # fmt: skip
    assert code == 0, err
    rec, rate = sf.read(tmp_path / "rec.wav", dtype="float32", always_2d=True)
    assert rate == 16_000 and rec.shape == (16_000, 1)
    np.testing.assert_allclose(rec[:, 0], decoded[:, 0], atol=1e-4)  # 16-bit PCM


def test_encode_several_files(tmp_path, capsys):
    sf.write(tmp_path / "a.flac", tone(1.0, 16_000, 1), 16_000)
    sf.write(tmp_path / "b.ogg", tone(1.0, 48_000, 1, seed=1), 48_000)
    code, out, err = run_cli(
        capsys, "encode", tmp_path / "a.flac", tmp_path / "b.ogg", "-o", tmp_path / "codes",
        "--model", tiny_checkpoint(),
    )  # fmt: skip
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "codes").iterdir()) == ["a.npz", "b.npz"]
    model = tiny_model()
    for name in ("a.flac", "b.ogg"):
        audio, _ = load_audio(tmp_path / name, 16_000, 1)
        codes = load_codes(tmp_path / "codes" / (Path(name).stem + ".npz"))
        expected = np.asarray(model.encode(audio[None]).audio_codes)[:, 0]
        np.testing.assert_array_equal(codes.audio_codes, expected)

    # one failing input: an error, and no output at all
    (tmp_path / "bad.wav").write_bytes(b"junk")
    code, out, err = run_cli(
        capsys, "encode", tmp_path / "a.flac", tmp_path / "bad.wav", "-o", tmp_path / "more",
        "--model", tiny_checkpoint(),
    )  # fmt: skip
    assert_one_line_error(code, err, "bad.wav")
    assert not (tmp_path / "more").exists()

    code, out, err = run_cli(
        capsys, "encode", tmp_path / "a.flac", tmp_path / "codes" / ".." / "a.flac", "-o",
        tmp_path / "dup", "--model", tiny_checkpoint(),
    )  # fmt: skip
    assert_one_line_error(code, err, "would both be written to")


def make_codes_file(path: Path, **changes) -> None:
    """A codes file of TINY's layout for 1 s of audio, with `changes` to its fields."""
    fields = dict(
        model="x",
        sample_rate=16_000,
        channels=1,
        num_samples=16_000,
        bandwidth=2.0,
        codebook_size=16,
        audio_codes=np.ones((1, 1, 500), np.int32),
        audio_scales=None,
        chunk_frames=(500,),
    )
    fields.update(changes)
    save_codes(path, Codes(**fields))


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"sample_rate": 24_000}, "sample rate 24000 Hz, model 16000 Hz"),
        (
            {"codebook_size": 1024, "audio_codes": np.full((1, 1, 500), 700, np.int32)},
            "codebook size 1024, model 16",
        ),
        ({"audio_codes": np.ones((1, 3, 500), np.int32)}, "3 codebooks, model at most 2"),
        ({"channels": 2}, "2 channel(s), model 1"),
        ({"num_samples": 8_000}, "chunk frames (500,), model (250,)"),
    ],
)
def test_decode_codes_of_another_model(tmp_path, capsys, changes, message):
    make_codes_file(tmp_path / "c.npz", **changes)
    code, _, err = run_cli(
        capsys, "decode", tmp_path / "c.npz", "-o", tmp_path / "out.wav", "--model",
        tiny_checkpoint(),
    )  # fmt: skip
    assert_one_line_error(code, err, "not by a model like", message)
    assert not (tmp_path / "out.wav").exists()


def test_cli_errors_are_one_line(tmp_path, capsys):
    tiny = tiny_checkpoint()
    sf.write(tmp_path / "a.wav", tone(1.0, 16_000, 1), 16_000)
    (tmp_path / "notes.txt").write_text("not audio")
    (tmp_path / "junk.npz").write_bytes(b"junk")
    (tmp_path / "file").write_text("x")
    a, out = tmp_path / "a.wav", tmp_path / "out"
    cases = [
        (["encode", tmp_path / "missing.wav", "-o", f"{out}.npz", "--model", tiny], "no such"),
        (["encode", a, "-o", f"{out}.mp4", "--model", tiny], "unknown codes format '.mp4'"),
        (["encode", tmp_path / "notes.txt", "-o", f"{out}.npz", "--model", tiny], "notes.txt"),
        (["encode", a, "-o", f"{out}.npz", "--model", tiny, "--bandwidth", "3"], "bandwidth 3.0"),
        (["encode", a, "-o", f"{out}.npz", "--model", tmp_path / "nomodel"], "nomodel"),
        (["encode", a, "-o", f"{out}.npz", "--model", tmp_path / "file"], "is a file"),
        (["encode", a, "-o", f"{out}.ecdc", "--model", tiny], "use .npz for this model"),
        (["encode", a, "-o", f"{out}.npz", "--format", "ecdc", "--model", tiny], "contradicts"),
        (["encode", a, a, "-o", tmp_path / "file", "--model", tiny], "must be a directory"),
        (["encode", a, "-o", f"{out}.npz", "--bandwidth", "lots"], "invalid float value"),
        (["encode", a, "-o", f"{out}.npz", "--frobnicate"], "unrecognized arguments"),
        (["encode", a], "required: -o/--output"),
        (["decode", tmp_path / "missing.npz", "-o", f"{out}.wav"], "no such file"),
        (["decode", tmp_path / "junk.npz", "-o", f"{out}.wav"], "not a valid .npz"),
        (["decode", a, "-o", f"{out}.wav"], "unknown codes format '.wav'"),
        (["decode", tmp_path / "junk.npz", "-o", f"{out}.xyz"], "unknown audio format '.xyz'"),
        (["reconstruct", a, "-o", f"{out}.npz", "--model", tiny], "unknown audio format"),
        (["tokenize", tmp_path / "nodir", "-o", out, "--model", tiny], "does not exist"),
        (["tokenize", tmp_path, "-o", out, "--batch-size", "0"], "positive integer"),
        (["tokenize", tmp_path, "-o", out, "--buckets", "-1"], "positive number"),
        (["frobnicate"], "invalid choice"),
        ([], "required"),
    ]
    for argv, needle in cases:
        code, _, err = run_cli(capsys, *argv)
        assert_one_line_error(code, err, needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.wav", "file", "junk.npz", "notes.txt"]


def test_console_script_error_is_one_line(tmp_path):
    """The installed entry point: exit status and stderr as a user sees them."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    script = Path(sys.executable).parent / "encodec-jax"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "encodec_jax"]
    result = subprocess.run(
        [*command, "decode", str(tmp_path / "x.npz"), "-o", str(tmp_path / "y.wav")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"encodec-jax decode: error: cannot read codes file {tmp_path / 'x.npz'}: no such file"
    ]


# ---- .ecdc with a real network: the encodec package's 24 kHz model and its conversion ----
@pytest.fixture(scope="module")
def package_24khz(tmp_path_factory):
    """(the encodec package's 24 kHz model with random weights, the same weights saved for
    encodec-jax)."""
    from encodec_jax.checkpoint import rename_original_key
    from tests.reference import make_original_model

    original = make_original_model(24_000)
    original.name = "encodec_24khz"
    state = {k: v.numpy() for k, v in original.state_dict().items()}
    directory = tmp_path_factory.mktemp("encodec24") / "model"
    EncodecModel.from_state_dict(ENCODEC_24KHZ, state, rename_original_key).save_pretrained(
        directory
    )
    return original, str(directory)


@needs_torch
def test_ecdc_round_trip_with_the_package(tmp_path, capsys, monkeypatch, package_24khz):
    import torch

    from tests.reference import import_encodec

    import_encodec()
    package = sys.modules["encodec.compress"]
    original, directory = package_24khz
    original.set_target_bandwidth(6.0)
    wav = tone(1.0, 24_000, 1)
    sf.write(tmp_path / "in.wav", wav, 24_000, subtype="FLOAT")  # bit-exact float samples

    # the package's writer and ours give the same bytes
    theirs = io.BytesIO()
    package.compress_to_file(original, torch.from_numpy(wav.T), theirs, use_lm=False)
    code, out, err = run_cli(
        capsys, "encode", tmp_path / "in.wav", "-o", tmp_path / "ours.ecdc", "--model",
        directory, "--bandwidth", "6",
    )  # fmt: skip
    assert code == 0, err
    assert (tmp_path / "ours.ecdc").read_bytes() == theirs.getvalue()
    (tmp_path / "theirs.ecdc").write_bytes(theirs.getvalue())

    # the package reads ours (building our weights instead of downloading its own)
    monkeypatch.setitem(package.MODELS, "encodec_24khz", lambda: original)
    with open(tmp_path / "ours.ecdc", "rb") as f:
        their_audio, rate = package.decompress_from_file(f)
    assert rate == 24_000 and their_audio.shape == (1, 24_000)

    # we read theirs, and decode it as they do
    code, out, err = run_cli(
        capsys, "decode", tmp_path / "theirs.ecdc", "-o", tmp_path / "dec.flac", "--model",
        directory,
    )  # fmt: skip
    assert code == 0, err
    ours, rate = sf.read(tmp_path / "dec.flac", dtype="float32", always_2d=True)
    assert rate == 24_000 and ours.shape == (24_000, 1)
    peak = float(np.abs(their_audio.numpy()).max())
    np.testing.assert_allclose(ours[:, 0], their_audio.numpy()[0], atol=1e-4 + 1e-4 * peak)

    # an .ecdc needs --model, and one of the architecture it names
    code, _, err = run_cli(capsys, "decode", tmp_path / "theirs.ecdc", "-o", tmp_path / "x.wav")
    assert_one_line_error(code, err, "give the model with --model", "facebook/encodec_24khz")
    code, _, err = run_cli(
        capsys, "decode", tmp_path / "theirs.ecdc", "-o", tmp_path / "x.wav", "--model",
        tiny_checkpoint(),
    )  # fmt: skip
    assert_one_line_error(code, err, "written by the encodec package's encodec_24khz")
    assert not (tmp_path / "x.wav").exists()
