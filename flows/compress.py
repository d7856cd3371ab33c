"""The compress flow: a model → pruned / quantized variants → export → side-by-side benchmark → release.

    nexus run compress configs/compress/tiny.yaml                    # builds a tiny base offline
    nexus run compress configs/compress/base.yaml model=models/my_sft@v3
    nexus serve compress/tiny_int8@v1                                # serve any variant

In the lifecycle it takes the trained model (and the corpus for calibration) as refs. A release
needs ``heldout``: a dataset disjoint from the calibration and recovery data (checked by row hash
up front where the data is known, and again by the release step against the variants' lineage).
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from pydantic import Field, model_validator

from flows.common import flow_lineage, main
from flows.results import CompressResult
from nexus_core.artifacts import ArtifactRef, raw_ref
from nexus_core.compress.benchmark import BenchmarkConfig, run_benchmark
from nexus_core.compress.export import ExportConfig, run_export
from nexus_core.compress.prune import PruneConfig, run_prune
from nexus_core.compress.quantize import QuantizeConfig, run_quantize
from nexus_core.compress.release import ReleaseConfig, run_release
from nexus_core.config import FlowConfig, NexusModel, PathOrName
from nexus_core.contract import check_plan
from nexus_core.corpus.ingest import IngestConfig
from nexus_core.errors import ConfigError, InputError
from nexus_core.io import resolve_ref
from nexus_core.models.io import resolve_model
from nexus_core.train.base_model import BaseModelConfig, pretrained_ref
from tasks.base_model import base_model
from tasks.compress_benchmark import benchmark
from tasks.compress_export import export
from tasks.compress_prune import prune
from tasks.compress_quantize import quantize
from tasks.compress_release import release
from tasks.ingest import ingest


class VariantSpec(NexusModel):
    """One compressed variant: prune, quantize, or prune then quantize."""

    name: str = Field(pattern=r"^[a-z0-9_]+$", description="Variant name (artifact suffix, benchmark row)")
    prune: PruneConfig | None = Field(default=None, description="Pruning, applied first")
    quantize: QuantizeConfig | None = Field(default=None, description="Quantization, applied to the (pruned) model")

    @model_validator(mode="after")
    def _something(self) -> VariantSpec:
        if self.prune is None and self.quantize is None:
            raise ValueError(f"variant {self.name!r}: needs prune and/or quantize")
        if self.name in {"base", "heldout", "calibration", "benchmark"}:
            raise ValueError(f"variant name {self.name!r} is reserved")
        return self


class ExportSection(ExportConfig):
    """Export settings plus which model to export."""

    source: str = Field(default="base", description="'base' or a variant name (quantized variants export as fp32)")


class CompressConfig(FlowConfig):
    """Config of the compress flow."""

    name: str = Field(default="compress", description="Run name; artifact names derive from it")
    model: PathOrName | None = Field(default=None, description="Model dir or artifact spec (NAME@vN); unused when the flow "
                                                "gets a model ref; if both are absent a base is built from corpus")
    calibration: PathOrName | None = Field(default=None, description="Calibration dataset dir or spec (default: the corpus)")
    heldout: PathOrName | None = Field(default=None, description="Held-out dataset dir, file or spec for perplexity and "
                                      "accuracy; never the calibration data. Required by `release`")
    corpus: IngestConfig | None = Field(default=None, description="Raw corpus (tiny base and default calibration)")
    base_model: BaseModelConfig = Field(default_factory=BaseModelConfig, description="Base built when no model")
    variants: list[VariantSpec] = Field(default_factory=list, description="Compressed variants to make")
    export: ExportSection | None = Field(default=None, description="Export settings (None: no export)")
    benchmark: BenchmarkConfig = Field(default_factory=BenchmarkConfig, description="Benchmark settings")
    release: ReleaseConfig | None = Field(default=None, description="Register the chosen variant (None: no release)")

    @model_validator(mode="after")
    def _sources(self) -> CompressConfig:
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"variants: duplicate names in {names}")
        if self.export and self.export.source not in {"base", *names}:
            raise ValueError(f"export.source: {self.export.source!r} is not 'base' or a variant ({names})")
        return self


def check_heldout_plan(cfg: CompressConfig, calibration: ArtifactRef | None, heldout: ArtifactRef | None) -> None:
    """A release needs a held-out set; when it and the calibration data (or the corpus files it will be
    built from) are known, they must share no row."""
    from nexus_core.artifacts import raw_ref
    from nexus_core.compress.common import overlap

    if cfg.release is not None and cfg.heldout is None and heldout is None:
        raise ConfigError(["heldout: `release` needs a held-out set (heldout=PATH|NAME@vN) disjoint from the "
                           "calibration and recovery data; it no longer defaults to the calibration texts"])
    if heldout is None:
        return
    others = {}
    if calibration is not None:
        others[f"calibration {calibration.name}"] = (calibration, None)
    elif cfg.corpus is not None:
        for src in cfg.corpus.sources:
            if Path(src).is_file():
                others[f"corpus source {src}"] = (raw_ref(src), None)
    found = {}
    for label, other in others.items():
        try:
            found.update(overlap(heldout, {label: other}))
        except InputError:  # a source that is not a text table: the release step checks the built corpus
            continue
    if found:
        listed = "; ".join(f"{n} row(s) also in {label}" for label, n in found.items())
        raise InputError(f"compress: held-out set {heldout.name} ({heldout.uri}) overlaps the calibration/recovery "
                         f"data: {listed}. Use held-out rows the variants never saw")


def check_compress(cfg: CompressConfig, model: ArtifactRef | None, calibration: ArtifactRef | None,
                   heldout: ArtifactRef | None) -> list[str]:
    """Check the model, calibration and held-out data against every planned step before any runs; the plan."""
    check_heldout_plan(cfg, calibration, heldout)
    planned: list = []
    for v in cfg.variants:
        if v.prune:
            planned.append((run_prune, v.prune, {"model": model, "calibration": calibration}, f"{v.name}.prune"))
        if v.quantize:
            src = None if v.prune else model
            planned.append((run_quantize, v.quantize, {"model": src, "calibration": calibration},
                            f"{v.name}.quantize"))
    if cfg.export:
        src = model if cfg.export.source == "base" else None
        planned.append((run_export, ExportConfig(**cfg.export.model_dump(exclude={"source"})), {"model": src},
                        "export"))
    planned.append((run_benchmark, cfg.benchmark, {"base": model, "heldout": heldout}, "benchmark"))
    if cfg.release:
        planned.append((run_release, cfg.release, {}, "release"))
    check_plan(planned)
    return [label for _, _, _, label in planned]


@flow(name="compress", log_prints=True)
def compress(cfg: CompressConfig, model: ArtifactRef | None = None,
             calibration: ArtifactRef | None = None) -> CompressResult:
    """Compress ``model`` (or ``cfg.model``, or a tiny base) into benchmarked release variants."""
    with flow_lineage(cfg) as mlflow_run_id:
        steps: dict = {}
        corpus = None
        if model is None and cfg.model:
            model = resolve_model(cfg.model, "model")
        if calibration is None and cfg.calibration:
            calibration = resolve_ref(cfg.calibration, "calibration")
        given_heldout = resolve_ref(cfg.heldout, "heldout") if cfg.heldout else None
        plan = check_compress(cfg, model, calibration, given_heldout)
        if cfg.dry_run:
            print("compress plan: " + ", ".join(plan))
            return CompressResult.planned("compress", plan, mlflow_run_id)
        needs_model, needs_calibration = model is None, calibration is None
        if cfg.corpus is not None and (needs_model or needs_calibration):
            sources = {f"source_{i}": raw_ref(p) for i, p in enumerate(cfg.corpus.sources)}
            corpus = steps["ingest"] = ingest(cfg.corpus, sources, name=f"{cfg.name}_corpus")
        if model is None:
            if corpus is not None:
                steps["base_model"] = base_model(cfg.base_model, corpus.ref, name=f"{cfg.name}_base",
                                                pretrained=pretrained_ref(cfg.base_model))
                model = steps["base_model"].ref
            else:
                raise InputError("compress: no model: pass one, set `model=PATH|NAME@vN`, or give a `corpus` "
                                 "to build a tiny base")
        if calibration is None and corpus is not None:
            calibration = corpus.ref
        heldout = given_heldout  # never the calibration texts: quality must be measured on unseen rows

        variants: dict[str, ArtifactRef] = {}
        for v in cfg.variants:
            src = model
            if v.prune:
                steps[f"{v.name}.prune"] = prune(v.prune, src, calibration, name=f"{cfg.name}_{v.name}_pruned")
                src = steps[f"{v.name}.prune"].ref
            if v.quantize:
                steps[f"{v.name}.quantize"] = quantize(v.quantize, src, calibration, name=f"{cfg.name}_{v.name}")
                src = steps[f"{v.name}.quantize"].ref
            variants[v.name] = src
        if cfg.export:
            source = model if cfg.export.source == "base" else variants[cfg.export.source]
            export_cfg = ExportConfig(**cfg.export.model_dump(exclude={"source"}))
            steps["export"] = export(export_cfg, source, name=f"{cfg.name}_export")
        bench = steps["benchmark"] = benchmark(cfg.benchmark, model, variants, heldout, name=f"{cfg.name}_benchmark")
        released = None
        if cfg.release:
            rel = steps["release"] = release(cfg.release, bench.ref, {"base": model, **variants}, heldout,
                                             calibration, name=f"{cfg.name}_release")
            released = {"variant": rel.chosen, "registry": f"{rel.registry_name}/{rel.registry_version}"}
    return CompressResult.from_steps(
        "compress", steps, mlflow_run_id, extra={"model": model, **variants}, benchmark=bench.ref,
        variants=list(variants), released=released,
        ratios={r["model"]: {k: r[k] for k in ("size_ratio", "latency_ratio", "perplexity_ratio")} for r in bench.table})


if __name__ == "__main__":
    raise SystemExit(main(compress, CompressConfig))
