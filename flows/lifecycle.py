"""The lifecycle flow: the main job. Every stage in order, on one config, each an artifact with lineage.

    raw corpus ─► ingest ─► base model ─► distill ─► llm_train (SFT LoRA, distillation)
               ─► evaluate (gates) ─► compress (release only when the gates pass)

Stages whose section is absent from the config are skipped. Each stage is its own flow (a subflow
here, nested in the Prefect UI and in MLflow), also runnable alone with ``nexus run <flow>``. A section
named in ``deployments`` runs as a run of that deployment on its work pool (:mod:`flows.sections`):
teacher collection on a CPU pool, training on a GPU pool. The lifecycle's ``budget_usd`` covers every
section, wherever it runs.

The feedback loop is opt-in (``feedback.use``): the next run's distill stage then also takes the samples
the previous evaluation failed (``evaluate/<name>_feedback``, its newest version, resolved at the start).
"""

from __future__ import annotations

from prefect import flow
from prefect.runtime import flow_run
from pydantic import Field, model_validator

from flows.common import flow_lineage, main
from flows.compress import CompressConfig, check_compress, compress
from flows.distill import DistillConfig, check_distill, distill, source_refs
from flows.evaluate import EvaluateConfig, check_evaluate, evaluate
from flows.llm_train import LLMTrainConfig, check_stages, llm_train, queue, referenced_models
from flows.results import FlowResult, LifecycleResult
from flows.sections import SectionDeployments, run_section
from nexus_core.artifacts import ArtifactRef, raw_ref
from nexus_core.config import FlowConfig, NexusModel
from nexus_core.corpus.ingest import IngestConfig
from nexus_core.evaluate.records import latest_feedback
from nexus_core.io import resolve_ref
from nexus_core.train.base_model import BaseModelConfig, pretrained_ref
from tasks.base_model import base_model
from tasks.ingest import ingest


class FeedbackLoopConfig(NexusModel):
    """Whether distill also takes the samples the previous evaluation failed (the loop closed)."""

    use: bool = Field(default=False, description=(
        "Add the newest evaluate/<evaluation>_feedback artifact, when there is one with samples, to distill's "
        "sources. Off by default: a run that uses it differs from the run before (distill's inputs change, "
        "so distill and everything after it run again instead of coming from cache), and an offline "
        "recorded teacher answers only prompts it has recorded (others count as offline misses)"))
    evaluation: str | None = Field(default=None, description="Evaluation whose feedback to take; default: the "
                                                             "evaluate section's name")


class LifecycleConfig(FlowConfig):
    """Config of the lifecycle flow: one section per stage; a missing section skips that stage."""

    name: str = Field(default="tiny", description="Run name; artifact names derive from it")
    corpus: IngestConfig = Field(description="Raw corpus to ingest")
    base_model: BaseModelConfig = Field(default_factory=BaseModelConfig, description="Base model to start from")
    distill: DistillConfig | None = Field(default=None, description="Distillation data pipeline → SFT dataset")
    train: LLMTrainConfig | None = Field(default=None, description="Training stages; the SFT dataset is dataset `sft`")
    evaluate: EvaluateConfig | None = Field(default=None, description="Evaluation of the trained model, with gates")
    compress: CompressConfig | None = Field(default=None, description="Compression; its release runs only if gates pass")
    omni: LLMTrainConfig | None = Field(default=None, description="Multimodal conversion of the trained model: an "
                                        "llm_train config with an `omni:` block (encoders) and mm stages; its base "
                                        "model is the model training ended with")
    deployments: SectionDeployments = Field(default_factory=SectionDeployments,
                                            description="Sections to run as deployment runs on work pools")
    feedback: FeedbackLoopConfig = Field(default_factory=FeedbackLoopConfig,
                                         description="Feed the previous evaluation's failed samples to distill")

    @model_validator(mode="after")
    def _omni_composes(self) -> LifecycleConfig:
        if self.omni is not None and self.omni.omni is None:
            raise ValueError("omni: needs an `omni:` block naming the encoders (e.g. extends: "
                             "../train/omni_tiny.yaml); without one it would be plain text training")
        if self.omni is not None and self.omni.base_model:
            raise ValueError("omni.base_model: the omni section starts from the model training ended with; "
                             "leave base_model out (run llm_train on its own for another base)")
        return self

    @model_validator(mode="after")
    def _feedback_has_a_source_and_a_use(self) -> LifecycleConfig:
        if self.feedback.use and self.distill is None:
            raise ValueError("feedback.use needs a distill section (the feedback goes to its sources)")
        if self.feedback.use and not (self.feedback.evaluation or self.evaluate):
            raise ValueError("feedback.use: name the evaluation (feedback.evaluation) or add an evaluate section")
        return self


def with_feedback(cfg: LifecycleConfig) -> tuple[LifecycleConfig, ArtifactRef | None, str | None]:
    """``cfg`` with the previous evaluation's feedback artifact added to distill's sources (by its
    store-relative URI, so this run's own evaluation cannot change what distill reads) when
    ``feedback.use`` is on and there is one; that artifact; the line to log (None when the loop is off)."""
    if not cfg.feedback.use or cfg.distill is None:
        return cfg, None, None
    evaluation = cfg.feedback.evaluation or (cfg.evaluate.name if cfg.evaluate else "")
    named = [s for s in cfg.distill.sources if f"{evaluation}_feedback" in s]
    if named:
        return cfg, None, f"feedback: distill's sources already name {named[0]}; left as written"
    ref, note = latest_feedback(evaluation)
    if ref is None:
        return cfg, None, note
    distill_cfg = cfg.distill.model_copy(update={"sources": [*cfg.distill.sources, ref.uri]})
    return cfg.model_copy(update={"distill": distill_cfg}), ref, note


