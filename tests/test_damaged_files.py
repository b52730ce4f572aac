"""One representative damaged or hostile file per reader, its message asserted word for word,
and the three cases of the issue that asked for them (a 10^12-sample .ecdc header, an .ecdc
header longer than the file, an .npz refused as made by a model "not like" itself).

The fuzz suite (`test_fuzz.py`) checks every reader on thousands of files for the error class,
one-line messages and bounded memory; these tests pin down what a user reads.
"""

from __future__ import annotations

import json
import struct
import zipfile

import numpy as np
import pytest
import soundfile as sf

from encodec_jax import ENCODEC_24KHZ, ENCODEC_32KHZ, EncodecConfig
from encodec_jax.audio import AudioError, load_audio
from encodec_jax.checkpoint import read_state_dict, write_safetensors
from encodec_jax.cli import main
from encodec_jax.codes import CodesError, check_codes_fit, load_codes, save_codes
from encodec_jax.feature_extraction import EncodecFeatureExtractor

from .fuzz_readers import _codes, _manifest_run, _npy_bytes
from .requires import needs_torch


def ecdc_bytes(meta: dict, body: bytes = b"") -> bytes:
    raw = json.dumps(meta).encode()
    return struct.pack("!4sBI", b"ECDC", 0, len(raw)) + raw + body


# ---- the three cases ----
def test_ecdc_claiming_a_trillion_samples_is_refused_before_allocating(tmp_path, capsys):
    path = tmp_path / "huge.ecdc"
    data = ecdc_bytes({"m": "encodec_24khz", "al": 10**12, "nc": 2, "lm": False})
    path.write_bytes(data + bytes(100 - len(data)))
    # 10^12 samples are 3,125,000,000 frames of 2 codes of 10 bits: 7,812,500,000 bytes.
    expected = (
        f"{path} ends before its last chunk: truncated .ecdc file (its header claims "
        "1000000000000 samples, whose codes take at least 7812500000 bytes; it holds 26)"
    )
    with pytest.raises(CodesError) as info:
        load_codes(path)
    assert str(info.value) == expected
    # What `decode` prints, before any model is loaded.
    code = main(["decode", str(path), "-o", str(tmp_path / "out.wav")])
    assert code == 1
    assert capsys.readouterr().err == f"encodec-jax decode: error: {expected}\n"


def test_ecdc_header_longer_than_the_file_is_a_truncated_header(tmp_path):
    path = tmp_path / "short.ecdc"
    path.write_bytes(struct.pack("!4sBI", b"ECDC", 0, 1000) + b'{"m": "encodec_24khz"}')
    with pytest.raises(CodesError) as info:
        load_codes(path)
    assert str(info.value) == (
        f"cannot read codes file {path}: truncated .ecdc header (it claims 1000 bytes, the "
        "file holds 22 after the first 9)"
    )


def test_codes_that_do_not_fit_the_model_they_name_say_so_once(tmp_path):
    # A file naming facebook/encodec_32khz whose codes a 24 kHz model made.
    _, codes = _codes("encodec_24khz", 24_000, 2)
    codes = type(codes)(**{**codes.__dict__, "model": "facebook/encodec_32khz"})
    with pytest.raises(CodesError) as info:
        check_codes_fit(codes, ENCODEC_32KHZ, "facebook/encodec_32khz")
    assert str(info.value) == (
        "these codes say they were made by facebook/encodec_32khz, but they do not fit it: "
        "sample rate 24000 Hz, model 32000 Hz; codebook size 1024, model 2048"
    )
    with pytest.raises(CodesError) as info:
        check_codes_fit(codes, ENCODEC_32KHZ, "my-model")
    assert str(info.value).startswith(
        "these codes were made by facebook/encodec_32khz, not by a model like my-model: "
    )


# ---- one representative file per reader ----
def test_npz_whose_header_claims_a_huge_shape(tmp_path):
    config, codes = _codes("encodec_24khz", 2_000, 2)
    save_codes(tmp_path / "good.npz", codes)
    with np.load(tmp_path / "good.npz") as npz:
        arrays = {k: npz[k] for k in npz.files}
    path = tmp_path / "bad.npz"
    with zipfile.ZipFile(path, "w") as archive:
        for key, value in arrays.items():
            claim = (10**12,) if key == "audio_codes" else None
            archive.writestr(key + ".npy", _npy_bytes(value, claim=claim))
    with pytest.raises(CodesError) as info:
        load_codes(path)
    assert str(info.value) == (
        f"codes file {path} is corrupt: its audio_codes claims shape (1000000000000,) of int32 "
        f"(4000000000000 bytes) but holds {arrays['audio_codes'].nbytes} bytes"
    )


def test_config_with_a_billion_filters_is_refused_before_a_model_is_built(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**ENCODEC_24KHZ.to_hf_config(), "num_filters": 10**9}))
    with pytest.raises(ValueError) as info:
        EncodecConfig.from_json_file(path)
    assert str(info.value) == (
        f"{path}: Invalid EncodecConfig: the model would hold about "
        "13,582,000,028,686,008,388,608 weights, more than the 2,147,483,648 accepted"
    )


