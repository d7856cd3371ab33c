"""Prepare on bad and awkward input: strict mode and max_skipped, EXIF orientation, streaming in input
order with a bounded window, DreamBooth class images (class_dir with num_class_images 0)."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import polars as pl
import pytest

from nexus_core.artifacts import raw_ref
from nexus_core.context import StepContext
from nexus_core.errors import InputError
from nexus_core.flux.mds import iter_samples
from nexus_core.flux.prepare import PrepareConfig, ordered_map, run_prepare
from nexus_core.flux.synthetic import make_shape_images
from nexus_core.runner import run_step


def _prepare(cfg, source, out, **inputs):
    return run_prepare(cfg, inputs={"source": raw_ref(source), **inputs}, out_uri=str(out), ctx=StepContext.detached())


def _folder_with_problems(tmp_path):
    images = make_shape_images(tmp_path / "imgs", 6, size=24)
    (images / "0001.txt").unlink()  # missing caption
    (images / "0003.png").write_bytes(b"\x89PNG\r\n truncated")  # corrupt image
    return images


def test_strict_names_the_missing_caption_and_publishes_nothing(tmp_path, data_root):
    images = _folder_with_problems(tmp_path)
    with pytest.raises(InputError, match=r"caption: .*0001\.txt not found; strict mode"):
        run_step(run_prepare, PrepareConfig(size=16), name="strict", inputs={"source": raw_ref(images)})
    assert not list(data_root.rglob("manifest.json"))  # nothing published
    (images / "0001.txt").write_text("a green square")
    with pytest.raises(InputError, match=r"unreadable: .*0003\.png: .*prepare\.strict=false"):
        _prepare(PrepareConfig(size=16), images, tmp_path / "out")


def test_unreadable_caption_file_is_bad_input(tmp_path):
    images = make_shape_images(tmp_path / "imgs", 2, size=24)
    (images / "0000.txt").write_bytes(b"a red caf\xe9")
    with pytest.raises(InputError, match=r"0000\.txt: not valid UTF-8"):
        _prepare(PrepareConfig(size=16), images, tmp_path / "out")


def test_non_strict_skips_with_reasons_and_max_skipped_caps_the_share(tmp_path):
    images = _folder_with_problems(tmp_path)
    res = _prepare(PrepareConfig(size=16, strict=False), images, tmp_path / "a")
    assert (res.kept, res.skipped, res.skipped_by_reason) == (4, 2, {"caption": 1, "unreadable": 1})
    table = pl.read_parquet(tmp_path / "a" / "data.parquet")
    assert table["status"].to_list() == ["ok", "skipped", "ok", "skipped", "ok", "ok"]
    assert "0003.png" in table["reason"][3]
    ok = _prepare(PrepareConfig(size=16, strict=False, max_skipped=0.34), images, tmp_path / "b")  # 2 of 6 allowed
    assert ok.kept == 4
    with pytest.raises(InputError, match=r"2 of 6 images unusable, more than prepare.max_skipped=0.2 allows \(1\); "
                                         r"first: caption: .*0001\.txt not found; unreadable: .*0003\.png"):
        _prepare(PrepareConfig(size=16, strict=False, max_skipped=0.2), images, tmp_path / "c")


def test_filter_skips_are_not_errors_in_strict_mode(tmp_path):
    from PIL import Image

    images = make_shape_images(tmp_path / "imgs", 3, size=24)
    Image.new("RGB", (8, 8)).save(images / "0100.png")
    (images / "0100.txt").write_text("tiny")
    res = _prepare(PrepareConfig(size=16, min_size=16), images, tmp_path / "out")
    assert (res.kept, res.skipped_by_reason) == (3, {"too_small": 1})


def test_max_skipped_needs_non_strict():
    with pytest.raises(ValueError, match="max_skipped: only applies with strict=false"):
        PrepareConfig(max_skipped=0.1)


def test_exif_orientation_is_applied_before_cropping(tmp_path):
    from PIL import Image

    src = tmp_path / "imgs"
    src.mkdir()
    # stored 40 wide x 20 high, left half red, right half blue; orientation 6 = display rotated 90 degrees
    # clockwise, so upright it is 20 wide x 40 high, red on top
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(src / "photo.jpg", exif=exif.tobytes(), quality=95)
    (src / "photo.txt").write_text("a photo")
    res = _prepare(PrepareConfig(size=16, min_aspect_ratio=0.4, max_aspect_ratio=0.6), src, tmp_path / "out")
    assert res.kept == 1  # upright 20x40 = 0.5 passes the aspect filter; as stored (2.0) it would be skipped
    table = pl.read_parquet(tmp_path / "out" / "data.parquet")
    assert (table["orig_width"][0], table["orig_height"][0]) == (20, 40)
    row = next(iter_samples(tmp_path / "out" / "mds", tmp_path / "cache"))
    top, bottom = row["image"].convert("RGB").getpixel((8, 2)), row["image"].convert("RGB").getpixel((8, 13))
    assert top[0] > 200 and top[2] < 60  # red on top after transposing
    assert bottom[2] > 200 and bottom[0] < 60


def test_ordered_map_keeps_order_and_a_bounded_window():
    pulled, lock = [0], threading.Lock()

    def source():
        for i in range(40):
            with lock:
                pulled[0] += 1
            yield i

    def slow(i):
        time.sleep(0.002 * (i % 3))  # finish out of order
        return i * i

    out, ahead = [], []
    with ThreadPoolExecutor(4) as pool:
        for r in ordered_map(pool, slow, source(), window=5):
            ahead.append(pulled[0] - len(out))  # items read but not yet handed on
            out.append(r)
    assert out == [i * i for i in range(40)]
    assert max(ahead) <= 5


def test_prepare_streams_rows_into_shards_in_input_order(tmp_path):
    images = make_shape_images(tmp_path / "imgs", 12, size=20)
    res = _prepare(PrepareConfig(size=16, num_proc=3, shard_size_limit=2048), images, tmp_path / "out")
    rows = list(iter_samples(tmp_path / "out" / "mds", tmp_path / "cache"))
    assert res.kept == 12 and len(list((tmp_path / "out" / "mds").glob("shard.*.mds"))) > 1
    expected = [(images / f"{i:04d}.txt").read_text() for i in range(12)]
    assert [r["caption"] for r in rows] == expected
    assert {r["dataset"] for r in rows} == {"main"} and {r["repeats"] for r in rows} == {1}
    assert rows[0]["image"].size == (16, 16)


def test_jpeg_rows_are_encoded_once_at_quality_95(tmp_path):
    images = make_shape_images(tmp_path / "imgs", 1, size=64)
    _prepare(PrepareConfig(size=64, image_format="jpeg"), images, tmp_path / "out")
    row = next(iter_samples(tmp_path / "out" / "mds", tmp_path / "cache"))
    assert row["image"].format == "JPEG"
    q = row["image"].quantization[0]  # the luminance table of quality 95 is all small steps
    assert max(q) <= 15  # quality 75 (the writer's own re-encode) would reach 60


def test_class_dir_is_used_whole_when_num_class_images_is_0(tmp_path):
    inst = make_shape_images(tmp_path / "inst", 2, size=20, layout="plain")
    cls = make_shape_images(tmp_path / "cls", 3, size=20, layout="plain", seed=1)
    cfg = PrepareConfig(source="dreambooth", instance_prompt="a sks square", class_prompt="a square", size=16)
    res = _prepare(cfg, inst, tmp_path / "a", class_dir=raw_ref(cls))
    assert res.kept == 5
    capped = _prepare(cfg.model_copy(update={"num_class_images": 2}), inst, tmp_path / "b", class_dir=raw_ref(cls))
    table = pl.read_parquet(tmp_path / "b" / "data.parquet")
    assert capped.kept == 4 and table["subset"].to_list() == ["instance", "instance", "class", "class"]


def test_prepare_memory_does_not_grow_with_the_dataset(tmp_path):
    """Peak Python memory while preparing 64 incompressible images stays well under their encoded total
    (holding every encoded image before writing, as prepare once did, exceeds it). Fixed costs (a 1 MB
    hashing buffer) stay under the bound too."""
    import tracemalloc

    import numpy as np
    from PIL import Image

    src = tmp_path / "imgs"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(64):
        Image.fromarray(rng.integers(0, 255, (160, 160, 3), dtype=np.uint8)).save(src / f"{i:03d}.png")
        (src / f"{i:03d}.txt").write_text("noise")
    encoded = sum(p.stat().st_size for p in src.glob("*.png"))  # ~77 KB each; stored at the same size
    _prepare(PrepareConfig(size=160, num_proc=2), src, tmp_path / "warm")  # imports and caches outside the trace
    tracemalloc.start()
    try:
        res = _prepare(PrepareConfig(size=160, num_proc=2, shard_size_limit=65536), src, tmp_path / "out")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert res.kept == 64
    assert peak < encoded / 2.5, (peak, encoded)
