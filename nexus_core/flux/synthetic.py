"""Synthetic captioned images (coloured shapes) for the tiny preset, tests and benches."""

from __future__ import annotations

import json
from pathlib import Path

COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
SHAPES = ("square", "circle")


def make_shape_images(out_dir: str | Path, n: int, size: int = 48, layout: str = "folder",
                      seed: int = 0) -> Path:
    """Write ``n`` images of a coloured shape on grey, captioned ``a <color> <shape>``.

    ``layout=folder``: ``<i>.png`` + ``<i>.txt``; ``layout=sstk``: ``<i>.png`` + ``<i>.png.json`` and an
    ``images.txt`` list (returned); ``layout=plain``: images only (DreamBooth folders).
    """
    import numpy as np
    from PIL import Image, ImageDraw

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = []
    for i in range(n):
        color = list(COLORS)[i % len(COLORS)]
        shape = SHAPES[(i // len(COLORS)) % len(SHAPES)]
        img = Image.new("RGB", (size, size), (128, 128, 128))
        draw = ImageDraw.Draw(img)
        a, b = int(rng.integers(2, size // 4)), int(rng.integers(size // 2, size - 2))
        (draw.rectangle if shape == "square" else draw.ellipse)([a, a, b, b], fill=COLORS[color])
        name = f"{i:04d}.png"
        img.save(out / name)
        caption = f"a {color} {shape}"
        if layout == "folder":
            (out / f"{i:04d}.txt").write_text(caption, encoding="utf-8")
        elif layout == "sstk":
            (out / f"{name}.json").write_text(json.dumps({"caption": caption}), encoding="utf-8")
        names.append(name)
    if layout == "sstk":
        (out / "images.txt").write_text("\n".join(names) + "\n", encoding="utf-8")
        return out / "images.txt"
    return out
