"""Honest benchmark, portable INT8 and a release you can trust, on the shared tiny model (no Prefect):

- the benchmark interleaves the models over rounds (the base in every one), discards warm-up,
  reports median and IQR, and pins and prints torch's thread count;
- an INT8 artifact ships no fp32 copy and no pickle; its size counts every file; a released INT8
  version still loads through ``mlflow.transformers`` and runs the int8 runtime through Nexus;
- a release needs a held-out set disjoint (by row hash) from calibration and recovery data, and its
  reason names exactly the checks that ran.
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from nexus_core.artifacts import ArtifactRef, raw_ref
from nexus_core.compress.benchmark import BenchmarkConfig, run_benchmark
from nexus_core.compress.common import shipped_bytes
from nexus_core.compress.quantize import QuantizeConfig, run_quantize
from nexus_core.compress.release import ReleaseConfig, choose_variant, run_release
from nexus_core.errors import ConfigError, InputError
from nexus_core.runner import run_step

CALIBRATION = [f"calibration {i}: soil respiration rises after rewetting and we compare samples" for i in range(8)]
HELDOUT = [f"held out {i}: what is the capital of France? Paris. Which planet is largest? Jupiter."
           for i in range(6)]
REPO = Path(__file__).resolve().parents[2]


def _table(path: Path, texts: list[str]) -> ArtifactRef:
    path.mkdir(parents=True)
    pl.DataFrame({"text": texts}).write_parquet(path / "data.parquet")
    return raw_ref(path)


@pytest.fixture(scope="module")
def made(tiny_llm: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, ArtifactRef]:
    root = tmp_path_factory.mktemp("release")
    base = raw_ref(tiny_llm).model_copy(update={"kind": "model"})
    calibration = _table(root / "calibration", CALIBRATION)
    heldout = _table(root / "heldout", HELDOUT)
    int8 = run_step(run_quantize, QuantizeConfig(method="int8_static", calibration_rows=4), name="r_int8",
                    inputs={"model": base, "calibration": calibration}).ref
    bench = run_step(run_benchmark, BenchmarkConfig(new_tokens=4, rounds=3, warmup_rounds=1, batch_sizes=[1, 2],
                                                    heldout_rows=4, threads=1),
                     name="r_bench", inputs={"base": base, "int8": int8, "heldout": heldout}).ref
    return {"base": base, "calibration": calibration, "heldout": heldout, "int8": int8, "benchmark": bench}


def test_int8_artifact_has_no_fp32_copy_no_pickle_and_its_size_counts_every_file(made, tiny_llm: Path) -> None:
    from transformers import AutoModelForCausalLM

    from nexus_core.models.io import load_causal_lm

    out = made["int8"].path
    files = {str(f.relative_to(out)) for f in out.rglob("*") if f.is_file()}
    weights = {f for f in files if f.endswith((".safetensors", ".bin", ".pt", ".pth", ".pkl"))}
    assert weights == {"quantized/model_int8.safetensors"}  # the only weights: no fp32 copy, no pickle
    with pytest.raises(OSError):  # a bare from_pretrained fails loudly instead of running random weights
        AutoModelForCausalLM.from_pretrained(str(out))
    model, _ = load_causal_lm(out)  # the int8 runtime (serving, evaluation, benchmark)
    assert any(".quantized" in type(m).__module__ for m in model.modules())
    fp, _ = load_causal_lm(out, int8=False)  # float weights rebuilt from the int8 values
    assert not any(".quantized" in type(m).__module__ for m in fp.modules())
    row = {r["model"]: r for r in pl.read_parquet(made["benchmark"].path / "data.parquet").to_dicts()}
    everything = sum(f.stat().st_size for f in out.rglob("*") if f.is_file() and f.name != "manifest.json")
    assert row["int8"]["size_mb"] * 1e6 == pytest.approx(everything)  # tokenizer and config count too
    assert row["base"]["size_mb"] * 1e6 == pytest.approx(shipped_bytes(tiny_llm))
    assert row["int8"]["size_ratio"] < 1


def test_no_loader_unpickles() -> None:
    """No code of the project calls a loader with weights_only=False, torch.load without weights_only=True,
    or pickle.load(s) (checked on the syntax tree, so messages that mention them do not count)."""
    import ast

    offenders = []
    for folder in ("nexus_core", "flows", "tasks", "bench", "dashboards"):
        for file in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(file.read_text())):
                if not isinstance(node, ast.Call):
                    continue
                name = ast.unparse(node.func)
                kw = {k.arg: k.value for k in node.keywords}
                only = kw.get("weights_only")
                if isinstance(only, ast.Constant) and only.value is False:
                    offenders.append(f"{file}:{node.lineno}: {name}(weights_only=False)")
                if name == "torch.load" and not (isinstance(only, ast.Constant) and only.value is True):
                    offenders.append(f"{file}:{node.lineno}: torch.load without weights_only=True")
                if name in {"pickle.load", "pickle.loads", "dill.load", "dill.loads", "cloudpickle.loads"}:
                    offenders.append(f"{file}:{node.lineno}: {name}")
    assert not offenders


def test_benchmark_interleaves_rounds_with_the_base_and_pins_threads(made, monkeypatch) -> None:
    import torch

    from nexus_core.compress import benchmark

    seen: list[tuple[str, int]] = []
    real = benchmark._time_round

    def observed(m, cfg):  # noqa: ANN001, ANN202 - records what the real round measured, and under how many threads
        seen.append((m["name"], torch.get_num_threads()))
        return real(m, cfg)

    monkeypatch.setattr(benchmark, "_time_round", observed)
    before = torch.get_num_threads()
    cfg = BenchmarkConfig(new_tokens=2, rounds=3, warmup_rounds=1, batch_sizes=[1], threads=1)
    rows, settings = benchmark.measure({"base": str(made["base"].path), "int8": str(made["int8"].path)}, cfg)
    assert [n for n, _ in seen] == ["base", "int8", "int8", "base", "base", "int8", "int8", "base"]  # rotated
    assert {t for _, t in seen} == {1} and torch.get_num_threads() == before  # pinned, then restored
    assert settings["threads"] == 1 and settings["rounds"] == 3 and settings["cpu"]
    base, int8 = rows
    assert base["latency_ratio"] == 1.0 and base["latency_iqr_ms"] >= 0
    assert int8["latency_ratio"] > 0 and int8["latency_ratio_iqr"] >= 0 and int8["quantization"] == "int8_static"
    report = (made["benchmark"].path / "report.md").read_text()
    assert "1 torch threads (pinned)" in report and "3 timed rounds after 1 discarded warm-up" in report
    assert "latency_iqr_ms" in report and "latency_ratio_iqr" in report
    assert json.loads((made["benchmark"].path / "settings.json").read_text())["threads"] == 1


def test_release_without_heldout_is_refused(made) -> None:
    inputs = {"benchmark": made["benchmark"], "base": made["base"], "int8": made["int8"]}
    with pytest.raises(InputError, match="needs a held-out set"):
        run_step(run_release, ReleaseConfig(registry_name="t-rel-none"), name="r_rel_none", inputs=inputs)


def test_release_refuses_heldout_rows_the_variant_was_calibrated_on(made, tmp_path: Path) -> None:
    # the held-out set shares 2 rows with the calibration data the int8 variant's quantize step read
    leaky = _table(tmp_path / "leaky", HELDOUT[:3] + CALIBRATION[:2])
    bench = run_step(run_benchmark, BenchmarkConfig(new_tokens=2, rounds=2, warmup_rounds=0, batch_sizes=[1],
                                                    heldout_rows=2, threads=1),
                     name="r_bench_leaky", inputs={"base": made["base"], "int8": made["int8"], "heldout": leaky}).ref
    with pytest.raises(InputError) as err:  # found through the variant's lineage: no calibration input given
        run_step(run_release, ReleaseConfig(registry_name="t-rel-leak"), name="r_rel_leak",
                 inputs={"benchmark": bench, "heldout": leaky, "base": made["base"], "int8": made["int8"]})
    msg = str(err.value)
    assert "overlaps" in msg and "2 row(s)" in msg and "quantize calibration data" in msg
    assert made["calibration"].uri in msg
    # and a held-out set other than the one the benchmark measured is refused too
    with pytest.raises(InputError, match="measured quality on"):
        run_step(run_release, ReleaseConfig(registry_name="t-rel-leak"), name="r_rel_other",
                 inputs={"benchmark": made["benchmark"], "heldout": leaky, "base": made["base"], "int8": made["int8"]})


def test_release_states_its_checks_and_the_int8_version_loads_through_mlflow(made) -> None:
    import mlflow.transformers

    from nexus_core import lineage
    from nexus_core.models.io import load_causal_lm, resolve_model

    res = run_step(run_release, ReleaseConfig(registry_name="t-rel-int8", choose="int8"), name="r_rel_int8",
                   inputs={"benchmark": made["benchmark"], "heldout": made["heldout"],
                           "calibration": made["calibration"], "base": made["base"], "int8": made["int8"]})
    release = json.loads((res.ref.path / "release.json").read_text())
    assert release["chosen"] == "int8"
    reason = release["reason"]
    assert "chosen explicitly" in reason and "bounds not applied" in reason and "<=" not in reason
    assert "same digest" in reason and f"heldout ({len(HELDOUT)} rows) shares no row" in reason
    assert "calibration calibration" in reason and "quantize calibration data" in reason
    assert str(lineage.client().get_model_version_by_alias("t-rel-int8", "champion").version) == res.registry_version

    pipe = mlflow.transformers.load_model(f"models:/t-rel-int8/{res.registry_version}")  # plain MLflow
    assert pipe("What is", max_new_tokens=2, do_sample=False)[0]["generated_text"]
    mv = lineage.client().get_model_version("t-rel-int8", res.registry_version)
    assert "quantized/" in mv.tags["nexus.int8_runtime"] and "int8 only" in mv.tags["nexus.weights"]
    assert not list(made["int8"].path.glob("*.safetensors"))  # the store artifact stays int8 only
    resolved = resolve_model(f"models:/t-rel-int8/{res.registry_version}")
    model, _ = load_causal_lm(resolved.path)  # what serving/evaluation get from the registry: the int8 runtime
    assert any(".quantized" in type(m).__module__ for m in model.modules())


def test_policy_reason_claims_only_what_was_measured() -> None:
    rows = [{"model": "base", "size_mb": 1.0, "size_ratio": 1.0, "latency_p50_ms": 10.0, "latency_ratio": 1.0,
             "perplexity_ratio": None},
            {"model": "int8", "size_mb": 0.5, "size_ratio": 0.5, "latency_p50_ms": 9.0, "latency_ratio": 0.9,
             "perplexity_ratio": None}]
    chosen, reason = choose_variant(rows, ReleaseConfig())
    assert chosen == "base" and reason.startswith("no model met") and "not candidates" in reason
    rows[0]["perplexity_ratio"], rows[1]["perplexity_ratio"] = 1.0, 1.02
    chosen, reason = choose_variant(rows, ReleaseConfig(max_latency_ratio=0.95), "8 rows of val")
    assert chosen == "int8" and "perplexity ratio <= 1.05 (on 8 rows of val)" in reason
    assert "paired p50 latency ratio <= 0.95" in reason and "2/2" not in reason and "1/2 models" in reason


def test_flow_refuses_a_release_without_heldout_or_with_the_calibration_as_heldout(repo: Path) -> None:
    from flows.common import load_flow_config
    from flows.compress import CompressConfig, check_compress

    cfg = load_flow_config(CompressConfig, str(repo / "configs/compress/tiny.yaml"), ["heldout=null"])
    with pytest.raises(ConfigError, match="heldout: `release` needs a held-out set"):
        check_compress(cfg, None, None, None)
    corpus = raw_ref(repo / "data/raw/scientific/abstracts.jsonl")
    cfg = load_flow_config(CompressConfig, str(repo / "configs/compress/tiny.yaml"),
                           [f"corpus.sources=[{corpus.uri}]", f"heldout={corpus.uri}"])
    with pytest.raises(InputError, match=r"overlaps .*16 row\(s\) also in corpus source"):
        check_compress(cfg, None, None, corpus)  # before any step runs
    with pytest.raises(InputError, match=r"16 row\(s\) also in calibration"):
        check_compress(cfg, None, corpus, corpus)
    held = raw_ref(repo / "data/raw/eval/tiny_validation.jsonl")
    assert "release" in check_compress(cfg, None, corpus, held)  # disjoint: the plan goes ahead
