"""Training data: deterministic examples, per-process shares of each global batch, resumption,
background workers, durations, resampling and channel mixing, failures while reading."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import soundfile as sf

from encodec_jax.audio import load_audio
from encodec_jax.train.data import (
    AudioFolder,
    DataError,
    SegmentSource,
    train_batches,
    valid_batches,
)

RATE = 8000


def write(path, audio: np.ndarray, rate: int) -> None:
    # FLAC holds integers: 24-bit, in which every value these tests use is exact.
    subtype = "PCM_24" if str(path).endswith(".flac") else "FLOAT"
    sf.write(path, audio.T if audio.ndim == 2 else audio, rate, subtype=subtype)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> AudioFolder:
    """Three files, each a constant (so a segment tells which file it came from): 1 s, 3 s and
    (in a subfolder) 0.1 s, which is shorter than a segment."""
    root = tmp_path_factory.mktemp("data")
    (root / "sub").mkdir()
    write(root / "a.wav", np.full(RATE, 0.25, np.float32), RATE)
    write(root / "b.flac", np.full(3 * RATE, -0.5, np.float32), RATE)
    write(root / "sub" / "c.wav", np.full(RATE // 10, 0.75, np.float32), RATE)
    return AudioFolder.scan(root)


def source(folder, seed=0, segment=0.25):
    return SegmentSource(folder, RATE, 1, segment, seed)


def batches(src, *, steps, global_batch=4, first_step=0, process_index=0, process_count=1, **kw):
    it = train_batches(
        src,
        global_batch=global_batch,
        first_step=first_step,
        steps=steps,
        process_index=process_index,
        process_count=process_count,
        **kw,
    )
    return [next(it) for _ in range(steps - first_step)]


def test_scan_finds_every_file_with_its_header(folder):
    assert folder.paths == ("a.wav", "b.flac", "sub/c.wav")
    assert folder.frames == (RATE, 3 * RATE, RATE // 10)
    assert folder.seconds == pytest.approx(4.1)


def test_examples_depend_on_seed_and_index_only(folder):
    a, b = source(folder), source(folder)
    for i in (0, 7, 123):
        np.testing.assert_array_equal(a.train_example(i), b.train_example(i))
    assert any(
        not np.array_equal(a.train_example(i), source(folder, seed=1).train_example(i))
        for i in range(20)
    )


@pytest.mark.parametrize("process_count", [2, 4])
def test_processes_read_disjoint_shares_of_the_same_global_batches(folder, process_count):
    """Each process's local batches, put side by side in process order, are exactly the global
    batches one process reads."""
    whole = batches(source(folder), steps=3)
    shares = [
        batches(source(folder), steps=3, process_index=p, process_count=process_count)
        for p in range(process_count)
    ]
    for step in range(3):
        assert shares[0][step].shape == (4 // process_count, 1, RATE // 4)
        np.testing.assert_array_equal(np.concatenate([s[step] for s in shares]), whole[step])


def test_a_resumed_run_reads_the_batches_an_uninterrupted_one_would(folder):
    whole = batches(source(folder), steps=5)
    resumed = batches(source(folder), steps=5, first_step=3)
    for a, b in zip(whole[3:], resumed, strict=True):
        np.testing.assert_array_equal(a, b)


def test_background_workers_give_the_same_batches(folder):
    whole = batches(source(folder), steps=3)
    background = batches(source(folder), steps=3, workers=2)
    for a, b in zip(whole, background, strict=True):
        np.testing.assert_array_equal(a, b)


def test_batch_must_divide_over_processes(folder):
    with pytest.raises(DataError, match="divide evenly over 3 processes"):
        batches(source(folder), steps=1, process_count=3)


def test_files_are_drawn_in_proportion_to_their_duration(folder):
    """Over 2000 examples, the share of each file within 4 standard deviations of its share of
    the folder's duration; a file shorter than a segment is zero-padded at the end."""
    src = source(folder)
    counts = {0.25: 0, -0.5: 0, 0.75: 0}
    n = 2000
    for i in range(n):
        example = src.train_example(i)
        value = float(example[0, 0])
        counts[value] += 1
        if value == 0.75:
            assert np.all(example[0, : RATE // 10] == 0.75) and np.all(
                example[0, RATE // 10 :] == 0
            )
        else:
            assert np.all(example == value)
    for value, seconds in ((0.25, 1.0), (-0.5, 3.0), (0.75, 0.1)):
        p = seconds / 4.1
        assert abs(counts[value] / n - p) <= 4 * np.sqrt(p * (1 - p) / n), counts


def test_segments_are_resampled_and_mixed_to_the_model(tmp_path):
    """A stereo 16 kHz file into a mono 8 kHz model: the segment equals load_audio's reading of
    the same window (to 1e-6: soxr on a window against soxr on the same window)."""
    t = np.arange(16000 * 2) / 16000
    stereo = np.stack([np.sin(2 * np.pi * 440 * t), 0.5 * np.sin(2 * np.pi * 660 * t)])
    write(tmp_path / "s.wav", stereo.astype(np.float32) * 0.5, 16000)
    folder = AudioFolder.scan(tmp_path)
    src = SegmentSource(folder, RATE, 1, 0.5, 0)
    example = src.train_example(0)
    assert example.shape == (1, RATE // 2) and example.dtype == np.float32
    # Find the window: the draw is the example's, so read every start and keep the one matching.
    rng = np.random.default_rng([0, 0])
    rng.random()
    start = int(rng.random() * (2 * 16000 - 8000))
    expected, _ = load_audio(tmp_path / "s.wav", RATE, 1, start, 8000)
    np.testing.assert_allclose(example, expected[:, : RATE // 2], atol=1e-6)


def test_validation_segments_are_fixed_and_cover_every_file(folder):
    src = source(folder)
    first = valid_batches(src, 6, 4)
    assert [b.shape[0] for b in first] == [4, 2]
    again = valid_batches(source(folder, seed=5), 6, 4)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    values = {float(x[0, 0]) for b in first for x in b}
    assert values == {0.25, -0.5, 0.75}


def test_a_file_failing_while_training_is_logged_and_replaced(tmp_path, caplog):
    for name, value in (("a.wav", 0.25), ("b.wav", -0.5)):
        write(tmp_path / name, np.full(RATE, value, np.float32), RATE)
    folder = AudioFolder.scan(tmp_path)
    os.remove(tmp_path / "a.wav")  # gone after the scan
    src = source(folder)
    with caplog.at_level(logging.WARNING, logger="encodec_jax.train.data"):
        examples = [src.train_example(i) for i in range(20)]
    assert all(np.all(e == -0.5) for e in examples)
    assert "skipping a.wav" in caplog.text
    os.remove(tmp_path / "b.wav")
    with pytest.raises(DataError, match="no file of"):
        src.train_example(0)


def test_missing_or_empty_folders_are_refused(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        AudioFolder.scan(tmp_path / "nope")
    (tmp_path / "junk.wav").write_bytes(b"not audio")
    with pytest.raises(DataError, match="1 unreadable audio files"):
        AudioFolder.scan(tmp_path)
