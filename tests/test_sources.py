"""encodec_jax.sources, the reading layer of `tokenize`: every source kind yields the same items
(keys, audio bytes, kept columns) in a fixed order, from any item index on; WebDataset keys as
WebDataset makes them; damaged shards raise ShardError after their good items, while storage
failures propagate; fsspec URLs (memory://, file://) read like local paths. No model here."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from encodec_jax.audio import AudioError, decode_audio
from encodec_jax.corpus import open_source
from encodec_jax.sources import (
    AudioFile,
    Samples,
    ShardError,
    SourceError,
    expand_braces,
    read_audio,
)

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

ITEMS = make_items(6)
BY_KEY = {it.key: it for it in ITEMS}


def everything(source) -> list[tuple[str, object]]:
    """(shard name, item) for every item of every shard."""
    return [(shard.name, item) for shard in source.shards for item in shard.items()]


def assert_resumable(shard) -> None:
    """Reading from any index gives the tail of reading from the start."""
    items = list(shard.items())
    for start in range(len(items) + 1):
        assert list(shard.items(start)) == items[start:], (shard.name, start)


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory):
    """`datasets` writes its cache here, not in the user's home."""
    home = tmp_path_factory.mktemp("hf_home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HOME", str(home))
        patch.setenv("HF_DATASETS_CACHE", str(home / "datasets"))
        patch.setenv("HF_HUB_OFFLINE", "1")
        yield home


# ---- patterns ----
@pytest.mark.parametrize(
    "pattern, expected",
    [
        ("a-{000..002}.tar", ["a-000.tar", "a-001.tar", "a-002.tar"]),
        ("a-{8..10}.tar", ["a-8.tar", "a-9.tar", "a-10.tar"]),
        ("{x,y}/{1..2}", ["x/1", "x/2", "y/1", "y/2"]),
        ("a-{3..1}", ["a-3", "a-2", "a-1"]),
        ("lit{eral}.tar", ["lit{eral}.tar"]),
        ("plain.tar", ["plain.tar"]),
    ],
)
def test_expand_braces(pattern, expected):
    assert expand_braces(pattern) == expected


def test_expand_braces_refuses_huge_patterns():
    with pytest.raises(SourceError, match="more than"):
        expand_braces("s-{0..99999999}.tar")


# ---- folders ----
def test_folder(tmp_path):
    root = write_folder(tmp_path / "audio", ITEMS[:3])
    (root / "sub").mkdir()
    (root / "sub" / "x.WAV").write_bytes(ITEMS[3].data)
    (root / ".hidden.wav").write_bytes(ITEMS[0].data)
    (root / "notes.txt").write_text("not audio")
    (root / "out").mkdir()
    (root / "out" / "y.wav").write_bytes(ITEMS[0].data)
    source = open_source(root, exclude=root / "out")
    assert source.kind == "folder" and source.options == {} and source.column_types == {}
    names = ["item00.flac", "item01.wav", "item02.mp3", "sub/x.WAV"]
    assert [s.name for s in source.shards] == names
    assert [s.count() for s in source.shards] == [1] * 4
    for shard in source.shards:
        (item,) = shard.items()
        assert item.key == shard.name and item.columns == {} and item.error is None
        assert isinstance(item.audio, AudioFile) and item.audio.fs is None
        assert list(shard.items(1)) == []
    assert [s.size for s in source.shards] == [len(it.data) for it in ITEMS[:4]]
    # the same folder through a file:// URL
    url = open_source(f"file://{root}", exclude=root / "out")
    assert [s.name for s in url.shards] == names
    assert url.fingerprint(url.shards) == source.fingerprint(source.shards)


