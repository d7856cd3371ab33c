"""Speech: every kept two-speaker script → one WAV per episode plus the script with per-turn timings.

Each speaker has a voice: a VITS checkpoint loaded with ``transformers.VitsModel.from_pretrained`` and,
for a multi-speaker one (``kakao-enterprise/vits-vctk``, the tiny preset's), a ``speaker_id``. Both
voices may share one model (the ``tts`` input) or each name its own (``voices.<SPEAKER>.model``, e.g. two
``facebook/mms-tts-*`` checkpoints); they must share a sampling rate. Turns are synthesised one by one
(seeded per row and turn, so a re-run writes the same audio), peak-normalised, padded with silence up to
``min_line_s`` (a model with random weights can predict near-zero durations), and joined with
``pause_s`` of silence. Timings (``start_s``/``end_s`` of every turn) are measured from the samples
written. WAVs are 16-bit PCM mono, written with the standard library's ``wave`` module.

Output: ``episodes/<n>.wav`` and ``episodes/<n>.json`` (title, speakers, voices, turns with timings),
``scripts.jsonl`` (the same records, one per episode) and ``data.parquet`` (every input row: status
``ok``, ``skipped`` (not kept upstream, with its reasons) or ``failed`` (with the reason)).
"""

from __future__ import annotations

import hashlib
import json
import wave
from pathlib import Path
from typing import Any, Literal

import polars as pl
from pydantic import Field

from nexus_core.artifacts import ArtifactRef
from nexus_core.config import NexusModel, PathOrName
from nexus_core.context import StepContext
from nexus_core.contract import model, step, table
from nexus_core.errors import InputError
from nexus_core.io import read_table, schema_of, write_jsonl, write_parquet
from nexus_core.runner import StepResult

REQUIRED = ("row_id", "final_keep", "final_reasons", "script_json")


class Voice(NexusModel):
    """One speaker's voice."""

    speaker_id: int | None = Field(default=None, ge=0, description="Speaker index of a multi-speaker model "
                                   "(null for a single-speaker one)")
    model: PathOrName | None = Field(default=None, description="VITS checkpoint (directory or hub id) of this voice; "
                                     "null: the step's `tts` input")


class SpeechConfig(NexusModel):
    """Voices, timing and limits."""

    voices: dict[str, Voice] = Field(default_factory=lambda: {"HOST": Voice(speaker_id=0), "GUEST": Voice(speaker_id=1)},
                                     description="Speaker name (as in the script) → voice")
    pause_s: float = Field(default=0.25, ge=0, description="Silence between turns, in seconds")
    min_line_s: float = Field(default=0.5, ge=0, description="Each turn lasts at least this long (padded with silence)")
    noise_scale: float | None = Field(default=None, ge=0, description="VITS sampling noise (null: the model's own)")
    seed: int = Field(default=0, description="Base seed of the per-turn sampling seeds")
    max_episodes: int | None = Field(default=None, ge=1, description="Synthesise at most this many scripts (null: all)")
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="Where the voices run (auto: CUDA "
                                                   "when present); seeded on each, but CPU and CUDA samples differ")


class SpeechResult(StepResult):
    """Episodes written and their total length."""

    episodes: int = 0
    skipped: int = 0
    failed: int = 0
    audio_seconds: float = 0.0
    sampling_rate: int = 0


def _local(voice: Voice) -> list[str]:
    return [voice.model] if voice.model and Path(voice.model).exists() else []


