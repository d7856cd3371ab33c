"""The compress flow on the tiny preset: variants, ONNX parity, side-by-side benchmark, MLflow registry."""

from __future__ import annotations

import json

import polars as pl
import pytest

from flows.common import load_flow_config
from flows.compress import CompressConfig, compress
from nexus_core import lineage
from nexus_core.artifacts import list_versions, read_manifest
from nexus_core.io import load_table

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # a whole flow: ~1-3 min on 2 cores


@pytest.fixture(scope="module")
def first_run(prefect_harness, repo):
    cfg = load_flow_config(CompressConfig, str(repo / "configs/compress/tiny.yaml"),
                           [f"corpus.sources=[{repo / 'data/raw/scientific/abstracts.jsonl'}]", "name=ct",
                            f"heldout={repo / 'data/raw/eval/tiny_validation.jsonl'}"])
    # Two variants keep the test short; tests/compress/test_steps.py covers every method.
    keep = [v for v in cfg.variants if v.name in {"structured", "int8"}]
    cfg = cfg.model_copy(update={"variants": keep})
    return cfg, compress(cfg)


def test_benchmark_table_compares_every_variant_with_the_base(first_run):
    _, result = first_run
    table = load_table(result.artifacts["benchmark"])
    assert table["model"].to_list() == ["base", "structured", "int8"]
    rows = {r["model"]: r for r in table.to_dicts()}
    assert rows["base"]["size_ratio"] == 1.0
    assert rows["structured"]["params_ratio"] < 0.8  # structured pruning shrank the model
    assert rows["int8"]["size_ratio"] < 1.0 and rows["int8"]["quantization"] == "int8_dynamic"
    for col in ("latency_p50_ms", "latency_iqr_ms", "latency_ratio_iqr", "ttft_ms", "tokens_per_s_b1", "tokens_per_s_b4", "perplexity",
                "accuracy", "peak_mem_mb"):
        assert table[col].null_count() == 0, col
    report = (result.artifacts["benchmark"].path / "report.md").read_text()
    assert "| structured |" in report and "latency_ratio" in report and "1 torch threads (pinned)" in report
    assert set(table["heldout_rows"].to_list()) == {8}  # measured on the held-out set, not the calibration corpus
    bench_run = lineage.client().get_run(read_manifest(result.artifacts["benchmark"].uri).mlflow_run_id)
    assert "int8.size_ratio" in bench_run.data.metrics


def test_onnx_export_matches_pytorch_and_unavailable_formats_say_why(first_run):
    cfg, result = first_run
    export = result.artifacts["export"]
    rows = {r["format"]: r for r in load_table(export).to_dicts()}
    assert rows["onnx"]["status"] == "ok" and rows["onnx"]["max_abs_diff"] <= cfg.export.parity_atol
    assert (export.path / "onnx" / "model.onnx").is_file()
    assert rows["tensorrt"]["status"] == "unavailable" and "TensorRT" in rows["tensorrt"]["reason"]
    # exported from the structured variant: the merged safetensors at the root are the pruned shape
    config = json.loads((export.path / "config.json").read_text())
    assert config["intermediate_size"] == 64


def test_release_registers_the_chosen_variant_with_lineage(first_run):
    _, result = first_run
    release = json.loads((result.artifacts["release"].path / "release.json").read_text())
    chosen_ref = result.artifacts[release["chosen"]] if release["chosen"] != "base" else result.artifacts["model"]
    mv = lineage.client().get_model_version(release["registry_name"], release["registry_version"])
    assert mv.source.endswith("/registered_model")  # a copy in MLflow's artifact store
    assert mv.tags["nexus.digest"] == chosen_ref.digest
    assert mv.run_id == read_manifest(chosen_ref.uri).mlflow_run_id  # the run that made it
    alias = lineage.client().get_model_version_by_alias(release["registry_name"], "champion")
    assert alias.version == mv.version
    bench = pl.DataFrame(load_table(result.artifacts["benchmark"]))
    smallest_ok = bench.filter(pl.col("perplexity_ratio") <= 1.5).sort("size_mb")["model"][0]
    assert release["chosen"] == smallest_ok
    assert "held-out perplexity ratio <= 1.5 (on 8 rows of tiny_validation.jsonl)" in release["reason"]
    assert "shares no row" in release["reason"] and "ct_corpus" in release["reason"]


def test_second_run_is_served_from_cache(first_run):
    cfg, result = first_run
    again = compress(cfg)
    assert again.artifacts == result.artifacts
    assert again.flow_run_id != result.flow_run_id
    for name in ("ct_benchmark", "ct_export", "ct_release", "ct_int8", "ct_structured_pruned"):
        assert list_versions("compress", name) == [1], name  # nothing recomputed, nothing re-registered
