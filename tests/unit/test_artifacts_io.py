import gzip
import json

import polars as pl
import pytest

from nexus_core.artifacts import (
    Manifest,
    atomic_write_text,
    dir_digest,
    list_versions,
    publish,
    read_manifest,
    staging_dir,
)
from nexus_core.errors import InputError
from nexus_core.io import DataQuery, iter_jsonl, read_table, write_jsonl, write_parquet


def _manifest(version, target, digest="d"):
    return Manifest(kind="dataset", name="t", version=version, uri=str(target), digest=digest, step="s",
                    config_hash="c", code_hash="h", started_at="now", finished_at="now")


def test_publish_numbers_versions_and_writes_manifest_last(data_root):
    for expected in (1, 2):
        stage = staging_dir("area", "t")
        (stage / "data.txt").write_text(f"v{expected}")
        m = publish(stage, "area", "t", _manifest)
        assert m.version == expected
        assert read_manifest(m.uri).version == expected
        assert not stage.exists()
    assert list_versions("area", "t") == [1, 2]
    # an interrupted run leaves a staging dir without manifest: not a version, never listed
    leftover = staging_dir("area", "t")
    (leftover / "data.txt").write_text("half")
    assert list_versions("area", "t") == [1, 2]


def test_dir_digest_tracks_content_and_ignores_manifest(tmp_path):
    (tmp_path / "a.txt").write_text("a")
    d1, size = dir_digest(tmp_path)
    (tmp_path / "manifest.json").write_text("{}")
    assert dir_digest(tmp_path)[0] == d1 and size == 1
    (tmp_path / "a.txt").write_text("b")
    assert dir_digest(tmp_path)[0] != d1


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "f.json"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        from nexus_core.artifacts import atomic_path

        with atomic_path(target) as tmp:
            tmp.write_text("new-half")
            raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.zst"])
def test_jsonl_round_trip(tmp_path, suffix):
    path = tmp_path / f"rows{suffix}"
    rows = [{"a": i, "text": f"row {i} é"} for i in range(5)]
    assert write_jsonl(rows, path) == 5
    assert list(iter_jsonl(path)) == rows
    assert read_table(path).height == 5


def test_bad_jsonl_line_is_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2\n')
    with pytest.raises(InputError, match=r"bad.jsonl:3: not valid JSON"):
        list(iter_jsonl(path))
    gz = tmp_path / "bad.jsonl.gz"
    with gzip.open(gz, "wb") as fh:
        fh.write(b'{"a": 1}\n[1, 2]\n')
    with pytest.raises(InputError, match=r"bad.jsonl.gz:2: expected a JSON object"):
        list(iter_jsonl(gz))


def test_non_utf8_line_is_named(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes(b'{"a": "ok"}\n{"a": "caf\xe9"}\n')
    with pytest.raises(InputError, match=r"latin.jsonl:\d+: not valid UTF-8"):
        list(iter_jsonl(path))


def test_unreadable_parquet_and_missing_columns(tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet at all")
    with pytest.raises(InputError, match="unreadable Parquet"):
        read_table(bad)
    good = tmp_path / "good.parquet"
    write_parquet(pl.DataFrame({"a": [1]}), good)
    with pytest.raises(InputError, match=r"missing column\(s\) text, domain"):
        read_table(good, columns=["a", "text", "domain"])
    with pytest.raises(InputError, match="file not found"):
        read_table(tmp_path / "nope.parquet")


def test_data_query_lists_and_loads_by_version(data_root):
    for n in (1, 2):
        stage = staging_dir("corpus", "docs")
        write_parquet(pl.DataFrame({"x": list(range(n))}), stage / "data.parquet")
        publish(stage, "corpus", "docs", lambda v, t, n=n: _manifest(v, t).model_copy(
            update={"name": "docs", "rows": n}))
    q = DataQuery()
    [info] = q.list()
    assert (info.area, info.name, info.versions, info.rows) == ("corpus", "docs", [1, 2], 2)
    assert q.load("docs@v1").height == 1
    assert q.load("docs").height == 2
    assert q.load("corpus/docs@v2").height == 2
    with pytest.raises(InputError, match="no version v3"):
        q.load("docs@v3")
    with pytest.raises(InputError, match="no dataset named 'other'"):
        q.load("other")
    assert json.loads((q.ref("docs").path / "manifest.json").read_text())["rows"] == 2
