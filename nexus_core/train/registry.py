"""MLflow model registry entries for trained models."""

from __future__ import annotations

import json
from pathlib import Path

from nexus_core import lineage
from nexus_core.artifacts import ArtifactRef, read_manifest


def register_model(ref: ArtifactRef, registered_name: str, stage: str, extra_tags: dict[str, str] | None = None) -> str:
    """Register the model artifact ``ref`` as a version of ``registered_name``; returns the version.

    Idempotent: an existing version with the same artifact digest is returned. Tags carry lineage:
    the producing step's MLflow run, config hash, and every input (datasets, base model) by name,
    version and digest.
    """
    client = lineage.client()
    try:
        client.get_registered_model(registered_name)
    except Exception:  # mlflow raises RestException/MlflowException for "not found" depending on store
        client.create_registered_model(registered_name, description="Nexus LLM training stages (llm_train flow)")
    for mv in client.search_model_versions(f"name = '{registered_name}'"):
        if mv.tags.get("nexus.digest") == ref.digest:
            return str(mv.version)
    m = read_manifest(ref.uri)
    tags = {
        "nexus.artifact": f"{ref.name}@v{ref.version}", "nexus.digest": ref.digest, "nexus.stage": stage,
        "nexus.step": m.step, "nexus.config_hash": m.config_hash,
        "nexus.inputs": json.dumps({k: f"{v.name}@v{v.version}:{v.digest[:12]}" for k, v in m.inputs.items()}),
        **{f"nexus.input.{k}": v.uri for k, v in m.inputs.items()},
        **{f"metric.{k}": f"{v:.6g}" for k, v in m.metrics.items() if k in ("train_loss", "final_loss", "global_step")},
        **(extra_tags or {}),
    }
    version = client.create_model_version(registered_name, source=str(Path(ref.uri).resolve()),
                                          run_id=m.mlflow_run_id, tags={k: str(v)[:5000] for k, v in tags.items()},
                                          description=f"{stage} ({m.step.rsplit('.', 1)[-1]})")
    return str(version.version)
