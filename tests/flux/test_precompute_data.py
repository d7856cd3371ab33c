"""Precompute on the tiny pipeline: rows encoded at their own bucket size (batched per bucket, stored in
prepared order), flipped latents, masks on the latent grid, dataset/repeats passed through, the
empty-prompt embedding; DreamBooth class images recorded inside the artifact."""

import json

import numpy as np
import polars as pl
import pytest
import torch

from nexus_core.artifacts import ArtifactRef, raw_ref
from nexus_core.context import StepContext
from nexus_core.errors import ConfigError
from nexus_core.flux import encode
from nexus_core.flux.mds import iter_samples
from nexus_core.flux.precompute import PrecomputeConfig, run_precompute
from nexus_core.flux.prepare import PrepareConfig, run_prepare
from nexus_core.flux.sources import ExtraSource
from nexus_core.flux.synthetic import make_shape_images
from nexus_core.models.flux_tiny import build_tiny_flux, load_flux_pipeline

pytestmark = pytest.mark.integration  # builds the tiny pipeline and encodes (~15 s on 2 cores)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    path = build_tiny_flux(tmp_path_factory.mktemp("pipe") / "pipe", ["a red square", "a sks square"])
    return ArtifactRef(uri=str(path), kind="model", name="pipe", version=1, digest="d")


def _ref(path):
    return ArtifactRef(uri=str(path), kind="dataset", name="x", version=1, digest="d")


def _run(fn, cfg, out, **inputs):
    return fn(cfg, inputs=inputs, out_uri=str(out), ctx=StepContext.detached())


@pytest.fixture(scope="module")
def bucketed(tmp_path_factory, pipeline):
    """Prepared + precomputed: 3 aspect ratios, one mask, an extra dataset with repeats 2."""
    from PIL import Image

    tmp = tmp_path_factory.mktemp("bucketed")
    src = tmp / "main"
    src.mkdir()
    rng = np.random.default_rng(0)
    for name, (w, h) in {"a": (48, 24), "b": (24, 48), "c": (32, 32), "d": (50, 26)}.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(src / f"{name}.png")
        (src / f"{name}.txt").write_text(f"a red square {name}")
    mask = Image.new("L", (48, 24), 0)
    mask.paste(255, (0, 0, 24, 24))  # left half of a.png
    mask.save(src / "a.mask.png")
    extra = make_shape_images(tmp / "extra", 2, size=32)
    prep_cfg = PrepareConfig(size=32, buckets={"enabled": True, "sizes": [[32, 32], [16, 32], [32, 16]],
                                               "divisible": 4, "step": 4},
                             extra_sources=[ExtraSource(source=str(extra), repeats=2)])
    _run(run_prepare, prep_cfg, tmp / "prep", source=raw_ref(src))
    cfg = PrecomputeConfig(resolution=32, flip=True, batch_size=2, group_size=3, max_sequence_length=8,
                           device="cpu", save_dtype="float32")
    res = _run(run_precompute, cfg, tmp / "pre", prepared=_ref(tmp / "prep"), pipeline=pipeline)
    return tmp, res, cfg


def test_rows_keep_their_bucket_shape_order_and_dataset(bucketed):
    tmp, res, _ = bucketed
    meta = json.loads((tmp / "pre" / "flux_meta.json").read_text())
    assert meta["buckets"] == [[16, 32], [32, 16], [32, 32]] == res.buckets
    assert (meta["has_mask"], meta["has_flip"], meta["empty_prompt"]) == (True, True, "empty_prompt.safetensors")
    assert meta["latent_shape"] == [16, 8, 8] and meta["latent_downscale"] == 4
    rows = list(iter_samples(tmp / "pre" / "mds", tmp / "cache"))
    assert [r["bucket"] for r in rows] == ["16x32", "32x16", "32x32", "16x32", "32x32", "32x32"]
    assert [r["latents_32"].shape for r in rows[:3]] == [(16, 4, 8), (16, 8, 4), (16, 8, 8)]
    assert all(r["latents_32_flip"].shape == r["latents_32"].shape for r in rows)
    assert [(r["dataset"], r["repeats"]) for r in rows] == [("main", 1)] * 4 + [("extra", 2)] * 2
    table = pl.read_parquet(tmp / "pre" / "data.parquet")
    assert table.columns == ["caption", "subset", "group", "bucket", "dataset", "repeats"]
    assert table["caption"].to_list() == [r["caption"] for r in rows]
    assert table["caption"].to_list()[:4] == [f"a red square {n}" for n in "abcd"]
    assert table["group"].to_list() == [0, 0, 0, 1, 1, 1]


