"""`encodec-jax tokenize` on every source kind: Parquet written by `datasets` and by pyarrow, a
`save_to_disk` folder, `load_dataset` streaming, WebDataset tars, the same behind memory:// and
file:// URLs (input and output). The same six items in every form give the same codes (equal
to `BatchCodec.encode` of the decoded audio, and with --exact to `EncodecModel.encode`), the
kept columns stay aligned with them, damaged items and shards go to errors.jsonl, a run killed
with SIGKILL resumes with every item exactly once, two `jax.distributed` processes take disjoint,
complete shares, and the pipeline keeps at most its stated number of items in memory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import encodec_jax.pipeline as pipeline_module
import encodec_jax.tokenize as tokenize_module
from encodec_jax.audio import decode_audio
from encodec_jax.batching import BatchCodec, EncodedItem
from encodec_jax.cli import main

from .corpora import (
    add_member,
    copy_to_fs,
    make_items,
    write_folder,
    write_hub_repo,
    write_parquet_arrow,
    write_parquet_datasets,
    write_saved,
    write_tars,
)
from .test_batching import child_env, finish, free_port, kill
from .test_cli import assert_one_line_error, run_cli, tiny_checkpoint, tiny_model

ITEMS = make_items(6)
BY_KEY = {it.key: it for it in ITEMS}
COMMON = ["--shard-size", "2", "--buckets", "1", "--batch-size", "4", "--no-progress"]
WORKER = Path(__file__).with_name("tokenize_worker.py")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The items in every form: {name: (SOURCE, extra arguments)}."""
    root = tmp_path_factory.mktemp("corpus")
    home = tmp_path_factory.mktemp("hf_home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HOME", str(home))
        patch.setenv("HF_HUB_OFFLINE", "1")
        columns = ["--id-column", "id", "--keep-columns", "text,speaker"]
        forms = {
            "folder": (str(write_folder(root / "folder", ITEMS)), []),
            "parquet-datasets": (write_parquet_datasets(root / "pq", ITEMS, shards=2), columns),
            "parquet-pyarrow": (
                write_parquet_arrow(root / "pa", ITEMS, shards=2, row_group_size=2),
                ["--audio-column", "wav", "--id-column", "uid", "--keep-columns", "text,speaker"],
            ),
            "saved": (str(write_saved(root / "saved", ITEMS, shards=2)), columns),
            "hf": (str(write_hub_repo(root / "repo", ITEMS)), ["--source-type", "hf", *columns]),
            "webdataset": (write_tars(root / "tar", ITEMS, shards=3), ["--keep-columns", "txt"]),
        }
        yield root, forms


@pytest.fixture(scope="module")
def expected() -> dict[str, EncodedItem]:
    """Each item's codes: BatchCodec on the decoded audio, as tokenize batches it."""
    audios = [decode_audio(it.data, 16_000, 1)[0] for it in ITEMS]
    codec = BatchCodec(tiny_model(), batch_size=4, buckets=[16_000])
    return dict(zip(BY_KEY, codec.encode(audios), strict=True))


def tokenize(source, out, *extra) -> int:
    return main(["tokenize", str(source), "-o", str(out), "--model", tiny_checkpoint(), *extra])


def read_rows(out: Path, pattern: str = "shard-*.parquet") -> list[dict]:
    rows = []
    for path in sorted(out.glob(pattern)):
        rows.extend(pq.read_table(path).to_pylist())
    return rows


def item_key(row: dict) -> str:
    return row["key"].split(".")[0]  # folder keys are file names


def check_rows(rows: list[dict], expected: dict[str, EncodedItem], keys=None) -> None:
    """Every item once, in source order, with its codes and its own kept columns."""
    keys = list(BY_KEY) if keys is None else keys
    assert [item_key(r) for r in rows] == keys
    for row in rows:
        item = expected[item_key(row)]
        np.testing.assert_array_equal(np.array(row["codes"]), item.audio_codes)
        assert row["num_samples"] == item.num_samples
        assert row["chunk_frames"] == list(item.chunk_frames)
        source = BY_KEY[item_key(row)]
        if "text" in row:
            assert row["text"] == source.text and row["speaker"] == source.speaker
        if "txt" in row:
            assert row["txt"] == source.text


