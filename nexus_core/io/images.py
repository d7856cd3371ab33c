"""Decoding still images the way every consumer should: fully, turned upright by their EXIF orientation
(phone photos are stored sideways with an Orientation tag; PIL does not apply it), in one mode.

Used by Flux prepare, the multimodal collators, VQA evaluation and the server's ``image_url`` parts, so a
photo reads the same in training, evaluation and serving.
"""

from __future__ import annotations

from pathlib import Path
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image


def open_upright(source: str | Path | IO[bytes], mode: str = "RGB") -> Image.Image:
    """Decode ``source`` (a path or a binary file object) fully, turned upright by its EXIF orientation,
    converted to ``mode``. Raises what PIL raises for unreadable data (OSError, UnidentifiedImageError)."""
    from PIL import Image, ImageOps

    with Image.open(source) as im:
        im.load()
        return ImageOps.exif_transpose(im).convert(mode)
