"""BatchCodec (encodec_jax.batching): batched against single-item encoding on the published
architectures, data parallelism over 8 simulated CPU devices, one share per process under
`jax.distributed`, compiled programs per bucket, the persistent compilation cache, input checks.

Measured on test_parity's transformers-derived random models at the largest bandwidth, batch size
4, lengths not multiples of the hop (`python -m pytest tests/test_batching.py -m slow -s` prints
them):

- exact=True: codes and scales identical to `model.encode(item[None])`; decoded audio within
  3.6e-7 (24 kHz), 4.6e-7 (32 kHz), 8.3e-7 (48 kHz) of the peak of the single-item decode, not
  bit-identical (a batch of 4 runs the convolutions in another order than a batch of 1).
- bucketed, 24 kHz (causal): exactly one frame differs, the item's last (1/26, 1/76, 1/150): the
  encoder's right padding of the last frame reflects the item's end alone, and is zeros batched.
- bucketed, 32 kHz (non-causal): 3 or 4 frames differ, all among the last 5 (4/17, 3/51, 4/100,
  4/51): the convolutions before the (causal) LSTM look about 470 samples (< 1 frame) ahead, so
  the LSTM input of the last one or two frames sees the padding, and the kernel-7 convolution
  after the LSTM spreads that 3 frames back. 5 is a receptive-field bound, asserted as such.
- bucketed, 48 kHz (normalised, chunked): every chunk of 48 000 samples of the item is identical,
  codes and scale; a short chunk can differ anywhere (93/94, 39/39, 16/16 frames for the last
  chunk of 30 000, 60 000, 100 000 samples), since its scale and time-group-norm statistics are
  taken over the padded chunk, as transformers does with padding. An item whose last two chunks
  are both short (47 700 samples) has both changed (15/150 and 1/1 frames).
- BatchCodec.decode batches only items of the same frame layout (padding codes changed the
  audio of non-causal decoders: up to 5.4e-3 of the peak at 32 kHz, 0.16-0.66 at 48 kHz), so it
  matches model.decode of the same codes (test at the end).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from jax import monitoring
from jax.sharding import Mesh

from encodec_jax import EncodecConfig, EncodecModel, ops
from encodec_jax.batching import BatchCodec, EncodedItem, process_share
from encodec_jax.testing import random_audio, random_model

from .batching_worker import (
    SHARED_LENGTHS,
    SHARED_SEED,
    TINY_BANDWIDTH,
    TINY_CONFIG,
    make_items,
)
from .requires import needs_transformers

WORKER = Path(__file__).with_name("batching_worker.py")
CHILD_TIMEOUT = 120  # seconds, per group of child processes
BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"  # jax/_src/dispatch.py
DECODE_RTOL = 1e-6  # of the peak: batched against single-item decode of the same codes


# ---- child processes ----
def child_env(**extra: str) -> dict[str, str]:
    """The environment of a worker: CPU only, one device, no persistent cache unless asked."""
    env = dict(os.environ)
    for key in ("XLA_FLAGS", "JAX_COMPILATION_CACHE_DIR", "JAX_NUM_CPU_DEVICES"):
        env.pop(key, None)
    env.update(JAX_PLATFORMS="cpu", ENCODEC_JAX_COMPILATION_CACHE="off")
    env.update(extra)
    return env


def start(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(WORKER), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def kill(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def finish(procs: list[subprocess.Popen], timeout: float = CHILD_TIMEOUT) -> None:
    """Wait for all, killing any still running after `timeout`; fail with the output of any
    that failed or had to be killed."""
    deadline = time.monotonic() + timeout
    outputs: list[str] = []
    try:
        for proc in procs:
            try:
                out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                out, _ = proc.communicate()
                out += f"\n[killed after {timeout} s]"
            outputs.append(out)
    finally:
        kill(procs)
    failed = [
        f"{p.args} exited {p.returncode}:\n{out[-4000:]}"
        for p, out in zip(procs, outputs, strict=True)
        if p.returncode
    ]
    assert not failed, "\n\n".join(failed)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- the tiny model shared by the sharding, distributed, compile and cache tests ----


class Tiny:
    """The tiny model (random weights, codebooks filled from its own residuals so that codes
    vary), its directory for the workers, and single-process reference encodings of the shared
    items."""

    def __init__(self, directory: Path):
        random_model(EncodecConfig(**TINY_CONFIG), seed=0).save_pretrained(directory)
        self.directory = directory
        self.model = EncodecModel.from_pretrained(directory)
        self.items = make_items(SHARED_LENGTHS, SHARED_SEED)
        self._reference: dict[bool, list] = {}

    def reference(self, exact: bool) -> list:
        """The shared items through BatchCodec on one device, batch size 8."""
        if exact not in self._reference:
            mesh = Mesh(np.array(jax.local_devices()[:1]), ("data",))
            codec = BatchCodec(
                self.model, bandwidth=TINY_BANDWIDTH, batch_size=8, exact=exact, mesh=mesh
            )
            self._reference[exact] = codec.encode(self.items)
        return self._reference[exact]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Tiny:
    tiny = Tiny(tmp_path_factory.mktemp("tiny_encodec"))
    codes = np.concatenate([item.audio_codes[0] for item in tiny.reference(False)], axis=-1)
    for level in codes:  # [n_q, frames]: every level uses several codes
        assert len(np.unique(level)) >= 4, np.bincount(level)
    return tiny


def assert_same_items(actual, expected, what: str, scale_rtol: float = 0.0) -> None:
    """Identical codes; scales within `scale_rtol`."""
    assert len(actual) == len(expected), what
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert a.num_samples == e.num_samples, f"{what}: item {i}"
        assert tuple(a.chunk_frames) == tuple(e.chunk_frames), f"{what}: item {i}"
        np.testing.assert_array_equal(a.audio_codes, e.audio_codes, err_msg=f"{what}: item {i}")
        if e.audio_scales is None:
            assert a.audio_scales is None
        else:
            np.testing.assert_allclose(
                a.audio_scales, e.audio_scales, rtol=scale_rtol, err_msg=f"{what}: item {i}"
            )


def load_items(npz, prefix: str, indices) -> list:
    """EncodedItems from a worker's npz."""
    items = []
    for i in indices:
        scales = npz.get(f"{prefix}scales_{i}")
        items.append(
            EncodedItem(
                audio_codes=npz[f"{prefix}codes_{i}"],
                audio_scales=None if scales is None else np.asarray(scales),
                num_samples=int(npz[f"{prefix}samples_{i}"]),
                chunk_frames=tuple(int(f) for f in npz[f"{prefix}frames_{i}"]),
            )
        )
    return items