def write_wav(path: Path, samples: Any, rate: int) -> None:
    """Write float samples in [-1, 1] as 16-bit PCM mono."""
    import numpy as np

    pcm = (np.clip(samples, -1.0, 1.0) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as fh:
        fh.setnchannels(1)
        fh.setsampwidth(2)
        fh.setframerate(rate)
        fh.writeframes(pcm.tobytes())


def _seed(base: int, row_id: str, turn: int) -> int:
    return (base + int(hashlib.sha256(f"{row_id}:{turn}".encode()).hexdigest()[:8], 16)) % (2**31)


@step(area="podcast", inputs={"scripts": table(*REQUIRED), "tts": model(optional=True)},
      reads=lambda cfg, inputs: [p for v in cfg.voices.values() for p in _local(v)])
def run_speech(cfg: SpeechConfig, *, inputs: dict[str, ArtifactRef], out_uri: str,
               ctx: StepContext) -> SpeechResult:
    """Synthesise every kept script of ``inputs["scripts"]``; write WAVs, scripts with timings, a table."""
    import numpy as np
    import torch
    from transformers import AutoTokenizer, VitsModel

    src = inputs["scripts"].path / "data.parquet"
    df = read_table(src, columns=REQUIRED)
    if not cfg.voices:
        raise InputError("speech.voices: no voices configured")
    shared = str(inputs["tts"].path) if "tts" in inputs else None
    loaded: dict[str, tuple[Any, Any]] = {}
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    voices: dict[str, tuple[Any, Any, Voice, str]] = {}
    for name, voice in cfg.voices.items():
        where = voice.model or shared
        if where is None:
            raise InputError(f"speech.voices.{name}: no model (set voices.{name}.model or give the tts input)")
        if where not in loaded:
            vits: Any = VitsModel.from_pretrained(where)  # transformers' typing of .to() trips pyright
            vits.eval().to(device)
            loaded[where] = (vits, AutoTokenizer.from_pretrained(where))
        vits, tok = loaded[where]
        n = vits.config.num_speakers
        if (voice.speaker_id is None) != (n <= 1) or (voice.speaker_id or 0) >= max(n, 1):
            raise InputError(f"speech.voices.{name}.speaker_id: {voice.speaker_id} does not fit {where} "
                             f"({n} speaker(s){'; use null' if n <= 1 else f'; use 0..{n - 1}'})")
        if cfg.noise_scale is not None:
            vits.noise_scale = cfg.noise_scale
        voices[name] = (vits, tok, voice, where)
    rates = {v[0].config.sampling_rate for v in voices.values()}
    if len(rates) != 1:
        raise InputError(f"speech.voices: the voices' models have different sampling rates {sorted(rates)}")
    rate = rates.pop()
    root = Path(out_uri)
    (root / "episodes").mkdir(parents=True, exist_ok=True)
    kept = df.filter(pl.col("final_keep") & pl.col("script_json").is_not_null())
    todo = kept.head(cfg.max_episodes) if cfg.max_episodes else kept
    status: dict[str, tuple[str, str | None, str | None, float]] = {}
    records, total = [], 0.0
    gap = np.zeros(int(round(cfg.pause_s * rate)), dtype=np.float32)
    for i, row in enumerate(todo.iter_rows(named=True)):
        ctx.progress(i, todo.height, f"episode {i + 1}/{todo.height}")
        turns = json.loads(row["script_json"])
        missing = sorted({t["speaker"] for t in turns} - set(voices))
        if missing:
            status[row["row_id"]] = ("failed", f"no voice for speaker(s) {', '.join(missing)}", None, 0.0)
            continue
        pieces, timed, t, failed = [], [], 0.0, None
        for j, turn in enumerate(turns):
            vits, tok, voice, _ = voices[turn["speaker"]]
            ids = tok(turn["text"], return_tensors="pt").to(device)
            if ids["input_ids"].shape[-1] == 0 or not any(c.isalnum() for c in turn["text"]):
                failed = f"turn {j + 1}: nothing the voice can say ({turn['text'][:40]!r})"
                break
            torch.manual_seed(_seed(cfg.seed, row["row_id"], j))
            with torch.no_grad():
                audio = vits(**ids, speaker_id=voice.speaker_id).waveform[0].float().cpu().numpy()
            peak = float(np.abs(audio).max()) if audio.size else 0.0
            audio = (audio / peak * 0.9 if peak > 0 else audio).astype(np.float32)
            short = int(round(cfg.min_line_s * rate)) - audio.size
            if short > 0:
                audio = np.concatenate([audio, np.zeros(short, dtype=np.float32)])
            if pieces:
                pieces.append(gap)
                t += gap.size / rate
            start, t = t, t + audio.size / rate
            pieces.append(audio)
            timed.append({"speaker": turn["speaker"], "text": turn["text"], "start_s": round(start, 3),
                          "end_s": round(t, 3), "padded_s": round(max(short, 0) / rate, 3)})
        if failed:
            status[row["row_id"]] = ("failed", failed, None, 0.0)
            continue
        n = len(records)
        wav = f"episodes/{n:04d}.wav"
        write_wav(root / wav, np.concatenate(pieces), rate)
        with wave.open(str(root / wav), "rb") as fh:  # the length a reader will see
            seconds = fh.getnframes() / fh.getframerate()
        rec = {"episode": n, "row_id": row["row_id"], "title": row.get("title"), "wav": wav,
               "duration_s": round(seconds, 3), "sampling_rate": rate, "speakers": sorted({x["speaker"] for x in timed}),
               "voices": {k: {"model": w, "speaker_id": v.speaker_id} for k, (_, _, v, w) in voices.items()},
               "turns": timed}
        (root / f"episodes/{n:04d}.json").write_text(json.dumps(rec, indent=2, ensure_ascii=False), encoding="utf-8")
        records.append(rec)
        total += seconds
        status[row["row_id"]] = ("ok", None, wav, seconds)
    rows = []
    for row in df.iter_rows(named=True):
        st = status.get(row["row_id"]) or ("skipped", row["final_reasons"] or "not synthesised (max_episodes)",
                                           None, 0.0)
        rows.append({"row_id": row["row_id"], "status": st[0], "reason": st[1], "wav": st[2],
                     "duration_s": round(st[3], 3)})
    table_out = pl.DataFrame(rows, schema={"row_id": pl.Utf8, "status": pl.Utf8, "reason": pl.Utf8, "wav": pl.Utf8,
                                           "duration_s": pl.Float64})
    write_parquet(table_out, root / "data.parquet")
    write_jsonl(records, root / "scripts.jsonl")
    counts = {s: int((table_out["status"] == s).sum()) for s in ("ok", "skipped", "failed")}
    ctx.info(f"{counts['ok']} episode(s), {total:.1f} s of audio at {rate} Hz; {counts['skipped']} skipped, "
             f"{counts['failed']} failed")
    return SpeechResult(rows=table_out.height, columns=schema_of(table_out), episodes=counts["ok"],
                        skipped=counts["skipped"], failed=counts["failed"], audio_seconds=round(total, 3),
                        sampling_rate=rate, metrics={"episodes": counts["ok"], "skipped": counts["skipped"],
                                                     "failed": counts["failed"], "audio_seconds": total})
