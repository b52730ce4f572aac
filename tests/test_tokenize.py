"""`encodec-jax tokenize`: Parquet shards equal to the library's codes, errors.jsonl, resuming
after a crash at any point (SIGKILL included) with every file exactly once, determinism, and one
share per process under jax.distributed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf

import encodec_jax.tokenize as tokenize_module
from encodec_jax.audio import load_audio
from encodec_jax.batching import BatchCodec
from tests.test_cli import assert_one_line_error, run_cli, tiny_checkpoint, tiny_model, tone

BAD = {"broken/corrupt.wav": "cannot read audio file", "empty.flac": "the file is empty"}


def make_dataset(root: Path, count: int = 9, seed: int = 0) -> list[str]:
    """`count` good files (wav/flac/ogg; 16, 44.1 and 48 kHz; mono and stereo) in nested
    folders, the two bad files of BAD, and a file that is not audio. Returns the good files'
    relative paths. At 16 kHz the files are 5001, 8000 or 6007 samples long: few lengths keep
    the compiled programs few, and two of them end in a partial frame."""
    good = []
    for i in range(count):
        fmt = ("wav", "flac", "ogg")[i % 3]
        rate = (16_000, 44_100, 48_000)[(i // 3) % 3]
        seconds = (5001, 8000, 6007)[i % 3] / 16_000
        rel = f"{'sub/' if i % 2 else ''}{'deep/' if i % 4 == 3 else ''}f{i:02d}.{fmt}"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        sf.write(root / rel, tone(seconds, rate, 1 + i % 2, seed=seed + i), rate)
        good.append(rel)
    (root / "broken").mkdir(exist_ok=True)
    (root / "broken/corrupt.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt junkjunkjunk")
    (root / "empty.flac").write_bytes(b"")
    (root / "README.txt").write_text("not audio")
    return sorted(good)


def tokenize(capsys, in_dir, out_dir, *extra) -> tuple[int, str, str]:
    return run_cli(
        capsys, "tokenize", in_dir, "-o", out_dir, "--model", tiny_checkpoint(),
        "--shard-size", "3", "--buckets", "1", "--batch-size", "4", "--no-progress", *extra,
    )  # fmt: skip


def read_rows(out_dir: Path, pattern: str = "shard-*.parquet") -> list[dict]:
    rows = []
    for path in sorted(out_dir.glob(pattern)):
        rows.extend(pq.read_table(path).to_pylist())
    return rows


def snapshot(out_dir: Path) -> dict[str, bytes]:
    """Every file of an output directory (temporary files would show up here too)."""
    return {p.name: p.read_bytes() for p in sorted(out_dir.iterdir())}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("audio")
    return root, make_dataset(root)


@pytest.fixture(scope="module")
def reference_run(dataset, tmp_path_factory):
    """An uninterrupted run: (output directory, its files)."""
    root, _ = dataset
    out = tmp_path_factory.mktemp("reference") / "out"
    code = tokenize_module_main(root, out)
    assert code == tokenize_module.EXIT_SOME_FAILED
    return out, snapshot(out)


def tokenize_module_main(in_dir, out_dir, *extra) -> int:
    """tokenize through `main` without capsys (for module-scoped fixtures)."""
    from encodec_jax.cli import main

    return main(
        [
            "tokenize", str(in_dir), "-o", str(out_dir), "--model", tiny_checkpoint(),
            "--shard-size", "3", "--buckets", "1", "--batch-size", "4", "--no-progress",
            *extra,
        ]
    )  # fmt: skip


def test_shards_hold_the_library_codes(dataset, reference_run, tmp_path):
    root, good = dataset
    out, files = reference_run
    # 11 files sorted: shards of 3, the two bad files leave their shards shorter
    assert sorted(files) == [
        "errors.jsonl",
        "manifest.json",
        "shard-00000.parquet",
        "shard-00001.parquet",
        "shard-00002.parquet",
        "shard-00003.parquet",
    ]
    rows = read_rows(out)
    assert [r["path"] for r in rows] == good  # every good file once, in path order
    model = tiny_model()
    audios = [load_audio(root / row["path"], 16_000, 1)[0] for row in rows]
    batched = BatchCodec(model, batch_size=4, buckets=[16_000]).encode(audios)
    for row, audio, item in zip(rows, audios, batched, strict=True):
        np.testing.assert_array_equal(np.array(row["codes"]), item.audio_codes)
        # Encoded alone, the model pads a partial last frame by reflection, not with the
        # batch's zeros: that frame may differ (use --exact for identical codes), no other.
        alone = np.asarray(model.encode(audio[None]).audio_codes)[:, 0]
        np.testing.assert_array_equal(np.array(row["codes"])[..., :-1], alone[..., :-1])
        if audio.shape[1] % 32 == 0:
            np.testing.assert_array_equal(np.array(row["codes"]), alone)
        assert row["num_samples"] == audio.shape[1] and row["sample_rate"] == 16_000
        assert row["chunk_frames"] == [alone.shape[-1]]
        assert row["audio_scales"] is None and row["bandwidth"] == 2.0
        assert row["model"] == tiny_checkpoint()

    errors = [json.loads(line) for line in files["errors.jsonl"].decode().splitlines()]
    assert [e["path"] for e in errors] == sorted(BAD)
    for entry in errors:
        assert BAD[entry["path"]] in entry["error"]
    manifest = json.loads(files["manifest.json"])
    assert manifest["num_shards"] == 4
    assert manifest["settings"]["source_shards"] == len(good) + len(BAD)


def test_load_dataset(reference_run, tmp_path):
    datasets = pytest.importorskip("datasets")
    out, _ = reference_run
    ds = datasets.load_dataset(
        "parquet",
        data_files=str(out / "shard-*.parquet"),
        split="train",
        cache_dir=str(tmp_path / "hf"),
    )
    assert ds.num_rows == 9
    assert set(ds.column_names) >= {"path", "codes", "audio_scales", "sample_rate", "num_samples"}
    rows = read_rows(out)
    assert ds[0]["codes"] == rows[0]["codes"] and ds[8]["path"] == rows[8]["path"]


def test_cli_reports_failures_and_is_deterministic(dataset, reference_run, tmp_path, capsys):
    root, _ = dataset
    code, out, err = tokenize(capsys, root, tmp_path / "out")
    assert code == tokenize_module.EXIT_SOME_FAILED
    assert_one_line_error(1, err, "2 of 11 items failed", "errors.jsonl")
    assert "x realtime" in out and "items/s" in out
    assert snapshot(tmp_path / "out") == reference_run[1]  # byte for byte

    # run again: nothing to do, same files, still reports the failures
    code, out, err = tokenize(capsys, root, tmp_path / "out")
    assert code == tokenize_module.EXIT_SOME_FAILED and "11 done by an earlier run" in out
    assert snapshot(tmp_path / "out") == reference_run[1]


class Crash(BaseException):
    """Stands for the process dying (BaseException: nothing in the library catches it)."""


def test_resume_after_a_crash_at_every_write(dataset, reference_run, tmp_path, monkeypatch):
    """Kill the run just before each of its atomic writes completes (leaving the temporary
    file behind, as SIGKILL would), resume, and get exactly the uninterrupted output."""
    root, _ = dataset
    real = tokenize_module.atomic_write

    def crashing_at(n):
        calls = {"count": 0}

        def atomic_write(path, mode="wb"):
            calls["count"] += 1
            if calls["count"] == n:
                stray = Path(path).parent / f".{Path(path).name}.dead{n}.tmp"
                stray.write_bytes(b"half a file")
                raise Crash
            return real(path, mode)

        return atomic_write, calls

    n = 1
    while True:
        out = tmp_path / f"out{n}"
        writer, calls = crashing_at(n)
        monkeypatch.setattr(tokenize_module, "atomic_write", writer)
        try:
            tokenize_module_main(root, out)
        except Crash:
            pass
        else:
            break  # n is past the last write: every crash point has been tried
        monkeypatch.setattr(tokenize_module, "atomic_write", real)
        assert tokenize_module_main(root, out) == tokenize_module.EXIT_SOME_FAILED
        assert snapshot(out) == reference_run[1], f"crash at write {n}"
        n += 1
    assert n > 8  # manifest, shards, errors: every kind of write was interrupted


def test_resume_after_sigkill(dataset, reference_run, tmp_path, capsys):
    """A real process, killed with SIGKILL as soon as its first shard is on disk."""
    root, _ = dataset
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "encodec_jax", "tokenize", str(root), "-o", str(out),
        "--model", tiny_checkpoint(), "--shard-size", "1", "--buckets", "1",
        "--batch-size", "4", "--no-progress",
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    try:
        while not list(out.glob("shard-*.parquet")):
            assert process.poll() is None, "the run ended before writing a shard"
            assert time.monotonic() < deadline
            time.sleep(0.005)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_shards"] is None, "killed too late to test anything"

    code, _, _ = run_cli(
        capsys, "tokenize", root, "-o", out, "--model", tiny_checkpoint(), "--shard-size", "1",
        "--buckets", "1", "--batch-size", "4", "--no-progress",
    )  # fmt: skip
    assert code == tokenize_module.EXIT_SOME_FAILED
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    assert read_rows(out) == read_rows(reference_run[0])  # every good file exactly once
    errors = (out / "errors.jsonl").read_bytes()
    assert errors == reference_run[1]["errors.jsonl"]


def test_one_share_per_process(dataset, reference_run, tmp_path, monkeypatch):
    """Two processes of a jax.distributed job (simulated one after the other) split the files
    round robin, each with its own shards, manifest and errors; together they hold every
    file once."""
    root, good = dataset
    out = tmp_path / "out"
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    for index in (0, 1):
        monkeypatch.setattr(jax, "process_index", lambda index=index: index)
        assert tokenize_module_main(root, out) == tokenize_module.EXIT_SOME_FAILED
    names = sorted(p.name for p in out.iterdir())
    assert "manifest-p000.json" in names and "manifest-p001.json" in names
    assert "errors-p000.jsonl" in names and "errors-p001.jsonl" in names
    first, second = read_rows(out, "shard-p000-*.parquet"), read_rows(out, "shard-p001-*.parquet")
    assert first and second
    everything = sorted(good + list(BAD))
    assert [r["path"] for r in first] == [p for p in everything[0::2] if p not in BAD]
    assert [r["path"] for r in second] == [p for p in everything[1::2] if p not in BAD]
    by_path = {r["path"]: r for r in read_rows(reference_run[0])}
    for row in first + second:
        assert row == by_path[row["path"]]


def test_exact_mode(dataset, tmp_path):
    """--exact: no padding, so every file's codes equal `EncodecModel.encode` of it alone."""
    root, good = dataset
    assert tokenize_module_main(root, tmp_path / "out", "--exact") == 3
    rows = read_rows(tmp_path / "out")
    assert [r["path"] for r in rows] == good
    model = tiny_model()
    for row in rows:
        audio, _ = load_audio(root / row["path"], 16_000, 1)
        expected = np.asarray(model.encode(audio[None]).audio_codes)[:, 0]
        np.testing.assert_array_equal(np.array(row["codes"]), expected)


