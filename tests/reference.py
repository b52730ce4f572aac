"""Reference PyTorch models for the parity tests, built and saved the way users have them.

A freshly initialised EnCodec has all-zero codebooks (every code would be 0), so the codebooks are
filled from the residuals the model itself produces (`encodec_jax.testing.fill_codebooks`): each
level's vectors are real residual frames plus a little noise, which makes codes vary and
near-ties as common as in a trained model.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import types
from pathlib import Path

import numpy as np
import torch

from encodec_jax import EncodecConfig
from encodec_jax.testing import fill_codebooks, random_audio


def fill_torch_codebooks(embeds: list[torch.Tensor], residual: torch.Tensor, seed: int) -> None:
    """`encodec_jax.testing.fill_codebooks` for a torch model's codebooks, in place."""
    filled = fill_codebooks(torch.stack(embeds).numpy(), residual.double().numpy(), seed).astype(
        np.float32
    )
    with torch.no_grad():
        for embed, values in zip(embeds, filled, strict=True):
            embed.copy_(torch.from_numpy(values))


def codebook_pool(config: EncodecConfig, encoder, seed: int) -> torch.Tensor:
    """Encoder output frames `[N, hidden]` of random audio, at least one per codebook entry."""
    seconds = math.ceil(config.codebook_size / config.frame_rate) + 1
    items = 4
    length = max(config.sampling_rate * seconds // items, config.hop_length * 8)
    audio = torch.from_numpy(random_audio(items, config.audio_channels, length, seed))
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
        fill_torch_codebooks(embeds, codebook_pool(config, model.encoder, seed), seed)
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
        fill_torch_codebooks(embeds, codebook_pool(config, model.encoder, seed), seed)
    return model.eval()
