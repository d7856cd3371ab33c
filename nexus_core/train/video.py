"""Video as a sequence of frames, for LLaVA-style models that take several images in one prompt.

A row's ``videos`` (sharegpt convention, files relative to the media folder) are sampled at
``VideoSampling.fps`` frames per second of play time (the frame on screen at 0, 1/fps, 2/fps, ... s),
at most ``max_frames`` of them spread evenly over the clip, and each sampled frame becomes one
``<image>`` block in the prompt (a documented choice: no video-specific tokens or pooling; the model
sees the frames in order, as LLaVA-style multi-image prompts do). A turn's ``<video>`` placeholders mark
where each video's frames go; a row without them gets its videos in front of its first user turn
(after its images, when those have no ``<image>`` placeholders either).

Decoding adds no heavy dependency: animated GIF / WebP / APNG through Pillow (frame durations give the
timeline; a GIF frame without one shows for 100 ms, as browsers do); ``.mp4`` / ``.webm`` / ``.mov`` /
``.mkv`` / ``.avi`` / ``.m4v`` through PyAV (``pip install av``) when it is installed. A sampled frame is
named ``<file>#frame=<index>`` in a row's image list and decoded again per batch.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PILLOW_SUFFIXES = (".gif", ".webp", ".png", ".apng")
AV_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".m4v")
IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"
DEFAULT_FRAME_S = 0.1
_REF = re.compile(r"^(.*)#frame=(\d+)$")


@dataclass(frozen=True)
class VideoSampling:
    """How frames are taken from a video (the stage settings video_fps / video_max_frames / video_max_seconds)."""

    fps: float = 1.0
    max_frames: int = 8
    max_seconds: float = 600.0


def frame_ref(path: str | Path, index: int) -> str:
    """The image-list entry for frame ``index`` (presentation order) of the video at ``path``."""
    return f"{path}#frame={index}"


def split_ref(ref: str) -> tuple[str, int | None]:
    """``(file, frame index)`` of an image-list entry; the index is None for a still image."""
    m = _REF.match(ref)
    return (m.group(1), int(m.group(2))) if m else (ref, None)


def sample_frames(starts: list[float], duration: float, s: VideoSampling) -> list[int]:
    """Indices of the frames on screen at 0, 1/fps, 2/fps, ... s (each once), at most ``max_frames``
    of them, evenly spread; ``starts`` are the frames' start times in seconds, ascending."""
    picked: list[int] = []
    k = 0
    while (t := k / s.fps) < duration:
        i = max(bisect.bisect_right(starts, t + 1e-9) - 1, 0)  # float sums of frame durations
        if not picked or picked[-1] != i:
            picked.append(i)
        k += 1
    if not picked and starts:
        picked = [0]
    if len(picked) > s.max_frames:
        last = len(picked) - 1
        picked = [picked[round(j * last / max(s.max_frames - 1, 1))] for j in range(s.max_frames)]
    return picked


def _timeline_pillow(path: Path) -> tuple[list[float], float]:
    from PIL import Image

    starts, t = [], 0.0
    with Image.open(path) as im:
        for i in range(getattr(im, "n_frames", 1)):
            im.seek(i)
            starts.append(t)
            ms = im.info.get("duration") or 0
            t += ms / 1000 if ms else DEFAULT_FRAME_S
    return starts, t


def _timeline_av(path: Path, max_seconds: float) -> tuple[list[float], float]:
    import av  # pyright: ignore[reportMissingImports] - optional package

    with av.open(str(path)) as container:
        if not container.streams.video:
            return [], 0.0
        if container.duration and container.duration / av.time_base > max_seconds:  # known before demuxing
            return [0.0], container.duration / av.time_base
        stream = container.streams.video[0]
        pts = sorted(p.pts for p in container.demux(stream) if p.pts is not None and p.size)
        tb = float(stream.time_base or 0)
        if not pts or not tb:
            return [], 0.0
        starts = [(p - pts[0]) * tb for p in pts]
        step = starts[-1] / (len(starts) - 1) if len(starts) > 1 else DEFAULT_FRAME_S
        return starts, starts[-1] + step


