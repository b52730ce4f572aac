"""Checkpoints: export to transformers, exact tensor round trips, loading errors that name the
problem, Hub ids resolved from a hand-built offline cache, and a torch-free import path.

One tiny reference model (transformers, random weights, filled codebooks, random EMA buffers)
serves the whole module.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

try:
    import torch

    from .reference import make_hf_model, save_hf_model
except ImportError:  # the tests that need them are skipped
    pass

from safetensors.numpy import load_file, save_file

from encodec_jax import EncodecConfig, EncodecModel
from encodec_jax.checkpoint import rename_hf_key
from encodec_jax.feature_extraction import EncodecFeatureExtractor
from encodec_jax.testing import TINY_CONFIG, random_audio

from .requires import needs_torch

CONFIG = TINY_CONFIG
REPO_ID = "acme/encodec-tiny"
BIN_REPO_ID = "acme/encodec-tiny-bin"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
# the shape and config of test_inputs.py's plain model: a run of both compiles them once
AUDIO = random_audio(2, 1, 260, seed=1)


def test_config_has_several_quantizers():
    assert CONFIG.num_quantizers == 3
    assert [CONFIG.num_quantizers_for_bandwidth(b) for b in CONFIG.target_bandwidths] == [1, 2, 3]


# ---- shared fixtures ----
pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture(scope="module")
def reference():
    """transformers' model, with EMA buffers that differ from their init so the export of each
    one is checked (a fresh model has inited=1, cluster_size=0, embed_avg=0 everywhere)."""
    model = make_hf_model(CONFIG, seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in model.quantizer.layers:
            codebook = layer.codebook
            codebook.inited.fill_(1.0)
            codebook.cluster_size.copy_(torch.rand(codebook.cluster_size.shape, generator=gen))
            codebook.embed_avg.copy_(torch.randn(codebook.embed_avg.shape, generator=gen))
    return model


@pytest.fixture(scope="module")
def hf_dir(reference, tmp_path_factory) -> Path:
    return save_hf_model(reference, tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="module")
def model(hf_dir) -> EncodecModel:
    return EncodecModel.from_pretrained(hf_dir)


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("exported")
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def bin_dir(reference, hf_dir, tmp_path_factory) -> Path:
    """config.json plus a PyTorch pickle of the state dict (transformers 5 always saves
    safetensors, so the pickle is written with torch.save)."""
    directory = tmp_path_factory.mktemp("bin")
    shutil.copy(hf_dir / "config.json", directory / "config.json")
    torch.save(reference.state_dict(), directory / "pytorch_model.bin")
    return directory


def reference_codes(reference, x: np.ndarray, bandwidth: float) -> np.ndarray:
    with torch.no_grad():
        return reference.encode(torch.from_numpy(x), bandwidth=bandwidth).audio_codes.numpy()


def assert_same_tensors(actual: dict, expected: dict) -> None:
    assert sorted(actual) == sorted(expected)
    for key, value in expected.items():
        assert actual[key].dtype == value.dtype, key
        assert np.array_equal(actual[key], value), key


def reference_tensors(reference) -> dict[str, np.ndarray]:
    """transformers' state dict under the Hub's names (weight norm as weight_g / weight_v)."""
    return {rename_hf_key(k): v.detach().numpy() for k, v in reference.state_dict().items()}


# ---- export ----
@needs_torch
def test_export_loads_in_transformers_with_identical_codes(reference, model, exported):
    import transformers

    reloaded, info = transformers.EncodecModel.from_pretrained(exported, output_loading_info=True)
    reloaded.eval()
    assert not info["missing_keys"]
    assert not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    assert_same_tensors(reference_tensors(reloaded), reference_tensors(reference))
    for bandwidth in CONFIG.target_bandwidths:
        codes = reference_codes(reloaded, AUDIO, bandwidth)
        assert codes.shape[2] == CONFIG.num_quantizers_for_bandwidth(bandwidth)
        assert np.array_equal(codes, reference_codes(reference, AUDIO, bandwidth))
        ours = np.asarray(model.encode(AUDIO, bandwidth=bandwidth).audio_codes)
        assert np.array_equal(ours, codes)
    assert len(np.unique(codes)) > 2, "degenerate codes would make the comparison vacuous"


@needs_torch
def test_round_trip_keeps_every_tensor_exactly(reference, model, exported):
    expected = reference_tensors(reference)
    # transformers saves weight norm as parametrizations.weight.original0/1
    assert any(k.endswith("weight_g") for k in expected)
    for i in range(CONFIG.num_quantizers):
        for buffer in ("inited", "cluster_size", "embed", "embed_avg"):
            assert f"quantizer.layers.{i}.codebook.{buffer}" in expected
    assert_same_tensors(model.state_dict(), expected)
    assert_same_tensors(load_file(exported / "model.safetensors"), expected)
    assert EncodecConfig.from_json_file(exported / "config.json") == CONFIG


@needs_torch
def test_pytorch_bin_gives_the_same_model(reference, model, bin_dir):
    from_bin = EncodecModel.from_pretrained(bin_dir)
    assert_same_tensors(from_bin.state_dict(), model.state_dict())
    bandwidth = CONFIG.target_bandwidths[-1]
    codes = np.asarray(from_bin.encode(AUDIO, bandwidth=bandwidth).audio_codes)
    assert np.array_equal(codes, reference_codes(reference, AUDIO, bandwidth))


# ---- loading errors ----
def edit_tensors(directory: Path, edit) -> None:
    path = directory / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def edit_config(directory: Path, edit) -> None:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


def truncate(directory: Path) -> None:
    path = directory / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def shrink_embed(tensors: dict) -> None:
    tensors["quantizer.layers.0.codebook.embed"] = np.zeros((8, 8), np.float32)


BROKEN = {
    "missing tensor": (
        lambda d: edit_tensors(d, lambda t: t.pop("quantizer.layers.1.codebook.embed_avg")),
        ValueError,
        r"1 tensors missing: quantizer\.layers\.1\.codebook\.embed_avg$",
    ),
    "unexpected tensor": (
        lambda d: edit_tensors(d, lambda t: t.update({"decoder.extra.bias": np.zeros(3)})),
        ValueError,
        r"1 tensors unexpected: decoder\.extra\.bias$",
    ),
    "mis-shaped tensor": (
        lambda d: edit_tensors(d, shrink_embed),
        ValueError,
        r"1 tensors of the wrong shape: quantizer\.layers\.0\.codebook\.embed: "
        r"checkpoint \(8, 8\), model \(16, 8\)$",
    ),
    "unknown config key": (
        lambda d: edit_config(d, lambda c: c.update({"frobnication": 3})),
        ValueError,
        r"does not handle: \['frobnication'\]",
    ),
    "other model type": (
        lambda d: edit_config(d, lambda c: c.update({"model_type": "bert"})),
        ValueError,
        r"Not an EnCodec config: model_type is 'bert'",
    ),
    "no weights": (
        lambda d: (d / "model.safetensors").unlink(),
        FileNotFoundError,
        r"No weights in .*: expected model\.safetensors or pytorch_model\.bin",
    ),
    "no config": (
        lambda d: (d / "config.json").unlink(),
        FileNotFoundError,
        r"No config\.json in ",
    ),
    "truncated safetensors": (
        truncate,
        ValueError,
        r"model\.safetensors: not a valid safetensors file",
    ),
    "garbage safetensors": (
        lambda d: (d / "model.safetensors").write_bytes(b"not a safetensors file" * 8),
        ValueError,
        r"model\.safetensors: not a valid safetensors file",
    ),
}


@needs_torch
@pytest.mark.parametrize("problem", list(BROKEN))
def test_broken_checkpoint_is_named(problem, exported, tmp_path):
    breaker, error, message = BROKEN[problem]
    directory = tmp_path / "checkpoint"
    shutil.copytree(exported, directory)
    breaker(directory)
    with pytest.raises(error, match=message):
        EncodecModel.from_pretrained(directory)


@needs_torch
def test_path_to_a_file_is_named(exported):
    with pytest.raises(ValueError, match=r"config\.json is a file; from_pretrained takes a"):
        EncodecModel.from_pretrained(exported / "config.json")


@pytest.mark.parametrize("path", ["./nope", "../nope", "/nonexistent/encodec/checkpoint"])
def test_missing_local_path_is_named(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=f"No such checkpoint directory: {path}"):
        EncodecModel.from_pretrained(path)


@needs_torch
def test_duplicate_weight_norm_spellings_are_rejected(exported, tmp_path):
    directory = tmp_path / "checkpoint"
    shutil.copytree(exported, directory)
    key = "encoder.layers.0.conv.weight_g"

    def add_duplicate(tensors):
        tensors["encoder.layers.0.conv.parametrizations.weight.original0"] = 2 * tensors[key]

    edit_tensors(directory, add_duplicate)
    with pytest.raises(ValueError, match=r"encoder\.layers\.0\.conv"):
        EncodecModel.from_pretrained(directory)


@needs_torch
def test_missing_shard_is_file_not_found(exported, tmp_path):
    directory = tmp_path / "checkpoint"
    shutil.copytree(exported, directory)
    shard = "model-00001-of-00002.safetensors"
    (directory / "model.safetensors").rename(directory / shard)
    weight_map = {"encoder.layers.0.conv.bias": shard, "decoder.layers.0.conv.bias": "gone.st"}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(FileNotFoundError, match=r"gone\.st"):
        EncodecModel.from_pretrained(directory)


@needs_torch
def test_invalid_config_json_names_the_file(exported, tmp_path):
    directory = tmp_path / "checkpoint"
    shutil.copytree(exported, directory)
    (directory / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json"):
        EncodecModel.from_pretrained(directory)


# ---- Hub ids, offline, from a hand-built cache ----
def add_to_cache(cache: Path, repo_id: str, files: dict[str, Path]) -> None:
    """The layout huggingface_hub writes: blobs named by hash, snapshot entries linking to them,
    refs/main holding the commit."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    for name, source in files.items():
        data = source.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))


