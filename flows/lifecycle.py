"""The lifecycle flow: the main job. Runs every stage that exists, in order, on one config.

    raw corpus ─► ingest ─► base model ─► (distill, train, compress, evaluate as they land)
"""

from __future__ import annotations

from prefect import flow
from prefect.runtime import flow_run
from pydantic import Field

from flows.common import flow_lineage, main
from flows.report import FlowResult
from nexus_core.artifacts import raw_ref
from nexus_core.flowconfig import FlowConfig
from nexus_core.steps.base_model import BaseModelConfig
from nexus_core.steps.ingest import IngestConfig
from tasks.base_model import base_model
from tasks.ingest import ingest


class LifecycleConfig(FlowConfig):
    """Config of the lifecycle flow: one section per stage."""

    name: str = Field("tiny", description="Run name; artifact names derive from it")
    corpus: IngestConfig = Field(description="Raw corpus to ingest")
    base_model: BaseModelConfig = Field(default_factory=BaseModelConfig, description="Base model to start from")


@flow(name="lifecycle", log_prints=True)
def lifecycle(cfg: LifecycleConfig) -> FlowResult:
    """Raw text to a base model (and onwards, as stages land), every step a cached, traced artifact."""
    with flow_lineage(cfg) as mlflow_run_id:
        sources = {f"source_{i}": raw_ref(path) for i, path in enumerate(cfg.corpus.sources)}
        corpus = ingest(cfg.corpus, sources, name=f"{cfg.name}_corpus")
        base = base_model(cfg.base_model, corpus.ref, name=f"{cfg.name}_base")
        steps = {"ingest": corpus, "base_model": base}
    return FlowResult(
        flow="lifecycle",
        artifacts={k: r.ref for k, r in steps.items()},
        reused=[k for k, r in steps.items() if r.reused],
        flow_run_id=flow_run.get_id(),
        mlflow_run_id=mlflow_run_id,
        summary={"base_model_parameters": base.parameters},
    )


if __name__ == "__main__":
    raise SystemExit(main(lifecycle, LifecycleConfig))
