"""The lifecycle flow: the main job. Every stage in order, on one config, each an artifact with lineage.

    raw corpus ─► ingest ─► base model ─► distill ─► llm_train (SFT LoRA, distillation)
               ─► evaluate (gates) ─► compress (release only when the gates pass)

Stages whose section is absent from the config are skipped. Each stage is its own flow (a subflow
here, nested in the Prefect UI and in MLflow), also runnable alone with ``nexus run <flow>``.
"""

from __future__ import annotations

from prefect import flow
from prefect.runtime import flow_run
from pydantic import Field

from flows.common import flow_lineage, main
from flows.compress import CompressConfig, compress
from flows.distill import DistillConfig, distill
from flows.evaluate import EvaluateConfig, evaluate
from flows.llm_train import LLMTrainConfig, llm_train
from flows.report import FlowResult
from nexus_core.artifacts import ArtifactRef, raw_ref
from nexus_core.config import FlowConfig
from nexus_core.corpus.ingest import IngestConfig
from nexus_core.train.base_model import BaseModelConfig
from tasks.base_model import base_model
from tasks.ingest import ingest


class LifecycleConfig(FlowConfig):
    """Config of the lifecycle flow: one section per stage; a missing section skips that stage."""

    name: str = Field("tiny", description="Run name; artifact names derive from it")
    corpus: IngestConfig = Field(description="Raw corpus to ingest")
    base_model: BaseModelConfig = Field(default_factory=BaseModelConfig, description="Base model to start from")
    distill: DistillConfig | None = Field(None, description="Distillation data pipeline → SFT dataset")
    train: LLMTrainConfig | None = Field(None, description="Training stages; the SFT dataset is dataset `sft`")
    evaluate: EvaluateConfig | None = Field(None, description="Evaluation of the trained model, with gates")
    compress: CompressConfig | None = Field(None, description="Compression; its release runs only if gates pass")


def _last_model(result: FlowResult) -> ArtifactRef:
    """The model the training queue ended with (its last non-reward stage)."""
    final = result.summary["final_model"]
    return next(ref for ref in result.artifacts.values() if ref.uri == final)


@flow(name="lifecycle", log_prints=True)
def lifecycle(cfg: LifecycleConfig) -> FlowResult:
    """Raw text to an evaluated, compressed model, every step a cached, traced artifact."""
    with flow_lineage(cfg) as mlflow_run_id:
        sources = {f"source_{i}": raw_ref(path) for i, path in enumerate(cfg.corpus.sources)}
        corpus = ingest(cfg.corpus, sources, name=f"{cfg.name}_corpus")
        base = base_model(cfg.base_model, corpus.ref, name=f"{cfg.name}_base")
        artifacts = {"ingest": corpus.ref, "base_model": base.ref}
        reused = [k for k, r in (("ingest", corpus), ("base_model", base)) if r.reused]
        summary: dict = {"base_model_parameters": base.parameters}
        model, sft = base.ref, None

        def collect(stage: str, result: FlowResult) -> None:
            artifacts.update({f"{stage}.{k}": v for k, v in result.artifacts.items()})
            reused.extend(f"{stage}.{k}" for k in result.reused)
            summary[stage] = result.summary

        if cfg.distill:
            d = distill(cfg.distill)
            collect("distill", d)
            sft = d.artifacts["sft"]
        if cfg.train:
            t = llm_train(cfg.train, base_model=base.ref, datasets={"sft": sft} if sft else None)
            collect("train", t)
            model = _last_model(t)
        passed = None
        if cfg.evaluate:
            e = evaluate(cfg.evaluate, model=model)
            collect("evaluate", e)
            passed = bool(e.summary["gate_passed"])
        if cfg.compress:
            # promote (register a release) only a model that passed its gates; otherwise still build
            # and benchmark the variants, so the report shows what compression would give
            ccfg = cfg.compress if passed is not False else cfg.compress.model_copy(update={"release": None})
            collect("compress", compress(ccfg, model=model, calibration=corpus.ref))
        summary["model"] = model.uri
        summary["verdict"] = {None: "not evaluated", True: "promoted", False: "rejected by gates"}[passed]
    return FlowResult(flow="lifecycle", artifacts=artifacts, reused=reused, flow_run_id=flow_run.get_id(),
                      mlflow_run_id=mlflow_run_id, summary=summary)


if __name__ == "__main__":
    raise SystemExit(main(lifecycle, LifecycleConfig))
