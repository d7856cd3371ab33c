"""The flux flow: images + captions → MDS → precomputed latents and text embeddings → Flux.2 training.

    [tiny pipeline] ─► prepare ─► precompute ─► train ─► (output_dir)

``precomputed_data_dir`` skips prepare and precompute (train from existing shards);
``pipeline.tiny`` builds a small Klein-compatible pipeline instead of naming a real one;
``data.extra_sources`` mixes more datasets in (each with its ``repeats``).

Before any work :func:`preflight` checks what would otherwise fail late: the pipeline (and DiTs) load
here, resolutions and buckets are multiples of the VAE x patch factor (from ``vae/config.json``),
train and precompute resolutions agree, and every data source exists; all problems in one ConfigError.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from pydantic import Field, model_validator
from pydantic_core import PydanticCustomError

from flows.common import flow_lineage, main
from flows.results import FluxResult
from nexus_core.artifacts import ArtifactRef, raw_ref
from nexus_core.config import ConfigPath, FlowConfig, NexusModel, PathOrName
from nexus_core.contract import check_plan
from nexus_core.errors import ConfigError
from nexus_core.flux import buckets as bk
from nexus_core.flux.checks import factor_of_vae_config, loadable, vae_patch_factor
from nexus_core.flux.precompute import PrecomputeConfig, run_precompute
from nexus_core.flux.prepare import PrepareConfig, run_prepare
from nexus_core.flux.sources import ExtraSource
from nexus_core.flux.tiny_pipeline import TinyPipelineConfig
from nexus_core.flux.train import TrainConfig, run_train
from nexus_core.flux.training import export_outputs
from nexus_core.models.flux_tiny import TinyFluxConfig
from tasks.flux_precompute import flux_precompute
from tasks.flux_prepare import flux_prepare
from tasks.flux_tiny_pipeline import flux_tiny_pipeline
from tasks.flux_train import flux_train


class PipelineSection(NexusModel):
    """The single source of VAE, scheduler and text encoder (and the DiT unless model.dit is set)."""

    pretrained_model_name_or_path: PathOrName | None = Field(default=None, description="Hub id or local pipeline directory")
    tiny: TinyFluxConfig | None = Field(default=None, description="Build a tiny pipeline from this shape instead")


class ModelSection(NexusModel):
    """The transformer to train."""

    dit: PathOrName | None = Field(default=None, description="Transformer dir or hub id; default the pipeline's transformer")


class DataSection(NexusModel):
    """Raw inputs of prepare."""

    source: ConfigPath | None = Field(default=None, description="sstk list file, image folder, or DreamBooth instance folder")
    class_dir: ConfigPath | None = Field(default=None, description="DreamBooth class image folder (optional)")
    extra_sources: list[ExtraSource] = Field(default_factory=list, description="More datasets: [{source, repeats, "
                                             "name, layout, caption_ext, caption_key, instance_prompt}]")


class FluxConfig(FlowConfig):
    """Config of the flux flow (configs/flux/...)."""

    name: str = Field(default="flux", description="Run name; artifact names derive from it")
    pipeline: PipelineSection = Field(default_factory=PipelineSection, description="Where the pipeline comes from")
    model: ModelSection = Field(default_factory=ModelSection, description="Which DiT to train")
    data: DataSection = Field(default_factory=DataSection, description="Raw images and captions")
    prepare: PrepareConfig = Field(default_factory=PrepareConfig, description="Prepare step")
    precompute: PrecomputeConfig = Field(default_factory=PrecomputeConfig, description="Precompute step")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Train step")
    precomputed_data_dir: ConfigPath | None = Field(default=None, description="Existing precompute artifact: skip prepare+precompute")
    output_dir: ConfigPath | None = Field(default=None, description="Also copy the trained weights and config here")

    @model_validator(mode="after")
    def _sources_named(self) -> FluxConfig:
        problems = []
        if not self.pipeline.tiny and not self.pipeline.pretrained_model_name_or_path:
            problems.append("pipeline.pretrained_model_name_or_path: missing (or set pipeline.tiny)")
        if not self.precomputed_data_dir and not self.data.source:
            problems.append("data.source: missing (or set precomputed_data_dir)")
        if self.prepare.extra_sources:
            problems.append("prepare.extra_sources: set data.extra_sources (the flow fills prepare's)")
        if problems:
            raise PydanticCustomError("flux_sources", "; ".join(problems))
        return self


def _prepare_cfg(cfg: FluxConfig, path: str | None) -> PrepareConfig:
    return cfg.prepare.model_copy(update={"pretrained_model_name_or_path": path,
                                          "extra_sources": cfg.data.extra_sources})


def preflight(cfg: FluxConfig) -> None:
    """Everything that would stop the run later, found now without loading a model: one ConfigError."""
    problems = []
    path, precomputed = cfg.pipeline.pretrained_model_name_or_path, cfg.precomputed_data_dir
    models = [("model.dit", cfg.model.dit),
              ("train.teacher_dit", cfg.train.teacher_dit if cfg.train.distillation else None)]
    factor = None
    if cfg.pipeline.tiny is not None:
        factor = factor_of_vae_config({"block_out_channels": cfg.pipeline.tiny.vae_block_out_channels})
    elif path:
        models.insert(0, ("pipeline.pretrained_model_name_or_path", path))
        factor = vae_patch_factor(path) if loadable(path) else None
    problems += [f"{key}: {ref} cannot be loaded here (no such local directory, or a hub id not in the local cache "
                 "while HF_HUB_OFFLINE is set); see `nexus doctor`" for key, ref in models if ref and not loadable(ref)]
    sizes = [("train.resolution", cfg.train.resolution)]
    if precomputed:
        if not Path(precomputed, "flux_meta.json").is_file():
            problems.append(f"precomputed_data_dir: {precomputed} is not a flux precompute artifact (no flux_meta.json)")
    else:
        sizes.append(("precompute.resolution", cfg.precompute.resolution))
        if cfg.train.resolution != cfg.precompute.resolution:
            problems.append(f"train.resolution: {cfg.train.resolution} but precompute.resolution is "
                            f"{cfg.precompute.resolution} (training reads latents made at the precompute resolution)")
        sources = [("data.source", cfg.data.source), ("data.class_dir", cfg.data.class_dir)]
        sources += [(f"data.extra_sources.{i}.source", x.source) for i, x in enumerate(cfg.data.extra_sources)]
        problems += [f"{key}: {src} does not exist" for key, src in sources if src and not Path(src).exists()]
        if cfg.data.class_dir and not cfg.prepare.class_prompt:
            problems.append("prepare.class_prompt: required when data.class_dir is set")
        if cfg.prepare.buckets.enabled and factor:
            odd = [f"{h}x{w}" for h, w in bk.all_buckets(cfg.prepare.buckets, cfg.prepare.size) if h % factor or w % factor]
            if odd:
                problems.append(f"prepare.buckets: {', '.join(odd[:5])} (height x width) not multiples of {factor}, "
                                f"the VAE x patch factor of the pipeline; set prepare.buckets.divisible={factor}")
    if factor:
        problems += [f"{key}: {res} is not a multiple of {factor} (VAE x patch factor of the pipeline)"
                     for key, res in sizes if res % factor]
    if problems:
        raise ConfigError(problems)


def check_flux(cfg: FluxConfig, source: ArtifactRef | None, class_dir: ArtifactRef | None,
               precomputed: ArtifactRef | None) -> list[str]:
    """Check the images, captions and precomputed data every step will read before anything runs; the plan."""
    path = cfg.pipeline.pretrained_model_name_or_path
    planned: list = []
    if precomputed is not None:
        planned.append((run_train, cfg.train, {"precomputed": precomputed}, "train"))
    else:
        planned += [(run_prepare, _prepare_cfg(cfg, path),
                     {"source": source, "class_dir": class_dir}, "prepare"),
                    (run_precompute, cfg.precompute, {}, "precompute"), (run_train, cfg.train, {}, "train")]
    check_plan(planned)
    return [label for _, _, _, label in planned]


@flow(name="flux", log_prints=True)
def flux(cfg: FluxConfig) -> FluxResult:
    """Prepare, precompute and train a Flux.2 Klein transformer; every step a cached, traced artifact."""
    with flow_lineage(cfg) as mlflow_run_id:
        preflight(cfg)
        precomputed = raw_ref(cfg.precomputed_data_dir) if cfg.precomputed_data_dir else None
        source = raw_ref(cfg.data.source) if cfg.data.source and precomputed is None else None
        class_dir = raw_ref(cfg.data.class_dir) if cfg.data.class_dir and precomputed is None else None
        plan = check_flux(cfg, source, class_dir, precomputed)
        if cfg.dry_run:
            print("flux plan: " + " → ".join(plan))
            return FluxResult.planned("flux", plan, mlflow_run_id)
        steps = {}
        pipe_ref, path = None, cfg.pipeline.pretrained_model_name_or_path
        if cfg.pipeline.tiny:
            prompts = [cfg.prepare.instance_prompt, cfg.prepare.class_prompt,
                       *(x.instance_prompt for x in cfg.data.extra_sources)]
            corpus = [p for p in prompts if p]
            steps["pipeline"] = flux_tiny_pipeline(
                TinyPipelineConfig(tiny=cfg.pipeline.tiny, corpus=corpus + cfg.train.validation_prompts),
                name=f"{cfg.name}_pipeline")
            pipe_ref, path = steps["pipeline"].ref, None
        if precomputed is not None:
            latents = precomputed
        else:
            steps["prepare"] = flux_prepare(
                _prepare_cfg(cfg, path), source, class_dir, pipe_ref, name=f"{cfg.name}_images")
            steps["precompute"] = flux_precompute(
                cfg.precompute.model_copy(update={"pretrained_model_name_or_path": path}), steps["prepare"].ref,
                pipe_ref, name=f"{cfg.name}_latents")
            latents = steps["precompute"].ref
        steps["train"] = flux_train(
            cfg.train.model_copy(update={"pretrained_model_name_or_path": path, "dit": cfg.model.dit}),
            latents, pipe_ref, name=f"{cfg.name}_transformer")
        exported = export_outputs(steps["train"].ref.path, cfg.output_dir) if cfg.output_dir else []
    train = steps["train"]
    return FluxResult.from_steps("flux", steps, mlflow_run_id, model=train.ref, global_step=train.global_step,
                                 final_loss=train.final_loss, weights=train.weights,
                                 validation_images=len(train.validation_images), exported=exported)


if __name__ == "__main__":
    raise SystemExit(main(flux, FluxConfig))
