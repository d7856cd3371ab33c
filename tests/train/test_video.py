"""Video by frames: the shipped GIFs decode with their timing, frames are sampled by fps / max frames and
placed where a row's <video> placeholder is (one <image> each), bad videos name their row or are
counted skips, and mm_sft trains the tiny omni model on the video instruct set."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import polars as pl
import pytest

from nexus_core.artifacts import raw_ref
from nexus_core.errors import InputError
from nexus_core.runner import run_step
from nexus_core.train.mm_data import MMCollator, mm_records
from nexus_core.train.mm_train import MMSFTConfig, run_mm_train
from nexus_core.train.modalities import needed_by_columns
from nexus_core.train.video import (
    VideoSampling,
    load_frames,
    load_visuals,
    place_videos,
    sample_frames,
    split_ref,
    video_frames,
)
from tests.train.test_omni import FAST, omni  # noqa: F401  (the module-scoped tiny omni model fixture)

REPO = Path(__file__).resolve().parents[2]
OMNI = REPO / "data" / "raw" / "omni"
VIDEOS = OMNI / "videos.jsonl"


def _square_x(image) -> float:  # noqa: ANN001
    """Mean x of the coloured (non-white) pixels."""
    rgb = image.convert("RGB")
    xs = [x for x in range(rgb.width) for y in range(rgb.height) if min(rgb.getpixel((x, y))) < 200]
    return sum(xs) / len(xs)


def test_sampling_by_fps_and_max_frames():
    starts = [k * 0.1 for k in range(8)]  # 8 frames of 100 ms
    assert sample_frames(starts, 0.8, VideoSampling(fps=1)) == [0]
    assert sample_frames(starts, 0.8, VideoSampling(fps=5)) == [0, 2, 4, 6]
    assert sample_frames(starts, 0.8, VideoSampling(fps=100, max_frames=8)) == list(range(8))  # each frame once
    assert sample_frames(starts, 0.8, VideoSampling(fps=100, max_frames=3)) == [0, 4, 7]  # spread evenly
    assert sample_frames([0.0, 2.0], 3.0, VideoSampling(fps=1)) == [0, 1]  # frame 0 shows at 0 s and 1 s


def test_shipped_gifs_move_the_way_their_answers_say():
    rows = [json.loads(line) for line in VIDEOS.read_text().splitlines()]
    assert len(rows) == 8 and needed_by_columns(rows[0]) == ["text", "vision"]
    for row in rows:
        (video,) = row["videos"]
        picked = video_frames(OMNI / video, VideoSampling(fps=5))
        assert picked == [0, 2, 4, 6]
        xs = [_square_x(im) for im in load_frames(OMNI / video, picked)]
        moves = "right" if xs == sorted(xs) and xs[0] < xs[-1] else "left" if xs == sorted(xs, reverse=True) else "?"
        assert moves in video
        answer = row["messages"][1]["content"]
        assert (f"moves {moves}" in answer) or answer.lower().startswith(video.split("/")[1].split("_")[0])


def test_rows_become_one_image_block_per_frame_in_placeholder_order(tmp_path):
    records, skipped = mm_records(pl.read_ndjson(VIDEOS), str(VIDEOS), OMNI, video=VideoSampling(fps=4, max_frames=3))
    assert skipped == 0 and len(records) == 8
    first = records[0]
    assert [split_ref(r) for r in first["images"]] == [(str(OMNI / "videos/red_left.gif"), k) for k in (0, 5, 7)]
    user = first["messages"][0]["content"]
    assert user[:3] == [{"type": "image"}] * 3 and user[3] == {"type": "text", "text": "Which way does the square move?"}
    assert records[1]["messages"][0]["content"][:3] == [{"type": "image"}] * 3  # no placeholder: frames in front

    from transformers import SiglipImageProcessor

    proc = SiglipImageProcessor(size={"height": 32, "width": 32})
    batch = MMCollator(proc, 0)([{"input_ids": [1, 2], "labels": [1, 2], "images": r["images"]} for r in records[:2]])
    assert tuple(batch["pixel_values"].shape) == (6, 3, 32, 32)

    # images and videos together, in the order the text places them
    msgs = [{"role": "user", "content": "<video>then<image>?"}, {"role": "assistant", "content": "ok"}]
    placed = place_videos(msgs, ["a.png"], [["v.gif#frame=0", "v.gif#frame=3"]])
    assert not isinstance(placed, str)
    assert placed[0][0]["content"] == "<image><image>then<image>?" and placed[1] == ["v.gif#frame=0", "v.gif#frame=3",
                                                                                      "a.png"]
    assert place_videos([{"role": "user", "content": "<video><video>"}], [], [["v.gif#frame=0"]]) == (
        "has 2 <video> placeholder(s) for 1 video(s)")
    assert [im.size for im in load_visuals([str(OMNI / "images/red_square.png"), f"{OMNI}/videos/red_left.gif#frame=7"])
            ] == [(32, 32), (32, 32)]


def _video_rows(tmp_path: Path, videos: list[str]) -> tuple[pl.DataFrame, str]:
    shutil.copytree(OMNI / "videos", tmp_path / "videos")
    (tmp_path / "videos" / "broken.gif").write_bytes(b"GIF89a not really")
    chat = [{"role": "user", "content": "<video>Which way?"}, {"role": "assistant", "content": "Left."}]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"messages": chat, "videos": [v]}) + "\n" for v in videos))
    return pl.read_ndjson(path), str(path)


def test_bad_videos_name_their_row_or_are_counted_skips(tmp_path):
    ok = "videos/red_left.gif"
    df, where = _video_rows(tmp_path, [ok, "videos/missing.gif", ok, "videos/broken.gif"])
    with pytest.raises(InputError, match=r"row 1: video 'videos/missing.gif' .* does not exist \(2 of 4 rows"):
        mm_records(df, where, tmp_path)
    with pytest.raises(InputError, match=r"row 1: video 'videos/broken.gif' .* cannot be read"):
        mm_records(df.slice(2), where, tmp_path)
    records, skipped = mm_records(df, where, tmp_path, max_skipped=0.5)
    assert skipped == 2 and len(records) == 2
    with pytest.raises(InputError, match=r"row 0: video 'videos/red_left.gif' .* is 0.8 s long, over "
                                         r"video_max_seconds=0.5"):
        mm_records(df.head(1), where, tmp_path, video=VideoSampling(max_seconds=0.5))
    (tmp_path / "videos" / "clip.txt").write_text("x")
    other, where2 = _video_rows(tmp_path / "o", ["videos/clip.txt"])
    shutil.copy(tmp_path / "videos" / "clip.txt", tmp_path / "o" / "videos" / "clip.txt")
    with pytest.raises(InputError, match=r"row 0: video 'videos/clip.txt' .* is not a video format this reads"):
        mm_records(other, where2, tmp_path / "o")


def test_animated_png_decodes_with_its_frame_durations(tmp_path):
    from PIL import Image

    frames = [Image.new("RGB", (16, 16), c) for c in ("red", "green", "blue")]
    path = tmp_path / "clip.png"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=[500, 500, 1000])
    picked = video_frames(path, VideoSampling(fps=2))  # 0, 0.5, 1.0, 1.5 s -> frames 0, 1, 2, 2
    assert picked == [0, 1, 2]
    assert [im.getpixel((0, 0)) for im in load_frames(path, picked)] == [(255, 0, 0), (0, 128, 0), (0, 0, 255)]


def test_mp4_through_pyav_or_a_clear_error_naming_the_row(tmp_path):
    path = tmp_path / "clip.mp4"
    try:
        import av  # pyright: ignore[reportMissingImports]
    except ImportError:
        path.write_bytes(b"\0" * 64)
        df, where = _video_rows(tmp_path / "r", ["../clip.mp4"])
        with pytest.raises(InputError, match=r"row 0: video '../clip.mp4' .* needs PyAV to decode .mp4 files: "
                                             r"pip install av"):
            mm_records(df, where, tmp_path / "r")
        return
    import numpy as np

    with av.open(str(path), "w") as out:  # 12 frames at 4 fps (3 s), the left half brightening
        stream = out.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for k in range(12):
            arr = np.zeros((32, 32, 3), dtype=np.uint8)
            arr[:, :16] = 20 * k
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    picked = video_frames(path, VideoSampling(fps=1))
    assert picked == [0, 4, 8]
    levels = [im.getpixel((4, 16))[0] for im in load_frames(path, picked)]
    assert levels == sorted(levels) and abs(levels[1] - 80) < 12 and abs(levels[2] - 160) < 12
    assert "over video_max_seconds=2" in str(video_frames(path, VideoSampling(max_seconds=2)))


def test_mm_sft_trains_the_omni_model_on_the_video_set(omni):  # noqa: F811
    from transformers import AutoModelForImageTextToText

    cfg = MMSFTConfig(finetune="lora", video_fps=4, video_max_frames=2, **FAST)
    r = run_step(run_mm_train, cfg, name="t_mm_video", inputs={"model": omni, "data": raw_ref(VIDEOS)})
    assert r.ref is not None and r.metrics["param_delta"] > 0 and r.metrics["global_step"] == 2
    assert type(AutoModelForImageTextToText.from_pretrained(str(r.ref.path))).__name__ == \
        "LlavaForConditionalGeneration"


def test_video_rows_on_a_text_only_model_stop_before_work(tiny_llm):
    with pytest.raises(InputError, match="modality validation failed: the data needs vision"):
        run_step(run_mm_train, MMSFTConfig(**FAST), name="t_mm_video_text", inputs={"model": raw_ref(tiny_llm),
                                                                                    "data": raw_ref(VIDEOS)})
