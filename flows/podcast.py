"""The podcast flow: documents → two-speaker scripts through the teacher machinery (templates, response
cache, rule filters + the strict script check, review, regeneration) → speech (one VITS voice per
speaker) → WAV files plus the scripts with per-turn timings; the kept scripts also become an SFT dataset
that ``configs/train/podcast_tiny.yaml`` trains an LLM on.

    nexus run podcast configs/podcast/tiny.yaml        # offline: recorded teacher, tiny VITS, 2 CPU cores
    nexus run podcast configs/podcast/base.yaml teacher.model=openrouter/... tts.model=kakao-enterprise/vits-vctk
"""

from __future__ import annotations

from typing import Literal

from prefect import flow
from pydantic import Field, model_validator

from flows.common import flow_lineage, main
from flows.distill import review_gate
from flows.results import FlowResult
from nexus_core.artifacts import ArtifactRef
from nexus_core.config import FlowConfig, NexusModel, PathOrName
from nexus_core.contract import check_plan
from nexus_core.distill.collect import CollectConfig, run_teacher_collect
from nexus_core.distill.filters import FiltersConfig, run_distill_filters
from nexus_core.distill.inputs import TeacherInputsConfig, run_teacher_inputs
from nexus_core.distill.package import PackageConfig, run_sft_package
from nexus_core.distill.prompts import TeacherConfig
from nexus_core.distill.regenerate import RegenerateConfig, run_regenerate
from nexus_core.distill.review import ReviewConfig
from nexus_core.distill.rules import load_rules
from nexus_core.io import resolve_ref
from nexus_core.podcast.check import ScriptCheckConfig, run_script_check
from nexus_core.podcast.script import ScriptRules
from nexus_core.podcast.speech import SpeechConfig, run_speech
from nexus_core.podcast.tts import TinyTTSConfig, run_tiny_tts
from tasks.distill_collect import teacher_collect
from tasks.distill_filters import distill_filters
from tasks.distill_inputs import teacher_inputs
from tasks.distill_package import sft_package
from tasks.distill_regenerate import regenerate
from tasks.distill_review import review
from tasks.podcast_check import script_check
from tasks.podcast_speech import speech, tiny_tts


class TTSConfig(NexusModel):
    """The text-to-speech model both voices use unless a voice names its own."""

    model: PathOrName = Field(default="tiny", description="tiny: build a tiny two-speaker VITS "
                                                "(random weights, offline); else a VITS model directory, artifact "
                                                "or hub id (kakao-enterprise/vits-vctk: many speakers)")
    tiny: TinyTTSConfig = Field(default_factory=TinyTTSConfig, description="Shape of the tiny model (model: tiny)")


class PodcastConfig(FlowConfig):
    """Config of the podcast flow; ``teacher`` serves collection and regeneration."""

    name: str = Field(default="podcast", description="Run name; artifact names derive from it")
    sources: list[PathOrName] = Field(default_factory=list, description="Documents: JSONL records (title, abstract, "
                                      "domain, text) or enhanced-prompt JSON files")
    inputs: TeacherInputsConfig = Field(default_factory=lambda: TeacherInputsConfig(
        templates=["podcast"], prompts_dir="configs/podcast/prompts"), description="Prompt templates")
    teacher: TeacherConfig = Field(default_factory=TeacherConfig, description="Teacher model through litellm")
    batch_size: int = Field(default=64, ge=1, description="Rows per collection batch")
    filters: FiltersConfig = Field(default_factory=lambda: FiltersConfig(rules="configs/podcast/filters.yaml"),
                                   description="Rule filters (length, format, duplicates)")
    script: ScriptRules = Field(default_factory=ScriptRules, description="What a usable two-speaker script is")
    review: ReviewConfig = Field(default_factory=ReviewConfig, description="Review gate")
    regenerate: RegenerateConfig = Field(default_factory=lambda: RegenerateConfig(
        template="podcast_strict", prompts_dir="configs/podcast/prompts"), description="Regeneration of rejects")
    package: PackageConfig = Field(default_factory=PackageConfig, description="SFT dataset of the kept scripts")
    tts: TTSConfig = Field(default_factory=TTSConfig, description="Text-to-speech model")
    speech: SpeechConfig = Field(default_factory=SpeechConfig, description="Voices and timing")

    @model_validator(mode="after")
    def _a_voice_per_speaker(self) -> PodcastConfig:
        missing = sorted(set(self.script.speakers) - set(self.speech.voices))
        if missing:
            raise ValueError(f"speech.voices: no voice for speaker(s) {', '.join(missing)} (script.speakers)")
        return self


