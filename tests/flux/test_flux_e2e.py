"""Tiny end to end through the real flux flow (Prefect, MLflow, from_pretrained): generated images →
prepare → precompute → LoRA training → validation image → the LoRA loads into the pipeline and
changes its output. Plus resume from a checkpoint, SSTK input, and DreamBooth with generated class
images and prior preservation."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from flows.flux import FluxConfig, flux
from nexus_core import checkpoints, lineage
from nexus_core.artifacts import ArtifactRef, raw_ref, read_manifest
from nexus_core.config import load_config
from nexus_core.context import StepContext
from nexus_core.flux.mds import read_index, verify_shards
from nexus_core.flux.precompute import PrecomputeConfig, run_precompute
from nexus_core.flux.prepare import PrepareConfig, run_prepare
from nexus_core.flux.synthetic import make_shape_images
from nexus_core.flux.train import TrainConfig, run_train
from nexus_core.models.flux_tiny import load_flux_pipeline

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def flow_run(prefect_harness, tmp_path_factory):
    images = make_shape_images(tmp_path_factory.mktemp("imgs"), 6, size=40)
    (images / "9999.png").write_bytes(b"\x89PNG\r\n truncated")  # unreadable: skipped and counted
    (images / "9999.txt").write_text("broken")
    out = tmp_path_factory.mktemp("export")
    cfg = load_config(REPO / "configs/flux/tiny.yaml", FluxConfig,
                      [f"data.source={images}", "name=fe2e", f"output_dir={out}", "precompute.layout=flat",
                       "prepare.strict=false"])
    return cfg, flux(cfg), out


def test_flow_produces_every_artifact_with_lineage(flow_run):
    _, result, _ = flow_run
    assert list(result.artifacts) == ["pipeline", "prepare", "precompute", "train"]
    prep = read_manifest(result.artifacts["prepare"].uri)
    assert prep.rows == 6 and prep.result["skipped_by_reason"] == {"unreadable": 1}
    pre = read_manifest(result.artifacts["precompute"].uri)
    assert pre.inputs["prepared"].digest == prep.digest
    mds = pre.ref().path / "mds"
    assert verify_shards(mds) >= 2  # group_size 4 → two groups, flat layout
    assert all("/" not in s["raw_data"]["basename"] for s in read_index(mds)["shards"])
    meta = json.loads((pre.ref().path / "flux_meta.json").read_text())
    assert meta["latent_column"] == "latents_32" and meta["latent_shape"] == [16, 8, 8]
    assert meta["text_shape"] == [16, 48] and len(meta["dataset_mean"]) == 16
    train = read_manifest(result.artifacts["train"].uri)
    assert train.inputs["precomputed"].digest == pre.digest
    run = lineage.client().get_run(train.mlflow_run_id)
    assert run.data.tags["mlflow.parentRunId"] == result.mlflow_run_id
    for metric in ("train_loss", "learning_rate", "grad_norm"):
        assert [m.step for m in lineage.client().get_metric_history(train.mlflow_run_id, metric)] == [1, 2, 3, 4]
    logged = [a.path for a in lineage.client().list_artifacts(train.mlflow_run_id, "validation/step_000002")]
    assert logged == ["validation/step_000002/step_000002_0.png"]


def test_validation_images_and_exported_outputs(flow_run):
    from PIL import Image

    _, result, out = flow_run
    root = result.artifacts["train"].path
    assert result.global_step == 4 and result.validation_images == 2
    with Image.open(root / "validation" / "step_000004_0.png") as im:
        assert im.size == (32, 32)
    assert (out / "transformer_lora.safetensors").is_file() and (out / "train_config.json").is_file()
    assert (out / "comfyui" / "transformer_lora.safetensors").is_file()
    saved = json.loads((root / "train_config.json").read_text())
    assert saved["train"]["lora"]["rank"] == 4 and len(saved["loss_history"]) == 4


def test_saved_lora_loads_into_the_pipeline_and_changes_its_output(flow_run):
    _, result, _ = flow_run
    pipe = load_flux_pipeline(str(result.artifacts["pipeline"].path))

    def render():
        return pipe(prompt="a red square", height=32, width=32, num_inference_steps=2, max_sequence_length=16,
                    output_type="np", generator=torch.Generator().manual_seed(0)).images[0]

    before = render()
    pipe.load_lora_weights(str(result.artifacts["train"].path), weight_name="transformer_lora.safetensors")
    after = render()
    scales = {n: m.scaling["default_0"] for n, m in pipe.transformer.named_modules() if hasattr(m, "scaling")}
    assert set(scales.values()) == {4.0}  # tiny.yaml: rank 4, alpha 16
    assert "single_transformer_blocks.0.attn.to_qkv_mlp_proj" in scales
    assert before.shape == after.shape == (32, 32, 3)
    assert np.abs(before - after).max() > 1e-4


def _ref(uri):
    return ArtifactRef(uri=str(uri), kind="dataset", name="x", version=1, digest="d")


def test_resume_from_checkpoint_continues_the_step_count(flow_run, tmp_path):
    cfg, result, _ = flow_run
    inputs = {"precomputed": result.artifacts["precompute"], "pipeline": result.artifacts["pipeline"]}
    base = cfg.train.model_copy(update={"max_steps": 2, "checkpointing_steps": 1, "checkpoints_total_limit": 2,
                                        "validation_prompts": [], "checkpoint_dir": str(tmp_path / "ck"),
                                        "train_mode": "full", "gradient_accumulation_steps": 2})
    first = run_train(base, inputs=inputs, out_uri=str(tmp_path / "a"), ctx=StepContext.detached())
    assert (first.start_step, first.global_step) == (0, 2)
    assert [s for s, _ in checkpoints.complete(tmp_path / "ck")] == [1, 2]
    resumed = run_train(base.model_copy(update={"max_steps": 3, "resume_from_checkpoint": "latest"}),
                        inputs=inputs, out_uri=str(tmp_path / "b"), ctx=StepContext.detached())
    assert (resumed.start_step, resumed.global_step) == (2, 3)
    assert [s for s, _ in checkpoints.complete(tmp_path / "ck")] == [2, 3]  # total limit 2: step 1 rotated out
    history = json.loads((tmp_path / "b" / "train_config.json").read_text())["loss_history"]
    assert list(history) == ["3"]  # only the new step ran
    assert (tmp_path / "b" / "transformer" / "config.json").is_file() and (tmp_path / "b" / "transformer.safetensors").is_file()


def test_a_killed_train_run_resumes_from_its_work_dir(flow_run, monkeypatch):
    """Through the runner, without checkpoint_dir: checkpoints live in the step's work dir, which a
    killed run leaves behind and the re-run (same cache key) finds; publishing removes it."""
    import nexus_core.flux.train as train_step
    from nexus_core.cachekey import resume_key
    from nexus_core.runner import run_step, work_dir_for

    cfg, result, _ = flow_run
    inputs = {"precomputed": result.artifacts["precompute"], "pipeline": result.artifacts["pipeline"]}
    train_cfg = cfg.train.model_copy(update={"max_steps": 2, "checkpointing_steps": 1, "validation_prompts": [],
                                             "resume_from_checkpoint": "latest", "checkpoint_dir": None})
    rotate = checkpoints.rotate

    def killed_after_first_checkpoint(root, limit):
        rotate(root, limit)
        raise RuntimeError("killed")

    monkeypatch.setattr(train_step.checkpoints, "rotate", killed_after_first_checkpoint)
    with pytest.raises(RuntimeError, match="killed"):
        run_step(run_train, train_cfg, name="fe2e_killed", inputs=inputs)
    work = work_dir_for("models", "fe2e_killed", resume_key(run_train, train_cfg, inputs))
    assert [s for s, _ in checkpoints.complete(work / "checkpoints")] == [1]
    monkeypatch.setattr(train_step.checkpoints, "rotate", rotate)
    resumed = run_step(run_train, train_cfg.model_copy(update={"max_steps": 3}), name="fe2e_killed", inputs=inputs)
    assert (resumed.start_step, resumed.global_step, resumed.ref.version) == (1, 3, 1)  # more steps: same work dir
    assert not work.exists()  # published: its checkpoints are no longer needed


def test_sstk_list_prepare(tmp_path):
    listing = make_shape_images(tmp_path / "sstk", 3, size=24, layout="sstk")
    (tmp_path / "sstk" / "0001.png.json").unlink()  # missing caption: skipped with its reason
    res = run_prepare(PrepareConfig(source="sstk", size=16, min_size=20, strict=False), inputs={"source": raw_ref(listing)},
                      out_uri=str(tmp_path / "out"), ctx=StepContext.detached())
    assert (res.kept, res.skipped, res.skipped_by_reason) == (2, 1, {"caption": 1})
    import polars as pl

    table = pl.read_parquet(tmp_path / "out" / "data.parquet")
    assert table["caption"].to_list()[0] == "a red square" and table["status"].to_list() == ["ok", "skipped", "ok"]


def test_dreambooth_with_generated_class_images_and_prior_preservation(flow_run, tmp_path):
    _, result, _ = flow_run
    pipe = result.artifacts["pipeline"]
    inst = make_shape_images(tmp_path / "inst", 2, size=32, layout="plain")
    prep = run_prepare(PrepareConfig(source="dreambooth", instance_prompt="a sks square", class_prompt="a square",
                                     num_class_images=2, generate_class_images=True, class_generation_steps=1,
                                     size=32), inputs={"source": raw_ref(inst), "pipeline": pipe},
                       out_uri=str(tmp_path / "prep"), ctx=StepContext.detached())
    assert (prep.kept, prep.generated_class_images) == (4, 2)
    pre = run_precompute(PrecomputeConfig(resolution=32, batch_size=4, max_sequence_length=16, save_dtype="bfloat16",
                                          device="cpu"),
                         inputs={"prepared": _ref(tmp_path / "prep"), "pipeline": pipe}, out_uri=str(tmp_path / "pre"),
                         ctx=StepContext.detached())
    assert pre.rows == 4 and pre.groups == 1
    res = run_train(TrainConfig(resolution=32, batch_size=2, max_steps=1, prior_preservation=True,
                                distillation=True, loss={"base": "huber", "weighting": "cosmap"},
                                gradient_checkpointing=True,
                                lora={"rank": 2, "alpha": 2}, checkpoint_dir=str(tmp_path / "ck"), device="cpu"),
                    inputs={"precomputed": _ref(tmp_path / "pre"), "pipeline": pipe}, out_uri=str(tmp_path / "t"),
                    ctx=StepContext.detached())
    assert res.global_step == 1 and np.isfinite(res.final_loss)
    assert (tmp_path / "t" / "transformer_lora.safetensors").is_file()


def test_precompute_resumes_by_shard_group(flow_run, tmp_path):
    from nexus_core.errors import InputError

    _, result, _ = flow_run
    inputs = {"prepared": result.artifacts["prepare"], "pipeline": result.artifacts["pipeline"]}
    cfg = PrecomputeConfig(resolution=32, batch_size=2, max_sequence_length=16, group_size=2, layout="nested",
                           device="cpu")
    ctx = StepContext.detached(work_dir=tmp_path / "work")  # the runner hands a re-run the same work dir
    with pytest.raises(InputError, match="max_groups=1"):  # an interrupted run: one group finished
        run_precompute(cfg.model_copy(update={"max_groups": 1}), inputs=inputs, out_uri=str(tmp_path / "a"), ctx=ctx)
    res = run_precompute(cfg, inputs=inputs, out_uri=str(tmp_path / "b"), ctx=ctx)
    assert (res.groups, res.resumed_groups, res.rows) == (3, 1, 6)
    names = [s["raw_data"]["basename"] for s in read_index(tmp_path / "b" / "mds")["shards"]]
    assert names[0].startswith("groups/00000/") and verify_shards(tmp_path / "b" / "mds") == len(names)


def test_second_flow_run_is_served_from_cache(flow_run):
    cfg, result, _ = flow_run
    again = flux(cfg)
    assert again.artifacts == result.artifacts
    assert again.flow_run_id != result.flow_run_id