def check_lifecycle(cfg: LifecycleConfig) -> list[str]:
    """Each stage flow's own up-front checks, with what is known before anything runs (a stage's
    inputs made by an earlier stage are checked when that stage has made them); the plan."""
    plan = ["ingest", "base_model"]
    pretrained_ref(cfg.base_model)  # a pretrained base must resolve (hub cache, local dir or artifact)
    if cfg.distill:
        plan += [f"distill.{s}" for s in check_distill(cfg.distill, source_refs(cfg.distill))]
    if cfg.train:
        data = {k: resolve_ref(v, f"train.datasets.{k}") for k, v in cfg.train.datasets.items()}
        check_stages(cfg.train, None, data, referenced_models(cfg.train))
        plan += [f"train.{q}" for q in queue(cfg.train)]
    if cfg.evaluate:
        dataset = resolve_ref(cfg.evaluate.dataset, "evaluate.dataset") if cfg.evaluate.dataset else None
        plan += [f"evaluate.{s}" for s in check_evaluate(cfg.evaluate, None, dataset)]
    if cfg.compress:
        plan += [f"compress.{s}" for s in check_compress(cfg.compress, None, None, None)]
    if cfg.omni:
        data = {k: resolve_ref(v, f"omni.datasets.{k}") for k, v in cfg.omni.datasets.items()}
        check_stages(cfg.omni, None, data, referenced_models(cfg.omni))
        plan += ["omni.compose", *(f"omni.{q}" for q in queue(cfg.omni))]
    return plan


@flow(name="lifecycle", log_prints=True)
def lifecycle(cfg: LifecycleConfig) -> LifecycleResult:
    """Raw text to an evaluated, compressed model, every step a cached, traced artifact.

    Every stage's up-front checks run before the first stage starts; a dry run stops there.
    """
    with flow_lineage(cfg) as mlflow_run_id:
        sources = {f"source_{i}": raw_ref(path) for i, path in enumerate(cfg.corpus.sources)}
        cfg, feedback, note = with_feedback(cfg)
        if note:
            print(note)
        fed_back = feedback.uri if feedback else None
        plan = check_lifecycle(cfg)
        if cfg.dry_run:
            print("lifecycle plan:\n  " + "\n  ".join(plan))
            return LifecycleResult.planned("lifecycle", plan, mlflow_run_id, feedback_source=fed_back)
        corpus = ingest(cfg.corpus, sources, name=f"{cfg.name}_corpus")
        base = base_model(cfg.base_model, corpus.ref, name=f"{cfg.name}_base",
                          pretrained=pretrained_ref(cfg.base_model))
        artifacts = {"ingest": corpus.ref, "base_model": base.ref}
        reused = [k for k, r in (("ingest", corpus), ("base_model", base)) if r.reused]
        stages: dict = {}
        model, sft = base.ref, None

        def collect(stage: str, result: FlowResult) -> None:
            artifacts.update({f"{stage}.{k}": v for k, v in result.artifacts.items()})
            reused.extend(f"{stage}.{k}" for k in result.reused)
            stages[stage] = result.summary

        pools, poll = cfg.deployments, cfg.deployments.poll_interval_s  # a section named there runs on its pool
        if cfg.distill:
            d = run_section(distill, cfg.distill, pools.distill, poll)
            collect("distill", d)
            sft = d.sft
        if cfg.train:
            t = run_section(llm_train, cfg.train, pools.train, poll, base_model=base.ref,
                            datasets={"sft": sft} if sft else None)
            collect("train", t)
            model = t.final_model or model
        passed = None
        if cfg.evaluate:
            e = run_section(evaluate, cfg.evaluate, pools.evaluate, poll, model=model)
            collect("evaluate", e)
            passed = bool(e.gate_passed)
        if cfg.compress:
            # promote (register a release) only a model that passed its gates; otherwise still build
            # and benchmark the variants, so the report shows what compression would give
            ccfg = cfg.compress if passed is not False else cfg.compress.model_copy(update={"release": None})
            collect("compress", run_section(compress, ccfg, pools.compress, poll, model=model,
                                                  calibration=corpus.ref))
        omni_model = None
        if cfg.omni:  # the trained text model, composed with the encoders and taught to see (or hear)
            o = run_section(llm_train, cfg.omni, pools.omni, poll, base_model=model)
            collect("omni", o)
            omni_model = o.final_model
        verdict = {None: "not evaluated", True: "promoted", False: "rejected by gates"}[passed]
    return LifecycleResult(flow="lifecycle", artifacts=artifacts, reused=reused, flow_run_id=flow_run.get_id(),
                           mlflow_run_id=mlflow_run_id, model=model, verdict=verdict,
                           base_model_parameters=base.parameters, stages=stages, feedback_source=fed_back,
                           omni_model=omni_model)


if __name__ == "__main__":
    raise SystemExit(main(lifecycle, LifecycleConfig))
