"""Parity of `encodec_jax.feature_extraction` with transformers' `EncodecFeatureExtractor`.

Every valid case runs both extractors on the same input and requires the same keys, array values,
dtypes and shapes. transformers is imported here only: the library itself must not need it.
"""

from __future__ import annotations

import ast
import json
import pathlib
import warnings

import numpy as np
import pytest

try:
    import transformers
except ImportError:  # the tests that need them are skipped
    pass

from encodec_jax.config import ENCODEC_24KHZ, ENCODEC_48KHZ, EncodecConfig
from encodec_jax.feature_extraction import BatchFeature, EncodecFeatureExtractor

from .requires import needs_transformers

MONO = {}
STEREO = {"feature_size": 2}
# facebook/encodec_48khz: chunk_length 48000, chunk_stride 47520.
CHUNKED_48K = {"feature_size": 2, "sampling_rate": 48000, "chunk_length_s": 1.0, "overlap": 0.01}
CHUNKED_48K_MONO = {**CHUNKED_48K, "feature_size": 1}


def _audio(channels: int, length: int, seed: int, dtype=np.float32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (length,) if channels == 1 else (channels, length)
    return rng.uniform(-1.0, 1.0, shape).astype(dtype)


def _batch(channels: int, lengths, dtype=np.float32) -> list[np.ndarray]:
    return [_audio(channels, n, seed, dtype) for seed, n in enumerate(lengths)]


def _extractors(settings: dict):
    return EncodecFeatureExtractor(**settings), transformers.EncodecFeatureExtractor(**settings)


def _assert_same(ours, theirs) -> None:
    assert isinstance(ours, BatchFeature)
    assert set(ours) == set(theirs)
    for key, expected in theirs.items():
        actual = ours[key]
        if isinstance(expected, list):
            assert isinstance(actual, list) and len(actual) == len(expected), key
            pairs = list(zip(actual, expected, strict=True))
        else:
            pairs = [(actual, expected)]
        for a, e in pairs:
            assert isinstance(a, np.ndarray), key
            assert a.dtype == e.dtype, key
            assert a.shape == e.shape, key
            np.testing.assert_array_equal(a, e, err_msg=key)
        assert getattr(ours, key) is actual


# (settings, input, call options); the input is built lazily so that ids stay readable.
_CASES = {
    # single items
    "mono-1-sample": (MONO, lambda: _audio(1, 1, 0), {}),
    "mono-single": (MONO, lambda: _audio(1, 37, 0), {}),
    "mono-list-of-floats": (MONO, lambda: [0.5, -0.25, 0.125], {}),
    "mono-float64": (MONO, lambda: _audio(1, 37, 0, np.float64), {}),
    "mono-single-no-pad": (MONO, lambda: _audio(1, 37, 0), {"padding": False}),
    "stereo-1-sample": (STEREO, lambda: _audio(2, 1, 0), {}),
    "stereo-single": (STEREO, lambda: _audio(2, 37, 0), {}),
    "stereo-float64": (STEREO, lambda: _audio(2, 37, 0, np.float64), {}),
    # batches of unequal lengths, each padding mode
    "mono-batch": (MONO, lambda: _batch(1, [20, 1, 33]), {}),
    "mono-batch-lists": (MONO, lambda: [x.tolist() for x in _batch(1, [20, 1, 33])], {}),
    "mono-batch-tuple": (MONO, lambda: tuple(_batch(1, [20, 33])), {}),
    "mono-batch-float64": (MONO, lambda: _batch(1, [20, 33], np.float64), {}),
    "mono-pad-true": (MONO, lambda: _batch(1, [20, 33]), {"padding": True}),
    "mono-pad-longest": (MONO, lambda: _batch(1, [20, 33]), {"padding": "longest"}),
    "mono-longest-ignores-max_length": (
        MONO,
        lambda: _batch(1, [20, 33]),
        {"padding": "longest", "max_length": 25},
    ),
    "mono-pad-max_length": (
        MONO,
        lambda: _batch(1, [20, 33]),
        {"padding": "max_length", "max_length": 40},
    ),
    "mono-pad-false": (MONO, lambda: _batch(1, [20, 33]), {"padding": False}),
    "mono-pad-false-equal": (MONO, lambda: _batch(1, [20, 20]), {"padding": False}),
    "mono-truncate-then-pad": (
        MONO,
        lambda: _batch(1, [20, 33, 5]),
        {"truncation": True, "max_length": 25},
    ),
    "mono-truncate-no-pad": (
        MONO,
        lambda: _batch(1, [20, 33]),
        {"truncation": True, "max_length": 25, "padding": False},
    ),
    "mono-left-padding": (
        {"padding_side": "left"},
        lambda: _batch(1, [20, 33]),
        {},
    ),
    "mono-padding-value": ({"padding_value": -0.5}, lambda: _batch(1, [20, 33]), {}),
    "stereo-batch": (STEREO, lambda: _batch(2, [20, 1, 33]), {}),
    "stereo-batch-float64": (STEREO, lambda: _batch(2, [20, 33], np.float64), {}),
    "stereo-pad-max_length": (
        STEREO,
        lambda: _batch(2, [20, 33]),
        {"padding": "max_length", "max_length": 40},
    ),
    "stereo-pad-false": (STEREO, lambda: _batch(2, [20, 33]), {"padding": False}),
    "stereo-truncate-then-pad": (
        STEREO,
        lambda: _batch(2, [20, 33, 5]),
        {"truncation": True, "max_length": 25},
    ),
    "stereo-truncate-no-pad": (
        STEREO,
        lambda: _batch(2, [20, 33]),
        {"truncation": True, "max_length": 25, "padding": False},
    ),
    # 48 kHz chunked model: lengths around one and two chunk strides
    "48k-pad-one-chunk": (CHUNKED_48K, lambda: _batch(2, [30000, 47520]), {}),
    "48k-pad-two-chunks": (CHUNKED_48K, lambda: _batch(2, [48000, 1]), {}),
    "48k-pad-max_length-no-length": (
        CHUNKED_48K,
        lambda: _batch(2, [48000, 100]),
        {"padding": "max_length"},
    ),
    "48k-pad-explicit-max_length": (
        CHUNKED_48K,
        lambda: _batch(2, [48000, 100]),
        {"padding": "max_length", "max_length": 50000},
    ),
    "48k-longest-with-max_length": (
        CHUNKED_48K,
        lambda: _batch(2, [48000, 100]),
        {"max_length": 50000},
    ),
    "48k-no-pad": (CHUNKED_48K, lambda: _batch(2, [48000, 100]), {"padding": False}),
    "48k-truncate": (CHUNKED_48K, lambda: _batch(2, [100000, 96000]), {"truncation": True}),
    "48k-truncate-rounds-up": (
        CHUNKED_48K,
        lambda: _batch(2, [100000, 95100]),
        {"truncation": True},
    ),
    "48k-truncate-short": (CHUNKED_48K, lambda: _batch(2, [1000, 300]), {"truncation": True}),
    "48k-truncate-no-pad": (
        CHUNKED_48K,
        lambda: _batch(2, [100000, 96000]),
        {"truncation": True, "padding": False},
    ),
    "48k-truncate-max_length": (
        CHUNKED_48K,
        lambda: _batch(2, [100000, 96000]),
        {"truncation": True, "max_length": 50000},
    ),
    "48k-single": (CHUNKED_48K, lambda: _audio(2, 50000, 0), {}),
    "48k-mono": (CHUNKED_48K_MONO, lambda: _batch(1, [50000, 7]), {}),
    "48k-float64": (CHUNKED_48K, lambda: _batch(2, [50000, 7], np.float64), {}),
}


@needs_transformers
@pytest.mark.parametrize("name", list(_CASES))
def test_matches_transformers(name):
    settings, make_input, options = _CASES[name]
    ours, theirs = _extractors(settings)
    rate = ours.sampling_rate
    expected = theirs(make_input(), sampling_rate=rate, **options)
    _assert_same(ours(make_input(), sampling_rate=rate, **options), expected)

    lengths = {x.shape[-1] for x in expected["input_values"]}
    if len(lengths) == 1:  # tensors exist only for equal lengths
        expected_np = theirs(make_input(), sampling_rate=rate, return_tensors="np", **options)
        _assert_same(
            ours(make_input(), sampling_rate=rate, return_tensors="np", **options), expected_np
        )


@needs_transformers
@pytest.mark.parametrize("name", ["mono-batch", "stereo-truncate-then-pad", "48k-pad-two-chunks"])
def test_jax_tensors(name):
    import jax

    settings, make_input, options = _CASES[name]
    ours, theirs = _extractors(settings)
    rate = ours.sampling_rate
    expected = theirs(make_input(), sampling_rate=rate, return_tensors="np", **options)
    actual = ours(make_input(), sampling_rate=rate, return_tensors="jax", **options)
    assert set(actual) == set(expected)
    for key, value in expected.items():
        assert isinstance(actual[key], jax.Array), key
        assert actual[key].dtype == value.dtype and actual[key].shape == value.shape, key
        np.testing.assert_array_equal(np.asarray(actual[key]), value, err_msg=key)


def test_input_is_not_modified_and_output_is_float32():
    audio = _audio(1, 10, 0, np.float64)
    copy = audio.copy()
    out = EncodecFeatureExtractor()(audio, sampling_rate=24000, return_tensors="np")
    np.testing.assert_array_equal(audio, copy)
    assert out.input_values.dtype == np.float32 and out.input_values.shape == (1, 1, 10)
    # transformers keeps an integer array's dtype; every output here is float32.
    ints = EncodecFeatureExtractor()(np.arange(4, dtype=np.int16), sampling_rate=24000)
    assert ints.input_values[0].dtype == np.float32
    np.testing.assert_array_equal(ints.input_values[0], [[0, 1, 2, 3]])


@needs_transformers
def test_transformers_enums_and_do_not_pad():
    from transformers.utils import PaddingStrategy, TensorType

    ours, theirs = _extractors(MONO)
    batch = _batch(1, [3, 9])
    _assert_same(
        ours(batch, sampling_rate=24000, padding=PaddingStrategy.LONGEST, return_tensors="np"),
        theirs(batch, sampling_rate=24000, padding="longest", return_tensors=TensorType.NUMPY),
    )
    # transformers returns a ragged object-dtype padding_mask for "do_not_pad"; here it means
    # the same as padding=False, and may be combined with truncation.
    _assert_same(
        ours(batch, sampling_rate=24000, padding="do_not_pad"),
        theirs(batch, sampling_rate=24000, padding=False),
    )
    _assert_same(
        ours(batch, sampling_rate=24000, padding="do_not_pad", truncation=True, max_length=5),
        theirs(batch, sampling_rate=24000, padding=False, truncation=True, max_length=5),
    )


def test_batch_of_jax_arrays():
    import jax.numpy as jnp

    extractor = EncodecFeatureExtractor(**STEREO)
    batch = _batch(2, [3, 9])
    expected = extractor(batch, sampling_rate=24000, return_tensors="np")
    actual = extractor([jnp.asarray(x) for x in batch], sampling_rate=24000, return_tensors="np")
    for key in expected:
        np.testing.assert_array_equal(actual[key], expected[key])


def test_batch_feature_attribute_access():
    out = EncodecFeatureExtractor()(_audio(1, 5, 0), sampling_rate=24000, padding=False)
    assert not hasattr(out, "padding_mask")
    with pytest.raises(AttributeError, match="padding_mask"):
        out.padding_mask  # noqa: B018


@needs_transformers
def test_chunk_properties_match_transformers():
    for settings in (
        MONO,
        CHUNKED_48K,
        {"chunk_length_s": 0.5},
        {"chunk_length_s": 2, "overlap": 0},
    ):
        ours, theirs = _extractors(settings)
        assert (ours.chunk_length, ours.chunk_stride) == (theirs.chunk_length, theirs.chunk_stride)


def test_missing_sampling_rate_is_accepted_silently():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = EncodecFeatureExtractor()(_audio(1, 5, 0))
    assert out.input_values[0].shape == (1, 5)


# ---- configuration files ----


@needs_transformers
def test_to_dict_matches_transformers():
    for settings in (MONO, CHUNKED_48K, {"padding_side": "left", "padding_value": 1.0}):
        ours, theirs = _extractors(settings)
        assert ours.to_dict() == theirs.to_dict()


@needs_transformers
@pytest.mark.parametrize("settings", [MONO, CHUNKED_48K], ids=["24k", "48k"])
def test_save_pretrained_round_trips_through_transformers(tmp_path, settings):
    ours, theirs = _extractors(settings)
    ours.save_pretrained(tmp_path / "ours")
    loaded = transformers.EncodecFeatureExtractor.from_pretrained(tmp_path / "ours")
    assert loaded.to_dict() == theirs.to_dict()
    theirs.save_pretrained(tmp_path / "theirs")
    assert EncodecFeatureExtractor.from_pretrained(tmp_path / "theirs") == ours
    files = [tmp_path / d / "preprocessor_config.json" for d in ("ours", "theirs")]
    assert json.loads(files[0].read_text()) == json.loads(files[1].read_text())

    batch = _batch(ours.feature_size, [30000, 50000])
    rate = ours.sampling_rate
    _assert_same(
        EncodecFeatureExtractor.from_pretrained(tmp_path / "theirs")(batch, sampling_rate=rate),
        loaded(batch, sampling_rate=rate),
    )


def test_unknown_keys_are_ignored_and_other_extractors_refused(tmp_path):
    path = tmp_path / "preprocessor_config.json"
    path.write_text(json.dumps({"feature_size": 2, "processor_class": "EncodecProcessor"}))
    assert EncodecFeatureExtractor.from_pretrained(tmp_path).feature_size == 2
    path.write_text(json.dumps({"feature_extractor_type": "WhisperFeatureExtractor"}))
    with pytest.raises(ValueError, match="Not an EnCodec feature extractor"):
        EncodecFeatureExtractor.from_pretrained(tmp_path)


@pytest.mark.parametrize("config", [ENCODEC_24KHZ, ENCODEC_48KHZ], ids=["24k", "48k"])
def test_from_model_config(tmp_path, config):
    expected = EncodecFeatureExtractor(
        feature_size=config.audio_channels,
        sampling_rate=config.sampling_rate,
        chunk_length_s=config.chunk_length_s,
        overlap=config.overlap,
    )
    assert EncodecFeatureExtractor.from_config(config) == expected
    config.to_json_file(tmp_path / "config.json")
    assert EncodecFeatureExtractor.from_pretrained(tmp_path) == expected
    # preprocessor_config.json wins over config.json
    EncodecFeatureExtractor(padding_value=0.25).save_pretrained(tmp_path)
    assert EncodecFeatureExtractor.from_pretrained(tmp_path).padding_value == 0.25


def test_from_pretrained_hub(tmp_path, monkeypatch):
    import huggingface_hub

    try:
        from huggingface_hub.errors import EntryNotFoundError
    except ImportError:  # huggingface_hub < 0.24
        from huggingface_hub.utils import EntryNotFoundError

    ENCODEC_48KHZ.to_json_file(tmp_path / "config.json")
    calls = []

    def fake_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename, kwargs))
        if not (tmp_path / filename).exists():
            raise EntryNotFoundError(f"{filename} not in {repo_id}")
        return str(tmp_path / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    options = {"revision": "v1", "cache_dir": "/c", "local_files_only": True, "token": "t"}
    loaded = EncodecFeatureExtractor.from_pretrained("facebook/encodec_48khz", **options)
    assert loaded == EncodecFeatureExtractor(**CHUNKED_48K)
    assert [c[1] for c in calls] == ["preprocessor_config.json", "config.json"]
    assert all(c[0] == "facebook/encodec_48khz" and c[2] == options for c in calls)

    (tmp_path / "config.json").unlink()
    # Neither file: huggingface_hub's own error for config.json reaches the caller.
    with pytest.raises(EntryNotFoundError, match="config.json not in"):
        EncodecFeatureExtractor.from_pretrained("facebook/encodec_48khz")


def test_from_pretrained_empty_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither preprocessor_config.json nor config.json"):
        EncodecFeatureExtractor.from_pretrained(tmp_path)


def test_from_config_needs_an_encodec_config():
    with pytest.raises(ValueError, match="EncodecConfig"):
        EncodecFeatureExtractor.from_config({"audio_channels": 1})
    assert EncodecFeatureExtractor.from_config(EncodecConfig(audio_channels=2)).feature_size == 2


# ---- errors ----

_BAD_INPUTS = {
    "mono-2d": (MONO, np.zeros((1, 8)), r"mono audio of shape \(samples,\), got shape \(1, 8\)"),
    "mono-batch-as-array": (MONO, np.zeros((3, 8)), "a batch is a list of items"),
    "mono-item-2d": (MONO, [np.zeros(4), np.zeros((2, 4))], "item 1 to be mono audio"),
    "mono-scalar": (MONO, np.float32(1.0), r"shape \(samples,\), got shape \(\)"),
    "stereo-1d": (STEREO, np.zeros(8), r"stereo audio of shape \(2, samples\), got a 1-D"),
    "stereo-3d": (STEREO, np.zeros((1, 2, 8)), "got a 3-D array"),
    "stereo-3-channels": (STEREO, np.zeros((3, 8)), "with 2 channels.*got 3 channels"),
    "stereo-channels-last": (STEREO, np.zeros((8, 2)), "with 2 channels.*got 8 channels"),
    "empty-mono": (MONO, np.zeros(0), "at least one sample"),
    "empty-stereo": (STEREO, np.zeros((2, 0)), "at least one sample"),
    "empty-item": (MONO, [np.zeros(3), np.zeros(0)], "item 1 to have at least one sample"),
    "empty-list": (MONO, [], "empty list"),
    "strings": (MONO, ["a", "b"], "real numbers"),
    "none": (MONO, None, "real numbers"),
    "objects": (MONO, np.array([object(), object()]), "real numbers"),
    "complex": (MONO, np.ones(4, dtype=np.complex64), "real numbers"),
    "booleans": (MONO, np.ones(4, dtype=bool), "real numbers"),
    "ragged-stereo": (STEREO, [[[1.0, 2.0], [3.0]]], "array of numbers"),
    "nan": (MONO, np.array([0.0, np.nan]), "NaN or Inf"),
    "inf": (STEREO, np.array([[0.0, 1.0], [np.inf, 0.0]]), "NaN or Inf"),
    "overflows-float32": (MONO, np.array([1e300]), "NaN or Inf"),
}


@pytest.mark.parametrize("name", list(_BAD_INPUTS))
def test_bad_input(name):
    settings, audio, message = _BAD_INPUTS[name]
    with pytest.raises(ValueError, match=message):
        EncodecFeatureExtractor(**settings)(audio, sampling_rate=24000)


_BAD_OPTIONS = {
    "sampling-rate": ({"sampling_rate": 16000}, "sampled at 16000 Hz.*expects 24000 Hz"),
    "padding-and-truncation": (
        {"padding": True, "truncation": True, "max_length": 4},
        "Both padding and truncation",
    ),
    "max_length-padding-and-truncation": (
        {"padding": "max_length", "truncation": True, "max_length": 4},
        "Both padding and truncation",
    ),
    "truncation-without-max_length": ({"truncation": True}, "needs max_length"),
    "max_length-padding-without-max_length": ({"padding": "max_length"}, "needs max_length"),
    "item-longer-than-max_length": (
        {"padding": "max_length", "max_length": 5},
        "Item 1 has 9 samples, more than max_length=5",
    ),
    "bad-padding": ({"padding": "shortest"}, "padding must be"),
    "bad-max_length": ({"max_length": 0}, "max_length must be a positive"),
    "bad-truncation": ({"truncation": "yes", "max_length": 4}, "truncation must be"),
    "torch": ({"return_tensors": "pt"}, r"torch tensors.*None, 'np' and 'jax'"),
    "unknown-tensors": ({"return_tensors": "tf"}, r"None, 'np' or 'jax'"),
    "ragged-tensors": ({"padding": False, "return_tensors": "np"}, "unequal lengths"),
}


@pytest.mark.parametrize("name", list(_BAD_OPTIONS))
def test_bad_options(name):
    options, message = _BAD_OPTIONS[name]
    options = {"sampling_rate": 24000, **options}
    with pytest.raises(ValueError, match=message):
        EncodecFeatureExtractor()(_batch(1, [3, 9]), **options)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"feature_size": 3}, "feature_size must be 1"),
        ({"sampling_rate": 0}, "sampling_rate must be a positive integer"),
        ({"padding_value": float("nan")}, "padding_value must be a finite number"),
        ({"chunk_length_s": 0.0}, "chunk_length_s must be"),
        ({"chunk_length_s": 1.0, "overlap": 1.0}, r"overlap must be a fraction in \[0, 1\)"),
        ({"padding_side": "middle"}, "padding_side must be one of"),
    ],
)
def test_bad_settings(settings, message):
    with pytest.raises(ValueError, match=message):
        EncodecFeatureExtractor(**settings)


def test_truncating_to_no_whole_chunk():
    extractor = EncodecFeatureExtractor(chunk_length_s=1.0, overlap=0.0)
    with pytest.raises(ValueError, match="leaves no samples"):
        extractor(_batch(1, [30000, 100]), sampling_rate=24000, truncation=True)


def test_library_never_imports_torch_or_transformers():
    import encodec_jax.feature_extraction as module

    tree = ast.parse(pathlib.Path(module.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            imported.add(node.module.split(".")[0])
    assert not imported & {"torch", "transformers"}, imported
