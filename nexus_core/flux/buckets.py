"""Aspect-ratio buckets and the crop every prepared image (and its mask) goes through.

Without buckets an image is cropped to a square and resized to ``prepare.size`` (as before). With
``prepare.buckets.enabled`` it is resized to *cover* the nearest bucket (a ``[height, width]`` in
pixels) and cropped to it, so wide and tall images keep most of their content; precompute then
encodes each row at its bucket's size and training batches rows of one bucket together.

Buckets are explicit (``sizes``) or generated per base resolution (``resolutions``, default
``[prepare.size]``): every ``[h, w]`` with sides multiples of ``step`` (itself a multiple of
``divisible``), area at most the resolution squared, and ``w/h`` within the aspect bounds (the
NovelAI / SimpleTuner scheme). Each side must be a multiple of the pipeline's VAE x patch factor (16
for Klein, 4 for the tiny pipeline): precompute and the flow's preflight check it.

Which bucket: with several base resolutions, the largest one whose area the image reaches (no
upscaling past it; the smallest when the image is smaller than all), then the bucket of the nearest
aspect ratio (log distance; ties go to the larger bucket). Explicit ``sizes``: among the buckets not
larger in area than the image (all when none is), the nearest aspect ratio.

``crop: random`` draws the crop offset from ``crop_seed`` and the image's file name, once, at prepare
time: the latents precomputed from it are fixed, so every epoch sees the same crop (as with any
cached-latent trainer). ``center`` keeps the middle.
"""

from __future__ import annotations

import io
import math
import zlib
from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator

from nexus_core.config import NexusModel

if TYPE_CHECKING:
    from PIL import Image


class BucketSettings(NexusModel):
    """Aspect-ratio buckets (off: square crop to ``prepare.size``)."""

    enabled: bool = Field(default=False, description="Crop each image to its nearest aspect-ratio bucket")
    sizes: list[tuple[int, int]] = Field(default_factory=list, description="Explicit buckets as [height, width] "
                                         "pixels (empty: generated from resolutions)")
    resolutions: list[int] = Field(default_factory=list, description="Base resolutions to generate buckets for "
                                   "(empty: [prepare.size]); several = multi-resolution")
    divisible: int = Field(default=16, ge=1, description="Every bucket side is a multiple of this (VAE x patch: 16 "
                           "for Klein, 4 for the tiny pipeline)")
    step: int = Field(default=64, ge=1, description="Side increment between generated buckets (multiple of divisible)")
    min_aspect_ratio: float = Field(default=0.5, gt=0, description="Generated buckets: smallest width/height")
    max_aspect_ratio: float = Field(default=2.0, gt=0, description="Generated buckets: largest width/height")

    @model_validator(mode="after")
    def _consistent(self) -> BucketSettings:
        problems = []
        if self.step % self.divisible:
            problems.append(f"step: {self.step} is not a multiple of divisible ({self.divisible})")
        bad = [list(s) for s in self.sizes if min(s) < 1 or s[0] % self.divisible or s[1] % self.divisible]
        if bad:
            problems.append(f"sizes: {bad} not positive multiples of divisible ({self.divisible})")
        if self.min_aspect_ratio > self.max_aspect_ratio:
            problems.append("min_aspect_ratio: above max_aspect_ratio")
        if problems:
            raise ValueError("; ".join(problems))
        return self


def generate(resolution: int, divisible: int, step: int, min_ar: float, max_ar: float) -> list[tuple[int, int]]:
    """Every ``(h, w)`` of sides multiple of ``step`` (and ``divisible``) with ``h*w <= resolution**2`` as
    large as the step allows, and ``min_ar <= w/h <= max_ar``; always includes the square."""
    side = max(divisible, resolution // divisible * divisible)
    area = resolution * resolution
    out = {(side, side)}
    w = step
    while w <= area // step:
        h = area // w // step * step
        if h >= step and min_ar <= w / h <= max_ar:
            out.add((h, w))
        w += step
    return sorted(out)


def bucket_sets(settings: BucketSettings, size: int) -> list[list[tuple[int, int]]]:
    """The candidate bucket sets, smallest resolution first (one set for explicit sizes)."""
    if settings.sizes:
        return [sorted({(int(h), int(w)) for h, w in settings.sizes})]
    return [generate(r, settings.divisible, settings.step, settings.min_aspect_ratio, settings.max_aspect_ratio)
            for r in sorted(set(settings.resolutions or [size]))]


def all_buckets(settings: BucketSettings, size: int) -> list[tuple[int, int]]:
    """Every bucket an image can land in."""
    return sorted({b for s in bucket_sets(settings, size) for b in s})


def nearest(width: int, height: int, sets: list[list[tuple[int, int]]]) -> tuple[int, int]:
    """The ``(h, w)`` bucket for an image of ``width`` x ``height`` (rules in the module docstring)."""
    area = width * height
    if len(sets) == 1:
        fits = [b for b in sets[0] if b[0] * b[1] <= area] or sets[0]
    else:
        reached = [s for s in sets if max(b[0] * b[1] for b in s) <= area]
        fits = reached[-1] if reached else sets[0]
    ar = math.log(width / height)
    return min(fits, key=lambda b: (round(abs(math.log(b[1] / b[0]) - ar), 9), -b[0] * b[1]))


def centering(crop: Literal["center", "random"], seed: int, name: str) -> tuple[float, float]:
    """Where the crop sits (``ImageOps.fit`` centering): the middle, or seeded by the file name."""
    if crop == "center":
        return 0.5, 0.5
    import numpy as np

    rng = np.random.default_rng([seed, zlib.crc32(name.encode("utf-8"))])
    x, y = rng.random(2)
    return float(x), float(y)


def fit(img: Image.Image, height: int, width: int, at: tuple[float, float], resample: int | None = None) -> Image.Image:
    """Crop ``img`` to the aspect of ``(height, width)`` at ``at`` and resize it to exactly that size."""
    from PIL import Image, ImageOps

    method = Image.Resampling.BICUBIC if resample is None else resample
    return ImageOps.fit(img, (width, height), method, centering=at)


def open_upright(path: str, mode: str) -> Image.Image:
    """Decode ``path`` fully, turned upright by its EXIF orientation, converted to ``mode``
    (:func:`nexus_core.io.images.open_upright`)."""
    from nexus_core.io.images import open_upright as upright

    return upright(path, mode)


def encode_image(img: Image.Image, fmt: Literal["png", "jpeg"]) -> bytes:
    """PNG or JPEG (quality 95) bytes of ``img``."""
    buf = io.BytesIO()
    img.save(buf, format="PNG" if fmt == "png" else "JPEG", quality=95)
    return buf.getvalue()
