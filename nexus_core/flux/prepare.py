"""Prepare: images + captions → an MDS dataset with ``image, caption, width, height, subset, dataset,
repeats`` (+ ``bucket`` with aspect-ratio buckets, + ``mask`` when any image has a mask).

Three source layouts (nexus_core.flux.sources):

* ``sstk``: a text file listing image paths (one per line, relative to the file); each caption is
  in ``<image path>.json`` under ``caption_key``. The listing's digest covers only the names, so the
  contract's ``reads`` names every listed image and caption file: their content joins the cache key.
* ``folder``: a folder of images, each with a caption file ``<stem><caption_ext>`` beside it.
* ``dreambooth``: instance images (captioned with ``instance_prompt``) plus class images
  (``class_prompt``) from ``class_dir`` (all of them, or the first ``num_class_images``); missing class
  images are generated with the pipeline when ``generate_class_images`` is set (recorded in
  data.parquet as ``class_images/class_<i>.png``, inside the artifact). Rows carry ``subset`` =
  instance | class for prior preservation.

``extra_sources`` mix more datasets in (each its own layout, name and ``repeats``); their files join the
cache key through ``reads``. Folder images may have a mask ``<stem>.mask.png`` (white = train on it):
it is cropped exactly like its image and stored as a grayscale PNG ``mask``; rows without one get an
all-white mask when any row has one.

Each image is decoded, turned upright by its EXIF orientation, filtered (``min_size``, aspect-ratio
bounds: skips, counted, not errors), cropped (square ``size``, or its aspect-ratio bucket: see
nexus_core.flux.buckets) and written to the shards as it comes: a bounded window of images is in
flight on the thread pool, in input order, so memory does not grow with the dataset.

Bad input: with ``strict`` (default) a missing or unreadable caption, an unreadable image or mask
fails the step naming the file and why, before anything is published. Otherwise such images are
skipped with their reason, up to ``max_skipped`` (a share of all images) when set. ``data.parquet``
lists every source image with its status and reason.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import Field, model_validator

from nexus_core.artifacts import ArtifactRef
from nexus_core.config import NexusModel, PathOrName, runtime_field
from nexus_core.context import StepContext
from nexus_core.contract import anything, directory, step
from nexus_core.errors import ConfigError, InputError
from nexus_core.flux import buckets as bk
from nexus_core.flux.mds import Encoded, write_mds
from nexus_core.flux.sources import (
    IMAGE_EXTS,
    Entry,
    ExtraSource,
    files_of,
    folder_images,
    list_source,
    mask_of,
    sstk_entries,
)
from nexus_core.io import write_parquet
from nexus_core.runner import StepResult

__all__ = ["IMAGE_EXTS", "PrepareConfig", "PrepareResult", "files_read", "run_prepare", "sstk_entries"]
FILTERS = ("too_small", "aspect_ratio")  # skip reasons that are choices, not bad input
T = TypeVar("T")
R = TypeVar("R")


class PrepareConfig(NexusModel):
    """Where the images and captions come from, and which images to keep."""

    source: Literal["sstk", "folder", "dreambooth"] = Field(default="folder", description="Layout of the input")
    caption_key: str = Field(default="caption", description="sstk: key of the caption in <image>.json")
    caption_ext: str = Field(default=".txt", description="folder: caption file suffix beside each image")
    instance_prompt: str | None = Field(default=None, description="dreambooth: caption of every instance image")
    class_prompt: str | None = Field(default=None, description="dreambooth: caption of every class image")
    num_class_images: int = Field(default=0, ge=0, description="dreambooth: class images wanted (generated if "
                                  "missing); 0 = every image of class_dir")
    generate_class_images: bool = Field(default=False, description="dreambooth: generate missing class images")
    class_generation_steps: int = Field(default=20, ge=1, description="Inference steps per generated class image")
    pretrained_model_name_or_path: PathOrName | None = Field(
        default=None, description="Pipeline used to generate class images (a 'pipeline' input overrides it)")
    size: int = Field(default=512, ge=8, description="Side of the stored square image (center crop, then resize); "
                      "the base resolution of generated buckets")
    min_size: int = Field(default=0, ge=0, description="Skip images whose shorter side is below this")
    min_aspect_ratio: float = Field(default=0.0, ge=0, description="Skip images with width/height below this")
    max_aspect_ratio: float = Field(default=1e9, gt=0, description="Skip images with width/height above this")
    crop: Literal["center", "random"] = Field(default="center", description="Crop position; random is drawn once "
                                              "per image at prepare time (cached latents keep that crop)")
    crop_seed: int = Field(default=0, description="Seed of random crops (with each image's file name)")
    buckets: bk.BucketSettings = Field(default_factory=bk.BucketSettings, description="Aspect-ratio buckets")
    image_format: Literal["png", "jpeg"] = Field(default="png", description="MDS encoding of the stored image")
    strict: bool = Field(default=True, description="Fail on a missing/unreadable caption or an unreadable image "
                         "or mask (naming the file); false: skip it with its reason")
    max_skipped: float | None = Field(default=None, ge=0, le=1, description="strict=false: fail when more than "
                                      "this share of the images is unusable (None: no limit)")
    dataset_name: str = Field(default="main", description="Value of the rows' dataset column for data.source")
    repeats: int = Field(default=1, ge=1, description="How many times each image of data.source counts per epoch")
    extra_sources: list[ExtraSource] = Field(default_factory=list, description="More datasets (the flux flow "
                                             "fills this from data.extra_sources)")
    num_proc: int = runtime_field(4, "Threads decoding and resizing images", ge=1)
    shard_size_limit: int = Field(default=1 << 26, ge=1024, description="Bytes per MDS shard before a new one starts")

    @model_validator(mode="after")
    def _consistent(self) -> PrepareConfig:
        problems = []
        if self.source == "dreambooth" and not self.instance_prompt:
            problems.append("instance_prompt: required when source is 'dreambooth'")
        if self.num_class_images and not self.class_prompt:
            problems.append("class_prompt: required when num_class_images > 0")
        if self.strict and self.max_skipped is not None:
            problems.append("max_skipped: only applies with strict=false (strict fails on the first bad file)")
        names = [self.dataset_name, *(x.dataset_name() for x in self.extra_sources)]
        if len(set(names)) != len(names):
            problems.append(f"extra_sources: dataset names {names} repeat; give each a distinct name")
        for i, extra in enumerate(self.extra_sources):
            if (extra.layout or self.source) == "dreambooth" and not (extra.instance_prompt or self.instance_prompt):
                problems.append(f"extra_sources.{i}.instance_prompt: required for a dreambooth source")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class PrepareResult(StepResult):
    """How many images were kept and why the others were skipped."""

    kept: int
    skipped: int
    skipped_by_reason: dict[str, int]
    generated_class_images: int = 0


def files_read(cfg: PrepareConfig, inputs: dict[str, ArtifactRef]) -> list[Path]:
    """Files prepare reads that its inputs' digests miss: every image and caption file an sstk listing
    names (a folder input's digest already covers its files), and every extra source (its folder, or
    its listing and the files it names). A listing that is not a file adds nothing: the step then
    fails with the reason."""
    src = inputs.get("source")
    main = files_of("sstk", src.path) if cfg.source == "sstk" and src is not None else []
    extra = [p for x in cfg.extra_sources for p in files_of(x.layout or cfg.source, Path(x.source))]
    return main + extra


def _items(cfg: PrepareConfig, inputs: dict[str, ArtifactRef]) -> list[tuple[Path, str | None, str, str]]:
    """(image path, caption or None, subset, skip reason) for every image of data.source and class_dir."""
    items = [(img, cap, "instance", why) for img, cap, why in list_source(
        cfg.source, inputs["source"].path, caption_ext=cfg.caption_ext, caption_key=cfg.caption_key,
        instance_prompt=cfg.instance_prompt)]
    if cfg.source == "dreambooth" and "class_dir" in inputs:
        if not cfg.class_prompt:
            raise ConfigError(["prepare.class_prompt: required when data.class_dir is set"])
        class_images = folder_images(inputs["class_dir"].path)[: cfg.num_class_images or None]
        items += [(img, cfg.class_prompt, "class", "") for img in class_images]
    return items


def _entries(cfg: PrepareConfig, inputs: dict[str, ArtifactRef]) -> list[Entry]:
    """Every image of every source, with its dataset, repeats and mask file."""
    def masked(img: Path, layout: str) -> Path | None:
        return mask_of(img) if layout != "sstk" and mask_of(img).is_file() else None

    out = [Entry(img, cap, subset, why, cfg.dataset_name, cfg.repeats, masked(img, cfg.source))
           for img, cap, subset, why in _items(cfg, inputs)]
    for x in cfg.extra_sources:
        layout = x.layout or cfg.source
        listed = list_source(layout, Path(x.source), caption_ext=x.caption_ext or cfg.caption_ext,
                             caption_key=x.caption_key or cfg.caption_key,
                             instance_prompt=x.instance_prompt or cfg.instance_prompt)
        out += [Entry(img, cap, "instance", why, x.dataset_name(), x.repeats, masked(img, layout))
                for img, cap, why in listed]
    return out


def _generate_class_images(cfg: PrepareConfig, inputs: dict[str, ArtifactRef], n: int, out: Path,
                           ctx: StepContext) -> list[Path]:
    """Generate ``n`` class images with the pipeline into ``out`` (DreamBooth prior preservation)."""
    import torch

    from nexus_core.models.flux_tiny import load_flux_pipeline

    path = str(inputs["pipeline"].path) if "pipeline" in inputs else cfg.pretrained_model_name_or_path
    if not path:
        raise InputError("flux prepare: generate_class_images needs pipeline.pretrained_model_name_or_path")
    pipe = load_flux_pipeline(path)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        image = pipe(prompt=cfg.class_prompt or "", height=cfg.size, width=cfg.size,
                     num_inference_steps=cfg.class_generation_steps, max_sequence_length=64,
                     generator=torch.Generator().manual_seed(i)).images[0]
        paths.append(out / f"class_{i:05d}.png")
        image.save(paths[-1])
        ctx.progress(i + 1, n, f"{i + 1}/{n} class images generated")
    return paths


def ordered_map(pool: ThreadPoolExecutor, fn: Callable[[T], R], items: Iterable[T], window: int) -> Iterator[R]:
    """``fn`` over ``items`` on ``pool``, results in input order, at most ``window`` submitted ahead of
    the consumer (so a slow writer bounds how many decoded images wait in memory)."""
    pending: deque[Future[R]] = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


@dataclass
class Loaded:
    """One decoded, filtered and cropped image (``image`` None when skipped, with the reason)."""

    image: bytes | None = None
    mask: bytes | None = None
    orig: tuple[int, int] = (0, 0)
    bucket: tuple[int, int] = (0, 0)  # (height, width)
    reason: str = ""


def _load(cfg: PrepareConfig, sets: list[list[tuple[int, int]]] | None, any_mask: bool, e: Entry) -> Loaded:
    """Decode ``e`` upright, filter it, crop it (and its mask) to its square or bucket, encode both."""
    if e.reason:
        return Loaded(reason=e.reason)
    try:
        img = bk.open_upright(str(e.path), "RGB")
    except Exception as exc:  # noqa: BLE001 - any decoder failure means "unreadable"
        return Loaded(reason=f"unreadable: {e.path}: {type(exc).__name__}: {exc}"[:300])
    w, h = img.size
    if min(w, h) < cfg.min_size:
        return Loaded(orig=(w, h), reason=f"too_small: {w}x{h} < min_size {cfg.min_size}")
    if not cfg.min_aspect_ratio <= w / h <= cfg.max_aspect_ratio:
        return Loaded(orig=(w, h), reason=f"aspect_ratio: {w / h:.3f} outside [{cfg.min_aspect_ratio}, "
                                          f"{cfg.max_aspect_ratio}]")
    mask = None
    if e.mask is not None:
        try:
            mask = bk.open_upright(str(e.mask), "L")
        except Exception as exc:  # noqa: BLE001
            return Loaded(orig=(w, h), reason=f"mask: {e.mask}: unreadable: {type(exc).__name__}: {exc}"[:300])
        if mask.size != img.size:
            return Loaded(orig=(w, h), reason=f"mask: {e.mask}: {mask.size[0]}x{mask.size[1]} but its image "
                                              f"is {w}x{h} (upright)")
    bh, bw = bk.nearest(w, h, sets) if sets else (cfg.size, cfg.size)
    at = bk.centering(cfg.crop, cfg.crop_seed, e.path.name)
    data = bk.encode_image(bk.fit(img, bh, bw, at), cfg.image_format)
    mdata = None
    if mask is not None:
        from PIL import Image

        mdata = bk.encode_image(bk.fit(mask, bh, bw, at, Image.Resampling.BILINEAR), "png")
    elif any_mask:
        from PIL import Image

        mdata = bk.encode_image(Image.new("L", (bw, bh), 255), "png")
    return Loaded(data, mdata, (w, h), (bh, bw))


def _check_bad(cfg: PrepareConfig, bad: list[str], total: int) -> None:
    """Fail once the unusable images (bad captions, files, masks) exceed what ``strict`` / ``max_skipped``
    allow, naming the count and the first reasons."""
    if cfg.strict and bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise InputError(f"flux prepare: {bad[0]}{more}; strict mode stops at a missing or unreadable caption, "
                         "image or mask: fix it, or set prepare.strict=false to skip such images")
    if not cfg.strict and cfg.max_skipped is not None and len(bad) > math.floor(cfg.max_skipped * total):
        allowed = math.floor(cfg.max_skipped * total)
        raise InputError(f"flux prepare: {len(bad)} of {total} images unusable, more than prepare.max_skipped="
                         f"{cfg.max_skipped} allows ({allowed}); first: " + "; ".join(bad[:3]))


@step(area="flux",
      inputs={"source": anything(description="sstk list file, image folder or DreamBooth instance folder"),
              "class_dir": directory(optional=True, description="DreamBooth class images"),
              "pipeline": directory(optional=True, description="Pipeline generating missing class images")},
      reads=files_read)
def run_prepare(cfg: PrepareConfig, *, inputs: dict[str, ArtifactRef], out_uri: str,
                ctx: StepContext) -> PrepareResult:
    """Read, filter and crop every source image into ``out_uri/mds`` as it goes; list every image in data.parquet."""
    out = Path(out_uri)
    entries = _entries(cfg, inputs)
    total = len(entries)
    bad = [e.reason for e in entries if e.reason]  # captions: known before any image is decoded
    _check_bad(cfg, bad, total)
    generated = 0
    if cfg.source == "dreambooth" and cfg.num_class_images:
        have = sum(1 for e in entries if e.subset == "class")
        if have < cfg.num_class_images and cfg.generate_class_images:
            made = _generate_class_images(cfg, inputs, cfg.num_class_images - have, out / "class_images", ctx)
            entries += [Entry(p, cfg.class_prompt, "class", "", cfg.dataset_name, cfg.repeats,
                              name=str(p.relative_to(out))) for p in made]
            generated, total = len(made), total + len(made)
    sets = bk.bucket_sets(cfg.buckets, cfg.size) if cfg.buckets.enabled else None
    any_mask = any(e.mask for e in entries)
    columns = {"image": cfg.image_format, "caption": "str", "width": "int", "height": "int", "subset": "str",
               "dataset": "str", "repeats": "int"}
    columns |= {"bucket": "str"} if sets else {}
    columns |= {"mask": "png"} if any_mask else {}
    table: list[dict[str, Any]] = []

    def rows() -> Iterator[dict[str, Any]]:
        with ThreadPoolExecutor(cfg.num_proc) as pool:
            loads = ordered_map(pool, lambda e: _load(cfg, sets, any_mask, e), entries, 2 * cfg.num_proc)
            for e, got in zip(entries, loads, strict=True):
                (bh, bw), ok = got.bucket, got.image is not None
                table.append({"path": e.name, "caption": e.caption, "subset": e.subset, "dataset": e.dataset,
                              "repeats": e.repeats, "orig_width": got.orig[0], "orig_height": got.orig[1],
                              "width": bw if ok else None, "height": bh if ok else None,
                              "bucket": f"{bh}x{bw}" if ok else None, "mask": str(e.mask) if e.mask else None,
                              "status": "ok" if ok else "skipped", "reason": got.reason or None})
                ctx.progress(len(table), total, f"{len(table)}/{total} images read")
                if got.image is None:
                    if not e.reason and got.reason.split(":")[0] not in FILTERS:
                        bad.append(got.reason)
                        _check_bad(cfg, bad, total)
                    continue
                row = {"image": Encoded(got.image), "caption": e.caption, "width": bw, "height": bh,
                       "subset": e.subset, "dataset": e.dataset, "repeats": e.repeats}
                row |= {"bucket": f"{bh}x{bw}"} if sets else {}
                row |= {"mask": Encoded(got.mask or b"")} if any_mask else {}
                yield row

    kept = write_mds(out / "mds", columns, rows(), size_limit=cfg.shard_size_limit)
    if not kept:
        first = next((row["reason"] for row in table if row["reason"]), "")
        raise InputError(f"{inputs['source'].uri}: no usable images ({len(table)} found, all skipped; first: "
                         f"{first})")
    import polars as pl

    write_parquet(pl.DataFrame(table, infer_schema_length=None), out / "data.parquet")
    reasons: dict[str, int] = {}
    for row in table:
        if row["reason"]:
            key = row["reason"].split(":")[0]
            reasons[key] = reasons.get(key, 0) + 1
    skipped = len(table) - kept
    return PrepareResult(rows=kept, kept=kept, skipped=skipped, skipped_by_reason=reasons,
                         generated_class_images=generated,
                         metrics={"kept": kept, "skipped": skipped, **{f"skipped_{k}": v for k, v in reasons.items()}})