@pytest.fixture(scope="module")
def runs(corpus, expected, tmp_path_factory):
    """One uninterrupted run per form: {name: output directory}."""
    _, forms = corpus
    out = tmp_path_factory.mktemp("runs")
    done = {}
    for name, (source, extra) in forms.items():
        assert tokenize(source, out / name, *COMMON, *extra) == 0, name
        done[name] = out / name
    return done


@pytest.mark.parametrize(
    "name", ["folder", "parquet-datasets", "parquet-pyarrow", "saved", "hf", "webdataset"]
)
def test_every_source_gives_the_same_codes(name, corpus, runs, expected):
    rows = read_rows(runs[name])
    check_rows(rows, expected)
    manifest = json.loads((runs[name] / "manifest.json").read_text())
    assert manifest["num_shards"] == 3 and not (runs[name] / "errors.jsonl").exists()
    # progress in source terms: where each output shard starts and ends
    shards = manifest["shards"]
    assert shards["0"]["start"]["item"] == 0
    for k in ("1", "2"):
        assert (
            shards[k]["start"] == shards[str(int(k) - 1)]["end"] or shards[k]["start"]["item"] == 0
        )
    assert shards["2"]["end"]["shard"] is not None or name == "folder"
    schema = pq.read_schema(runs[name] / "shard-00000.parquet")
    assert schema.names[:9] == list(tokenize_module.ROW_COLUMNS)
    if name in ("parquet-datasets", "parquet-pyarrow", "saved", "hf"):
        assert schema.field("text").type == pa.string()
        assert schema.field("speaker").type == pa.int64()
        paths = {r["path"] for r in rows}
        assert len(paths) == 2 and all(p.endswith((".parquet", ".arrow")) for p in paths)
    if name == "webdataset":
        assert [r["path"] for r in rows] == ["shard-000000.tar"] * 2 + ["shard-000001.tar"] * 2 + [
            "shard-000002.tar"
        ] * 2


def test_fsspec_input_and_output(corpus, runs, expected, tmp_path):
    """memory:// and file:// URLs for the shards and for the output."""
    fsspec = pytest.importorskip("fsspec")
    root, forms = corpus
    memory = fsspec.filesystem("memory")
    copy_to_fs(sorted((root / "tar").iterdir()), memory, "/in/tar")
    copy_to_fs(sorted((root / "pa").iterdir()), memory, "/in/pa")
    try:
        args = [*COMMON, "--keep-columns", "txt"]
        assert (
            tokenize("memory://in/tar/shard-{000000..000002}.tar", "memory://out/tar", *args) == 0
        )
        _, pa_extra = forms["parquet-pyarrow"]
        assert tokenize("memory://in/pa/part-*.parquet", "memory://out/pa", *COMMON, *pa_extra) == 0
        for name, form in (("tar", "webdataset"), ("pa", "parquet-pyarrow")):
            names = sorted(memory.ls(f"/out/{name}", detail=False))
            assert [n.rsplit("/", 1)[-1] for n in names] == [
                "manifest.json",
                "shard-00000.parquet",
                "shard-00001.parquet",
                "shard-00002.parquet",
            ]
            for n in names:  # byte for byte what the local run wrote
                local = (runs[form] / n.rsplit("/", 1)[-1]).read_bytes()
                if n.endswith(".parquet"):
                    assert memory.cat_file(n) == local, n
        # resuming a memory:// output: nothing left to do
        assert (
            tokenize("memory://in/tar/shard-{000000..000002}.tar", "memory://out/tar", *args) == 0
        )
    finally:
        memory.rm("/in", recursive=True)
        memory.rm("/out", recursive=True)
    source, extra = forms["parquet-datasets"]
    assert tokenize(f"file://{source}", f"file://{tmp_path}/out", *COMMON, *extra) == 0
    check_rows(read_rows(tmp_path / "out"), expected)