# ---- 1. batched against single-item encoding, per published architecture ----
# (length, seed) of each item; the repeated lengths put two items in one exact-mode batch.
FULL_ITEMS = {
    "24khz": [(8_017, 1), (24_005, 2), (47_900, 3), (24_005, 4)],
    "32khz": [(10_683, 1), (32_005, 2), (63_900, 3), (32_005, 4)],
    # one chunk; a full and a short chunk; two full and a short; two short (47 520 + 180)
    "48khz": [(30_000, 1), (60_000, 2), (100_000, 3), (60_000, 4), (47_700, 5)],
}
# the default run: one length twice, and one that is exactly its bucket (1 s), so that the exact and
# bucketed runs share that program
QUICK_ITEMS = {"24khz": [(8_017, 1), (24_000, 2), (8_017, 3)]}
# bucketed mode: frames at the end of the item (of each chunk without chunking) that may differ
TAIL_FRAMES = {"24khz": 1, "32khz": 5}


def differing_frames(ours: np.ndarray, single: np.ndarray, frames: int) -> list[int]:
    """Frames (of `[n_q, frames]` codes) where any codebook differs."""
    return np.nonzero((ours[:, :frames] != single[:, :frames]).any(axis=0))[0].tolist()


def check_batched_against_single(name: str, items_spec, tmp_path_factory) -> list[str]:
    from .reference import one_torch_thread
    from .test_parity import load_pair

    with one_torch_thread():
        pair = load_pair(name, tmp_path_factory)
    model, config = pair.model, pair.config
    bandwidth = config.target_bandwidths[-1]
    items = [random_audio(1, config.audio_channels, n, seed=s)[0] for n, s in items_spec]
    singles = [model.encode(item[None], bandwidth=bandwidth) for item in items]
    report: list[str] = []

    # exact mode: identical codes and scales, audio within DECODE_RTOL of the peak
    codec = BatchCodec(model, batch_size=4, bandwidth=bandwidth, exact=True)
    encoded = codec.encode(items)
    decoded = codec.decode(encoded)
    worst = 0.0
    for item, enc, single, audio in zip(items, encoded, singles, decoded, strict=True):
        n = item.shape[-1]
        assert enc.chunk_frames == single.chunk_frames
        codes = np.asarray(single.audio_codes)[:, 0]
        assert enc.audio_codes.shape == codes.shape
        for c, f in enumerate(enc.chunk_frames):
            np.testing.assert_array_equal(enc.audio_codes[c, :, :f], codes[c, :, :f])
        if config.normalize:
            scales = np.array([float(np.asarray(s)[0, 0]) for s in single.audio_scales])
            np.testing.assert_array_equal(enc.audio_scales, scales)
        else:
            assert enc.audio_scales is None and single.audio_scales[0] is None
        alone = model.decode(
            single.audio_codes, single.audio_scales, chunk_frames=single.chunk_frames
        ).audio_values
        alone = np.asarray(alone)[0, :, :n]
        assert audio.shape == alone.shape == item.shape
        error = float(np.abs(audio - alone).max()) / float(np.abs(alone).max())
        worst = max(worst, error)
        assert error <= DECODE_RTOL, f"{n} samples: decode differs by {error:.2e} of the peak"
    report.append(f"{name} exact: codes identical; decode max error {worst:.2e} of the peak")

    # bucketed mode
    codec = BatchCodec(model, batch_size=4, bandwidth=bandwidth)
    encoded = codec.encode(items)
    decoded = codec.decode(encoded)
    for item, enc, single, audio in zip(items, encoded, singles, decoded, strict=True):
        n = item.shape[-1]
        assert enc.chunk_frames == single.chunk_frames
        codes = np.asarray(single.audio_codes)[:, 0]
        chunk_lengths = [
            length for _, length in ops.chunk_bounds(n, config.chunk_length, config.chunk_stride)
        ]
        per_chunk = []
        for c, f in enumerate(enc.chunk_frames):
            diff = differing_frames(enc.audio_codes[c], codes[c], f)
            where = f" (frames {diff[0]}..{diff[-1]})" if diff else ""
            per_chunk.append(f"{len(diff)}/{f}{where}")
            if name in TAIL_FRAMES:
                assert all(d >= f - TAIL_FRAMES[name] for d in diff), (n, c, f, diff)
            else:
                # chunked and normalised: a chunk the item fills is encoded as alone
                if chunk_lengths[c] == config.chunk_length:
                    assert not diff, (n, c, f, diff)
                    assert enc.audio_scales[c] == float(np.asarray(single.audio_scales[c])[0, 0])
        report.append(f"{name} bucketed: {n} samples, differing frames per chunk: {per_chunk}")
        # decoding the item's own codes: as alone only where the decoder cannot see the padding
        alone = model.decode(
            enc.audio_codes[:, None],
            None if enc.audio_scales is None else enc.audio_scales[:, None, None],
            chunk_frames=enc.chunk_frames,
        ).audio_values
        alone = np.asarray(alone)[0, :, :n]
        error = float(np.abs(audio - alone).max()) / float(np.abs(alone).max())
        report.append(f"{name} bucketed decode vs decoding the same codes alone: {error:.2e}")
        if config.use_causal_conv:
            assert error <= DECODE_RTOL, error
    return report


