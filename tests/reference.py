"""Reference PyTorch models for the parity tests, built and saved the way users have them.

A freshly initialised EnCodec has all-zero codebooks (every code would be 0), so the codebooks are
filled from the residuals the model itself produces: each level's vectors are real residual
frames plus a little noise, which makes codes vary and near-ties as common as in a trained model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import types
from pathlib import Path

import numpy as np
import torch

from encodec_jax import EncodecConfig

# A tiny model for fast tests. hop 4 at 8 kHz: 2000 frames/s x 4 bits = 8 kbps per codebook,
# so 1, 2 and 3 codebooks. Shared so that test modules using it compile its programs once.
TINY_CONFIG = EncodecConfig(
    num_filters=4,
    hidden_size=8,
    upsampling_ratios=(2, 2),
    codebook_size=16,
    target_bandwidths=(8.0, 16.0, 24.0),
    sampling_rate=8000,
)
# The 48 kHz layout in miniature: stereo, normalised, chunks of 80 samples (20 frames).
TINY_CHUNKED_CONFIG = dataclasses.replace(
    TINY_CONFIG,
    target_bandwidths=(8.0, 16.0),
    audio_channels=2,
    normalize=True,
    chunk_length_s=0.01,
    overlap=0.0,
)


def test_audio(batch: int, channels: int, length: int, seed: int) -> np.ndarray:
    """`[batch, channels, length]` float32: a few sines plus noise, peak around 0.5."""
    rng = np.random.default_rng(seed)
    t = np.arange(length)[None, None, :]
    freqs = rng.uniform(0.001, 0.1, size=(batch, channels, 3, 1))
    sines = np.sin(2 * np.pi * freqs * t[:, :, None, :]).sum(axis=2) / 6
    noise = rng.normal(0.0, 0.05, size=(batch, channels, length))
    return (sines + noise).astype(np.float32)


test_audio.__test__ = False  # a helper, not a pytest test


@torch.no_grad()
def fill_codebooks(embeds: list[torch.Tensor], residual: torch.Tensor, seed: int) -> None:
    """Fill each `[bins, dim]` codebook from the residual frames `[N, dim]` left by the levels
    before it, in place, with the reference's distance formula."""
    gen = torch.Generator().manual_seed(seed)
    for embed in embeds:
        bins = embed.shape[0]
        if residual.shape[0] >= bins:
            idx = torch.randperm(residual.shape[0], generator=gen)[:bins]
        else:
            idx = torch.randint(0, residual.shape[0], (bins,), generator=gen)
        noise = torch.randn(embed.shape, generator=gen) * residual.std() * 0.1
        embed.copy_(residual[idx] + noise)
        dist = -(
            residual.pow(2).sum(1, keepdim=True)
            - 2 * residual @ embed.t()
            + embed.pow(2).sum(1, keepdim=True).t()
        )
        residual = residual - embed[dist.argmax(dim=-1)]


def codebook_pool(config: EncodecConfig, encoder, seed: int) -> torch.Tensor:
    """Encoder output frames `[N, hidden]` of random audio, at least one per codebook entry."""
    seconds = math.ceil(config.codebook_size / config.frame_rate) + 1
    items = 4
    length = max(config.sampling_rate * seconds // items, config.hop_length * 8)
    audio = torch.from_numpy(test_audio(items, config.audio_channels, length, seed))
    with torch.no_grad():
        emb = encoder(audio)  # [B, D, F]
    return emb.permute(0, 2, 1).reshape(-1, emb.shape[1])


@contextlib.contextmanager
def one_torch_thread():
    """Building reference models is many small LSTM steps, which two torch threads fighting
    XLA's over two cores make 5x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def make_hf_model(config: EncodecConfig, seed: int = 0):
    """transformers' EncodecModel for `config`: random weights, filled codebooks, eval mode."""
    import transformers

    with one_torch_thread():
        torch.manual_seed(seed)
        hf_config = transformers.EncodecConfig(**config.to_hf_config())
        model = transformers.EncodecModel(hf_config).eval()
        embeds = [layer.codebook.embed for layer in model.quantizer.layers]
        fill_codebooks(embeds, codebook_pool(config, model.encoder, seed), seed)
    return model


def save_hf_model(model, directory: Path, legacy_weight_norm: bool = False) -> Path:
    """`save_pretrained`, optionally with weight norm renamed to weight_g/weight_v as on the Hub."""
    model.save_pretrained(directory)
    if legacy_weight_norm:
        from safetensors.numpy import load_file, save_file

        path = directory / "model.safetensors"
        tensors = load_file(path)
        renamed = {
            k.replace("parametrizations.weight.original0", "weight_g").replace(
                "parametrizations.weight.original1", "weight_v"
            ): v
            for k, v in tensors.items()
        }
        assert any(k.endswith("weight_g") for k in renamed) or not any(
            "parametrizations" in k for k in tensors
        )
        save_file(renamed, path, metadata={"format": "pt"})
    config = json.loads((directory / "config.json").read_text())
    assert config["model_type"] == "encodec"
    return directory


def import_encodec():
    """The original `encodec` package. It imports torchaudio only for file I/O and resampling,
    and torchaudio does not load beside torch 2.13, so an empty module stands in for it."""
    stubbed = "torchaudio" not in sys.modules
    if stubbed:
        sys.modules["torchaudio"] = types.ModuleType("torchaudio")
    try:
        import encodec
    finally:
        # encodec keeps its reference to the stub; taking it out of sys.modules again keeps
        # transformers from mistaking it for an installed torchaudio.
        if stubbed:
            del sys.modules["torchaudio"]
    return encodec


def make_original_model(sample_rate: int, seed: int = 0):
    """The `encodec` package's 24 or 48 kHz model (pretrained=False) with filled codebooks."""
    from encodec_jax import ENCODEC_24KHZ, ENCODEC_48KHZ

    encodec = import_encodec()
    with one_torch_thread():
        torch.manual_seed(seed)
        if sample_rate == 24_000:
            model, config = (
                encodec.EncodecModel.encodec_model_24khz(pretrained=False),
                ENCODEC_24KHZ,
            )
        else:
            model, config = (
                encodec.EncodecModel.encodec_model_48khz(pretrained=False),
                ENCODEC_48KHZ,
            )
        embeds = [layer._codebook.embed for layer in model.quantizer.vq.layers]
        fill_codebooks(embeds, codebook_pool(config, model.encoder, seed), seed)
    return model.eval()