def test_weights_size_is_the_models_weight_count_within_a_percent():
    import math

    from flax import nnx

    from encodec_jax import PRESETS, EncodecModel

    for name, config in PRESETS.items():
        model = nnx.eval_shape(lambda config=config: EncodecModel(config, rngs=nnx.Rngs(0)))
        count = sum(math.prod(v.shape) for _, v in nnx.to_flat_state(nnx.state(model)))
        assert 0.99 * count <= config.weights_size <= count, name  # biases and norms left out


def test_preprocessor_config_with_a_key_twice(tmp_path):
    path = tmp_path / "preprocessor_config.json"
    path.write_text('{"feature_size": 1, "sampling_rate": 24000, "feature_size": 2}')
    with pytest.raises(ValueError) as info:
        EncodecFeatureExtractor.from_pretrained(tmp_path)
    assert str(info.value) == f"{path} gives the key 'feature_size' twice"


def test_safetensors_index_naming_a_file_outside_the_checkpoint(tmp_path):
    write_safetensors(tmp_path / "a.safetensors", {"x": np.zeros(2, np.float32)})
    path = tmp_path / "model.safetensors.index.json"
    path.write_text(json.dumps({"weight_map": {"x": "../a.safetensors"}}))
    with pytest.raises(ValueError) as info:
        read_state_dict(tmp_path)
    assert str(info.value) == (
        f"{path} names the shard '../a.safetensors', not a file beside the index"
    )


def test_safetensors_header_longer_than_the_file(tmp_path):
    path = tmp_path / "model.safetensors"
    write_safetensors(path, {"x": np.zeros(2, np.float32)})
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 10**6) + data[8:])
    with pytest.raises(ValueError) as info:
        read_state_dict(tmp_path)
    assert str(info.value) == (
        f"Cannot read {path}: not a valid safetensors file (Error while deserializing header: "
        "invalid header length)"
    )


@needs_torch
def test_pytorch_zip_with_a_view_repeating_its_storage(tmp_path):
    import torch

    path = tmp_path / "pytorch_model.bin"
    torch.save({"x": torch.zeros(1).expand(1000)}, path)
    with pytest.raises(ValueError) as info:
        read_state_dict(tmp_path)
    assert str(info.value) == (
        f"Cannot read {path}: corrupt or not a checkpoint (a tensor of shape (1000,) claims more "
        "elements than its storage (4 bytes) holds: a view repeating its data, which a state "
        "dict of weights does not hold)"
    )


@needs_torch
def test_legacy_pytorch_pickle_claiming_a_huge_storage(tmp_path):
    import torch

    path = tmp_path / "pytorch_model.bin"
    torch.save({"x": torch.zeros(10)}, path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    # The storage's element count, BININT1 10 after the location 'cpu', claimed as 10^11.
    at = data.index(b"K\n", data.index(b"X\x03\x00\x00\x00cpu"))
    path.write_bytes(data[:at] + b"\x8a\x06" + (10**11).to_bytes(6, "little") + data[at + 2 :])
    with pytest.raises(ValueError) as info:
        read_state_dict(tmp_path)
    # 10^11 float32 plus the storage's 8-byte size; the file holds 8 + 40 bytes of storage.
    assert str(info.value) == (
        f"Cannot read {path}: corrupt checkpoint (its tensors claim 400000000008 bytes, the "
        "file holds 48 after its pickles)"
    )


def test_xp_cfg_alias_bomb():
    from encodec_jax.convert import ConversionError, config_from_audiocraft_yaml

    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
        for p, c in zip("abcdefgh", "bcdefghi", strict=True)
    )
    with pytest.raises(ConversionError) as info:
        config_from_audiocraft_yaml(bomb + "seanet: *i\nencodec: *i\nrvq: *i\n")
    assert str(info.value) == (
        "xp.cfg's model sections hold more than 100000 values once expanded; an audiocraft "
        "config holds a few hundred"
    )


@pytest.mark.parametrize(
    "nesting, refusal",
    [
        ("[" * 5000 + "]" * 5000, "brackets nested deeper than 64 levels"),
        ("{a: " * 5000 + "}" * 5000, "nested deeper than 64 levels"),
        ("".join(f"\n{'  ' * i}- " for i in range(1, 80)) + "1", "nested deeper than 64 levels"),
    ],
    ids=["brackets", "braces", "indented"],
)
def test_yaml_nested_too_deep_is_refused_where_the_limit_is_crossed(tmp_path, nesting, refusal):
    """Both YAML readers stop at 64 levels, as they read: PyYAML's scanner alone took about 1 s
    on 10 kB of nested brackets before the composer's recursion limit refused them, and nested
    64 levels deep each reader still reads a file."""
    from encodec_jax.convert import ConversionError, config_from_audiocraft_yaml
    from encodec_jax.train.config import TrainConfigError, read_yaml

    with pytest.raises(ConversionError, match=f"^xp.cfg is not valid YAML: {refusal}"):
        config_from_audiocraft_yaml(f"seanet: {nesting}\n")
    path = tmp_path / "config.yaml"
    path.write_text(f"model: {nesting}\n")
    with pytest.raises(TrainConfigError, match=f": {refusal} in "):
        read_yaml(path)
    path.write_text("model: " + "[" * 63 + "]" * 63 + "\n")
    nested: list = []
    for _ in range(62):
        nested = [nested]
    assert read_yaml(path) == {"model": nested}