def test_latents_and_flips_match_encoding_each_image_alone(bucketed, pipeline):
    from PIL import ImageOps

    tmp, _, _ = bucketed
    pipe = load_flux_pipeline(str(pipeline.path))
    prepared = list(iter_samples(tmp / "prep" / "mds", tmp / "cache-prep"))
    rows = list(iter_samples(tmp / "pre" / "mds", tmp / "cache"))
    for i, (p, r) in enumerate(zip(prepared, rows, strict=True)):
        h, w = (int(v) for v in p["bucket"].split("x"))
        pixels = encode.images_to_tensor([p["image"]], (h, w))
        alone = encode.encode_images(pipe, pixels)[0].numpy()
        flipped = encode.encode_images(pipe, encode.images_to_tensor([ImageOps.mirror(p["image"])], (h, w)))[0].numpy()
        np.testing.assert_allclose(r["latents_32"], alone, atol=1e-4)
        np.testing.assert_allclose(r["latents_32_flip"], flipped, atol=1e-4)
        if i < 4:  # noise images (a shape image may be symmetric)
            assert np.abs(r["latents_32_flip"] - r["latents_32"]).max() > 1e-3


def test_masks_are_pooled_onto_the_latent_grid(bucketed):
    tmp, _, _ = bucketed
    rows = list(iter_samples(tmp / "pre" / "mds", tmp / "cache"))
    m = rows[0]["mask"]  # a.png (48x24) in the 16x32 bucket: latent grid 4x8, left half ones
    assert m.dtype == np.float16 and m.shape == (4, 8)
    assert m[:, :3].min() == 1.0 and m[:, 5:].max() == 0.0
    assert all(r["mask"].shape == r["latents_32"].shape[1:] and r["mask"].min() == 1.0 for r in rows[1:])


def test_empty_prompt_embedding_is_written(bucketed, pipeline):
    from safetensors.torch import load_file

    tmp, res, cfg = bucketed
    saved = load_file(str(tmp / "pre" / "empty_prompt.safetensors"))
    assert list(saved["text_embeds"].shape) == res.text_shape == [8, 48]
    assert saved["text_embeds"].dtype == torch.float32 and saved["text_ids"].dtype == torch.int32
    pipe = load_flux_pipeline(str(pipeline.path))
    emb, ids = encode.encode_prompts(pipe, [""], cfg.max_sequence_length, cfg.text_encoder_out_layers)
    torch.testing.assert_close(saved["text_embeds"], emb[0].float())
    assert torch.equal(saved["text_ids"], ids[0].to(torch.int32))


def test_square_rows_bf16_and_no_mask_or_flip(tmp_path, pipeline):
    from safetensors.torch import load_file

    src = make_shape_images(tmp_path / "imgs", 2, size=24)
    _run(run_prepare, PrepareConfig(size=24), tmp_path / "prep", source=raw_ref(src))
    _run(run_precompute, PrecomputeConfig(resolution=32, max_sequence_length=8, device="cpu", save_dtype="bfloat16"),
         tmp_path / "pre", prepared=_ref(tmp_path / "prep"), pipeline=pipeline)
    meta = json.loads((tmp_path / "pre" / "flux_meta.json").read_text())
    assert (meta["buckets"], meta["has_mask"], meta["has_flip"]) == ([[32, 32]], False, False)
    row = next(iter_samples(tmp_path / "pre" / "mds", tmp_path / "cache"))
    assert row["bucket"] == "32x32" and "mask" not in row and "latents_32_flip" not in row
    assert row["latents_32"].shape == (16, 8, 8)
    assert load_file(str(tmp_path / "pre" / "empty_prompt.safetensors"))["text_embeds"].dtype == torch.bfloat16


def test_bucket_off_the_vae_grid_is_refused_before_encoding(tmp_path, pipeline):
    src = make_shape_images(tmp_path / "imgs", 1, size=24)
    _run(run_prepare, PrepareConfig(size=24, buckets={"enabled": True, "sizes": [[18, 18]], "divisible": 2, "step": 2}),
         tmp_path / "prep", source=raw_ref(src))
    with pytest.raises(ConfigError, match=r"prepare.buckets: 18x18 .* not multiples of 4"):
        _run(run_precompute, PrecomputeConfig(resolution=32, max_sequence_length=8, device="cpu"), tmp_path / "pre",
             prepared=_ref(tmp_path / "prep"), pipeline=pipeline)


def test_generated_class_images_are_recorded_inside_the_artifact(tmp_path, pipeline):
    inst = make_shape_images(tmp_path / "inst", 2, size=32, layout="plain")
    res = _run(run_prepare, PrepareConfig(source="dreambooth", instance_prompt="a sks square", class_prompt="a square",
                                          num_class_images=1, generate_class_images=True, class_generation_steps=1,
                                          size=16), tmp_path / "prep", source=raw_ref(inst), pipeline=pipeline)
    table = pl.read_parquet(tmp_path / "prep" / "data.parquet")
    assert res.generated_class_images == 1 and table["path"].to_list()[-1] == "class_images/class_00000.png"
    assert (tmp_path / "prep" / table["path"].to_list()[-1]).is_file()
