"""Prepare: images + captions → an MDS dataset with ``image, caption, width, height`` (+ ``subset``).

Three sources:

* ``sstk``: a text file listing image paths (one per line, relative to the file); each caption is
  in ``<image path>.json`` under ``caption_key``. The listing's digest covers only the names, so the
  contract's ``reads`` names every listed image and caption file: their content joins the cache key.
* ``folder``: a folder of images, each with a caption file ``<stem><caption_ext>`` beside it.
* ``dreambooth``: instance images (captioned with ``instance_prompt``) plus class images
  (``class_prompt``) from ``class_dir``; missing class images are generated with the pipeline when
  ``generate_class_images`` is set. Rows carry ``subset`` = instance | class for prior preservation.

Images are center-cropped to a square and resized to ``size``. Unreadable images, and images outside
``min_size`` / the aspect-ratio bounds, are skipped: counted in the metrics and listed, with their
reason, in ``data.parquet`` (one row per source image).

A ``folder`` or ``dreambooth`` source (and ``class_dir``) is a directory input whose digest already
covers every image and caption file in it.
"""

from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from nexus_core.artifacts import ArtifactRef
from nexus_core.config import NexusModel, PathOrName, runtime_field
from nexus_core.context import StepContext
from nexus_core.contract import anything, directory, step
from nexus_core.errors import InputError
from nexus_core.flux.mds import write_mds
from nexus_core.io import write_parquet
from nexus_core.runner import StepResult

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


class PrepareConfig(NexusModel):
    """Where the images and captions come from, and which images to keep."""

    source: Literal["sstk", "folder", "dreambooth"] = Field(default="folder", description="Layout of the input")
    caption_key: str = Field(default="caption", description="sstk: key of the caption in <image>.json")
    caption_ext: str = Field(default=".txt", description="folder: caption file suffix beside each image")
    instance_prompt: str | None = Field(default=None, description="dreambooth: caption of every instance image")
    class_prompt: str | None = Field(default=None, description="dreambooth: caption of every class image")
    num_class_images: int = Field(default=0, ge=0, description="dreambooth: class images wanted (generated if missing)")
    generate_class_images: bool = Field(default=False, description="dreambooth: generate missing class images")
    class_generation_steps: int = Field(default=20, ge=1, description="Inference steps per generated class image")
    pretrained_model_name_or_path: PathOrName | None = Field(
        default=None, description="Pipeline used to generate class images (a 'pipeline' input overrides it)")
    size: int = Field(default=512, ge=8, description="Side of the stored square image (center crop, then resize)")
    min_size: int = Field(default=0, ge=0, description="Skip images whose shorter side is below this")
    min_aspect_ratio: float = Field(default=0.0, ge=0, description="Skip images with width/height below this")
    max_aspect_ratio: float = Field(default=1e9, gt=0, description="Skip images with width/height above this")
    image_format: Literal["png", "jpeg"] = Field(default="png", description="MDS encoding of the stored image")
    num_proc: int = runtime_field(4, "Threads decoding and resizing images", ge=1)
    shard_size_limit: int = Field(default=1 << 26, ge=1024, description="Bytes per MDS shard before a new one starts")

    @model_validator(mode="after")
    def _dreambooth_prompts(self) -> PrepareConfig:
        if self.source == "dreambooth" and not self.instance_prompt:
            raise ValueError("instance_prompt: required when source is 'dreambooth'")
        if self.num_class_images and not self.class_prompt:
            raise ValueError("class_prompt: required when num_class_images > 0")
        return self


class PrepareResult(StepResult):
    """How many images were kept and why the others were skipped."""

    kept: int
    skipped: int
    skipped_by_reason: dict[str, int]
    generated_class_images: int = 0


