"""Release: choose a variant from the benchmark table and register it in the MLflow model registry.

Inputs: ``benchmark`` (the benchmark artifact) and the model artifacts it compared, under the same
names (``base`` and each variant). The policy picks the smallest model on disk whose perplexity is
within ``max_perplexity_ratio`` of the base (and, optionally, not slower than ``max_latency_ratio``),
or the variant named in ``choose``. The registered version is an ``mlflow.transformers`` model (loadable
on any machine, :mod:`nexus_core.models.registry`) and carries its lineage: artifact name/version/digest,
producing step's MLflow run, config hash, inputs. ``alias`` (default ``champion``) moves to it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import Field

from nexus_core import contract  # contract.table: `table` is a local name here
from nexus_core.artifacts import ArtifactRef, atomic_write_json, read_manifest
from nexus_core.config import NexusModel
from nexus_core.context import StepContext
from nexus_core.contract import step
from nexus_core.errors import InputError
from nexus_core.io import load_table
from nexus_core.models.registry import register_model_version
from nexus_core.runner import StepResult


class ReleaseConfig(NexusModel):
    """How to choose and where to register."""

    registry_name: str = Field(default="nexus-compressed", description="Registered model name in MLflow")
    choose: str | None = Field(default=None, description="Release this model by name instead of applying the policy")
    max_perplexity_ratio: float = Field(default=1.05, gt=0, description="Candidates must keep ppl <= base * this")
    max_latency_ratio: float | None = Field(default=None, gt=0, description="Candidates must keep p50 latency <= base * this")
    alias: str | None = Field(default="champion", description="Registry alias set on the new version (None: no alias)")


class ReleaseResult(StepResult):
    """What was released."""

    chosen: str
    model_uri: str
    registry_name: str
    registry_version: str
    reason: str


def choose_variant(table: list[dict[str, Any]], cfg: ReleaseConfig) -> tuple[str, str]:
    """Name of the model to release and why (pure function over the benchmark rows)."""
    names = [r["model"] for r in table]
    if cfg.choose:
        if cfg.choose not in names:
            raise InputError(f"release: choose={cfg.choose!r} is not in the benchmark (models: {', '.join(names)})")
        return cfg.choose, "chosen explicitly"
    ok = []
    for r in table:
        ppl_ok = r.get("perplexity_ratio") is None or r["perplexity_ratio"] <= cfg.max_perplexity_ratio
        lat_ok = cfg.max_latency_ratio is None or r["latency_ratio"] <= cfg.max_latency_ratio
        if ppl_ok and lat_ok:
            ok.append(r)
    if not ok:
        return "base", "no variant met the quality/latency bounds"
    best = min(ok, key=lambda r: (r["size_mb"], r["latency_p50_ms"]))
    return best["model"], (f"smallest on disk ({best['size_mb']:.3g} MB, ratio {best['size_ratio']:.3g}) with "
                           f"perplexity ratio <= {cfg.max_perplexity_ratio}")


# The model inputs come under the benchmark's row names (dynamic): checked against the chosen row below.
@step(area="compress", kind="release",
      inputs={"benchmark": contract.table("model", description="The benchmark artifact")})
def run_release(cfg: ReleaseConfig, *, inputs: dict[str, ArtifactRef], out_uri: str,
                ctx: StepContext) -> ReleaseResult:
    """Pick the variant, register it with its lineage, write ``release.json`` under ``out_uri``."""
    table = load_table(inputs["benchmark"]).to_dicts()
    chosen, reason = choose_variant(table, cfg)
    if chosen not in inputs:
        raise InputError(f"release: the benchmark row {chosen!r} has no matching model input "
                         f"(inputs: {', '.join(sorted(inputs))})")
    ref = inputs[chosen]
    row = next(r for r in table if r["model"] == chosen)
    try:
        manifest = read_manifest(ref.uri)
        producer = {"step": manifest.step, "mlflow_run_id": manifest.mlflow_run_id,
                    "config_hash": manifest.config_hash,
                    "inputs": {k: f"{v.name}@v{v.version}:{v.digest[:12]}" for k, v in manifest.inputs.items()}}
    except Exception:  # a model passed by path, not made by a step: register it without producer lineage
        producer = {"step": None, "mlflow_run_id": None, "config_hash": None, "inputs": {}}
    tags = {"nexus.artifact": f"{ref.name}@v{ref.version}", "nexus.digest": ref.digest, "nexus.variant": chosen,
            "nexus.benchmark": f"{inputs['benchmark'].name}@v{inputs['benchmark'].version}",
            "nexus.producer_step": producer["step"], "nexus.config_hash": producer["config_hash"],
            "nexus.inputs": json.dumps(producer["inputs"]), "nexus.reason": reason,
            **{f"bench.{k}": f"{v:.6g}" for k, v in row.items() if isinstance(v, float)}}
    version = register_model_version(ref, cfg.registry_name, run_id=producer["mlflow_run_id"] or ctx.run_id,
                                     tags=tags, alias=cfg.alias, description=f"{chosen}: {reason}")
    atomic_write_json(Path(out_uri) / "release.json", {
        "chosen": chosen, "reason": reason, "model": ref.model_dump(), "registry_name": cfg.registry_name,
        "registry_version": version, "alias": cfg.alias, "lineage": producer, "benchmark_row": row})
    return ReleaseResult(chosen=chosen, model_uri=ref.uri, registry_name=cfg.registry_name,
                         registry_version=version, reason=reason,
                         metrics={"registry_version": float(version)})
