"""Tasks: the tiny TTS model and speech synthesis of the kept scripts."""

from __future__ import annotations

from nexus_core.artifacts import ArtifactRef
from nexus_core.podcast.speech import SpeechConfig, SpeechResult, run_speech
from nexus_core.podcast.tts import TinyTTSConfig, TinyTTSResult, run_tiny_tts
from nexus_core.runner import run_step
from tasks.common import nexus_task, run_context


@nexus_task(run_tiny_tts, name="podcast-tiny-tts")
def tiny_tts(cfg: TinyTTSConfig, name: str = "tiny_tts") -> TinyTTSResult:
    """Build the tiny multi-speaker VITS into ``models/<name>_vN``."""
    return run_step(run_tiny_tts, cfg, name=name, inputs={}, context=run_context())


@nexus_task(run_speech, name="podcast-speech")
def speech(cfg: SpeechConfig, scripts: ArtifactRef, tts: ArtifactRef | None = None,
           name: str = "episodes") -> SpeechResult:
    """Synthesise the kept scripts into ``podcast/<name>_vN`` (WAVs + scripts with timings)."""
    return run_step(run_speech, cfg, name=name, inputs={"scripts": scripts, "tts": tts}, context=run_context())