def load_frames(path: Path, indices: list[int]) -> list[Any]:
    """RGB PIL images of frames ``indices`` (presentation order) of the video at ``path``, in that order."""
    from PIL import Image

    want = sorted(set(indices))
    got: dict[int, Any] = {}
    if path.suffix.lower() in AV_SUFFIXES:
        import av  # pyright: ignore[reportMissingImports] - optional package

        with av.open(str(path)) as container:
            for i, frame in enumerate(container.decode(video=0)):
                if i in want:
                    got[i] = frame.to_image().convert("RGB")
                if i >= want[-1]:
                    break
    else:
        with Image.open(path) as im:
            for i in want:
                im.seek(i)
                got[i] = im.convert("RGB")
    missing = [i for i in want if i not in got]
    if missing:
        raise ValueError(f"{path}: frame(s) {missing} not decoded")
    return [got[i] for i in indices]


def video_frames(path: Path, s: VideoSampling) -> list[int] | str:
    """The sampled frame indices of the video at ``path`` (decoded once to prove it reads), or why not:
    missing, not a readable video, no frames, or longer than ``max_seconds``."""
    suffix = path.suffix.lower()
    if not path.is_file():
        return "does not exist"
    if suffix not in PILLOW_SUFFIXES + AV_SUFFIXES:
        return (f"is not a video format this reads ({' '.join(PILLOW_SUFFIXES)} through Pillow; "
                f"{' '.join(AV_SUFFIXES)} through PyAV)")
    if suffix in AV_SUFFIXES:
        try:
            import av  # noqa: F401  # pyright: ignore[reportMissingImports]
        except ImportError:
            return f"needs PyAV to decode {suffix} files: pip install av"
    try:
        starts, duration = _timeline_av(path, s.max_seconds) if suffix in AV_SUFFIXES else _timeline_pillow(path)
        if not starts:
            return "has no frames"
        if duration > s.max_seconds:
            return f"is {duration:.1f} s long, over video_max_seconds={s.max_seconds:g}"
        picked = sample_frames(starts, duration, s)
        load_frames(path, picked)
    except Exception as exc:  # Pillow and PyAV raise many types for corrupt files
        return f"cannot be read ({type(exc).__name__}: {str(exc)[:120]})"
    return picked


def load_visuals(refs: list[str]) -> list[Any]:
    """RGB PIL images for an image list: still images and video frames (``frame_ref``), in order; each
    video is opened once."""
    from nexus_core.io.images import open_upright

    wanted: dict[str, list[int]] = {}
    for ref in refs:
        file, index = split_ref(ref)
        if index is not None:
            wanted.setdefault(file, []).append(index)
    frames = {f: dict(zip(ix, load_frames(Path(f), ix), strict=True)) for f, ix in wanted.items()}
    out = []
    for ref in refs:
        file, index = split_ref(ref)
        if index is None:
            out.append(open_upright(file))  # a photo's EXIF orientation applied, as in Flux prepare
        else:
            out.append(frames[file][index])
    return out


def place_videos(messages: list[dict[str, Any]], images: list[str],
                 videos: list[list[str]]) -> tuple[list[dict[str, Any]], list[str]] | str:
    """Messages whose ``<video>`` placeholders are replaced by one ``<image>`` per sampled frame, and the
    row's image list in placeholder order (images and frames interleaved as the text places them); or
    why the placeholders do not fit the row's media (see the module docstring for rows without them)."""
    def count(token: str) -> int:
        return sum(str(m.get("content") or "").count(token) for m in messages)

    messages = [dict(m) for m in messages]
    missing = (IMAGE_TOKEN * len(images) if images and not count(IMAGE_TOKEN) else "") + (
        VIDEO_TOKEN * len(videos) if not count(VIDEO_TOKEN) else "")
    if missing:
        first = next((i for i, m in enumerate(messages) if m.get("role") == "user"), None)
        if first is None:
            return "has media but no user turn to put them in"
        messages[first]["content"] = missing + str(messages[first].get("content") or "")
    for token, n, what in ((IMAGE_TOKEN, len(images), "image"), (VIDEO_TOKEN, len(videos), "video")):
        if count(token) != n:
            return f"has {count(token)} {token} placeholder(s) for {n} {what}(s)"
    image_iter, video_iter, refs = iter(images), iter(videos), []
    for m in messages:
        pieces = re.split(f"({IMAGE_TOKEN}|{VIDEO_TOKEN})", str(m.get("content") or ""))
        if len(pieces) == 1:
            continue
        text = []
        for piece in pieces:
            if piece == IMAGE_TOKEN:
                refs.append(next(image_iter))
            elif piece == VIDEO_TOKEN:
                frames = next(video_iter)
                refs.extend(frames)
                piece = IMAGE_TOKEN * len(frames)
            text.append(piece)
        m["content"] = "".join(text)
    return messages, refs