def test_audio_claiming_a_sample_rate_too_low_to_resample(tmp_path):
    path = tmp_path / "low.wav"
    sf.write(path, np.zeros(100, np.float32), 100)
    with pytest.raises(AudioError) as info:
        load_audio(path, 24_000, 1)
    assert str(info.value) == (
        f"audio file {path} has a sample rate of 100 Hz; resampling it to 24000 Hz would make "
        "it 240 times longer (at most 64 is accepted)"
    )


def test_flac_claiming_more_samples_than_it_holds_is_refused_without_allocating(tmp_path):
    path = tmp_path / "a.flac"
    sf.write(path, np.full(1000, 0.25, np.float32), 24_000)
    data = bytearray(path.read_bytes())
    # STREAMINFO's last 36 bits of bytes 18..25 count the samples: claim 2^36 - 1.
    packed = int.from_bytes(data[18:26], "big") | (2**36 - 1)
    data[18:26] = packed.to_bytes(8, "big")
    path.write_bytes(bytes(data))
    # Reading the claim at once would allocate 2^36 float32 (256 GiB) and fail with MemoryError;
    # block by block, libsndfile's own error comes when the frames run out.
    assert sf.info(path).frames == 2**36 - 1
    with pytest.raises(AudioError) as info:
        load_audio(path, 24_000, 1)
    assert str(info.value) == f"cannot read audio file {path}: Internal psf_fseek() failed."


def test_damaged_tokenize_manifest(tmp_path):
    run = _manifest_run(tmp_path)
    run.open()
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["shards"] = {"x": {"file": None, "rows": 0, "audio_seconds": 0, "errors": []}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(Exception) as info:
        _manifest_run(tmp_path).open()
    assert type(info.value).__name__ == "TokenizeError"
    assert str(info.value) == (
        f"{tmp_path / 'manifest.json'} is damaged (shard 'x' is not a shard number); delete "
        "it and the shards to start over"
    )
    # a position naming a source shard this run does not read
    manifest["num_shards"] = 3
    manifest["shards"] = {
        "1": {
            "file": None,
            "rows": 0,
            "items": 1,
            "audio_seconds": 0.0,
            "start": {"shard": "a.tar", "item": 0},
            "end": {"shard": "elsewhere.tar", "item": 0},
            "errors": [{"path": "a.tar", "key": None, "error": "damaged"}],
        }
    }
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(Exception) as info:
        _manifest_run(tmp_path).open()
    assert str(info.value) == (
        f"{tmp_path / 'manifest.json'} is damaged (shard 1: its end is not a position in this "
        "source); delete it and the shards to start over"
    )


def test_ecdc_with_a_key_twice_in_its_header(tmp_path):
    path = tmp_path / "twice.ecdc"
    raw = b'{"m": "encodec_24khz", "al": 320, "nc": 2, "lm": false, "al": 640}'
    path.write_bytes(struct.pack("!4sBI", b"ECDC", 0, len(raw)) + raw + bytes(3))
    with pytest.raises(CodesError) as info:
        load_codes(path)
    assert str(info.value) == (
        f"cannot read codes file {path}: bad .ecdc header (it gives the key 'al' twice)"
    )


def test_npz_member_claiming_more_than_deflate_can_hold(tmp_path):
    config, codes = _codes("encodec_24khz", 2_000, 2)
    save_codes(tmp_path / "good.npz", codes)
    data = bytearray((tmp_path / "good.npz").read_bytes())
    # The central directory's uncompressed size of the first member, set to 4 GiB - 1.
    at = data.index(b"PK\x01\x02")
    compressed = struct.unpack_from("<I", data, at + 20)[0]
    name = data[at + 46 : at + 46 + struct.unpack_from("<H", data, at + 28)[0]].decode()
    struct.pack_into("<I", data, at + 24, 2**32 - 1)
    path = tmp_path / "bomb.npz"
    path.write_bytes(bytes(data))
    with pytest.raises(CodesError) as info:
        load_codes(path)
    assert str(info.value) == (
        f"codes file {path} is corrupt: its member {name} claims {2**32 - 1} bytes, more than "
        f"the archive ({len(data)} bytes) can hold"
    )
    assert compressed * 1032 < 2**32 - 1  # more than deflate could expand to
