"""Prepare's cache key covers the images and caption files an sstk listing names, not just the listing:
editing a caption or replacing an image makes a new version (and so misses precompute and train too)."""

import json

import polars as pl

from nexus_core.artifacts import raw_ref
from nexus_core.flux.prepare import PrepareConfig, files_read, run_prepare
from nexus_core.flux.synthetic import make_shape_images
from nexus_core.runner import run_step


def test_editing_a_listed_caption_or_image_makes_a_new_version(tmp_path, data_root):
    from PIL import Image

    listing = make_shape_images(tmp_path / "sstk", 3, size=24, layout="sstk")
    cfg = PrepareConfig(source="sstk", size=16, num_proc=1)

    def prepare():
        # a fresh ref each time, as a flow makes one: the listing itself never changes below
        return run_step(run_prepare, cfg, name="sstk_images", inputs={"source": raw_ref(listing)})

    first = prepare()
    again = prepare()
    assert again.reused and again.ref.uri == first.ref.uri

    (tmp_path / "sstk" / "0001.png.json").write_text(json.dumps({"caption": "a purple square"}))
    edited = prepare()
    assert not edited.reused and edited.ref.version == first.ref.version + 1
    captions = pl.read_parquet(edited.ref.path / "data.parquet")["caption"].to_list()
    assert captions[1] == "a purple square"
    assert prepare().reused  # and the edited state is itself cached

    Image.new("RGB", (24, 24), (0, 0, 0)).save(tmp_path / "sstk" / "0002.png")  # same name, new pixels
    replaced = prepare()
    assert not replaced.reused and replaced.ref.version == edited.ref.version + 1


def test_reads_lists_each_image_and_caption_file_of_the_listing(tmp_path):
    listing = make_shape_images(tmp_path / "sstk", 2, size=16, layout="sstk")
    names = [p.name for p in files_read(PrepareConfig(source="sstk"), {"source": raw_ref(listing)})]
    assert names == ["0000.png", "0000.png.json", "0001.png", "0001.png.json"]
    # a folder's own digest covers its files: nothing extra to read
    folder = make_shape_images(tmp_path / "folder", 2, size=16)
    assert files_read(PrepareConfig(source="folder"), {"source": raw_ref(folder)}) == []