class PodcastResult(FlowResult):
    """What the podcast flow made."""

    episodes: ArtifactRef | None = Field(default=None, description="WAVs + scripts with timings")
    sft: ArtifactRef | None = Field(default=None, description="SFT dataset of the kept scripts")
    scripts_kept: int = 0
    scripts_rejected: dict[str, int] = Field(default_factory=dict, description="Script check rejections by reason")
    regenerated_rescued: int = 0
    episode_count: int = 0
    audio_seconds: float = 0.0


def _regenerate_config(cfg: PodcastConfig) -> RegenerateConfig:
    return cfg.regenerate.model_copy(update={"teacher": cfg.teacher, "rules": cfg.filters.rules})


def _check(cfg: PodcastConfig, stage: Literal["filtered", "final"]) -> ScriptCheckConfig:
    return ScriptCheckConfig(stage=stage, rules=cfg.script)


def check_podcast(cfg: PodcastConfig, sources: dict[str, ArtifactRef], tts: ArtifactRef | None) -> list[str]:
    """Check what every stage reads before the first one runs; the plan."""
    collect = CollectConfig(teacher=cfg.teacher, batch_size=cfg.batch_size)
    planned = [(run_teacher_inputs, cfg.inputs, dict(sources), "teacher_inputs"),
               (run_teacher_collect, collect, {}, "collect"), (run_distill_filters, cfg.filters, {}, "filters"),
               (run_script_check, _check(cfg, "filtered"), {}, "script_check"),
               (run_regenerate, _regenerate_config(cfg), {}, "regenerate"),
               (run_script_check, _check(cfg, "final"), {}, "final_check"),
               (run_sft_package, cfg.package, {}, "package"),
               *([(run_tiny_tts, cfg.tts.tiny, {}, "tiny_tts")] if cfg.tts.model == "tiny" else []),
               (run_speech, cfg.speech, {"tts": tts}, "speech")]
    check_plan(planned)
    load_rules(cfg.filters.rules)
    return [f"{label}: {fn.__name__.removeprefix('run_')}" for fn, _, _, label in planned]


def tts_ref(cfg: PodcastConfig) -> ArtifactRef | None:
    """The shared TTS model when it is not built here (a directory, an artifact or a cached hub id)."""
    if cfg.tts.model == "tiny":
        return None
    from nexus_core.models.io import resolve_model

    return resolve_model(cfg.tts.model, "tts.model")


@flow(name="podcast", log_prints=True)
def podcast(cfg: PodcastConfig) -> PodcastResult:
    """Documents to two-speaker podcast episodes (WAV + timed scripts) and an SFT dataset of the scripts."""
    with flow_lineage(cfg) as mlflow_run_id:
        sources = {f"source_{i}": resolve_ref(s, f"podcast.sources[{i}]") for i, s in enumerate(cfg.sources)}
        shared_tts = tts_ref(cfg)
        plan = check_podcast(cfg, sources, shared_tts)
        if cfg.dry_run:
            print("podcast plan:\n  " + "\n  ".join(plan))
            return PodcastResult.planned("podcast", plan, mlflow_run_id)
        n = cfg.name
        inputs = teacher_inputs(cfg.inputs, sources, name=f"{n}_teacher_inputs")
        collected = teacher_collect(CollectConfig(teacher=cfg.teacher, batch_size=cfg.batch_size), inputs.ref,
                                    name=f"{n}_collected")
        ruled = distill_filters(cfg.filters, collected.ref, name=f"{n}_ruled")
        filtered = script_check(_check(cfg, "filtered"), ruled.ref, name=f"{n}_filtered")
        reviewed = review(review_gate(cfg.review, filtered.ref), filtered.ref, name=f"{n}_reviewed")
        regenerated = regenerate(_regenerate_config(cfg), reviewed.ref, name=f"{n}_regenerated")
        scripts = script_check(_check(cfg, "final"), regenerated.ref, name=f"{n}_scripts")
        sft = sft_package(cfg.package, scripts.ref, name=f"{n}_sft")
        built = tiny_tts(cfg.tts.tiny, name=f"{n}_tts") if shared_tts is None else None
        episodes = speech(cfg.speech, scripts.ref, built.ref if built is not None else shared_tts,
                          name=f"{n}_episodes")
        steps = {"teacher_inputs": inputs, "collected": collected, "ruled": ruled, "filtered": filtered,
                 "reviewed": reviewed, "regenerated": regenerated, "scripts": scripts, "sft": sft,
                 **({"tts": built} if built is not None else {}), "episodes": episodes}
    return PodcastResult.from_steps(
        "podcast", steps, mlflow_run_id, episodes=episodes.ref, sft=sft.ref, scripts_kept=scripts.kept,
        scripts_rejected=filtered.reasons, regenerated_rescued=regenerated.rescued,
        episode_count=episodes.episodes, audio_seconds=episodes.audio_seconds)


if __name__ == "__main__":
    raise SystemExit(main(podcast, PodcastConfig))
