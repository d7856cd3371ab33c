"""The video_gen flow: an LLM drives Stable Video Diffusion through a trained projector (text-to-video).

    [tiny SVD] ─► precompute ─► [tiny LLM] ─► projector train ─► render
    nexus run video_gen configs/video_gen/tiny.yaml

precompute (nexus_core.videogen.precompute) encodes caption + video rows with the pipeline's frozen VAE
and CLIP image encoder; the projector (nexus_core.videogen.train) learns to map the frozen LLM's pooled
hidden states to the UNet's one-token conditioning (and a first-frame latent) with SVD's EDM denoising
loss; render (nexus_core.videogen.render) films ``render.prompts`` to animated GIFs and PNG frames.
``llm.model`` names any model reference; ``llm.tiny`` builds a tiny LLM whose tokenizer is trained on
the captions. ``precomputed_data_dir`` skips precompute.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from pydantic import Field, model_validator
from pydantic_core import PydanticCustomError

from flows.common import flow_lineage, main
from flows.image_gen import LLMSection
from flows.results import FlowResult
from nexus_core.artifacts import ArtifactRef, raw_ref
from nexus_core.config import ConfigPath, FlowConfig, NexusModel, PathOrName
from nexus_core.contract import check_plan
from nexus_core.errors import ConfigError
from nexus_core.flux.checks import loadable
from nexus_core.models.io import resolve_model
from nexus_core.train.base_model import BaseModelConfig
from nexus_core.videogen.precompute import VideoPrecomputeConfig, run_video_precompute
from nexus_core.videogen.render import VideoRenderConfig, run_video_render
from nexus_core.videogen.svd import TinySVDConfig
from nexus_core.videogen.tiny_svd import TinySVDStepConfig
from nexus_core.videogen.train import VideoProjectorTrainConfig, run_video_projector_train
from tasks.base_model import base_model
from tasks.video_gen_precompute import video_gen_precompute
from tasks.video_gen_render import video_gen_render
from tasks.video_gen_tiny_svd import video_gen_tiny_svd
from tasks.video_gen_train import video_gen_train


class SVDPipelineSection(NexusModel):
    """The Stable Video Diffusion pipeline (UNet, VAE, CLIP image encoder, scheduler; all frozen)."""

    pretrained_model_name_or_path: PathOrName | None = Field(default=None, description="Hub id or local pipeline "
                                                             "directory")
    tiny: TinySVDConfig | None = Field(default=None, description="Build a tiny pipeline from this shape instead")


class VideoDataSection(NexusModel):
    """Raw inputs of precompute."""

    source: ConfigPath | None = Field(default=None, description="JSON lines of {video, caption} (video relative "
                                      "to the file)")


class VideoGenConfig(FlowConfig):
    """Config of the video_gen flow (configs/video_gen/...)."""

    name: str = Field(default="video_gen", description="Run name; artifact names derive from it")
    pipeline: SVDPipelineSection = Field(default_factory=SVDPipelineSection, description="The SVD pipeline")
    llm: LLMSection = Field(default_factory=LLMSection, description="The LLM that reads the prompts")
    data: VideoDataSection = Field(default_factory=VideoDataSection, description="Captioned videos")
    precompute: VideoPrecomputeConfig = Field(default_factory=VideoPrecomputeConfig, description="Precompute step")
    projector: VideoProjectorTrainConfig = Field(default_factory=VideoProjectorTrainConfig,
                                                 description="Projector training")
    render: VideoRenderConfig = Field(description="Prompts to film with the trained projector")
    precomputed_data_dir: ConfigPath | None = Field(default=None, description="Existing video precompute artifact: "
                                                    "skip precompute")

    @model_validator(mode="after")
    def _sources_named(self) -> VideoGenConfig:
        problems = []
        if not self.pipeline.tiny and not self.pipeline.pretrained_model_name_or_path:
            problems.append("pipeline.pretrained_model_name_or_path: missing (or set pipeline.tiny)")
        if (self.llm.model is None) == (self.llm.tiny is None):
            problems.append("llm: set exactly one of llm.model and llm.tiny")
        if not self.precomputed_data_dir and not self.data.source:
            problems.append("data.source: missing (or set precomputed_data_dir)")
        if problems:
            raise PydanticCustomError("video_gen_sources", "; ".join(problems))
        return self


class VideoGenResult(FlowResult):
    """The video_gen flow: the trained projector and the rendered videos."""

    projector: ArtifactRef | None = None
    videos: ArtifactRef | None = None
    global_step: int = 0
    final_loss: float | None = None
    rendered: int = Field(default=0, description="GIF files written")
    unseen_prompts: int = Field(default=0, description="Rendered prompts that were not training captions")


def preflight(cfg: VideoGenConfig) -> ArtifactRef | None:
    """What would stop the run later, found before any work (one ConfigError); the resolved llm.model."""
    problems = []
    path = cfg.pipeline.pretrained_model_name_or_path
    if not cfg.pipeline.tiny and path and not loadable(path):
        problems.append(f"pipeline.pretrained_model_name_or_path: {path} cannot be loaded here (no such local "
                        "directory, or a hub id not in the local cache while HF_HUB_OFFLINE is set)")
    if cfg.precomputed_data_dir and not Path(cfg.precomputed_data_dir, "video_meta.json").is_file():
        problems.append(f"precomputed_data_dir: {cfg.precomputed_data_dir} is not a video precompute artifact")
    if not cfg.precomputed_data_dir and cfg.data.source and not Path(cfg.data.source).is_file():
        problems.append(f"data.source: {cfg.data.source} is not a file")
    if problems:
        raise ConfigError(problems)
    return resolve_model(cfg.llm.model, "llm.model") if cfg.llm.model else None


@flow(name="video_gen", log_prints=True)
def video_gen(cfg: VideoGenConfig) -> VideoGenResult:
    """Precompute video latents, train the LLM → SVD projector, film the prompts; each a cached, traced artifact."""
    with flow_lineage(cfg) as mlflow_run_id:
        llm = preflight(cfg)
        precomputed = raw_ref(cfg.precomputed_data_dir) if cfg.precomputed_data_dir else None
        source = raw_ref(cfg.data.source) if cfg.data.source and precomputed is None else None
        path = cfg.pipeline.pretrained_model_name_or_path
        planned: list = [] if precomputed else [(run_video_precompute, cfg.precompute, {"source": source},
                                                 "precompute")]
        planned += [(run_video_projector_train, cfg.projector, {"precomputed": precomputed, "llm": llm}, "projector"),
                    (run_video_render, cfg.render, {"llm": llm}, "render")]
        check_plan(planned)
        plan = [label for *_, label in planned]
        if cfg.dry_run:
            print("video_gen plan: " + " → ".join(plan))
            return VideoGenResult.planned("video_gen", plan, mlflow_run_id)
        steps, pipe_ref = {}, None
        if cfg.pipeline.tiny:
            steps["pipeline"] = video_gen_tiny_svd(TinySVDStepConfig(tiny=cfg.pipeline.tiny),
                                                   name=f"{cfg.name}_pipeline")
            pipe_ref, path = steps["pipeline"].ref, None
        if precomputed is None:
            assert source is not None  # the config validator named data.source
            steps["precompute"] = video_gen_precompute(
                cfg.precompute.model_copy(update={"pretrained_model_name_or_path": path}), source, pipe_ref,
                name=f"{cfg.name}_latents")
            precomputed = steps["precompute"].ref
        if cfg.llm.tiny:  # its tokenizer learns the captions (the precompute table's caption column)
            steps["llm"] = base_model(BaseModelConfig(source="tiny", tiny=cfg.llm.tiny, text_column="caption"),
                                      precomputed, name=f"{cfg.name}_llm")
            llm = steps["llm"].ref
        assert llm is not None and precomputed is not None  # the config names an LLM; precompute ran or was given
        steps["projector"] = video_gen_train(cfg.projector.model_copy(update={"pretrained_model_name_or_path": path}),
                                             precomputed, llm, pipe_ref, name=f"{cfg.name}_projector")
        steps["render"] = video_gen_render(cfg.render.model_copy(update={"pretrained_model_name_or_path": path}),
                                           steps["projector"].ref, llm, pipe_ref, name=f"{cfg.name}_videos")
    train, render = steps["projector"], steps["render"]
    return VideoGenResult.from_steps("video_gen", steps, mlflow_run_id, projector=train.ref, videos=render.ref,
                                     global_step=train.global_step, final_loss=train.final_loss,
                                     rendered=len(render.videos), unseen_prompts=render.unseen_prompts)


if __name__ == "__main__":
    raise SystemExit(main(video_gen, VideoGenConfig))