@pytest.fixture(scope="module")
def hub_cache(exported, bin_dir, tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("hub_cache")
    add_to_cache(
        cache,
        REPO_ID,
        {name: exported / name for name in ("config.json", "model.safetensors")},
    )
    add_to_cache(
        cache,
        BIN_REPO_ID,
        {name: bin_dir / name for name in ("config.json", "pytorch_model.bin")},
    )
    return cache


@needs_torch
@pytest.mark.parametrize("revision", [None, "main", COMMIT])
def test_hub_id_from_cache_with_local_files_only(revision, model, hub_cache):
    loaded = EncodecModel.from_pretrained(
        REPO_ID, revision=revision, cache_dir=hub_cache, local_files_only=True
    )
    assert_same_tensors(loaded.state_dict(), model.state_dict())


@needs_torch
def test_hub_id_falls_back_to_pytorch_bin_in_cache(model, hub_cache):
    loaded = EncodecModel.from_pretrained(BIN_REPO_ID, cache_dir=hub_cache, local_files_only=True)
    assert_same_tensors(loaded.state_dict(), model.state_dict())


@pytest.fixture
def offline(monkeypatch):
    """HF_HUB_OFFLINE=1 as the installed huggingface_hub sees it: `constants.is_offline_mode()`
    reads `constants.HF_HUB_OFFLINE` on every request. Records what each metadata request raised,
    to prove the offline switch (not a failing network) is what sent it to the cache."""
    import huggingface_hub.constants
    import huggingface_hub.file_download as file_download

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    raised: list[type] = []
    real = file_download.get_hf_file_metadata

    def recording(*args, **kwargs):
        try:
            return real(*args, **kwargs)
        except Exception as err:
            raised.append(type(err))
            raise

    monkeypatch.setattr(file_download, "get_hf_file_metadata", recording)
    return raised


@needs_torch
@pytest.mark.parametrize("revision", [None, COMMIT])
def test_hub_id_from_cache_in_offline_mode(revision, model, hub_cache, offline):
    from huggingface_hub.errors import OfflineModeIsEnabled

    loaded = EncodecModel.from_pretrained(REPO_ID, revision=revision, cache_dir=hub_cache)
    assert_same_tensors(loaded.state_dict(), model.state_dict())
    # a branch name is looked up on the Hub first, and offline mode is what refused it
    assert offline if revision is None else not offline
    assert all(issubclass(t, OfflineModeIsEnabled) for t in offline), offline


@needs_torch
def test_uncached_hub_id_raises_huggingface_hub_error(hub_cache, offline):
    from huggingface_hub.errors import LocalEntryNotFoundError

    with pytest.raises(LocalEntryNotFoundError):
        EncodecModel.from_pretrained("acme/missing", cache_dir=hub_cache, local_files_only=True)
    with pytest.raises(LocalEntryNotFoundError):
        EncodecModel.from_pretrained("acme/missing", cache_dir=hub_cache)


@needs_torch
@pytest.mark.parametrize("local_files_only", [True, False])
def test_feature_extractor_from_cached_hub_id(local_files_only, hub_cache, offline):
    extractor = EncodecFeatureExtractor.from_pretrained(
        REPO_ID, cache_dir=hub_cache, local_files_only=local_files_only
    )
    assert extractor.to_dict() == EncodecFeatureExtractor.from_config(CONFIG).to_dict()
    assert extractor.sampling_rate == CONFIG.sampling_rate
    assert extractor.feature_size == CONFIG.audio_channels


@needs_torch
def test_feature_extractor_uncached_hub_id_raises_huggingface_hub_error(hub_cache, offline):
    from huggingface_hub.errors import LocalEntryNotFoundError

    with pytest.raises(LocalEntryNotFoundError):
        EncodecFeatureExtractor.from_pretrained(
            "acme/missing", cache_dir=hub_cache, local_files_only=True
        )


# ---- torch stays out of the library ----
TORCH_FREE_SCRIPT = textwrap.dedent(
    """
    import importlib.abc
    import sys

    class BlockTorch(importlib.abc.MetaPathFinder):
        attempts = []

        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                self.attempts.append(name)
                raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
            return None

    sys.meta_path.insert(0, BlockTorch())

    import numpy as np

    import encodec_jax

    model = encodec_jax.EncodecModel.from_pretrained(sys.argv[1])
    x = np.sin(np.arange(2 * 37, dtype=np.float32) / 3).reshape(2, 1, 37) / 2
    enc = model.encode(x, bandwidth=16.0)
    assert enc.audio_codes.shape == (1, 2, 2, 10), enc.audio_codes.shape
    audio = model.decode(enc.audio_codes, enc.audio_scales, np.ones((2, 37))).audio_values
    assert audio.shape == (2, 1, 37), audio.shape
    assert np.isfinite(np.asarray(audio)).all()
    assert BlockTorch.attempts == [], BlockTorch.attempts
    assert "torch" not in sys.modules or sys.modules["torch"] is None
    assert not [m for m in sys.modules if m.startswith("torch.")]

    try:
        encodec_jax.EncodecModel.from_pretrained(sys.argv[2])
    except ImportError as err:
        print("IMPORT ERROR:", err)
    else:
        raise AssertionError("pytorch_model.bin loaded without torch")
    print("TORCH FREE OK")
    """
)


@needs_torch
def test_library_never_imports_torch(exported, bin_dir, tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-c", TORCH_FREE_SCRIPT, str(exported), str(bin_dir)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "TORCH FREE OK" in result.stdout
    error_line = next(line for line in result.stdout.splitlines() if "IMPORT ERROR" in line)
    assert "pytorch_model.bin needs PyTorch" in error_line
    assert "pip install torch" in error_line
