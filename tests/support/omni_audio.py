"""Writes the tiny WAV clips under data/raw/omni/audio/ (tones of two pitches and noise, 8 kHz 16-bit
mono, half a second: 8 KB each; the 16 kHz encoder resamples them) and the audio caption / instruct
sets and corpus over them. Re-run to re-make them:

    .venv/bin/python -m tests.support.omni_audio
"""

from __future__ import annotations

import json
import wave
from pathlib import Path

import numpy as np

OMNI = Path(__file__).resolve().parents[2] / "data" / "raw" / "omni"
RATE, SECONDS = 8000, 0.5
CLIPS = {  # name: (frequency in Hz, 0 for noise; caption; answer to "high or low?")
    "high_1760": (1760, "A high tone.", "High."),
    "high_1320": (1320, "A high tone.", "High."),
    "low_220": (220, "A low tone.", "Low."),
    "low_330": (330, "A low tone.", "Low."),
    "noise_a": (0, "White noise.", "Neither, it is noise."),
    "noise_b": (0, "White noise.", "Neither, it is noise."),
}


def write_wav(path: Path, samples: np.ndarray, rate: int = RATE, width: int = 2, channels: int = 1) -> Path:
    """``samples`` (floats in [-1, 1], shape (n,) or (n, channels)) as a PCM WAV of ``width`` bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    kind = {1: np.uint8, 2: np.int16, 4: np.int32}[width]
    if width == 1:
        ints = np.clip(samples * 127 + 128, 0, 255).astype(kind)
    else:
        ints = np.clip(samples * np.iinfo(kind).max, np.iinfo(kind).min, np.iinfo(kind).max).astype(kind)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(ints.tobytes())
    return path


def tone(freq: float, seconds: float = SECONDS, rate: int = RATE, seed: int = 0) -> np.ndarray:
    """A sine at ``freq`` Hz (white noise when 0), amplitude 0.5."""
    n = int(seconds * rate)
    if freq == 0:
        return np.random.default_rng(seed).uniform(-0.5, 0.5, n)
    return 0.5 * np.sin(2 * np.pi * freq * np.arange(n) / rate)


def main() -> None:
    """Write the clips and the JSONL sets."""
    captions, instruct, corpus = [], [], []
    for i, (name, (freq, caption, answer)) in enumerate(CLIPS.items()):
        write_wav(OMNI / "audio" / f"{name}.wav", tone(freq, seed=i))
        clip = [f"audio/{name}.wav"]
        captions.append({"messages": [{"role": "user", "content": "<audio>Describe the sound."},
                                      {"role": "assistant", "content": caption}], "audios": clip})
        instruct.append({"messages": [{"role": "user", "content": "Is the sound high or low?"},
                                      {"role": "assistant", "content": answer}], "audios": clip})
        corpus.append({"text": f"Describe the sound. {caption} Is the sound high or low? {answer}"})
    for file, rows in (("audio_captions.jsonl", captions), ("audio_instruct.jsonl", instruct),
                       ("audio_corpus.jsonl", corpus)):
        (OMNI / file).write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
