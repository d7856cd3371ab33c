"""MDS helpers: hashes recorded at write time, flat and nested layouts, corruption detected."""

import numpy as np
import pytest

from nexus_core.errors import InputError
from nexus_core.flux.mds import iter_samples, merge_groups, read_index, verify_shards, write_mds

COLUMNS = {"caption": "str", "x": "ndarray"}


def _groups(root, n_groups=2, rows=5):
    for g in range(n_groups):
        write_mds(root / f"groups/{g:05d}", COLUMNS,
                  ({"caption": f"g{g} r{i}", "x": np.full((2, 3), i, np.float16)} for i in range(rows)),
                  size_limit=120)
    return [f"groups/{g:05d}" for g in range(n_groups)]


@pytest.mark.parametrize("layout", ["flat", "nested"])
def test_groups_merge_into_one_verified_dataset(tmp_path, layout):
    root = tmp_path / "mds"
    shards = merge_groups(root, _groups(root), layout)
    assert shards > 2  # the small size limit forced several shards per group
    assert verify_shards(root) == shards
    names = [s["raw_data"]["basename"] for s in read_index(root)["shards"]]
    assert all(("/" in n) == (layout == "nested") for n in names)
    rows = list(iter_samples(root, tmp_path / "cache"))
    assert [r["caption"] for r in rows] == [f"g{g} r{i}" for g in range(2) for i in range(5)]
    assert rows[7]["x"].dtype == np.float16 and rows[7]["x"][0, 0] == 2
    assert not (tmp_path / "cache").exists()  # the streaming cache is cleaned up


def test_corrupt_or_missing_shard_is_named(tmp_path):
    root = tmp_path / "mds"
    merge_groups(root, _groups(root, 1), "flat")
    first = root / read_index(root)["shards"][0]["raw_data"]["basename"]
    data = bytearray(first.read_bytes())
    data[-1] ^= 0xFF
    first.write_bytes(bytes(data))
    with pytest.raises(InputError, match=first.name + ".*sha256"):
        verify_shards(root)
    first.unlink()
    with pytest.raises(InputError, match="missing"):
        verify_shards(root)


def test_encoded_image_bytes_are_written_unchanged(tmp_path):
    import io

    from PIL import Image

    from nexus_core.flux.mds import Encoded

    img = Image.new("RGB", (8, 8), (10, 200, 30))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    write_mds(tmp_path / "mds", {"image": "jpeg", "plain": "png"},
              [{"image": Encoded(buf.getvalue()), "plain": img}])
    row = next(iter_samples(tmp_path / "mds", tmp_path / "cache"))
    assert row["image"].quantization == Image.open(io.BytesIO(buf.getvalue())).quantization  # not re-encoded at 75
    assert row["plain"].getpixel((0, 0)) == (10, 200, 30)
