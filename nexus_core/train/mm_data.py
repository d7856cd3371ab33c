"""Multimodal training data: sharegpt-style ``messages`` + ``images`` rows, checked, encoded and batched.

Layout (LLaMA-Factory's sharegpt convention): ``messages`` is a list of ``{"role", "content"}`` turns
(or its JSON text), ``images`` a list of image files (or one file) relative to the media folder (the
data file's folder unless the stage sets ``media_dir``); ``videos`` likewise, read as sampled frames
(:mod:`nexus_core.train.video`: one ``<image>`` per frame where the row's ``<video>`` placeholder is).
A turn's ``<image>`` placeholders mark where each image goes, in order; a row without placeholders
gets its images in front of its first user turn.

Bad media fails fast, naming the row: a missing or unreadable image, or a placeholder count that does
not match the row's images. With ``max_skipped`` > 0 such rows are skipped and counted instead, as long
as their share stays within it (the error then gives the count and the first bad row).

Encoding renders the chat with the processor's template, finds the assistant turns by rendering
prefixes (:func:`nexus_core.train.chat.assistant_spans`), expands each ``<image>`` to the model's
``image_seq_length`` tokens (as ``LlavaProcessor`` does) and puts the loss on assistant tokens only.
Images are read again and preprocessed per batch, in the collator.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl

from nexus_core.errors import InputError
from nexus_core.train.video import VideoSampling, frame_ref, load_visuals, place_videos, video_frames

IMAGE_TOKEN = "<image>"
IGNORE = -100


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, str):
        text = value.strip()
        return json.loads(text) if text.startswith("[") else [value]
    return list(value)


def check_image(path: Path) -> str | None:
    """Why ``path`` is not a usable image (None when it is): missing, or not decodable."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        return "does not exist"
    try:
        with Image.open(path) as im:
            im.convert("RGB").load()
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        return f"cannot be read ({type(exc).__name__}: {str(exc)[:120]})"
    return None


def to_parts(messages: list[dict[str, Any]], n_images: int) -> list[dict[str, Any]] | str:
    """Messages with ``<image>`` placeholders as content parts, or why they do not fit ``n_images``."""
    placed = sum(str(m.get("content") or "").count(IMAGE_TOKEN) for m in messages)
    if placed == 0 and n_images:
        first = next((i for i, m in enumerate(messages) if m.get("role") == "user"), None)
        if first is None:
            return "has images but no user turn to put them in"
        messages = [dict(m) for m in messages]
        messages[first]["content"] = IMAGE_TOKEN * n_images + str(messages[first].get("content") or "")
    elif placed != n_images:
        return f"has {placed} {IMAGE_TOKEN} placeholder(s) for {n_images} image(s)"
    out = []
    for m in messages:
        pieces = str(m.get("content") or "").split(IMAGE_TOKEN)
        parts: list[dict[str, Any]] = []
        for i, text in enumerate(pieces):
            if i:
                parts.append({"type": "image"})
            if text:
                parts.append({"type": "text", "text": text})
        out.append({"role": m["role"], "content": parts if len(pieces) > 1 else str(m.get("content") or "")})
    return out


def _place_videos(messages: list[dict[str, Any]], images: list[str], clips: list[str], media_root: Path,
                  sampling: VideoSampling) -> tuple[list[dict[str, Any]], list[str]] | str:
    """Sample each clip's frames and put them where the row's ``<video>`` placeholders are, or why not."""
    videos = []
    for f in clips:
        path = (media_root / f) if not Path(f).is_absolute() else Path(f)
        frames = video_frames(path, sampling)
        if isinstance(frames, str):
            return f"video {f!r} ({path}) {frames}"
        videos.append([frame_ref(path, k) for k in frames])
    return place_videos(messages, images, videos)


