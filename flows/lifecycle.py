"""The lifecycle flow: the main job. Every stage in order, on one config, each an artifact with lineage.

    raw corpus ─► ingest ─► base model ─► distill ─► llm_train (SFT LoRA, distillation)
               ─► evaluate (gates) ─► compress (release only when the gates pass)

Stages whose section is absent from the config are skipped. Each stage is its own flow (a subflow
here, nested in the Prefect UI and in MLflow), also runnable alone with ``nexus run <flow>``. A section
named in ``deployments`` runs as a run of that deployment on its work pool (:mod:`flows.sections`):
teacher collection on a CPU pool, training on a GPU pool. The lifecycle's ``budget_usd`` covers every
section, wherever it runs.
"""

from __future__ import annotations

from prefect import flow
from prefect.runtime import flow_run
from pydantic import Field

from flows.common import flow_lineage, main
from flows.compress import CompressConfig, check_compress, compress
from flows.distill import DistillConfig, check_distill, distill, source_refs
from flows.evaluate import EvaluateConfig, check_evaluate, evaluate
from flows.llm_train import LLMTrainConfig, check_stages, llm_train, queue, referenced_models
from flows.results import FlowResult, LifecycleResult
from flows.sections import SectionDeployments, run_section
from nexus_core.artifacts import raw_ref
from nexus_core.config import FlowConfig
from nexus_core.corpus.ingest import IngestConfig
from nexus_core.io import resolve_ref
from nexus_core.train.base_model import BaseModelConfig, pretrained_ref
from tasks.base_model import base_model
from tasks.ingest import ingest


class LifecycleConfig(FlowConfig):
    """Config of the lifecycle flow: one section per stage; a missing section skips that stage."""

    name: str = Field(default="tiny", description="Run name; artifact names derive from it")
    corpus: IngestConfig = Field(description="Raw corpus to ingest")
    base_model: BaseModelConfig = Field(default_factory=BaseModelConfig, description="Base model to start from")
    distill: DistillConfig | None = Field(default=None, description="Distillation data pipeline → SFT dataset")
    train: LLMTrainConfig | None = Field(default=None, description="Training stages; the SFT dataset is dataset `sft`")
    evaluate: EvaluateConfig | None = Field(default=None, description="Evaluation of the trained model, with gates")
    compress: CompressConfig | None = Field(default=None, description="Compression; its release runs only if gates pass")
    deployments: SectionDeployments = Field(default_factory=SectionDeployments,
                                            description="Sections to run as deployment runs on work pools")


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
    return plan


@flow(name="lifecycle", log_prints=True)
def lifecycle(cfg: LifecycleConfig) -> LifecycleResult:
    """Raw text to an evaluated, compressed model, every step a cached, traced artifact.

    Every stage's up-front checks run before the first stage starts; a dry run stops there.
    """
    with flow_lineage(cfg) as mlflow_run_id:
        sources = {f"source_{i}": raw_ref(path) for i, path in enumerate(cfg.corpus.sources)}
        plan = check_lifecycle(cfg)
        if cfg.dry_run:
            print("lifecycle plan:\n  " + "\n  ".join(plan))
            return LifecycleResult.planned("lifecycle", plan, mlflow_run_id)
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
        verdict = {None: "not evaluated", True: "promoted", False: "rejected by gates"}[passed]
    return LifecycleResult(flow="lifecycle", artifacts=artifacts, reused=reused, flow_run_id=flow_run.get_id(),
                           mlflow_run_id=mlflow_run_id, model=model, verdict=verdict,
                           base_model_parameters=base.parameters, stages=stages)


if __name__ == "__main__":
    raise SystemExit(main(lifecycle, LifecycleConfig))
