"""Aspect-ratio buckets, crops, masks and extra datasets at prepare time."""

import numpy as np
import polars as pl
import pytest

from nexus_core.artifacts import raw_ref
from nexus_core.context import StepContext
from nexus_core.errors import InputError
from nexus_core.flux import buckets as bk
from nexus_core.flux.mds import iter_samples
from nexus_core.flux.prepare import PrepareConfig, files_read, run_prepare
from nexus_core.flux.sources import ExtraSource
from nexus_core.flux.synthetic import make_shape_images


def _image(path, w, h, color=(200, 50, 50)):
    from PIL import Image

    Image.new("RGB", (w, h), color).save(path)
    path.with_suffix(".txt").write_text(f"{w}x{h}")


def _prepare(cfg, source, out, **inputs):
    return run_prepare(cfg, inputs={"source": raw_ref(source), **inputs}, out_uri=str(out), ctx=StepContext.detached())


def test_generated_buckets_respect_area_divisibility_and_aspect():
    got = bk.generate(512, 16, 64, 0.5, 2.0)
    assert (512, 512) in got and (384, 640) in got and (640, 384) in got
    assert all(h % 64 == 0 and w % 64 == 0 and h * w <= 512 * 512 and 0.5 <= w / h <= 2.0 for h, w in got)
    with pytest.raises(ValueError, match="step: 24 is not a multiple of divisible"):
        bk.BucketSettings(step=24, divisible=16)
    with pytest.raises(ValueError, match=r"sizes: \[\[30, 32\]\] not positive multiples"):
        bk.BucketSettings(sizes=[(30, 32)])


def test_nearest_bucket_by_aspect_and_resolution():
    sets = bk.bucket_sets(bk.BucketSettings(resolutions=[256, 512], step=64), 512)
    assert bk.nearest(1200, 800, sets) == (384, 640)  # wide, big enough for 512: 640/384 is nearest to 1.5
    assert bk.nearest(300, 450, sets) == (320, 192)  # too small for 512 buckets: a 256 one, tall
    assert bk.nearest(1000, 1000, sets) == (512, 512)
    explicit = bk.bucket_sets(bk.BucketSettings(sizes=[(32, 32), (24, 40), (40, 24)], divisible=8, step=8), 32)
    assert bk.nearest(100, 60, explicit) == (24, 40) and bk.nearest(60, 100, explicit) == (40, 24)


def test_random_crop_is_seeded_per_file_name():
    a = bk.centering("random", 0, "a.png")
    assert a == bk.centering("random", 0, "a.png") != bk.centering("random", 1, "a.png")
    assert bk.centering("center", 0, "a.png") == (0.5, 0.5)


def test_prepare_crops_each_image_to_its_bucket(tmp_path):
    src = tmp_path / "imgs"
    src.mkdir()
    _image(src / "a.png", 60, 40)
    _image(src / "b.png", 40, 60)
    _image(src / "c.png", 50, 50)
    cfg = PrepareConfig(size=32, buckets={"enabled": True, "sizes": [[32, 32], [24, 40], [40, 24]], "divisible": 4,
                                          "step": 4})
    _prepare(cfg, src, tmp_path / "out")
    rows = list(iter_samples(tmp_path / "out" / "mds", tmp_path / "cache"))
    assert [(r["bucket"], r["width"], r["height"], r["image"].size) for r in rows] == [
        ("24x40", 40, 24, (40, 24)), ("40x24", 24, 40, (24, 40)), ("32x32", 32, 32, (32, 32))]
    table = pl.read_parquet(tmp_path / "out" / "data.parquet")
    assert table["bucket"].to_list() == ["24x40", "40x24", "32x32"]


def test_random_crop_differs_from_center_and_is_reproducible(tmp_path):
    from PIL import Image

    src = tmp_path / "imgs"
    src.mkdir()
    gradient = np.tile(np.arange(64, dtype=np.uint8)[None, :, None] * 4, (16, 1, 3))  # 64 wide x 16 high
    for i in range(4):
        Image.fromarray(gradient).save(src / f"{i}.png")
        (src / f"{i}.txt").write_text("g")

    def lefts(crop, out):
        _prepare(PrepareConfig(size=16, crop=crop, crop_seed=3), src, tmp_path / out)
        return [np.asarray(r["image"])[0, 0, 0] for r in iter_samples(tmp_path / out / "mds", tmp_path / "c" / out)]

    center, rand, again = lefts("center", "a"), lefts("random", "b"), lefts("random", "c")
    assert len(set(center)) == 1 and rand == again and len(set(rand)) > 1


def test_masks_are_cropped_like_their_images_and_rows_without_get_white(tmp_path):
    from PIL import Image

    src = make_shape_images(tmp_path / "imgs", 2, size=32)
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (0, 0, 16, 32))  # left half
    mask.save(src / "0000.mask.png")
    res = _prepare(PrepareConfig(size=16), src, tmp_path / "out")
    assert res.kept == 2  # the mask file is not an image of its own
    rows = list(iter_samples(tmp_path / "out" / "mds", tmp_path / "cache"))
    m0, m1 = np.asarray(rows[0]["mask"]), np.asarray(rows[1]["mask"])
    assert rows[0]["mask"].mode == "L" and m0.shape == (16, 16)
    assert m0[:, :7].min() == 255 and m0[:, 9:].max() == 0 and m1.min() == 255
    table = pl.read_parquet(tmp_path / "out" / "data.parquet")
    assert table["mask"].to_list() == [str(src / "0000.mask.png"), None]


def test_no_mask_column_without_masks_and_a_wrong_sized_mask_is_named(tmp_path):
    from PIL import Image

    src = make_shape_images(tmp_path / "imgs", 2, size=32)
    _prepare(PrepareConfig(size=16), src, tmp_path / "a")
    assert "mask" not in next(iter_samples(tmp_path / "a" / "mds", tmp_path / "cache"))
    Image.new("L", (20, 32), 255).save(src / "0001.mask.png")
    with pytest.raises(InputError, match=r"mask: .*0001\.mask\.png: 20x32 but its image is 32x32"):
        _prepare(PrepareConfig(size=16), src, tmp_path / "b")


def test_extra_sources_carry_dataset_and_repeats_and_join_the_cache_key(tmp_path):
    main = make_shape_images(tmp_path / "main", 2, size=20)
    extra = make_shape_images(tmp_path / "extra", 3, size=20, seed=1)
    listing = make_shape_images(tmp_path / "sstk", 1, size=20, layout="sstk")
    cfg = PrepareConfig(size=16, repeats=1, extra_sources=[ExtraSource(source=str(extra), repeats=3),
                                                           ExtraSource(source=str(listing), layout="sstk", name="s")])
    res = _prepare(cfg, main, tmp_path / "out")
    rows = list(iter_samples(tmp_path / "out" / "mds", tmp_path / "cache"))
    assert res.kept == 6
    assert [(r["dataset"], r["repeats"]) for r in rows] == [("main", 1)] * 2 + [("extra", 3)] * 3 + [("s", 1)]
    read = files_read(cfg, {"source": raw_ref(main)})
    assert read[0] == extra and [p.name for p in read[1:]] == ["0000.png", "0000.png.json"]
    with pytest.raises(ValueError, match="dataset names .* repeat"):
        PrepareConfig(extra_sources=[ExtraSource(source=str(extra)), ExtraSource(source=str(tmp_path / "x/extra"))])
