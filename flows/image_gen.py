"""The image_gen flow: an LLM drives Flux.2 Klein through a trained projector.

    [tiny pipeline] ─► prepare ─► precompute ─► [tiny LLM] ─► projector train ─► render
    nexus run image_gen configs/image_gen/tiny.yaml

prepare and precompute are the flux flow's steps (images + captions → latents and text embeddings);
the projector (nexus_core.flux.projector_train) learns to map the frozen LLM's hidden states to Klein's
``prompt_embeds`` with the flow-matching loss of the frozen DiT; render (nexus_core.flux.projector_render)
draws ``render.prompts`` through ``Flux2KleinPipeline(prompt_embeds=...)`` to PNG files.
``llm.model`` names any model reference (artifact, directory, hub id, registry entry); ``llm.tiny``
builds a tiny LLM whose tokenizer is trained on the captions instead. ``precomputed_data_dir`` skips
prepare and precompute.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from pydantic import Field, model_validator
from pydantic_core import PydanticCustomError

from flows.common import flow_lineage, main
from flows.flux import DataSection, PipelineSection
from flows.results import FlowResult
from nexus_core.artifacts import ArtifactRef, raw_ref
from nexus_core.config import ConfigPath, FlowConfig, NexusModel, PathOrName
from nexus_core.contract import check_plan
from nexus_core.errors import ConfigError
from nexus_core.flux.checks import loadable
from nexus_core.flux.precompute import PrecomputeConfig, run_precompute
from nexus_core.flux.prepare import PrepareConfig, run_prepare
from nexus_core.flux.projector_render import RenderConfig, run_projector_render
from nexus_core.flux.projector_train import ProjectorTrainConfig, run_projector_train
from nexus_core.flux.tiny_pipeline import TinyPipelineConfig
from nexus_core.models.io import resolve_model
from nexus_core.models.tiny import TinyLLMConfig
from nexus_core.train.base_model import BaseModelConfig
from tasks.base_model import base_model
from tasks.flux_precompute import flux_precompute
from tasks.flux_prepare import flux_prepare
from tasks.flux_tiny_pipeline import flux_tiny_pipeline
from tasks.image_gen_render import image_gen_render
from tasks.image_gen_train import image_gen_train


class LLMSection(NexusModel):
    """The LLM whose hidden states condition the images (frozen)."""

    model: PathOrName | None = Field(default=None, description="Model reference: artifact NAME@vN, directory, hub id "
                                     "ORG/NAME[@REV] or models:/NAME@ALIAS")
    tiny: TinyLLMConfig | None = Field(default=None, description="Build a tiny LLM (tokenizer trained on the captions)")


class ImageGenConfig(FlowConfig):
    """Config of the image_gen flow (configs/image_gen/...)."""

    name: str = Field(default="image_gen", description="Run name; artifact names derive from it")
    pipeline: PipelineSection = Field(default_factory=PipelineSection, description="The Klein pipeline (DiT frozen)")
    llm: LLMSection = Field(default_factory=LLMSection, description="The LLM that reads the prompts")
    data: DataSection = Field(default_factory=DataSection, description="Raw images and captions")
    prepare: PrepareConfig = Field(default_factory=PrepareConfig, description="Prepare step (flux)")
    precompute: PrecomputeConfig = Field(default_factory=PrecomputeConfig, description="Precompute step (flux)")
    projector: ProjectorTrainConfig = Field(default_factory=ProjectorTrainConfig, description="Projector training")
    render: RenderConfig = Field(description="Prompts to draw with the trained projector")
    precomputed_data_dir: ConfigPath | None = Field(default=None, description="Existing precompute artifact: skip "
                                                    "prepare+precompute")

    @model_validator(mode="after")
    def _sources_named(self) -> ImageGenConfig:
        problems = []
        if not self.pipeline.tiny and not self.pipeline.pretrained_model_name_or_path:
            problems.append("pipeline.pretrained_model_name_or_path: missing (or set pipeline.tiny)")
        if (self.llm.model is None) == (self.llm.tiny is None):
            problems.append("llm: set exactly one of llm.model and llm.tiny")
        if not self.precomputed_data_dir and not self.data.source:
            problems.append("data.source: missing (or set precomputed_data_dir)")
        if problems:
            raise PydanticCustomError("image_gen_sources", "; ".join(problems))
        return self


class ImageGenResult(FlowResult):
    """The image_gen flow: the trained projector and the rendered images."""

    projector: ArtifactRef | None = None
    images: ArtifactRef | None = None
    global_step: int = 0
    final_loss: float | None = None
    rendered: int = Field(default=0, description="PNG files written")
    unseen_prompts: int = Field(default=0, description="Rendered prompts that were not training captions")


def preflight(cfg: ImageGenConfig) -> ArtifactRef | None:
    """What would stop the run later, found before any work (one ConfigError); the resolved llm.model."""
    problems = []
    path = cfg.pipeline.pretrained_model_name_or_path
    if not cfg.pipeline.tiny and path and not loadable(path):
        problems.append(f"pipeline.pretrained_model_name_or_path: {path} cannot be loaded here (no such local "
                        "directory, or a hub id not in the local cache while HF_HUB_OFFLINE is set)")
    if cfg.precomputed_data_dir and not Path(cfg.precomputed_data_dir, "flux_meta.json").is_file():
        problems.append(f"precomputed_data_dir: {cfg.precomputed_data_dir} is not a flux precompute artifact")
    if not cfg.precomputed_data_dir and cfg.data.source and not Path(cfg.data.source).exists():
        problems.append(f"data.source: {cfg.data.source} does not exist")
    if problems:
        raise ConfigError(problems)
    return resolve_model(cfg.llm.model, "llm.model") if cfg.llm.model else None


@flow(name="image_gen", log_prints=True)
def image_gen(cfg: ImageGenConfig) -> ImageGenResult:
    """Precompute latents, train the LLM → Klein projector, render the prompts; each a cached, traced artifact."""
    with flow_lineage(cfg) as mlflow_run_id:
        llm = preflight(cfg)
        precomputed = raw_ref(cfg.precomputed_data_dir) if cfg.precomputed_data_dir else None
        source = raw_ref(cfg.data.source) if cfg.data.source and precomputed is None else None
        path = cfg.pipeline.pretrained_model_name_or_path
        prepare_cfg = cfg.prepare.model_copy(update={"pretrained_model_name_or_path": path,
                                                     "extra_sources": cfg.data.extra_sources})
        planned: list = [] if precomputed else [(run_prepare, prepare_cfg, {"source": source}, "prepare"),
                                                (run_precompute, cfg.precompute, {}, "precompute")]
        planned += [(run_projector_train, cfg.projector, {"precomputed": precomputed, "llm": llm}, "projector"),
                    (run_projector_render, cfg.render, {"llm": llm}, "render")]
        check_plan(planned)
        plan = [label for *_, label in planned]
        if cfg.dry_run:
            print("image_gen plan: " + " → ".join(plan))
            return ImageGenResult.planned("image_gen", plan, mlflow_run_id)
        steps, pipe_ref = {}, None
        if cfg.pipeline.tiny:
            steps["pipeline"] = flux_tiny_pipeline(TinyPipelineConfig(tiny=cfg.pipeline.tiny),
                                                   name=f"{cfg.name}_pipeline")
            pipe_ref, path = steps["pipeline"].ref, None
        if precomputed is None:
            steps["prepare"] = flux_prepare(prepare_cfg.model_copy(update={"pretrained_model_name_or_path": path}),
                                            source, None, pipe_ref, name=f"{cfg.name}_images")
            steps["precompute"] = flux_precompute(
                cfg.precompute.model_copy(update={"pretrained_model_name_or_path": path}), steps["prepare"].ref,
                pipe_ref, name=f"{cfg.name}_latents")
            precomputed = steps["precompute"].ref
        if cfg.llm.tiny:  # its tokenizer learns the captions (the precompute table's caption column)
            steps["llm"] = base_model(BaseModelConfig(source="tiny", tiny=cfg.llm.tiny, text_column="caption"),
                                      precomputed, name=f"{cfg.name}_llm")
            llm = steps["llm"].ref
        assert llm is not None and precomputed is not None  # the config names an LLM; precompute ran or was given
        steps["projector"] = image_gen_train(cfg.projector.model_copy(update={"pretrained_model_name_or_path": path}),
                                             precomputed, llm, pipe_ref, name=f"{cfg.name}_projector")
        steps["render"] = image_gen_render(cfg.render.model_copy(update={"pretrained_model_name_or_path": path}),
                                           steps["projector"].ref, llm, pipe_ref, name=f"{cfg.name}_render")
    train, render = steps["projector"], steps["render"]
    return ImageGenResult.from_steps("image_gen", steps, mlflow_run_id, projector=train.ref, images=render.ref,
                                     global_step=train.global_step, final_loss=train.final_loss,
                                     rendered=len(render.images), unseen_prompts=render.unseen_prompts)


if __name__ == "__main__":
    raise SystemExit(main(image_gen, ImageGenConfig))