def test_refuses_other_settings_and_foreign_directories(dataset, reference_run, tmp_path, capsys):
    root, _ = dataset
    out = tmp_path / "out"
    out.mkdir()
    for name, data in reference_run[1].items():
        (out / name).write_bytes(data)
    code, _, err = run_cli(
        capsys, "tokenize", root, "-o", out, "--model", tiny_checkpoint(), "--shard-size", "4",
        "--buckets", "1", "--no-progress",
    )  # fmt: skip
    assert_one_line_error(code, err, "other settings", "shard_size")
    code, _, err = tokenize(capsys, root, out, "--bandwidth", "4")
    assert_one_line_error(code, err, "bandwidth", "n_q")
    assert snapshot(out) == reference_run[1]

    (root / "sub" / "late.wav").write_bytes((root / "f00.wav").read_bytes())
    try:
        code, _, err = tokenize(capsys, root, out)
        assert_one_line_error(code, err, "source_sha256", "source_shards")
    finally:
        os.remove(root / "sub" / "late.wav")

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    code, _, err = tokenize(capsys, root, foreign)
    assert_one_line_error(code, err, "not empty", "thesis.tex")
    assert sorted(p.name for p in foreign.iterdir()) == ["thesis.tex"]

    (tmp_path / "nothing").mkdir()
    (tmp_path / "nothing" / "a.txt").write_text("x")
    code, _, err = tokenize(capsys, tmp_path / "nothing", tmp_path / "out2")
    assert_one_line_error(code, err, "no audio files")
    assert not (tmp_path / "out2").exists()
