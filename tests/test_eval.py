"""`encodec-jax eval` and `encodec_jax.evaluate`: a small folder, two tiny models of different
rates (each saved and loaded as a user would), the outputs and their columns, the numbers
against a direct computation, failures reported and skipped, determinism."""

from __future__ import annotations

import csv
import dataclasses
import json
import math

import numpy as np
import pytest
import soundfile as sf

from encodec_jax import EncodecModel, metrics
from encodec_jax.cli import main
from encodec_jax.evaluate import (
    CSV_NAME,
    EXIT_SOME_FAILED,
    JSON_NAME,
    PLOT_NAME,
    EvalError,
    evaluate,
    iter_eval_items,
    plot_rate_distortion,
)
from encodec_jax.testing import TINY_CONFIG, random_audio, random_model

from .test_metrics import si_snr_reference, speech_like

# A second architecture at another rate: hop 4 at 16 kHz, 4000 frames/s x 4 bits = 16 kbps
# per codebook.
TINY_16K_CONFIG = dataclasses.replace(
    TINY_CONFIG, sampling_rate=16000, target_bandwidths=(16.0, 32.0), use_causal_conv=False
)
COLUMNS = ["model", "bandwidth", "si_snr", "mel_distance", "stft_distance", "l1", "kbps"]
COLUMNS += ["kbps_entropy"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{directory: model loaded back from it}: TINY_CONFIG (8 kHz, causal) and TINY_16K_CONFIG."""
    out = {}
    for i, config in enumerate((TINY_CONFIG, TINY_16K_CONFIG)):
        directory = tmp_path_factory.mktemp(f"model{i}")
        random_model(config, seed=i).save_pretrained(directory)
        out[str(directory)] = EncodecModel.from_pretrained(directory)
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """speech.wav (1 s, 16 kHz, speech-like), sub/noise.flac (1 s stereo at 8 kHz), broken.wav
    (not audio). One length, so each model compiles its programs once."""
    root = tmp_path_factory.mktemp("data")
    sf.write(root / "speech.wav", speech_like(16000, seconds=1.0)[0], 16000)
    (root / "sub").mkdir()
    sf.write(root / "sub" / "noise.flac", random_audio(1, 2, 8000, seed=3)[0].T, 8000)
    (root / "broken.wav").write_bytes(b"RIFF not really a wave file")
    return root


@pytest.fixture(scope="module")
def cli_run(models, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "out"
    args = [str(data), "-o", str(out), "--no-progress"]
    for name in models:
        args += ["--model", name]
    rc = main(["eval", *args])
    return rc, out


def test_command_writes_json_csv_and_plot(cli_run, models, capsys):
    """Exit status 3 (a file failed), one row per (model, bandwidth) with the issue's columns,
    means over the two good files, the failing file listed, a PNG plot."""
    rc, out = cli_run
    assert rc == EXIT_SOME_FAILED
    result = json.loads((out / JSON_NAME).read_text())
    names = list(models)
    expected = [(names[0], b) for b in (8.0, 16.0, 24.0)] + [(names[1], b) for b in (16.0, 32.0)]
    assert [(r["model"], r["bandwidth"]) for r in result["rows"]] == expected
    for row in result["rows"]:
        assert set(COLUMNS) <= set(row)
        assert row["files"] == 2
        assert row["kbps"] == row["bandwidth"]  # both configs have whole bit rates
        assert 0 < row["kbps_entropy"] <= row["kbps"]
        assert len(row["usage"]) == len(row["perplexity"]) == row["n_q"]
        for name in ("si_snr", "mel_distance", "stft_distance", "l1"):
            per_file = [
                f[name]
                for f in result["per_file"]
                if f["model"] == row["model"] and f["bandwidth"] == row["bandwidth"]
            ]
            assert sorted({f["key"] for f in result["per_file"]}) == [
                "speech.wav",
                "sub/noise.flac",
            ]
            assert row[name] == pytest.approx(np.mean(per_file), rel=1e-12)
            assert all(math.isfinite(v) for v in per_file)
    assert [e["key"] for e in result["errors"]] == ["broken.wav"]
    with open(out / CSV_NAME, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5 and set(COLUMNS) <= set(rows[0])
    assert "pesq" not in rows[0]  # speech metrics only with --speech
    assert float(rows[0]["si_snr"]) == result["rows"][0]["si_snr"]
    png = (out / PLOT_NAME).read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000


def test_rows_are_what_reconstruct_gives(cli_run, models, data):
    """For each file, model and bandwidth: the metrics of `EncodecModel.encode` at that
    bandwidth then `decode` (what `encodec-jax reconstruct` runs), cut to the input's length,
    against the input read at the model's rate (float32: 1e-5 relative; the same programs,
    so in practice equal). Also checks that the codes of a smaller bandwidth are the first
    codebooks of a larger one (what `eval` relies on to encode once)."""
    _, out = cli_run
    result = json.loads((out / JSON_NAME).read_text())
    for name, model in models.items():
        config = model.config
        items = [i for i in iter_eval_items(data, config.sampling_rate, config.audio_channels)]
        assert [i.key for i in items] == ["broken.wav", "speech.wav", "sub/noise.flac"]
        for item in items[1:]:
            top = model.encode(item.audio[None], bandwidth=config.target_bandwidths[-1])
            for bandwidth in config.target_bandwidths:
                enc = model.encode(item.audio[None], bandwidth=bandwidth)
                n_q = enc.audio_codes.shape[2]
                np.testing.assert_array_equal(enc.audio_codes, top.audio_codes[:, :, :n_q])
                dec = model.decode(enc.audio_codes, enc.audio_scales, chunk_frames=enc.chunk_frames)
                y = np.asarray(dec.audio_values)[:, :, : item.audio.shape[-1]]
                x = item.audio[None]
                got = next(
                    f
                    for f in result["per_file"]
                    if (f["key"], f["model"], f["bandwidth"]) == (item.key, name, bandwidth)
                )
                # SI-SNR and L1 in float64 from the formula: they fix the audio compared (the
                # spectral distances are functions of the same two arrays, tested elsewhere).
                want = si_snr_reference(y, x)[0]
                assert got["si_snr"] == pytest.approx(want, rel=1e-5, abs=1e-4)
                assert got["l1"] == pytest.approx(np.mean(np.abs(y - x)), rel=1e-5)


def test_entropy_bitrate_is_a_direct_count(cli_run, models, data):
    """kbps_entropy: the entropy of each codebook's codes over both good files, counted here
    with np.bincount and summed in float64 (1e-5 relative), times the frame rate; usage too."""
    _, out = cli_run
    result = json.loads((out / JSON_NAME).read_text())
    for name, model in models.items():
        config = model.config
        codes = []
        for item in iter_eval_items(data, config.sampling_rate, config.audio_channels):
            if item.audio is not None:
                enc = model.encode(item.audio[None], bandwidth=config.target_bandwidths[-1])
                codes.append(np.asarray(enc.audio_codes)[0, 0])  # [n_q, frames], one chunk
        codes = np.concatenate(codes, axis=-1)
        for row in (r for r in result["rows"] if r["model"] == name):
            bits = 0.0
            for q in range(row["n_q"]):
                counts = np.bincount(codes[q], minlength=config.codebook_size)
                p = counts[counts > 0] / counts.sum()
                bits += float(-(p * np.log2(p)).sum())
                assert row["usage"][q] == np.count_nonzero(counts) / config.codebook_size
            expected = bits * config.frame_rate / 1000
            assert row["kbps_entropy"] == pytest.approx(expected, rel=1e-5)
            assert row["entropy_saving"] == pytest.approx(1 - expected / row["kbps"], rel=1e-5)


def test_results_are_deterministic(cli_run, models, data):
    """The library call gives the command's numbers exactly, and a second call the same."""
    _, out = cli_run
    saved = json.loads((out / JSON_NAME).read_text())
    first = evaluate(models, data, progress=False).to_json()
    second = evaluate(models, data, progress=False).to_json()
    assert first == second
    assert json.loads(json.dumps(first)) == saved