def test_exact_codes_equal_encoding_alone(corpus, tmp_path):
    """--exact on a Parquet source: every item's codes are `EncodecModel.encode` of its audio."""
    _, forms = corpus
    source, extra = forms["parquet-datasets"]
    assert tokenize(source, tmp_path / "out", *COMMON, *extra, "--exact") == 0
    rows = read_rows(tmp_path / "out")
    assert [r["key"] for r in rows] == list(BY_KEY)
    model = tiny_model()
    for row in rows:
        audio, _ = decode_audio(BY_KEY[row["key"]].data, 16_000, 1)
        alone = np.asarray(model.encode(audio[None]).audio_codes)[:, 0]
        np.testing.assert_array_equal(np.array(row["codes"]), alone)


def test_damaged_items_and_shards(tmp_path, expected, capsys):
    """A corrupt audio member, a sample without audio, a truncated shard and an unreadable one:
    each is one line of errors.jsonl; every good item is tokenized once."""
    import tarfile

    root = tmp_path / "tars"
    root.mkdir()
    with tarfile.open(root / "a.tar", "w") as tar:
        add_member(tar, "item00.flac", ITEMS[0].data)
        add_member(tar, "bad.flac", b"fLaC" + bytes(300))
        add_member(tar, "item01.wav", ITEMS[1].data)
        add_member(tar, "lonely.txt", b"no audio here")
    with tarfile.open(root / "b.tar", "w") as tar:
        add_member(tar, "item02.mp3", ITEMS[2].data)
        add_member(tar, "item03.ogg", ITEMS[3].data)
    data = (root / "b.tar").read_bytes()
    (root / "b.tar").write_bytes(data[: 512 + -(-len(ITEMS[2].data) // 512) * 512 + 600])
    (root / "c.tar").write_bytes(b"this is not a tar file" * 50)
    code, out, err = run_cli(
        capsys, "tokenize", root / "*.tar", "-o", tmp_path / "out", "--model", tiny_checkpoint(),
        *COMMON,
    )  # fmt: skip
    assert code == tokenize_module.EXIT_SOME_FAILED
    assert_one_line_error(1, err, "4 of 7 items failed", "errors.jsonl")
    check_rows(read_rows(tmp_path / "out"), expected, keys=["item00", "item01", "item02"])
    errors = [json.loads(line) for line in (tmp_path / "out" / "errors.jsonl").open()]
    assert [(e["path"], e["key"]) for e in errors] == [
        ("a.tar", "bad"),
        ("a.tar", "lonely"),
        ("b.tar", None),
        ("c.tar", None),
    ]
    assert "cannot read the audio" in errors[0]["error"]
    assert "no audio member" in errors[1]["error"]
    assert "cannot read b.tar from item 1 on" in errors[2]["error"]
    assert "past the end of the shard" in errors[2]["error"]
    assert "cannot read c.tar from item 0 on" in errors[3]["error"]


@pytest.mark.parametrize("name", ["parquet-pyarrow", "saved", "hf", "webdataset"])
def test_resume_after_sigkill(name, corpus, runs, tmp_path):
    """A real process killed with SIGKILL as soon as its first shard is on disk; the run started
    again ends with exactly the uninterrupted run's rows."""
    _, forms = corpus
    source, extra = forms[name]
    out = tmp_path / "out"
    args = ["--shard-size", "1", "--buckets", "1", "--batch-size", "4", "--no-progress", *extra]
    command = [
        sys.executable, "-m", "encodec_jax", "tokenize", source, "-o", str(out),
        "--model", tiny_checkpoint(), *args,
    ]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 120
    try:
        while not list(out.glob("shard-*.parquet")):
            if process.poll() is not None:
                pytest.fail(f"the run ended before writing a shard: {process.stderr.read()}")
            assert time.monotonic() < deadline
            time.sleep(0.002)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
        process.stderr.close()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_shards"] is None, "killed too late to test anything"
    assert tokenize(source, out, *args) == 0
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    assert read_rows(out) == read_rows(runs[name])  # every item exactly once, same order
    assert len(list(out.glob("shard-*.parquet"))) == 6


def test_resume_after_a_crash_at_every_write(corpus, runs, tmp_path, monkeypatch):
    """A tar source split into output shards across tar boundaries, killed just before each of
    its writes completes and resumed: always the uninterrupted output, file for file."""
    _, forms = corpus
    source, extra = forms["webdataset"]
    reference = {p.name: p.read_bytes() for p in runs["webdataset"].iterdir()}
    real = tokenize_module.atomic_write

    class Crash(BaseException):
        pass

    n = 1
    while True:
        calls = {"count": 0}

        def atomic_write(path, mode="wb", n=n, calls=calls):
            calls["count"] += 1
            if calls["count"] == n:
                raise Crash
            return real(path, mode)

        out = tmp_path / f"out{n}"
        monkeypatch.setattr(tokenize_module, "atomic_write", atomic_write)
        try:
            tokenize(source, out, *COMMON, *extra)
        except Crash:
            pass
        else:
            break
        monkeypatch.setattr(tokenize_module, "atomic_write", real)
        assert tokenize(source, out, *COMMON, *extra) == 0
        assert {p.name: p.read_bytes() for p in out.iterdir()} == reference, f"crash at {n}"
        n += 1
    assert n > 4  # the first manifest, every shard, every manifest update


def test_two_processes_take_disjoint_complete_shares(corpus, runs, expected, tmp_path):
    """Under jax.distributed: a two-shard Parquet source is split by shard (each process reads
    only its own file), a one-shard tar by item; together the processes hold every item once,
    with the codes of the single-process run."""
    root, forms = corpus
    parquet, parquet_extra = forms["parquet-datasets"]
    one_tar = write_tars(root / "one-tar", ITEMS, shards=1)
    common = ["--model", tiny_checkpoint(), *COMMON]
    runs_json = json.dumps(
        [
            ["tokenize", parquet, "-o", str(tmp_path / "by-shard"), *common, *parquet_extra],
            ["tokenize", one_tar, "-o", str(tmp_path / "by-item"), *common],
        ]
    )
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(port), str(i), runs_json],
            env=child_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    try:
        finish(procs)
    except BaseException:
        kill(procs)
        raise
    for name in ("by-shard", "by-item"):
        first = read_rows(tmp_path / name, "shard-p000-*.parquet")
        second = read_rows(tmp_path / name, "shard-p001-*.parquet")
        assert first and second
        keys = sorted(item_key(r) for r in first + second)
        assert keys == sorted(BY_KEY), name  # complete and disjoint
        for row in first + second:
            np.testing.assert_array_equal(
                np.array(row["codes"]), expected[item_key(row)].audio_codes
            )
    by_shard = [read_rows(tmp_path / "by-shard", f"shard-p00{i}-*.parquet") for i in (0, 1)]
    assert {r["path"] for r in by_shard[0]} == {"train-00000-of-00002.parquet"}
    assert {r["path"] for r in by_shard[1]} == {"train-00001-of-00002.parquet"}
    manifests = [
        json.loads((tmp_path / "by-item" / f"manifest-p00{i}.json").read_text()) for i in (0, 1)
    ]
    assert [m["settings"]["source_split"] for m in manifests] == ["by item", "by item"]


def test_cli_errors(corpus, runs, tmp_path, capsys):
    _, forms = corpus
    source, extra = forms["parquet-datasets"]
    # a kept column that would overwrite one tokenize writes
    table = pa.table({"audio": pa.array([ITEMS[0].data], pa.binary()), "model": ["x"]})
    pq.write_table(table, tmp_path / "t.parquet")
    code, _, err = run_cli(
        capsys, "tokenize", tmp_path / "t.parquet", "-o", tmp_path / "o1", "--model",
        tiny_checkpoint(), "--keep-columns", "model", *COMMON,
    )  # fmt: skip
    assert_one_line_error(code, err, "would overwrite", "model")
    # a missing column, named with the columns there are
    code, _, err = run_cli(
        capsys, "tokenize", source, "-o", tmp_path / "o2", "--model", tiny_checkpoint(),
        "--audio-column", "sound", *COMMON,
    )  # fmt: skip
    assert_one_line_error(code, err, "no column 'sound'", "audio, id, text, speaker")
    # an output on a file system whose package is missing
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        code, _, err = run_cli(
            capsys, "tokenize", source, "-o", "gs://bucket/tokens", "--model", tiny_checkpoint(),
            *extra, *COMMON,
        )  # fmt: skip
        assert_one_line_error(code, err, "cannot write to gs://bucket/tokens", "pip install gcsfs")
    # a damaged manifest, and one from the first version of tokenize
    out = tmp_path / "o3"
    out.mkdir()
    for name in ("manifest.json", "shard-00000.parquet"):
        (out / name).write_bytes((runs["parquet-datasets"] / name).read_bytes())
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["shards"]["0"]["end"] = {"shard": "elsewhere.parquet", "item": 1}
    (out / "manifest.json").write_text(json.dumps(manifest))
    code, _, err = run_cli(
        capsys, "tokenize", source, "-o", out, "--model", tiny_checkpoint(), *extra, *COMMON
    )
    assert_one_line_error(code, err, "is damaged", "end is not a position in this source")
    manifest["version"] = 1
    (out / "manifest.json").write_text(json.dumps(manifest))
    code, _, err = run_cli(
        capsys, "tokenize", source, "-o", out, "--model", tiny_checkpoint(), *extra, *COMMON
    )
    assert_one_line_error(code, err, "another version", "new output directory")


def test_progress_bar_without_a_known_total(corpus, tmp_path, capsys):
    _, forms = corpus
    source, extra = forms["webdataset"]
    args = [a for a in COMMON if a != "--no-progress"]
    code, out, err = run_cli(
        capsys, "tokenize", source, "-o", tmp_path / "out", "--model", tiny_checkpoint(),
        *args, *extra,
    )  # fmt: skip
    assert code == 0 and "tokenized 6 items" in out
    assert "tokenize: " in err and "6item" in err.replace(" ", "") and "x realtime" in err


# ---- the pipeline alone: batching and memory ----
class FakeCodec:
    """Stands for BatchCodec: buckets of 100, 200, 400 samples; records every batch."""

    class config:  # noqa: N801 (attribute access as on EncodecConfig)
        sampling_rate = 1000
        audio_channels = 1

    def __init__(self, batch_size: int = 4):
        self.batch_size = batch_size
        self.buckets = (100, 200, 400)
        self.batches: list[list[int]] = []

    def padded_length(self, n: int) -> int:
        return next((b for b in self.buckets if n <= b), -(-n // 400) * 400)

    def encode(self, audios):
        self.batches.append([a.shape[-1] for a in audios])
        return [EncodedItem(np.zeros((1, 1, 1), np.int32), None, a.shape[-1], (1,)) for a in audios]


def test_pipeline_fills_batches_and_bounds_memory(monkeypatch):
    """1000 items of random lengths in output shards of 300: batches are full except where a
    shard ends (at most one part-full batch per bucket per shard), and the items taken from
    the source but not yet encoded never exceed decoding_limit + waiting_limit."""
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 400, 1000)
    alive = {"now": 0, "max": 0}

    def read_audio(audio, rate, channels, name):
        return np.zeros(int(audio)), []

    monkeypatch.setattr(pipeline_module, "read_audio", read_audio)
    codec = FakeCodec()
    pulled = {"count": 0}

    def records():
        for i, n in enumerate(lengths):
            pulled["count"] += 1
            alive["max"] = max(alive["max"], pulled["count"] - encoded())
            yield pipeline_module.Record("s", str(i), int(n), {}, None, (0, i), (0, i + 1))

    def encoded():
        return sum(len(b) for b in codec.batches)

    with ThreadPoolExecutor(2) as pool:
        pipeline = pipeline_module.Pipeline(codec, pool, 2, lambda items, seconds: None)
        shards = list(pipeline.shards(records(), 0, 300, lambda k: False))
    assert [k for k, _ in shards] == [0, 1, 2, 3] and pipeline.source_ended
    outcomes = [o for _, shard in shards for _, o in shard]
    assert [o.num_samples for o in outcomes] == list(lengths)  # every item once, in order
    partial = [b for b in codec.batches if len(b) < codec.batch_size]
    assert len(partial) <= 4 * len(codec.buckets)
    assert all(len({codec.padded_length(n) for n in b}) == 1 for b in codec.batches)
    assert alive["max"] <= pipeline.decoding_limit + pipeline.waiting_limit + 1
