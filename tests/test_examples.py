"""The README's main job, examples/reconstruct.py, run on a local checkpoint."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import soundfile as sf
from flax import nnx

from encodec_jax import EncodecConfig, EncodecModel

ROOT = Path(__file__).resolve().parent.parent


def load_example():
    spec = importlib.util.spec_from_file_location("reconstruct", ROOT / "examples/reconstruct.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reconstruct_script(tmp_path):
    config = EncodecConfig(num_filters=4, hidden_size=8, codebook_size=16)
    EncodecModel(config, rngs=nnx.Rngs(0)).save_pretrained(tmp_path / "model")
    out = tmp_path / "decoded.wav"
    codes = tmp_path / "codes.npz"
    args = [str(ROOT / "examples/chirp.wav"), str(out), "--model", str(tmp_path / "model")]
    assert load_example().main([*args, "--codes", str(codes), "--bandwidth", "24.0"]) == 0
    original, rate = sf.read(ROOT / "examples/chirp.wav")
    decoded, decoded_rate = sf.read(out)
    assert decoded_rate == rate == config.sampling_rate
    assert decoded.shape == original.shape
    saved = np.load(codes)
    assert saved["audio_codes"].shape == (1, 1, config.num_quantizers, 150)


def test_reconstruct_script_rejects_wrong_rate(tmp_path, capsys):
    config = EncodecConfig(num_filters=4, hidden_size=8, codebook_size=16, sampling_rate=16_000)
    EncodecModel(config, rngs=nnx.Rngs(0)).save_pretrained(tmp_path / "model")
    args = [str(ROOT / "examples/chirp.wav"), str(tmp_path / "o.wav")]
    assert load_example().main([*args, "--model", str(tmp_path / "model")]) == 2
    assert "16000 Hz" in capsys.readouterr().err
    assert not (tmp_path / "o.wav").exists()