def test_speech_metrics(models, data, tmp_path):
    """--speech adds pesq and stoi (and visqol when installed, here only on the 8 kHz model at
    one bandwidth to keep it quick); each within its scale."""
    pytest.importorskip("pesq")
    pytest.importorskip("pystoi")
    name = next(iter(models))
    speech_only = tmp_path / "speech"
    speech_only.mkdir()
    (speech_only / "speech.wav").write_bytes((data / "speech.wav").read_bytes())
    rc = main(
        ["eval", str(speech_only), "-o", str(tmp_path / "out"), "--model", name]
        + ["--bandwidths", "8", "--speech", "--no-progress"]
    )
    assert rc == 0
    with open(tmp_path / "out" / CSV_NAME, newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert set(COLUMNS) | {"pesq", "stoi"} <= set(row)
    assert 1.0 <= float(row["pesq"]) <= 4.65
    assert 0.0 <= float(row["stoi"]) <= 1.0
    if metrics.visqol_available():
        assert 1.0 <= float(row["visqol"]) <= 5.0
    else:
        assert "visqol" not in row


def test_bad_requests_fail_in_one_line(models, data, tmp_path, capsys):
    name = next(iter(models))
    assert (
        main(["eval", str(data), "-o", str(tmp_path / "o"), "--model", name, "--bandwidths", "3"])
        == 1
    )
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "has no bandwidth 3 kbps (it offers 8, 16, 24)" in err
    assert (
        main(["eval", str(tmp_path / "missing"), "-o", str(tmp_path / "o"), "--model", name]) == 1
    )
    assert "does not exist (no such file, folder or Hub dataset id)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", str(data), "-o", str(tmp_path / "o"), "--bandwidths", "x,y"])
    assert "comma-separated kbps" in capsys.readouterr().err
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "a.wav").write_bytes(b"nope")
    with pytest.raises(EvalError, match="no item .* could be evaluated"):
        evaluate(models, only_bad, progress=False)
    assert not (tmp_path / "o").exists()


