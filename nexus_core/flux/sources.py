"""Where prepare's images, captions and masks come from: sstk listings, caption folders, DreamBooth
folders, and the extra datasets a run mixes in (each with its own ``repeats``).

A caption problem is not raised here: each entry carries its reason (``caption: <file> ...``) and the
prepare step decides (``strict`` fails, otherwise the image is skipped and counted).

Masks (masked loss): beside ``<stem>.<ext>`` in a folder source, ``<stem>.mask.png`` (white = train
on it, black = ignore). Mask files are never images of their own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field

from nexus_core.config import ConfigPath, NexusModel
from nexus_core.errors import InputError

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
MASK_SUFFIX = ".mask.png"
Layout = Literal["sstk", "folder", "dreambooth"]


class ExtraSource(NexusModel):
    """One more dataset mixed into the run, sampled ``repeats`` times as often as a dataset of 1."""

    source: ConfigPath = Field(description="sstk list file, caption folder or DreamBooth instance folder")
    layout: Layout | None = Field(default=None, description="Layout of the source (default: prepare.source)")
    name: str | None = Field(default=None, description="Dataset name in the rows (default: the source's file name "
                                                       "without suffix)")
    repeats: int = Field(default=1, ge=1, description="How many times each image counts per epoch")
    caption_ext: str | None = Field(default=None, description="folder: caption suffix (default: prepare.caption_ext)")
    caption_key: str | None = Field(default=None, description="sstk: caption key (default: prepare.caption_key)")
    instance_prompt: str | None = Field(default=None, description="dreambooth: caption of every image (default: "
                                        "prepare.instance_prompt)")

    def dataset_name(self) -> str:
        """The ``dataset`` value of this source's rows."""
        return self.name or Path(self.source).stem


@dataclass
class Entry:
    """One source image: its caption (or why it has none), subset, dataset, repeats and mask file."""

    path: Path
    caption: str | None
    subset: str
    reason: str = ""
    dataset: str = "main"
    repeats: int = 1
    mask: Path | None = None
    name: str = ""  # what the table records (artifact-relative for generated class images)

    def __post_init__(self) -> None:
        self.name = self.name or str(self.path)


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


def mask_of(image: Path) -> Path:
    """Where the mask of ``image`` would be."""
    return image.with_name(image.stem + MASK_SUFFIX)


def folder_images(folder: Path) -> list[Path]:
    """The images of a folder, sorted, mask files left out."""
    return sorted(p for p in folder.iterdir()
                  if p.suffix.lower() in IMAGE_EXTS and not p.name.lower().endswith(MASK_SUFFIX))


def list_source(layout: Layout, src: Path, *, caption_ext: str, caption_key: str,
                instance_prompt: str | None) -> list[tuple[Path, str | None, str]]:
    """(image, caption or None, reason) for every image of one source, in a stable order."""
    out: list[tuple[Path, str | None, str]] = []
    if layout == "sstk":
        for img, side in sstk_entries(src):
            try:
                out.append((img, str(json.loads(side.read_text(encoding="utf-8"))[caption_key]), ""))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                out.append((img, None, f"caption: {side}: {type(exc).__name__}: {exc}"))
        return out
    if not src.is_dir():
        raise InputError(f"{src}: {layout} source must be a folder of images")
    for img in folder_images(src):
        if layout == "dreambooth":
            out.append((img, instance_prompt, ""))
            continue
        cap = img.with_suffix(caption_ext)
        if not cap.is_file():
            out.append((img, None, f"caption: {cap} not found"))
            continue
        try:
            out.append((img, cap.read_bytes().decode("utf-8").strip(), ""))
        except UnicodeDecodeError as exc:
            out.append((img, None, f"caption: {cap}: not valid UTF-8 ({exc.reason} at byte {exc.start})"))
        except OSError as exc:
            out.append((img, None, f"caption: {cap}: unreadable ({exc.strerror or exc})"))
    return out


def files_of(layout: Layout, src: Path) -> list[Path]:
    """What a source's cache key must cover beyond its own digest: every file an sstk listing names
    (a folder's digest already covers its files). Empty when the listing is not a file (the step then
    fails with the reason)."""
    if layout != "sstk":
        return [src]
    if not src.is_file():
        return []
    return [path for pair in sstk_entries(src) for path in pair]
