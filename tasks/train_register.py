"""Task: register a trained model in the MLflow model registry (idempotent by artifact digest)."""

from __future__ import annotations

from prefect import task

from nexus_core.artifacts import ArtifactRef
from nexus_core.train.registry import register_model


@task(name="train-register", tags=["nexus"])
def train_register(ref: ArtifactRef, registered_name: str, stage: str, flow_run_id: str | None = None) -> str:
    """Register ``ref`` as a version of ``registered_name``; returns the version number."""
    return register_model(ref, registered_name, stage, {"prefect.flow_run_id": flow_run_id or ""})
