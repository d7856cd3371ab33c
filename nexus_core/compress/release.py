"""Release: choose a variant from the benchmark table and register it in the MLflow model registry.

Inputs: ``benchmark`` (the benchmark artifact), ``heldout`` (the held-out set the benchmark measured
quality on), optionally ``calibration`` (the data the variants were calibrated and recovered on), and
the model artifacts the benchmark compared, under the same names (``base`` and each variant).

Before choosing, the release checks that the held-out set is what the benchmark used (by digest) and
that it shares **no row** with any calibration or recovery data: the ``calibration`` input and every
``calibration`` input found in the lineage of each variant (its prune and quantize steps' manifests),
compared by the sha256 of each text. An overlap is an InputError naming the datasets and the count.

The policy picks the smallest model on disk whose held-out perplexity is within ``max_perplexity_ratio``
of the base (and, optionally, whose paired p50 latency ratio is within ``max_latency_ratio``), or
the variant named in ``choose``. The reason string lists exactly the checks that ran. The registered
version is an ``mlflow.transformers`` model (loadable on any machine, :mod:`nexus_core.models.registry`)
and carries its lineage: artifact name/version/digest, producing step's MLflow run, config hash,
inputs. ``alias`` (default ``champion``) moves to it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import Field

from nexus_core import contract  # contract.table: `table` is a local name here
from nexus_core.artifacts import ArtifactRef, atomic_write_json, read_manifest
from nexus_core.compress.common import load_rows, overlap
from nexus_core.config import NexusModel
from nexus_core.context import StepContext
from nexus_core.contract import step
from nexus_core.errors import InputError
from nexus_core.models.registry import register_model_version
from nexus_core.runner import StepResult

RESERVED = {"benchmark", "heldout", "calibration"}  # input names that are not models


class ReleaseConfig(NexusModel):
    """How to choose and where to register."""

    registry_name: str = Field(default="nexus-compressed", description="Registered model name in MLflow")
    choose: str | None = Field(default=None, description="Release this model by name instead of applying the policy")
    max_perplexity_ratio: float = Field(default=1.05, gt=0, description="Candidates must keep held-out ppl <= base * this")
    max_latency_ratio: float | None = Field(default=None, gt=0, description="Candidates must keep p50 latency <= base * this")
    alias: str | None = Field(default="champion", description="Registry alias set on the new version (None: no alias)")


class ReleaseResult(StepResult):
    """What was released."""

    chosen: str
    model_uri: str
    registry_name: str
    registry_version: str
    reason: str
    checks: list[str] = Field(default_factory=list, description="Every check that ran, as stated in the reason")


def choose_variant(table: list[dict[str, Any]], cfg: ReleaseConfig, heldout: str = "the held-out set") -> tuple[str, str]:
    """Name of the model to release and why (pure function over the benchmark rows).

    The reason names only what was checked: a model without a measured perplexity ratio is not a
    candidate (it cannot be said to meet the bound)."""
    names = [r["model"] for r in table]
    by_name = {r["model"]: r for r in table}
    if cfg.choose:
        if cfg.choose not in names:
            raise InputError(f"release: choose={cfg.choose!r} is not in the benchmark (models: {', '.join(names)})")
        r = by_name[cfg.choose]
        ppl = r.get("perplexity_ratio")
        measured = (f"held-out perplexity ratio {ppl:.4g} on {heldout}" if ppl is not None
                    else "no held-out perplexity measured")
        return cfg.choose, (f"chosen explicitly (choose={cfg.choose}); quality/latency bounds not applied; "
                            f"{measured}, size ratio {r['size_ratio']:.3g}, p50 latency ratio {r['latency_ratio']:.3g}")
    bounds = [f"held-out perplexity ratio <= {cfg.max_perplexity_ratio} (on {heldout})"]
    if cfg.max_latency_ratio is not None:
        bounds.append(f"paired p50 latency ratio <= {cfg.max_latency_ratio}")
    unmeasured = [r["model"] for r in table if r.get("perplexity_ratio") is None]
    ok = [r for r in table if r.get("perplexity_ratio") is not None
          and r["perplexity_ratio"] <= cfg.max_perplexity_ratio
          and (cfg.max_latency_ratio is None or r["latency_ratio"] <= cfg.max_latency_ratio)]
    skipped = f"; not candidates (no perplexity measured): {', '.join(unmeasured)}" if unmeasured else ""
    if not ok:
        return "base", f"no model met {' and '.join(bounds)}; releasing the base{skipped}"
    best = min(ok, key=lambda r: (r["size_mb"], r["latency_p50_ms"]))
    return best["model"], (f"smallest on disk ({best['size_mb']:.3g} MB, size ratio {best['size_ratio']:.3g}) of "
                           f"{len(ok)}/{len(table)} models meeting {' and '.join(bounds)}: perplexity ratio "
                           f"{best['perplexity_ratio']:.4g}, p50 latency ratio {best['latency_ratio']:.3g}{skipped}")


def used_data(name: str, ref: ArtifactRef) -> dict[str, tuple[ArtifactRef, str | None]]:
    """Calibration and recovery datasets in the compress lineage of model ``ref``: the ``calibration``
    inputs of its prune/quantize steps, following their ``model`` inputs back (``label -> (dataset,
    text column)``). A model without a manifest (passed by path) contributes nothing."""
    found: dict[str, tuple[ArtifactRef, str | None]] = {}
    seen: set[str] = set()
    todo = [ref]
    while todo:
        cur = todo.pop()
        if cur.uri in seen:
            continue
        seen.add(cur.uri)
        try:
            manifest = read_manifest(cur.uri)
        except Exception:  # noqa: BLE001 - no manifest: a model given by path; nothing to follow
            continue
        kind = manifest.step.rpartition(".")[2]
        if kind not in {"run_prune", "run_quantize"}:
            continue
        cal = manifest.inputs.get("calibration")
        if cal is not None:
            recovery = kind == "run_prune" and manifest.config.get("recovery", {}).get("steps", 0)
            use = "calibration + recovery data" if recovery else "calibration data"
            found[f"{name}: {kind.removeprefix('run_')} {use} {cal.name}@v{cal.version}"] = (
                cal, manifest.config.get("calibration_column"))
        if manifest.inputs.get("model") is not None:
            todo.append(manifest.inputs["model"])
    return found


def check_heldout(heldout: ArtifactRef | None, benchmark: ArtifactRef, calibration: ArtifactRef | None,
                  models: dict[str, ArtifactRef]) -> list[str]:
    """Refuse a release without a held-out set, with another one than the benchmark's, or with one that
    shares rows with calibration/recovery data; return the checks that ran, as sentences."""
    if heldout is None:
        raise InputError("release: needs a held-out set (input 'heldout'; the compress flow's `heldout=PATH|NAME@vN`) "
                         "disjoint from the calibration and recovery data; none given")
    checks = []
    try:
        bench_heldout = read_manifest(benchmark.uri).inputs.get("heldout")
    except Exception:  # noqa: BLE001 - a benchmark given by path: its held-out set cannot be compared
        bench_heldout = None
    else:
        if bench_heldout is None or bench_heldout.digest != heldout.digest:
            used = f"{bench_heldout.name} ({bench_heldout.digest[:12]})" if bench_heldout else "no held-out set"
            raise InputError(f"release: the benchmark {benchmark.name}@v{benchmark.version} measured quality on "
                             f"{used}, not on the release's held-out set {heldout.name} ({heldout.digest[:12]})")
        checks.append("the benchmark measured quality on this held-out set (same digest)")
    others: dict[str, tuple[ArtifactRef, str | None]] = {}
    if calibration is not None:
        others[f"calibration {calibration.name}"] = (calibration, None)
    for name, ref in models.items():
        others.update(used_data(name, ref))
    if not others:
        checks.append("no calibration or recovery data in the inputs or the variants' lineage to compare with")
        return checks
    rows = load_rows(heldout).height
    found = overlap(heldout, others)
    if found:
        listed = "; ".join(f"{n} row(s) also in {label} ({others[label][0].uri})" for label, n in found.items())
        raise InputError(f"release: held-out set {heldout.name} ({heldout.uri}) overlaps the calibration/recovery "
                         f"data: {listed}. Use held-out rows the variants never saw")
    labels = sorted({label.split(": ", 1)[-1] for label in others})
    checks.append(f"held-out set {heldout.name} ({rows} rows) shares no row (sha256 of each text) with "
                  f"{', '.join(labels)}")
    return checks


# The model inputs come under the benchmark's row names (dynamic): checked against the chosen row below.
@step(area="compress", kind="release",
      inputs={"benchmark": contract.table("model", description="The benchmark artifact"),
              "heldout": contract.table(optional=True, description="The held-out set the benchmark measured "
                                                                    "quality on (required; optional here so the "
                                                                    "release can say why)"),
              "calibration": contract.table(optional=True, description="Calibration/recovery data of the variants")})
def run_release(cfg: ReleaseConfig, *, inputs: dict[str, ArtifactRef], out_uri: str,
                ctx: StepContext) -> ReleaseResult:
    """Check the held-out set, pick the variant, register it with its lineage, write ``release.json``."""
    models = {k: v for k, v in inputs.items() if k not in RESERVED}
    checks = check_heldout(inputs.get("heldout"), inputs["benchmark"], inputs.get("calibration"), models)
    table = load_rows(inputs["benchmark"]).to_dicts()
    heldout = inputs["heldout"]
    rows = {r.get("heldout_rows") for r in table} - {None}
    where = f"{max(rows) if rows else '?'} rows of {heldout.name}"
    chosen, policy = choose_variant(table, cfg, where)
    reason = f"{policy}. Checks: " + "; ".join(checks)
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
            "nexus.heldout": f"{heldout.name}@v{heldout.version}:{heldout.digest[:12]}",
            "nexus.producer_step": producer["step"], "nexus.config_hash": producer["config_hash"],
            "nexus.inputs": json.dumps(producer["inputs"]), "nexus.reason": reason,
            **{f"bench.{k}": f"{v:.6g}" for k, v in row.items() if isinstance(v, float)}}
    version = register_model_version(ref, cfg.registry_name, run_id=producer["mlflow_run_id"] or ctx.run_id,
                                     tags=tags, alias=cfg.alias, description=f"{chosen}: {reason}")
    atomic_write_json(Path(out_uri) / "release.json", {
        "chosen": chosen, "reason": reason, "checks": checks, "model": ref.model_dump(),
        "heldout": heldout.model_dump(), "registry_name": cfg.registry_name, "registry_version": version,
        "alias": cfg.alias, "lineage": producer, "benchmark_row": row})
    return ReleaseResult(chosen=chosen, model_uri=ref.uri, registry_name=cfg.registry_name,
                         registry_version=version, reason=reason, checks=checks,
                         metrics={"registry_version": float(version)})