def sstk_entries(listing: Path) -> list[tuple[Path, Path]]:
    """(image, caption file) for every line of an sstk listing, resolved against the listing's folder."""
    if not listing.is_file():
        raise InputError(f"{listing}: sstk source must be a text file listing image paths")
    entries = []
    for lineno, raw in enumerate(listing.read_bytes().splitlines(), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(f"{listing}:{lineno}: not valid UTF-8 ({exc.reason} at byte {exc.start} of the "
                             f"line)") from None
        if line.strip():
            img = (listing.parent / line.strip()).resolve()
            entries.append((img, Path(f"{img}.json")))
    return entries


def files_read(cfg: PrepareConfig, inputs: dict[str, ArtifactRef]) -> list[Path]:
    """Files prepare reads that its inputs' digests miss: every image and caption file an sstk listing
    names (a folder input's digest already covers its files). Empty when the listing is not a file:
    the step then fails with the reason."""
    src = inputs.get("source")
    if cfg.source != "sstk" or src is None or not src.path.is_file():
        return []
    return [path for pair in sstk_entries(src.path) for path in pair]


def _items(cfg: PrepareConfig, inputs: dict[str, ArtifactRef]) -> list[tuple[Path, str | None, str, str]]:
    """(image path, caption or None + error, subset) for every source image."""
    src = inputs["source"].path
    out: list[tuple[Path, str | None, str, str]] = []
    if cfg.source == "sstk":
        for img, side in sstk_entries(src):
            try:
                caption = json.loads(side.read_text(encoding="utf-8"))[cfg.caption_key]
                out.append((img, str(caption), "instance", ""))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                out.append((img, None, "instance", f"caption: {side}: {type(exc).__name__}: {exc}"))
        return out
    if not src.is_dir():
        raise InputError(f"{src}: {cfg.source} source must be a folder of images")
    for img in sorted(p for p in src.iterdir() if p.suffix.lower() in IMAGE_EXTS):
        if cfg.source == "dreambooth":
            out.append((img, cfg.instance_prompt, "instance", ""))
            continue
        cap = img.with_suffix(cfg.caption_ext)
        if cap.is_file():
            try:  # like any unusable caption: this image is skipped, with the reason
                out.append((img, cap.read_bytes().decode("utf-8").strip(), "instance", ""))
            except UnicodeDecodeError as exc:
                out.append((img, None, "instance", f"caption: {cap}: not valid UTF-8 ({exc.reason} at byte "
                                                   f"{exc.start})"))
        else:
            out.append((img, None, "instance", f"caption: {cap} not found"))
    if cfg.source == "dreambooth" and "class_dir" in inputs:
        cdir = inputs["class_dir"].path
        for img in sorted(p for p in cdir.iterdir() if p.suffix.lower() in IMAGE_EXTS)[: cfg.num_class_images]:
            out.append((img, cfg.class_prompt, "class", ""))
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


def _load(cfg: PrepareConfig, path: Path) -> tuple[bytes | None, int, int, str]:
    """(encoded square image, original width, height, skip reason or '')."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            im.load()
            img = im.convert("RGB")
    except Exception as exc:  # noqa: BLE001 - any decoder failure means "unreadable"
        return None, 0, 0, f"unreadable: {type(exc).__name__}: {exc}"[:300]
    w, h = img.size
    if min(w, h) < cfg.min_size:
        return None, w, h, f"too_small: {w}x{h} < min_size {cfg.min_size}"
    if not cfg.min_aspect_ratio <= w / h <= cfg.max_aspect_ratio:
        return None, w, h, f"aspect_ratio: {w / h:.3f} outside [{cfg.min_aspect_ratio}, {cfg.max_aspect_ratio}]"
    img = ImageOps.fit(img, (cfg.size, cfg.size), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="PNG" if cfg.image_format == "png" else "JPEG", quality=95)
    return buf.getvalue(), w, h, ""


@step(area="flux",
      inputs={"source": anything(description="sstk list file, image folder or DreamBooth instance folder"),
              "class_dir": directory(optional=True, description="DreamBooth class images"),
              "pipeline": directory(optional=True, description="Pipeline generating missing class images")},
      reads=files_read)
def run_prepare(cfg: PrepareConfig, *, inputs: dict[str, ArtifactRef], out_uri: str,
                ctx: StepContext) -> PrepareResult:
    """Read, filter and square-crop every source image into ``out_uri/mds``; list every image in data.parquet."""
    from PIL import Image

    out = Path(out_uri)
    items = _items(cfg, inputs)
    generated = 0
    if cfg.source == "dreambooth" and cfg.num_class_images:
        have = sum(1 for *_, subset, _ in items if subset == "class")
        if have < cfg.num_class_images and cfg.generate_class_images:
            made = _generate_class_images(cfg, inputs, cfg.num_class_images - have, out / "class_images", ctx)
            items += [(p, cfg.class_prompt, "class", "") for p in made]
            generated = len(made)
    loaded = []
    with ThreadPoolExecutor(cfg.num_proc) as pool:
        for res in pool.map(lambda it: _load(cfg, it[0]) if it[1] is not None else (None, 0, 0, it[3]), items):
            loaded.append(res)
            ctx.progress(len(loaded), len(items), f"{len(loaded)}/{len(items)} images read")

    table, kept = [], []
    for (path, caption, subset, _), (data, w, h, reason) in zip(items, loaded, strict=True):
        table.append({"path": str(path), "caption": caption, "subset": subset, "orig_width": w,
                      "orig_height": h, "status": "ok" if data else "skipped", "reason": reason or None})
        if data:
            kept.append({"image": Image.open(io.BytesIO(data)), "caption": caption, "width": cfg.size,
                         "height": cfg.size, "subset": subset})
    if not kept:
        first = next((reason for *_, reason in loaded if reason), "")
        raise InputError(f"{inputs['source'].uri}: no usable images ({len(items)} found, all skipped; first: "
                         f"{first})")
    columns = {"image": cfg.image_format, "caption": "str", "width": "int", "height": "int", "subset": "str"}
    write_mds(out / "mds", columns, kept, size_limit=cfg.shard_size_limit)
    import polars as pl

    write_parquet(pl.DataFrame(table, infer_schema_length=None), out / "data.parquet")
    reasons: dict[str, int] = {}
    for row in table:
        if row["reason"]:
            key = row["reason"].split(":")[0]
            reasons[key] = reasons.get(key, 0) + 1
    skipped = len(table) - len(kept)
    return PrepareResult(rows=len(kept), kept=len(kept), skipped=skipped, skipped_by_reason=reasons,
                         generated_class_images=generated,
                         metrics={"kept": len(kept), "skipped": skipped, **{f"skipped_{k}": v for k, v in reasons.items()}})