def test_folder_errors(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        open_source(tmp_path / "missing")
    (tmp_path / "tables").mkdir()
    write_parquet_arrow(tmp_path / "tables", ITEMS[:2], shards=1)
    with pytest.raises(SourceError, match=r"no audio files.*\.parquet files.*\*\.parquet"):
        open_source(tmp_path / "tables")
    write_folder(tmp_path / "audio", ITEMS[:1])
    with pytest.raises(SourceError, match="no columns"):
        open_source(tmp_path / "audio", keep_columns=["text"])
    with pytest.raises(SourceError, match="encodec-jax encode"):
        open_source(tmp_path / "audio" / "item00.flac")
    with pytest.raises(SourceError, match="--split applies to Hugging Face"):
        open_source(tmp_path / "audio", split="test")


# ---- Parquet ----
def test_parquet_written_by_datasets(tmp_path, hf_home):
    pattern = write_parquet_datasets(tmp_path, ITEMS, shards=2)
    source = open_source(pattern, id_column="id", keep_columns=["text", "speaker"])
    assert source.kind == "parquet"
    assert [s.name for s in source.shards] == [
        "train-00000-of-00002.parquet",
        "train-00001-of-00002.parquet",
    ]
    assert source.column_types == {"text": pa.string(), "speaker": pa.int64()}
    assert [s.count() for s in source.shards] == [3, 3]
    items = [item for _, item in everything(source)]
    assert [i.key for i in items] == [it.key for it in ITEMS]
    for item in items:
        expected = BY_KEY[item.key]
        assert item.audio == expected.data  # the bytes, undecoded
        assert item.columns == {"text": expected.text, "speaker": expected.speaker}
    # without an id column the key is the row number in the shard
    plain = open_source(pattern)
    assert [i.key for _, i in everything(plain)] == ["0", "1", "2", "0", "1", "2"]
    assert plain.options == {"audio_column": "audio", "id_column": None, "keep_columns": []}
    assert plain.fingerprint(plain.shards) != source.fingerprint(source.shards)


def test_parquet_written_by_pyarrow_resumes_inside_row_groups(tmp_path):
    pattern = write_parquet_arrow(tmp_path, ITEMS, shards=2, row_group_size=2)
    assert pattern.endswith("part-{0..1}.parquet")
    source = open_source(pattern, audio_column="wav", id_column="uid")
    assert [s.name for s in source.shards] == ["part-0.parquet", "part-1.parquet"]
    assert [i.key for _, i in everything(source)] == [it.key for it in ITEMS]
    assert all(i.audio == BY_KEY[i.key].data for _, i in everything(source))
    for shard in source.shards:
        assert_resumable(shard)


def test_parquet_is_read_a_row_group_at_a_time(tmp_path):
    """Reading a shard of 8 row groups holds about one row group and one batch of rows in Arrow
    memory, never the shard (the items' bytes are Python objects, handed on one by one)."""
    rng = np.random.default_rng(0)
    blobs = [rng.bytes(50_000) for _ in range(320)]  # 16 MB in row groups of 2 MB
    table = pa.table({"audio": pa.array(blobs, pa.binary())})
    pq.write_table(table, tmp_path / "big.parquet", row_group_size=40, use_dictionary=False)
    (shard,) = open_source(tmp_path / "big.parquet").shards
    base, peak, count = pa.total_allocated_bytes(), 0, 0
    for item in shard.items():
        peak = max(peak, pa.total_allocated_bytes() - base)
        assert item.audio == blobs[count]
        count += 1
    assert count == 320
    # measured: 5.2 MB (a 64-row batch spanning two groups); the shard is 16 MB
    assert peak < 8_000_000, peak


def test_parquet_column_errors(tmp_path):
    pattern = write_parquet_arrow(tmp_path, ITEMS[:2], shards=1)
    with pytest.raises(SourceError, match=r"no column 'audio' \(its columns: uid, wav, text"):
        open_source(pattern)
    with pytest.raises(SourceError, match="'transcript'"):
        open_source(pattern, audio_column="wav", keep_columns=["transcript"])
    with pytest.raises(SourceError, match="has type double; the audio column must hold"):
        pq.write_table(pa.table({"audio": pa.array([1.5, 2.5])}), tmp_path / "f.parquet")
        open_source(tmp_path / "f.parquet")
    with pytest.raises(SourceError, match="--keep-columns must name distinct"):
        open_source(pattern, audio_column="wav", keep_columns=["text", "text"])


def test_parquet_decoded_arrays(tmp_path):
    """Decoded audio: {array, sampling_rate} structs (mono and [channels, samples]), a list
    column beside a sampling_rate column; nulls are item errors."""
    mono = np.linspace(-0.5, 0.5, 800, dtype=np.float32)
    stereo = np.stack([mono, -mono])
    struct = pa.array(
        [
            {"array": mono.tolist(), "sampling_rate": 8000},
            None,
        ],
        pa.struct({"array": pa.list_(pa.float32()), "sampling_rate": pa.int64()}),
    )
    pq.write_table(pa.table({"audio": struct}), tmp_path / "struct.parquet")
    items = [i for _, i in everything(open_source(tmp_path / "struct.parquet"))]
    assert isinstance(items[0].audio, Samples) and items[0].audio.rate == 8000
    np.testing.assert_array_equal(items[0].audio.array, mono)
    assert items[1].audio is None and "null" in items[1].error

    nested = pa.array([stereo.tolist(), [mono.tolist(), mono[:5].tolist()]])
    table = pa.table({"audio": nested, "sampling_rate": pa.array([16000, 16000])})
    pq.write_table(table, tmp_path / "lists.parquet")
    items = [i for _, i in everything(open_source(tmp_path / "lists.parquet"))]
    np.testing.assert_array_equal(items[0].audio.array, stereo)
    assert items[0].audio.rate == 16000
    assert "differ in length" in items[1].error

    # read_audio resamples and mixes down as for files: the two channels cancel out
    audio, _ = read_audio(items[0].audio, 8000, 1)
    assert audio.shape == (1, 400) and np.abs(audio).max() < 1e-6
    pq.write_table(pa.table({"audio": nested}), tmp_path / "norate.parquet")
    with pytest.raises(SourceError, match="no 'sampling_rate' column"):
        open_source(tmp_path / "norate.parquet")


def test_parquet_paths_to_files(tmp_path):
    """A string column, or an Audio struct without bytes, names files relative to the shard."""
    write_folder(tmp_path / "clips", ITEMS[:2])
    table = pa.table(
        {
            "file": ["clips/item00.flac", str(tmp_path / "clips" / "item01.wav"), None],
            "audio": pa.array(
                [
                    {"bytes": None, "path": "clips/item00.flac"},
                    {"bytes": ITEMS[1].data, "path": "ignored.wav"},
                    {"bytes": None, "path": None},
                ],
                pa.struct({"bytes": pa.binary(), "path": pa.string()}),
            ),
        }
    )
    pq.write_table(table, tmp_path / "index.parquet")
    by_path = [
        i for _, i in everything(open_source(tmp_path / "index.parquet", audio_column="file"))
    ]
    assert by_path[0].audio == AudioFile(str(tmp_path / "clips" / "item00.flac"))
    assert by_path[1].audio == AudioFile(str(tmp_path / "clips" / "item01.wav"))
    assert "null" in by_path[2].error
    by_struct = [i for _, i in everything(open_source(tmp_path / "index.parquet"))]
    assert by_struct[0].audio == AudioFile(str(tmp_path / "clips" / "item00.flac"))
    assert by_struct[1].audio == ITEMS[1].data
    assert "no bytes and no path" in by_struct[2].error


def test_damaged_parquet(tmp_path):
    pattern = write_parquet_arrow(tmp_path, ITEMS[:4], shards=1, row_group_size=2)
    path = tmp_path / "part-0.parquet"
    good = path.read_bytes()
    (shard,) = open_source(pattern, audio_column="wav").shards
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(ShardError, match="magic bytes"):
        list(shard.items())
    damaged = bytearray(good)
    footer = len(good) - 8 - int.from_bytes(good[-8:-4], "little")
    damaged[footer + 10 : footer + 60] = bytes(50 * [0x5A])
    path.write_bytes(bytes(damaged))
    with pytest.raises(ShardError):
        list(shard.items())


class FlakyFile(io.BytesIO):
    """A remote file whose connection drops after `limit` bytes."""

    def __init__(self, data: bytes, limit: int):
        super().__init__(data)
        self.limit = limit

    def read(self, n=-1):
        if self.tell() + (n if n and n > 0 else len(self.getvalue())) > self.limit:
            raise ConnectionError("connection reset by peer")
        return super().read(n)


class FlakyFS:
    def __init__(self, data: bytes, limit: int):
        self.data, self.limit = data, limit

    def open(self, path, mode="rb"):
        return FlakyFile(self.data, self.limit)


@pytest.mark.parametrize("kind", ["parquet", "webdataset"])
def test_storage_failures_are_not_damage(tmp_path, kind):
    """A dropped connection propagates as itself (the run stops and can resume): it must not be
    recorded as a damaged shard."""
    if kind == "parquet":
        spec = write_parquet_arrow(tmp_path, ITEMS[:4], shards=1, row_group_size=2)
        (shard,) = open_source(spec, audio_column="wav").shards
        data = (tmp_path / "part-0.parquet").read_bytes()
        limit = len(data) - 200  # the footer reads, the pages fail
    else:
        spec = write_tars(tmp_path, ITEMS[:4], shards=1)
        (shard,) = open_source(spec).shards
        data = (tmp_path / "shard-000000.tar").read_bytes()
        limit = len(data) // 2
    shard.fs = FlakyFS(data, limit)
    with pytest.raises(ConnectionError):
        list(shard.items())


# ---- Hugging Face datasets ----
def test_save_to_disk_folder(tmp_path, hf_home):
    root = write_saved(tmp_path / "saved", ITEMS, shards=2)
    source = open_source(root, id_column="id", keep_columns=["text"])
    assert source.kind == "saved"
    assert [s.name for s in source.shards] == [
        "data-00000-of-00002.arrow",
        "data-00001-of-00002.arrow",
    ]
    items = [i for _, i in everything(source)]
    assert [i.key for i in items] == [it.key for it in ITEMS]
    assert all(i.audio == BY_KEY[i.key].data for i in items)
    assert all(i.columns == {"text": BY_KEY[i.key].text} for i in items)
    for shard in source.shards:
        assert_resumable(shard)


def test_save_to_disk_dataset_dict(tmp_path, hf_home):
    from datasets import DatasetDict

    from .corpora import _dataset

    DatasetDict({"train": _dataset(ITEMS[:4]), "test": _dataset(ITEMS[4:])}).save_to_disk(
        str(tmp_path / "dict")
    )
    train = open_source(tmp_path / "dict", id_column="id")
    assert [i.key for _, i in everything(train)] == [it.key for it in ITEMS[:4]]
    test = open_source(tmp_path / "dict", id_column="id", split="test")
    assert [i.key for _, i in everything(test)] == [it.key for it in ITEMS[4:]]
    assert test.options["split"] == "test"
    with pytest.raises(SourceError, match="holds the splits train, test"):
        open_source(tmp_path / "dict", split="validation")


def test_save_to_disk_state_naming_other_files(tmp_path, hf_home):
    """Found by the fuzzer: state.json listing a name the OS refuses (too long) raised OSError.
    Only plain .arrow names in the folder are taken."""
    root = write_saved(tmp_path / "saved", ITEMS[:2], shards=1)
    state = json.loads((root / "state.json").read_text())
    for name in ["x" * 300 + ".arrow", "../elsewhere.arrow", ".hidden.arrow", "data.parquet"]:
        state["_data_files"] = [{"filename": name}]
        (root / "state.json").write_text(json.dumps(state))
        with pytest.raises(SourceError, match="not an .arrow file in the folder"):
            open_source(root)


def test_load_dataset_streaming(tmp_path, hf_home):
    """The Hub path (`datasets.load_dataset(..., streaming=True)`) on a local repository."""
    repo = write_hub_repo(tmp_path / "repo", ITEMS, shards=2)
    source = open_source(repo, kind="hf", id_column="id", keep_columns=["speaker"])
    assert source.kind == "hf"
    assert source.options["split"] == "train" and source.options["dataset"] == str(repo)
    assert [s.name for s in source.shards] == [
        "train-00000-of-00002.parquet",
        "train-00001-of-00002.parquet",
    ]
    assert source.column_types == {"speaker": pa.int64()}
    items = [i for _, i in everything(source)]
    assert [i.key for i in items] == [it.key for it in ITEMS]
    assert all(i.audio == BY_KEY[i.key].data for i in items)
    assert all(i.columns == {"speaker": BY_KEY[i.key].speaker} for i in items)
    assert_resumable(source.shards[1])
    with pytest.raises(SourceError, match="cannot stream the dataset"):
        open_source(repo, kind="hf", split="nonexistent")


# ---- WebDataset ----
def make_tar(path: Path, members: list[tuple[str, bytes]], **kwargs) -> Path:
    with tarfile.open(path, "w", **kwargs) as tar:
        for name, data in members:
            add_member(tar, name, data)
    return path


def test_webdataset_shards(tmp_path):
    pattern = write_tars(tmp_path, ITEMS, shards=2)
    assert pattern.endswith("shard-{000000..000001}.tar")
    source = open_source(pattern, keep_columns=["txt", "json"])
    assert source.kind == "webdataset"
    assert source.column_types == {"txt": pa.string(), "json": pa.string()}
    assert [s.name for s in source.shards] == ["shard-000000.tar", "shard-000001.tar"]
    items = [i for _, i in everything(source)]
    assert [i.key for i in items] == [it.key for it in ITEMS]
    for item in items:
        expected = BY_KEY[item.key]
        assert item.audio == expected.data
        assert item.columns["txt"] == expected.text
        assert json.loads(item.columns["json"]) == {"speaker": expected.speaker}
    for shard in source.shards:
        assert_resumable(shard)
    # a glob names the same shards
    assert [s.name for s in open_source(tmp_path / "shard-*.tar").shards] == [
        "shard-000000.tar",
        "shard-000001.tar",
    ]


def test_webdataset_keys(tmp_path):
    """Keys and grouping as WebDataset's base_plus_ext and group_by_keys make them."""
    flac, wav = ITEMS[0].data, ITEMS[1].data
    path = make_tar(
        tmp_path / "keys.tar",
        [
            ("__meta__", b"skipped"),
            ("README", b"no extension: skipped"),
            ("dir/a.b/one.seg.FLAC", flac),  # key up to the first dot of the file name
            ("dir/a.b/one.seg.TXT", b"first"),
            ("two.wav", wav),
            ("two.flac", flac),  # two audio members
            ("three.txt", b"no audio"),
            ("four.wav", wav),
            ("four.txt", b"\xff\xfe not utf-8"),
            ("one.seg.flac", flac),
        ],
    )
    items = [i for _, i in everything(open_source(path, keep_columns=["txt", "seg.txt"]))]
    assert [i.key for i in items] == ["dir/a.b/one", "two", "three", "four", "one"]
    assert items[0].audio == flac and items[0].columns == {"txt": None, "seg.txt": "first"}
    assert "several audio members (wav, flac)" in items[1].error
    assert "no audio member (members: txt)" in items[2].error
    assert "not UTF-8" in items[3].error
    assert items[4].audio == flac and items[4].error is None
    # --audio-column picks the member by its extension
    chosen = [i for _, i in everything(open_source(path, audio_column="wav"))]
    assert chosen[1].audio == wav and chosen[1].error is None
    assert "no .wav member" in chosen[0].error


def test_damaged_tars(tmp_path):
    """Every kind of damage raises ShardError after the items before it."""
    members = [(f"{it.key}.{it.ext}", it.data) for it in ITEMS[:3]]
    good = make_tar(tmp_path / "good.tar", members).read_bytes()
    sizes = [512 + -(-len(it.data) // 512) * 512 for it in ITEMS[:3]]  # header + data blocks

    def keys_then_error(data: bytes, match: str) -> list[str]:
        (tmp_path / "bad.tar").write_bytes(data)
        (shard,) = open_source(tmp_path / "bad.tar").shards
        keys = []
        with pytest.raises(ShardError, match=match):
            for item in shard.items():
                keys.append(item.key)
        return keys

    # cut inside the second member's data
    cut = keys_then_error(good[: sizes[0] + 512 + 100], "claims .* past the end of the shard")
    assert cut == ["item00"]
    # cut exactly after the second member: no end-of-archive marker
    assert keys_then_error(good[: sizes[0] + sizes[1]], "end-of-archive") == ["item00", "item01"]
    # a damaged header in the middle (tarfile alone would end there quietly)
    damaged = bytearray(good)
    damaged[sizes[0] + 100 : sizes[0] + 200] = bytes(range(100))
    assert keys_then_error(bytes(damaged), f"damaged tar header at byte {sizes[0]}") == ["item00"]
    # two members with the same extension for one key
    twice = make_tar(tmp_path / "twice.tar", [members[0], members[0]]).read_bytes()
    assert keys_then_error(twice, "a second .flac member") == []
    assert keys_then_error(gzip.compress(good), "gzip") == []
    assert keys_then_error(b"", "empty") == []
    assert keys_then_error(b"not a tar file" * 100, "") == []


def test_tar_header_pointing_past_the_end(tmp_path):
    """Found by the fuzzer: a GNU sparse header claiming 2^80 bytes made tarfile seek past any
    offset the OS takes (a ValueError taken for a storage failure). It is damage."""
    data = bytearray(make_tar(tmp_path / "a.tar", [("x.flac", ITEMS[0].data)]).read_bytes())
    data[124:136] = b"\x80" + (2**80).to_bytes(11, "big")  # size, GNU base-256
    data[156:157] = b"S"  # typeflag: sparse
    data[148:156] = b" " * 8
    data[148:156] = f"{sum(data[:512]):06o}".encode() + b"\0 "  # the header checksum
    (tmp_path / "a.tar").write_bytes(bytes(data))
    (shard,) = open_source(tmp_path / "a.tar").shards
    with pytest.raises(ShardError, match=r"points to byte 1208925819614629174706687, outside the"):
        list(shard.items())


def test_arrow_batch_with_damaged_offsets(tmp_path):
    """Found by the fuzzer: an Arrow IPC batch is not validated when read, so a string offset
    of 2^30 made pyarrow allocate (or read) far beyond the file. Batches are validated."""
    folder = tmp_path / "saved"
    folder.mkdir()
    audio = pa.StructArray.from_arrays(
        [pa.array([ITEMS[0].data, ITEMS[1].data], pa.binary()), pa.array(["ab", "cdefg"])],
        names=["bytes", "path"],
    )
    table = pa.table({"audio": audio})
    arrow = folder / "data-00000-of-00001.arrow"
    with pa.ipc.new_stream(arrow, table.schema) as writer:
        writer.write_table(table)
    offsets = np.array([0, 2, 7], np.int32).tobytes()
    raw = arrow.read_bytes()
    assert raw.count(offsets) == 1
    arrow.write_bytes(raw.replace(offsets, np.array([0, 2, 1 << 30], np.int32).tobytes()))
    state = {"_data_files": [{"filename": arrow.name}]}
    (folder / "state.json").write_text(json.dumps(state))
    (folder / "dataset_info.json").write_text("{}")
    (shard,) = open_source(folder).shards
    with pytest.raises(ShardError, match="offset for slot 2 out of bounds: 1073741824 > 7"):
        list(shard.items())


# ---- fsspec ----
def test_memory_filesystem(tmp_path):
    """Parquet and tar shards behind memory:// URLs (glob and brace patterns)."""
    fsspec = pytest.importorskip("fsspec")
    memory = fsspec.filesystem("memory")
    write_parquet_arrow(tmp_path / "p", ITEMS, shards=2)
    write_tars(tmp_path / "t", ITEMS, shards=2)
    copy_to_fs(sorted((tmp_path / "p").iterdir()), memory, "/corpus/p")
    copy_to_fs(sorted((tmp_path / "t").iterdir()), memory, "/corpus/t")
    try:
        parquet = open_source(
            "memory://corpus/p/part-*.parquet", audio_column="wav", id_column="uid"
        )
        tars = open_source("memory://corpus/t/shard-{000000..000001}.tar")
        for source in (parquet, tars):
            items = [i for _, i in everything(source)]
            assert [i.key for i in items] == [it.key for it in ITEMS]
            assert all(i.audio == BY_KEY[i.key].data for i in items)
            assert_resumable(source.shards[1])
        assert [s.count() for s in parquet.shards] == [None, None]  # not read up front remotely
        with pytest.raises(SourceError, match="does not exist"):
            open_source("memory://corpus/t/shard-{000000..000002}.tar")
        with pytest.raises(SourceError, match="matches no files"):
            open_source("memory://corpus/t/*.parquet")
    finally:
        memory.rm("/corpus", recursive=True)


def test_missing_fsspec_backend_says_what_to_install():
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("gcsfs is installed")
    with pytest.raises(SourceError, match=r"gs:// needs a package \(pip install gcsfs\)"):
        open_source("gs://bucket/shards/train-*.parquet")


# ---- decoding ----
@pytest.mark.parametrize("index", range(4))
def test_read_audio_from_bytes(index):
    """flac, wav, mp3 and ogg bytes decode like the same file on disk."""
    item = ITEMS[index]
    audio, _ = read_audio(item.data, 16_000, 1)
    expected, _ = decode_audio(item.data, 16_000, 1)
    np.testing.assert_array_equal(audio, expected)
    data, rate = sf.read(io.BytesIO(item.data), dtype="float32", always_2d=True)
    assert audio.shape[1] == round(data.shape[0] * 16_000 / rate)


def test_read_audio_errors():
    with pytest.raises(AudioError, match="empty"):
        read_audio(b"", 16_000, 1)
    with pytest.raises(AudioError, match="MP4/M4A container"):
        read_audio(b"\x00\x00\x00\x20ftypM4A " + bytes(200), 16_000, 1)
    with pytest.raises(AudioError, match="not recognised"):
        read_audio(b"garbage" * 10, 16_000, 1)
    with pytest.raises(AudioError, match="floating-point"):
        read_audio(Samples(np.zeros(100, np.int16), 16_000), 16_000, 1)
    with pytest.raises(AudioError, match="sampling rate"):
        read_audio(Samples(np.zeros(100, np.float32), 0), 16_000, 1)
    with pytest.raises(AudioError, match="NaN"):
        read_audio(Samples(np.full(100, np.nan, np.float32), 16_000), 16_000, 1)
