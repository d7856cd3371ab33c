"""Printing what a flow produced: manifests, MLflow run, and where to look next."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from nexus_core.artifacts import ArtifactRef
from nexus_core.settings import mlflow_uri, nexus_home


class FlowResult(BaseModel):
    """What every flow returns: the artifacts it produced (in order) and its run ids."""

    flow: str
    artifacts: dict[str, ArtifactRef]
    reused: list[str] = []
    flow_run_id: str | None = None
    mlflow_run_id: str | None = None
    summary: dict[str, Any] = {}

    @classmethod
    def from_steps(cls, flow: str, steps: dict[str, Any], mlflow_run_id: str | None, summary: dict[str, Any],
                   extra: dict[str, ArtifactRef] | None = None) -> FlowResult:
        """The result of a flow whose step results (``.ref``, ``.reused``) are ``steps``, in order.

        ``extra`` adds refs the flow was given or made without a step (listed first).
        """
        from prefect.runtime import flow_run

        return cls(flow=flow, artifacts={**(extra or {}), **{k: r.ref for k, r in steps.items()}},
                   reused=[k for k, r in steps.items() if r.reused], flow_run_id=flow_run.get_id(),
                   mlflow_run_id=mlflow_run_id, summary=summary)


def print_result(result: Any) -> None:
    """Print the manifests a flow produced and how to open the UIs."""
    if not isinstance(result, FlowResult):
        print(result)
        return
    print(f"\n{result.flow}: {len(result.artifacts)} artifact(s)")
    for step, ref in result.artifacts.items():
        note = " (reused)" if step in result.reused else ""
        rows = f", {ref.rows} rows" if ref.rows is not None else ""
        print(f"  {step:<16} {ref.name}@v{ref.version}{rows}{note}\n  {'':<16} {ref.uri}/manifest.json")
    for key, value in result.summary.items():
        print(f"  {key}: {value}")
    print(f"\nMLflow run {result.mlflow_run_id} in {mlflow_uri()}")
    print(f"Prefect flow run {result.flow_run_id}")
    print("Look at it:")
    print(f"  mlflow ui --backend-store-uri {mlflow_uri()}      # http://127.0.0.1:5000")
    print("  streamlit run dashboards/app.py                    # review, data, training, leaderboard, costs, lineage")
    print("  make up                                            # Prefect UI :4200, MLflow :5000, Streamlit :8501")
    print(f"  nexus data ls                                      # datasets and versions (state in {nexus_home()})")
