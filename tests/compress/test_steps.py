"""Compress steps on a tiny model, through the real spine (manifests, MLflow, catalog), no Prefect."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from nexus_core.artifacts import ArtifactRef, raw_ref
from nexus_core.compress.prune import PruneConfig, run_prune
from nexus_core.compress.quantize import QuantizeConfig, run_quantize
from nexus_core.config import load_config
from nexus_core.errors import ConfigError, InputError, StepError
from nexus_core.models.compressed import load_compressed
from nexus_core.models.io import load_causal_lm
from nexus_core.models.tiny import TinyLLMConfig, build_tiny_llm
from nexus_core.runner import run_step

TEXTS = [f"sample {i}: the cat sat on the mat while a dog ran in the park and models learn from data"
         for i in range(12)]


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ArtifactRef]:
    root = tmp_path_factory.mktemp("compress")
    model = build_tiny_llm(root / "model", TEXTS, TinyLLMConfig(vocab_size=300, num_hidden_layers=3))
    (root / "calib").mkdir()
    pl.DataFrame({"text": TEXTS}).write_parquet(root / "calib" / "data.parquet")
    return {"model": raw_ref(model), "calibration": raw_ref(root / "calib")}


def _generates(path: str) -> list[int]:
    model, tok, _ = load_compressed(path)
    ids = tok("the cat", return_tensors="pt")["input_ids"]
    out = model.generate(input_ids=ids, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                         pad_token_id=tok.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


def test_structured_pruning_really_shrinks_the_saved_model(assets: dict[str, ArtifactRef]) -> None:
    cfg = PruneConfig(method="structured", sparsity=0.5, recovery={"steps": 1, "batch_size": 2})
    res = run_step(run_prune, cfg, name="t_struct", inputs=assets)
    model, _ = load_causal_lm(res.ref.uri, int8=False)  # the plain from_pretrained path
    assert res.params_after < 0.8 * res.params_before
    assert sum(p.numel() for p in model.parameters()) == res.params_after
    assert model.config.intermediate_size == 64 and model.config.num_key_value_heads == 1
    assert model.config.num_attention_heads == 2 and model.config.head_dim == 16
    assert len(_generates(res.ref.uri)) == 4
    assert res.recovery_losses and "ppl_after" in res.metrics


def test_magnitude_pruning_reaches_target_sparsity_through_recovery(assets: dict[str, ArtifactRef]) -> None:
    cfg = PruneConfig(method="magnitude", sparsity=0.6, scope="layer", recovery={"steps": 2, "batch_size": 2})
    res = run_step(run_prune, cfg, name="t_mag", inputs=assets)
    assert res.sparsity == pytest.approx(0.6, abs=0.01)  # masks re-applied after every recovery step
    assert res.params_after == res.params_before
    assert len(_generates(res.ref.uri)) == 4


def test_layer_drop_removes_the_least_important_block(assets: dict[str, ArtifactRef]) -> None:
    res = run_step(run_prune, PruneConfig(method="layer_drop", drop_layers=1), name="t_drop", inputs=assets)
    scores = [res.metrics[f"importance_layer_{i}"] for i in range(3)]
    assert res.dropped_layers == [scores.index(min(scores))]
    model, _ = load_causal_lm(res.ref.uri, int8=False)
    assert model.config.num_hidden_layers == 2 and len(model.model.layers) == 2
    assert len(_generates(res.ref.uri)) == 4


@pytest.mark.parametrize("method", ["int8_dynamic", "int8_static", "mixed"])
def test_int8_variants_load_generate_and_are_smaller(assets: dict[str, ArtifactRef], method: str) -> None:
    cfg = QuantizeConfig(method=method, calibration_rows=4, keep_fraction=0.25)
    res = run_step(run_quantize, cfg, name=f"t_{method}", inputs=assets)
    model, _, meta = load_compressed(res.ref.uri)
    assert meta["method"] == method
    assert [m for m in model.modules() if ".quantized" in type(m).__module__]  # a real int8 runtime
    assert res.int8_bytes < res.fp32_bytes  # every file of each artifact counted
    assert not list(res.ref.path.glob("*.safetensors"))  # no fp32 copy: the weights are all in quantized/
    if method == "mixed":
        assert len(res.kept_fp32) == round(0.25 * 21) and res.quantized_modules == 21 - len(res.kept_fp32)
    if method != "int8_dynamic":  # calibrated methods measure quality; int8 must stay close to fp32
        assert res.metrics["ppl_int8"] == pytest.approx(res.metrics["ppl_fp32"], rel=0.05)
    assert len(_generates(res.ref.uri)) == 4
    # and the float model rebuilt from the int8 values (what export and the registry copy use)
    assert load_causal_lm(res.ref.uri, int8=False)[0].config.num_hidden_layers == 3


def test_server_serves_an_int8_variant(assets: dict[str, ArtifactRef]) -> None:
    import httpx

    from nexus_core.serve import serve_in_thread
    from nexus_core.serve.app import create_app

    res = run_step(run_quantize, QuantizeConfig(method="int8_dynamic"), name="t_int8_serve",
                   inputs={"model": assets["model"]})
    app = create_app({"int8": res.ref.uri})
    eng = app.state.engines["int8"]
    assert any(".quantized" in type(m).__module__ for m in eng.model.modules())  # the int8 runtime
    with serve_in_thread(app) as url:
        r = httpx.post(f"{url}/completions", json={"model": "int8", "prompt": "the cat", "max_tokens": 3}, timeout=60)
    app.state.close()
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in {"stop", "length"}


@pytest.mark.parametrize("sparsity", [0.0, 1.0, 1.5, -0.1])
def test_sparsity_outside_open_interval_is_rejected(tmp_path: Path, sparsity: float) -> None:
    cfg_file = tmp_path / "prune.yaml"
    cfg_file.write_text(f"method: magnitude\nsparsity: {sparsity}\n")
    with pytest.raises(ConfigError, match="sparsity"):
        load_config(cfg_file, PruneConfig)


def test_missing_calibration_and_weights_are_clear_errors(assets: dict[str, ArtifactRef], tmp_path: Path) -> None:
    only_model = {"model": assets["model"]}
    with pytest.raises(InputError, match="calibration data missing"):
        run_step(run_quantize, QuantizeConfig(method="int8_static"), name="t_bad", inputs=only_model)
    with pytest.raises(InputError, match="calibration data missing"):
        run_step(run_prune, PruneConfig(method="layer_drop"), name="t_bad", inputs=only_model)
    empty = tmp_path / "noweights"
    empty.mkdir()
    (empty / "config.json").write_text((assets["model"].path / "config.json").read_text())
    with pytest.raises(InputError, match="without weights"):
        run_step(run_prune, PruneConfig(method="magnitude"), name="t_bad", inputs={"model": raw_ref(empty)})


def test_contract_refuses_a_dir_that_is_no_model_before_any_work(tmp_path: Path) -> None:
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "README.md").write_text("not a model")
    with pytest.raises(InputError, match=r"input 'model' .*no config.json"):
        run_step(run_quantize, QuantizeConfig(method="int8_dynamic"), name="t_bad",
                 inputs={"model": raw_ref(tmp_path / "notes")})


def test_nf4_on_cpu_says_why(assets: dict[str, ArtifactRef]) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: NF4 would run")
    with pytest.raises(StepError, match="nf4 needs a CUDA GPU"):
        run_step(run_quantize, QuantizeConfig(method="nf4"), name="t_nf4", inputs={"model": assets["model"]})


def test_export_folds_a_lora_adapter_into_merged_safetensors(assets: dict[str, ArtifactRef], tmp_path: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from nexus_core.compress.export import ExportConfig, run_export

    base = AutoModelForCausalLM.from_pretrained(str(assets["model"].path))
    peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits
    cfg = ExportConfig(formats=["safetensors", "coreml"])
    res = run_step(run_export, cfg, name="t_export_lora", inputs={"model": raw_ref(tmp_path / "adapter")})
    assert res.formats["safetensors"] == "ok" and res.formats["coreml"] == "unavailable"
    merged = AutoModelForCausalLM.from_pretrained(str(res.ref.path))
    assert not (res.ref.path / "adapter_config.json").exists()
    with torch.no_grad():
        got = merged(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5)  # the LoRA delta is in the merged weights