@needs_transformers
def test_batched_against_single_24khz_quick(tmp_path_factory, record_property):
    report = check_batched_against_single("24khz", QUICK_ITEMS["24khz"], tmp_path_factory)
    record_property("measured", report)
    print("\n".join(report))


@pytest.mark.slow
@needs_transformers
@pytest.mark.parametrize("name", list(FULL_ITEMS))
def test_batched_against_single(name, tmp_path_factory, record_property):
    report = check_batched_against_single(name, FULL_ITEMS[name], tmp_path_factory)
    record_property("measured", report)
    print("\n".join(report))


# ---- 2. sharding over 8 simulated CPU devices ----
def test_eight_devices_match_one(tiny, tmp_path):
    out = tmp_path / "shard.npz"
    env = child_env(XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = start(["shard", str(tiny.directory), str(out)], env)
    try:
        expected = {exact: tiny.reference(exact) for exact in (False, True)}  # meanwhile
    except BaseException:
        kill([proc])
        raise
    finish([proc])
    with np.load(out) as npz:
        info = json.loads(str(npz["info"]))
        got = {exact: load_items(npz, f"exact{int(exact)}_", range(10)) for exact in expected}
    assert info["devices"] == info["local_devices"] == 8
    for exact in (False, True):
        run = info["runs"][str(exact)]
        assert run["mesh_size"] == 8
        assert run["calls"], "BatchCodec never called the model"
        for call in run["calls"]:
            # the batch of 8 is split one row per device, and so are the codes
            assert call["input_shape"][0] == 8
            assert call["input_devices"] == 8 and not call["input_replicated"]
            assert [shape[0] for shape in call["input_shards"]] == [1]
            assert call["codes_devices"] == 8 and not call["codes_replicated"]
        # scales: the mean over a row split from the batch can differ in the last bit (measured:
        # 1 ulp for some items in exact mode)
        assert_same_items(got[exact], expected[exact], f"exact={exact}", scale_rtol=1e-6)
    assert len(info["runs"]["False"]["calls"]) == 2  # one bucket: batches of 8 and 2 (+6 pad)
    assert len(info["runs"]["True"]["calls"]) == 2  # two lengths, 5 items each


# ---- 3. two processes under jax.distributed ----
def test_two_processes_share_the_items(tiny, tmp_path):
    port = free_port()
    outs = [tmp_path / f"process{i}.npz" for i in range(2)]
    procs = [
        start(["distributed", str(tiny.directory), str(out), str(port), str(i)], child_env())
        for i, out in enumerate(outs)
    ]
    try:
        expected = tiny.reference(False)  # meanwhile
    except BaseException:
        kill(procs)
        raise
    finish(procs)
    shares = []
    got = [None] * len(tiny.items)
    for i, out in enumerate(outs):
        with np.load(out) as npz:
            info = json.loads(str(npz["info"]))
            assert info["process_index"] == i and info["process_count"] == 2
            assert info["global_devices"] == 2 and info["mesh_size"] == 1
            shares.append(info["share"])
            for j, item in zip(info["share"], load_items(npz, "", info["share"]), strict=True):
                got[j] = item
    assert not set(shares[0]) & set(shares[1])
    assert sorted(shares[0] + shares[1]) == list(range(len(tiny.items)))
    assert shares == [list(range(0, 10, 2)), list(range(1, 10, 2))]
    assert_same_items(got, expected, "union of the two shares")
    assert process_share(len(tiny.items)) == list(range(len(tiny.items)))  # one process here


# ---- 4. compiled programs bounded by the buckets ----
@contextlib.contextmanager
def count_compiles():
    """Names of the programs compiled (or loaded from the persistent cache) inside."""
    names: list[str] = []

    def listener(event, duration, **kwargs):
        if event == BACKEND_COMPILE:
            names.append(str(kwargs.get("fun_name")))

    monitoring.register_event_duration_secs_listener(listener)
    try:
        yield names
    finally:
        monitoring.unregister_event_duration_listener(listener)


# Buckets used by no other test, so that their programs are compiled here for the first time.
COMPILE_BUCKETS = (1_200, 2_400, 3_600)
# Programs compiled (or loaded from the persistent cache) for each new bucket, measured: 11 for the
# unchunked tiny model (encoder, quantizer, and 9 small eager operations of encode on the new
# shapes: input check, padding mask, slicing, padding, stacking); 79-82 for 3 buckets of the chunked
# one (two chunk lengths per bucket, and the chunk gathering runs as eager operations). The bounds
# leave room for a few more small operations.
PROGRAMS_PER_BUCKET = 16
PROGRAMS_PER_BUCKET_CHUNKED = 32


def test_compiles_bounded_by_buckets(tiny):
    codec = BatchCodec(tiny.model, bandwidth=TINY_BANDWIDTH, batch_size=4, buckets=COMPILE_BUCKETS)
    first = [101, 333, 517, 800, 999, 1_200, 1_201, 1_500, 1_777, 2_000, 2_222, 2_400]
    second = [50, 250, 640, 1_111, 1_199, 700, 1_300, 1_601, 1_888, 2_100, 2_399, 1_250]
    third = [2_401, 3_000, 3_600, 90, 1_234]
    with count_compiles() as names:
        codec.encode(make_items(first, seed=1))
    print(f"\nfirst list, 2 buckets: {len(names)} programs: {sorted(names)}")
    assert 2 <= len(names) <= 2 * PROGRAMS_PER_BUCKET
    with count_compiles() as again:
        codec.encode(make_items(second, seed=2))
    assert again == [], f"new lengths in the same buckets compiled {again}"
    with count_compiles() as new:
        codec.encode(make_items(third, seed=3))
    print(f"third list, 3 buckets (1 new): {len(new)} programs: {sorted(new)}")
    assert 1 <= len(new) <= PROGRAMS_PER_BUCKET
    assert len(names) + len(new) <= 3 * PROGRAMS_PER_BUCKET


@pytest.mark.slow
def test_compiles_bounded_by_buckets_chunked(tmp_path):
    """A fresh chunked model: a list spanning 3 buckets at once."""
    config = EncodecConfig(**{**TINY_CONFIG, "chunk_length_s": 0.1, "overlap": 0.01})
    random_model(config, seed=1).save_pretrained(tmp_path)
    model = EncodecModel.from_pretrained(tmp_path)
    codec = BatchCodec(model, bandwidth=TINY_BANDWIDTH, batch_size=4, buckets=(1_592, 3_176))
    lengths = [101, 800, 1_001, 1_592, 1_593, 2_500, 3_176, 3_300, 6_000]
    with count_compiles() as names:
        codec.encode(make_items(lengths, seed=4))  # buckets 1 592, 3 176 and 6 352
    print(f"\nchunked, 3 buckets: {len(names)} programs: {sorted(names)}")
    assert 3 <= len(names) <= 3 * PROGRAMS_PER_BUCKET_CHUNKED
    with count_compiles() as again:
        codec.encode(make_items([700, 2_000, 5_000], seed=5))
    assert again == []


# ---- 5. the persistent compilation cache ----
def test_persistent_compilation_cache(tiny, tmp_path):
    cache = tmp_path / "xla"
    env = child_env(
        ENCODEC_JAX_COMPILATION_CACHE=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0"
    )
    first = start(["cache", str(tiny.directory), str(tmp_path / "first.json")], env)
    # meanwhile: "off" leaves JAX alone; unset uses ~/.cache (here $XDG_CACHE_HOME)/encodec-jax
    off = start(["config", str(tmp_path / "off.json")], child_env())
    default_env = child_env(XDG_CACHE_HOME=str(tmp_path / "xdg"))
    del default_env["ENCODEC_JAX_COMPILATION_CACHE"]
    default = start(["config", str(tmp_path / "default.json")], default_env)
    finish([first, off, default])
    files = [p for p in cache.rglob("*") if p.is_file()]
    assert files, "the first process wrote nothing to the cache"

    second = start(["cache", str(tiny.directory), str(tmp_path / "second.json")], env)
    finish([second])
    results = [json.loads((tmp_path / f"{n}.json").read_text()) for n in ("first", "second")]
    assert results[0]["cache_dir"] == results[1]["cache_dir"] == str(cache)
    assert results[0]["cache_misses"] > 0 and results[0]["cache_hits"] == 0
    # every program the second process needed came from the cache
    assert results[1]["cache_hits"] == results[1]["compiles"] > 0
    assert results[1]["cache_misses"] == 0
    assert results[0]["codes"] == results[1]["codes"]
    assert json.loads((tmp_path / "off.json").read_text())["cache_dir"] is None
    default = json.loads((tmp_path / "default.json").read_text())
    assert default["cache_dir"] == str(tmp_path / "xdg" / "encodec-jax" / "xla")
    # `import encodec_jax` alone changed no JAX setting; enable_compilation_cache() did
    assert default["imported"] is None


# ---- 6. input checks ----
@pytest.mark.parametrize(
    "bad,match",
    [
        (np.zeros((1, 900), np.float32), "item 1: expected \\[2, samples\\]"),  # mono, stereo model
        (np.zeros((3, 900), np.float32), "item 1: expected \\[2, samples\\]"),
        (np.zeros(900, np.float32), "item 1: expected \\[2, samples\\]"),
        (np.zeros((2, 0), np.float32), "item 1 is empty"),
        (np.zeros((2, 900), np.int16), "item 1: expected floating-point audio"),
        (np.zeros((2, 900), bool), "item 1: expected floating-point audio"),
    ],
)
def test_bad_items_name_their_index(tiny, bad, match):
    codec = BatchCodec(tiny.model, bandwidth=TINY_BANDWIDTH)
    good = np.zeros((2, 900), np.float32)
    with pytest.raises(ValueError, match=match):
        codec.encode([good, bad, good])


def test_non_finite_item_names_its_index(tiny):
    bad = np.zeros((2, 900), np.float32)
    bad[1, 17] = np.nan
    with pytest.raises(ValueError, match="item 1"):
        BatchCodec(tiny.model, bandwidth=TINY_BANDWIDTH).encode([np.zeros_like(bad), bad])


@pytest.mark.parametrize("buckets", [(), (0,), (-8, 1_000), (1_000, 0)])
def test_bad_buckets(tiny, buckets):
    with pytest.raises(ValueError, match="buckets"):
        BatchCodec(tiny.model, buckets=buckets)


def test_non_integer_buckets(tiny):
    with pytest.raises(ValueError, match="buckets"):
        codec = BatchCodec(tiny.model, bandwidth=TINY_BANDWIDTH, buckets=(1_000.5,))
        codec.encode([np.zeros((2, 900), np.float32)])


def test_bad_mesh_and_empty_list(tiny):
    mesh = Mesh(np.array(jax.local_devices()[:1]).reshape(1, 1), ("a", "b"))
    with pytest.raises(ValueError, match="one \\(data\\) axis"):
        BatchCodec(tiny.model, mesh=mesh)
    codec = BatchCodec(tiny.model, bandwidth=TINY_BANDWIDTH)
    assert codec.encode([]) == [] and codec.decode([]) == []


# ---- decode of bucketed codes ----
def test_bucketed_decode_matches_decoding_alone(tiny):
    codec = BatchCodec(tiny.model, bandwidth=TINY_BANDWIDTH, batch_size=1)
    [item] = codec.encode([tiny.items[0]])  # 700 samples in the 8 000-sample bucket
    [audio] = codec.decode([item])
    alone = tiny.model.decode(
        item.audio_codes[:, None], item.audio_scales[:, None, None], chunk_frames=item.chunk_frames
    ).audio_values
    alone = np.asarray(alone)[0, :, : item.num_samples]
    error = float(np.abs(audio - alone).max()) / float(np.abs(alone).max())
    assert error <= DECODE_RTOL, f"{error:.3g} of the peak"
