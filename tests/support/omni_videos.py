"""Writes the tiny animated GIFs under data/raw/omni/videos/ (a square moving left or right on white)
and data/raw/omni/videos.jsonl, the video instruct set over them. Re-run to re-make them:

    .venv/bin/python -m tests.support.omni_videos
"""

from __future__ import annotations

import json
from pathlib import Path

OMNI = Path(__file__).resolve().parents[2] / "data" / "raw" / "omni"
COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220)}
SIZE, SQUARE, FRAMES, FRAME_MS = 32, 10, 8, 100  # 8 frames of 100 ms: 0.8 s


def write_gif(path: Path, colour: tuple[int, int, int], direction: str) -> None:
    """A ``SQUARE``-px square crossing a white ``SIZE``-px frame towards ``direction`` in ``FRAMES`` frames."""
    from PIL import Image, ImageDraw

    frames = []
    for k in range(FRAMES):
        x = round(k * (SIZE - SQUARE) / (FRAMES - 1))
        if direction == "left":
            x = SIZE - SQUARE - x
        im = Image.new("RGB", (SIZE, SIZE), "white")
        ImageDraw.Draw(im).rectangle([x, 11, x + SQUARE - 1, 11 + SQUARE - 1], fill=colour)
        frames.append(im)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=FRAME_MS, loop=0, optimize=False)


def main() -> None:
    """Write the GIFs and the instruct rows."""
    rows = []
    for colour, rgb in COLOURS.items():
        for direction in ("left", "right"):
            name = f"videos/{colour}_{direction}.gif"
            write_gif(OMNI / name, rgb, direction)
            rows.append({"messages": [{"role": "user", "content": "<video>Which way does the square move?"},
                                      {"role": "assistant", "content": f"It moves {direction}."}],
                         "videos": [name]})
            rows.append({"messages": [{"role": "user", "content": "What colour is the moving square?"},
                                      {"role": "assistant", "content": f"{colour.capitalize()}."}],
                         "videos": [name]})
    (OMNI / "videos.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