def mm_records(df: pl.DataFrame, where: str, media_root: Path, max_skipped: float = 0.0,
               video: VideoSampling | None = None) -> tuple[list[dict], int]:
    """Checked records ``{"messages": <parts>, "images": [paths]}`` and how many rows were skipped.
    A row's ``videos`` become sampled frames in ``images`` (:mod:`nexus_core.train.video`, ``video``)."""
    if "messages" not in df.columns:
        raise InputError(f"{where}: missing column 'messages'; has: {', '.join(df.columns)}")
    records, bad = [], []
    for i, row in enumerate(df.iter_rows(named=True)):
        try:
            messages = _as_list(row["messages"])
            files = [str(f) for f in _as_list(row.get("images"))]
            clips = [str(f) for f in _as_list(row.get("videos"))]
        except (ValueError, TypeError) as exc:
            bad.append(f"row {i}: messages/images are not lists ({exc})")
            continue
        paths = [(media_root / f) if not Path(f).is_absolute() else Path(f) for f in files]
        problem = next((f"image {f!r} ({p}) {why}" for f, p in zip(files, paths, strict=True)
                        if (why := check_image(p))), None)
        if problem is None and clips:
            placed = _place_videos(messages, [str(p) for p in paths], clips, media_root, video or VideoSampling())
            if isinstance(placed, str):
                problem = placed
            else:
                messages, paths = placed[0], [Path(p) for p in placed[1]]
        parts = to_parts(messages, len(paths)) if problem is None else problem
        if isinstance(parts, str):
            bad.append(f"row {i}: {parts}")
            continue
        records.append({"messages": parts, "images": [str(p) for p in paths]})
    n = df.height
    if bad and (max_skipped <= 0 or len(bad) / max(n, 1) > max_skipped):
        more = f" ({len(bad)} of {n} rows are bad; max_skipped={max_skipped})" if len(bad) > 1 or max_skipped else ""
        raise InputError(f"{where}: {bad[0]}{more}")
    if not records:
        raise InputError(f"{where}: no usable rows")
    return records, len(bad)


def encode_mm(tokenizer: Any, record: dict[str, Any], image_seq_length: int, max_length: int,
              assistant_only: bool = True) -> dict[str, Any]:
    """``input_ids`` and ``labels`` (assistant tokens only) of one record, its images' tokens expanded.

    Text past ``max_length`` is cut; a row whose image tokens would be cut raises (the model needs every
    image's tokens)."""
    from nexus_core.train.chat import assistant_spans

    text, spans = assistant_spans(tokenizer, record["messages"])

    def expand(s: str) -> str:
        return s.replace(IMAGE_TOKEN, IMAGE_TOKEN * image_seq_length)

    spans = [(len(expand(text[:a])), len(expand(text[:b]))) for a, b in spans]
    enc = tokenizer(expand(text), add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if image_id in ids[max_length:]:
        raise InputError(f"max_length={max_length} cuts an image's {image_seq_length} tokens "
                         f"(the row needs {len(ids)} tokens)")
    ids = ids[:max_length]
    if assistant_only:
        labels = [t if any(s < b and e > a for a, b in spans) else IGNORE
                  for t, (s, e) in zip(ids, enc["offset_mapping"][: len(ids)], strict=True)]
    else:
        labels = [IGNORE if t == image_id else t for t in ids]
    return {"input_ids": ids, "labels": labels, "images": record["images"]}


class MMCollator:
    """Pads a batch of encoded rows and preprocesses their images into ``pixel_values``."""

    def __init__(self, image_processor: Any, pad_id: int):
        self.image_processor = image_processor
        self.pad_id = pad_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """The model's keyword arguments for one batch (right padding)."""
        import torch

        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            labels[i, :n] = torch.tensor(r["labels"])
            mask[i, :n] = 1
        batch: dict[str, Any] = {"input_ids": ids, "labels": labels, "attention_mask": mask}
        images = []
        for r in rows:
            images.extend(load_visuals(r["images"]))  # still images and video frames
        if images:
            batch["pixel_values"] = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        return batch
