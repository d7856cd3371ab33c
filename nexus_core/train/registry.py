"""MLflow model registry entries for trained models (real ``mlflow.transformers`` models)."""

from __future__ import annotations

import json

from nexus_core.artifacts import ArtifactRef, read_manifest
from nexus_core.models.registry import register_model_version


def register_model(ref: ArtifactRef, registered_name: str, stage: str, extra_tags: dict[str, str] | None = None,
                   alias: str | None = None) -> str:
    """Register the model artifact ``ref`` as a version of ``registered_name``; returns the version.

    The version is an ``mlflow.transformers`` model logged into the training step's MLflow run
    (:func:`nexus_core.models.registry.register_model_version`). Idempotent by artifact digest. Tags
    carry lineage: the producing step, config hash, and every input (datasets, base model) by name,
    version and digest.
    """
    m = read_manifest(ref.uri)
    tags = {
        "nexus.artifact": f"{ref.name}@v{ref.version}", "nexus.stage": stage,
        "nexus.step": m.step, "nexus.config_hash": m.config_hash,
        "nexus.inputs": json.dumps({k: f"{v.name}@v{v.version}:{v.digest[:12]}" for k, v in m.inputs.items()}),
        **{f"nexus.input.{k}": v.uri for k, v in m.inputs.items()},
        **{f"metric.{k}": f"{v:.6g}" for k, v in m.metrics.items() if k in ("train_loss", "final_loss", "global_step")},
        **(extra_tags or {}),
    }
    return register_model_version(ref, registered_name, run_id=m.mlflow_run_id, tags=tags, alias=alias,
                                  description=f"{stage} ({m.step.rsplit('.', 1)[-1]})")