def test_plot_of_one_file(models, data):
    """What the quickstart notebook draws: one model, one file, a figure with a line per model
    in each panel (4 panels: SI-SNR, mel, STFT, entropy kbps)."""
    name, model = next(iter(models.items()))
    result = evaluate({name: model}, data / "speech.wav", progress=False)
    assert {f["key"] for f in result.per_file} == {"speech.wav"}
    figure = plot_rate_distortion(result)
    visible = [ax for ax in figure.axes if ax.get_visible()]
    assert len(visible) == 4
    assert all(len(ax.lines) >= 1 for ax in visible)


def test_every_source_tokenize_reads(models, tmp_path):
    """The same three recordings as a folder, as Parquet written by pyarrow (a plain binary
    column, keyed by an id column) and as WebDataset tar shards through the command: every
    per-item value equal, keys saying where each item came from."""
    from .corpora import make_items, write_folder, write_parquet_arrow, write_tars

    name, model = next(iter(models.items()))
    items = make_items(3)
    folder = evaluate({name: model}, write_folder(tmp_path / "folder", items), progress=False)
    parquet = evaluate(
        {name: model},
        write_parquet_arrow(tmp_path / "parquet", items),
        progress=False,
        source_options={"audio_column": "wav", "id_column": "uid"},
    )
    rc = main(
        ["eval", write_tars(tmp_path / "tars", items), "-o", str(tmp_path / "out")]
        + ["--model", name, "--no-progress"]
    )
    assert rc == 0
    tars = json.loads((tmp_path / "out" / JSON_NAME).read_text())

    def by_item(per_file):
        return {(f["key"].rsplit(":", 1)[-1].split(".")[0], f["bandwidth"]): f for f in per_file}

    want = by_item(folder.per_file)
    assert sorted(f["key"] for f in folder.per_file if f["bandwidth"] == 8.0) == [
        "item00.flac",
        "item01.wav",
        "item02.mp3",
    ]
    assert sorted(f["key"] for f in parquet.per_file if f["bandwidth"] == 8.0) == [
        "part-0.parquet:item00",
        "part-0.parquet:item01",
        "part-1.parquet:item02",
    ]
    assert tars["per_file"][0]["key"] == "shard-000000.tar:item00"
    for got in (parquet.per_file, tars["per_file"]):
        got = by_item(got)
        assert got.keys() == want.keys()
        for k, row in got.items():
            assert {m: row[m] for m in folder.metrics} == {m: want[k][m] for m in folder.metrics}
    assert parquet.rows[0]["kbps_entropy"] == folder.rows[0]["kbps_entropy"]


@pytest.mark.slow
def test_chunked_stereo_model_counts_real_frames_only(tmp_path):
    """A 48 kHz-like model (stereo, normalised, 20-frame chunks): the short last chunk's padding
    codes are not counted; the entropy bitrate is the direct count over every chunk's real
    frames (1e-5 relative)."""
    from encodec_jax.testing import TINY_CHUNKED_CONFIG

    model = random_model(TINY_CHUNKED_CONFIG, seed=2)
    path = tmp_path / "stereo.wav"  # 100 chunks of 80 samples and one of 30
    sf.write(path, random_audio(1, 2, 8030, seed=4)[0].T, 8000, subtype="FLOAT")
    result = evaluate({"chunked": model}, path, progress=False)
    (item,) = list(iter_eval_items(path, 8000, 2))
    enc = model.encode(item.audio[None], bandwidth=16.0)
    codes = np.asarray(enc.audio_codes)[:, 0]  # [chunks, n_q, frames]
    assert enc.chunk_frames[-1] < codes.shape[-1]  # a short last chunk, padded
    real = np.concatenate([c[:, :f] for c, f in zip(codes, enc.chunk_frames, strict=True)], -1)
    for row in result.rows:
        bits = 0.0
        for q in range(row["n_q"]):
            counts = np.bincount(real[q], minlength=TINY_CHUNKED_CONFIG.codebook_size)
            p = counts[counts > 0] / counts.sum()
            bits += float(-(p * np.log2(p)).sum())
        expected = bits * TINY_CHUNKED_CONFIG.frame_rate / 1000
        assert row["kbps_entropy"] == pytest.approx(expected, rel=1e-5)
