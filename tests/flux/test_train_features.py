"""The flux train step's options on a tiny precomputed set, step-level (no flow): the LoRA file's
strength and targets as diffusers loads it, adapter-only checkpoints and bit-exact resume with a
scheduler, EMA, caption dropout and flips, validation settings, and the preflight errors."""

import json
import logging

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from nexus_core import checkpoints
from nexus_core.artifacts import ArtifactRef, raw_ref
from nexus_core.context import StepContext
from nexus_core.errors import ConfigError
from nexus_core.flux.precompute import PrecomputeConfig, run_precompute
from nexus_core.flux.prepare import PrepareConfig, run_prepare
from nexus_core.flux.synthetic import make_shape_images
from nexus_core.flux.train import TrainConfig, preflight, run_train
from nexus_core.models.flux_tiny import TinyFluxConfig, build_tiny_flux, load_flux_pipeline

pytestmark = pytest.mark.integration


def _ref(path, kind="dataset"):
    return ArtifactRef(uri=str(path), kind=kind, name="x", version=1, digest="d")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A tiny pipeline with two single-stream blocks, and 4 images precomputed with flipped latents."""
    root = tmp_path_factory.mktemp("flux_train")
    pipe = build_tiny_flux(root / "pipe", ["a red square"], TinyFluxConfig(num_single_layers=2))
    images = make_shape_images(root / "imgs", 4, size=32)
    run_prepare(PrepareConfig(size=32), inputs={"source": raw_ref(images)}, out_uri=str(root / "prep"),
                ctx=StepContext.detached())
    run_precompute(PrecomputeConfig(resolution=32, batch_size=4, max_sequence_length=16, flip=True, device="cpu"),
                   inputs={"prepared": _ref(root / "prep"), "pipeline": _ref(pipe)}, out_uri=str(root / "pre"),
                   ctx=StepContext.detached())
    return {"precomputed": _ref(root / "pre"), "pipeline": _ref(pipe, "model")}


BASE = dict(resolution=32, batch_size=2, max_steps=2, learning_rate=1e-2, device="cpu", validation_prompts=[],
            lora={"rank": 4, "alpha": 16})


def _train(data, tmp_path, name, **over):
    cfg = TrainConfig(**{**BASE, "checkpoint_dir": str(tmp_path / f"ck_{name}"), **over})
    return run_train(cfg, inputs=data, out_uri=str(tmp_path / name), ctx=StepContext.detached())


def test_lora_file_loads_into_diffusers_at_alpha_over_rank_and_reaches_single_stream_blocks(data, tmp_path):
    _train(data, tmp_path, "lora", max_steps=1)
    path = tmp_path / "lora" / "transformer_lora.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert (meta["transformer.r"], meta["transformer.lora_alpha"]) == (4, 16)
    pipe = load_flux_pipeline(str(data["pipeline"].path))
    base = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    pipe.load_lora_weights(str(tmp_path / "lora"), weight_name="transformer_lora.safetensors")
    scales = {n: m.scaling["default_0"] for n, m in pipe.transformer.named_modules() if hasattr(m, "scaling")}
    assert set(scales.values()) == {4.0}
    assert {"single_transformer_blocks.0.attn.to_qkv_mlp_proj", "single_transformer_blocks.1.attn.to_out",
            "transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_out.0"} <= set(scales)

    # the loaded adapter acts exactly like W + (alpha / rank) * B @ A, and the ComfyUI copy (alpha folded
    # into B, no metadata) like W + B' @ A
    lora = load_file(str(path))
    comfy = load_file(str(tmp_path / "lora" / "comfyui" / "transformer_lora.safetensors"))
    name = "single_transformer_blocks.1.attn.to_out"
    w = base[f"{name}.weight"]
    a, b = lora[f"transformer.{name}.lora_A.weight"], lora[f"transformer.{name}.lora_B.weight"]
    module = dict(pipe.transformer.named_modules())[name]
    x = torch.randn(3, w.shape[1])
    expected = x @ (w + 4.0 * b @ a).T + base.get(f"{name}.bias", 0)
    torch.testing.assert_close(module(x), expected, rtol=1e-4, atol=1e-5)
    b_folded = comfy[f"transformer.{name}.lora_B.weight"]
    torch.testing.assert_close(b_folded, 4.0 * b)


def test_checkpoints_hold_the_adapter_not_the_frozen_base(data, tmp_path):
    _train(data, tmp_path, "ck", max_steps=1, checkpointing_steps=1)
    ck = checkpoints.latest(tmp_path / "ck_ck")
    assert ck is not None
    saved = load_file(str(ck / "trainable.safetensors"))
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved)
    base_bytes = (data["pipeline"].path / "transformer" / "diffusion_pytorch_model.safetensors").stat().st_size
    assert (ck / "trainable.safetensors").stat().st_size < base_bytes / 2


FEATURES = dict(lr_scheduler="cosine", lr_warmup_steps=2, ema_decay=0.9, caption_dropout=0.5, random_flip=True,
                loss={"shift_by_resolution": True, "weighting": "logit_normal"}, gradient_accumulation_steps=2,
                lora={"rank": 4, "alpha": 16, "dropout": 0.1})


@pytest.mark.parametrize("optimizer", ["adamw", "prodigy"])
def test_resume_with_scheduler_ema_dropout_and_flips_is_bit_exact(data, tmp_path, optimizer):
    lr = 1.0 if optimizer == "prodigy" else 1e-2
    straight = _train(data, tmp_path, "straight", max_steps=4, optimizer=optimizer, learning_rate=lr, **FEATURES)
    _train(data, tmp_path, "half", max_steps=2, checkpointing_steps=2, optimizer=optimizer, learning_rate=lr, **FEATURES)
    resumed = _train(data, tmp_path, "rest", max_steps=4, optimizer=optimizer, learning_rate=lr,
                     resume_from_checkpoint="latest", checkpoint_dir=str(tmp_path / "ck_half"), **FEATURES)
    assert (resumed.start_step, resumed.global_step) == (2, 4)
    assert resumed.final_loss == straight.final_loss
    a = load_file(str(tmp_path / "straight" / "transformer_lora.safetensors"))
    b = load_file(str(tmp_path / "rest" / "transformer_lora.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ema_is_what_gets_exported(data, tmp_path):
    _train(data, tmp_path, "live", max_steps=3)
    _train(data, tmp_path, "ema", max_steps=3, ema_decay=0.5)
    live = load_file(str(tmp_path / "live" / "transformer_lora.safetensors"))
    ema = load_file(str(tmp_path / "ema" / "transformer_lora.safetensors"))
    assert any(not torch.equal(live[k], ema[k]) for k in live)  # same training, averaged weights exported


def test_validation_uses_its_size_count_and_guidance(data, tmp_path):
    from PIL import Image

    res = _train(data, tmp_path, "val", max_steps=1, validation_prompts=["a red square"], validation_inference_steps=1,
                 validation_width=48, validation_height=32, validation_images_per_prompt=2,
                 validation_guidance_scale=3.0, validation_negative_prompt="blurry")
    assert res.validation_images == ["validation/step_000001_0_0.png", "validation/step_000001_0_1.png"]
    with Image.open(tmp_path / "val" / res.validation_images[0]) as im:
        assert im.size == (48, 32)


def test_resume_latest_with_no_checkpoint_says_so(data, tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        res = _train(data, tmp_path, "fresh", max_steps=1, resume_from_checkpoint="latest")
    assert res.start_step == 0
    assert "found no finished checkpoint" in caplog.text


def test_preflight_names_every_unusable_option(data, tmp_path):
    pre = tmp_path / "pre"
    pre.mkdir()
    meta = json.loads((data["precomputed"].path / "flux_meta.json").read_text())
    for key in ("has_flip", "has_mask", "empty_prompt"):
        meta.pop(key, None)
    (pre / "flux_meta.json").write_text(json.dumps(meta))
    cfg = TrainConfig(**{**BASE, "caption_dropout": 0.1, "random_flip": True, "masked_loss": True,
                         "optimizer": "adamw8bit", "base_quantization": "nf4", "train_mode": "full"})
    with pytest.raises(ConfigError) as err:
        preflight(cfg, {"precomputed": _ref(pre), "pipeline": data["pipeline"]})
    text = str(err.value)
    for key in ("train.caption_dropout", "train.random_flip", "train.masked_loss", "train.optimizer",
                "train.base_quantization: nf4 needs a CUDA device", "only a LoRA run"):
        assert key in text, key


def test_a_target_that_matches_nothing_is_named(data, tmp_path):
    with pytest.raises(ConfigError, match="'to_qv' matches no module"):
        _train(data, tmp_path, "bad", lora={"rank": 2, "alpha": 2, "target_modules": ["to_q", "to_qv"]})


def test_masked_loss_trains_only_where_the_mask_is_set():
    from nexus_core.flux import losses

    pred, target = torch.zeros(2, 4, 3), torch.ones(2, 4, 3)
    target[0, 2:] = 5.0  # the masked-out tokens of sample 0 are far off
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]])
    got = losses.flow_matching_loss(pred, target, torch.tensor([0.5, 0.5]), mask=mask)
    assert got.tolist() == [1.0, 0.0]


def test_resolution_shift_matches_the_scheduler_at_inference():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from nexus_core.flux import losses

    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=256, max_image_seq_len=4096)
    sig = torch.tensor([0.2, 0.5, 0.9])
    seq = 1024
    mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (seq - 256)
    expected = sched.time_shift(mu, 1.0, sig)
    assert losses.resolution_shift(sig, seq).tolist() == pytest.approx(expected.tolist())
    assert (losses.resolution_shift(sig, 4096) > sig).all()


def test_batch_plan_draws_one_bucket_per_batch_with_repeats():
    from nexus_core.flux.training import BatchPlan

    buckets = ["32x32"] * 3 + ["32x48"] * 2
    pool = [0, 1, 2, 3, 3, 4, 4]  # rows 3 and 4 have repeats 2
    plan = BatchPlan([pool], buckets, per_pool=2, seed=1)
    epoch = [plan.batch(i) for i in range(plan.lengths[0])]
    assert all(len({buckets[r] for r, _ in b}) == 1 for b in epoch)
    drawn = sorted(r for b in epoch for r, _ in b)
    assert drawn == sorted(pool)
    assert [plan.batch(i) for i in range(10)] == [BatchPlan([pool], buckets, 2, 1).batch(i) for i in range(10)]
    assert np.any([plan.batch(i) != plan.batch(i + plan.lengths[0]) for i in range(plan.lengths[0])])


def test_buckets_masks_and_repeats_train_from_real_shards(data, tmp_path):
    """Three aspect-ratio buckets (batches never mix shapes), a masked image, an extra dataset with
    repeats 2, flips and caption dropout: every option the data side writes, read back by training."""
    from PIL import Image

    from nexus_core.flux.sources import ExtraSource

    src = tmp_path / "main"
    src.mkdir()
    rng = np.random.default_rng(0)
    for name, (w, h) in {"a": (48, 24), "b": (24, 48), "c": (32, 32)}.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(src / f"{name}.png")
        (src / f"{name}.txt").write_text(f"a red square {name}")
    mask = Image.new("L", (48, 24), 0)
    mask.paste(255, (0, 0, 24, 24))
    mask.save(src / "a.mask.png")
    extra = make_shape_images(tmp_path / "extra", 2, size=32)
    run_prepare(PrepareConfig(size=32, buckets={"enabled": True, "sizes": [[32, 32], [16, 32], [32, 16]],
                                                "divisible": 4, "step": 4},
                              extra_sources=[ExtraSource(source=str(extra), repeats=2)]),
                inputs={"source": raw_ref(src)}, out_uri=str(tmp_path / "prep"), ctx=StepContext.detached())
    run_precompute(PrecomputeConfig(resolution=32, flip=True, batch_size=2, max_sequence_length=16, device="cpu"),
                   inputs={"prepared": _ref(tmp_path / "prep"), "pipeline": data["pipeline"]},
                   out_uri=str(tmp_path / "pre"), ctx=StepContext.detached())
    bucketed = {"precomputed": _ref(tmp_path / "pre"), "pipeline": data["pipeline"]}
    res = _train(bucketed, tmp_path, "buckets", max_steps=4, masked_loss=True, random_flip=True, caption_dropout=0.3,
                 validation_prompts=["a red square"], validation_inference_steps=1)
    assert res.global_step == 4 and np.isfinite(res.final_loss)
    history = json.loads((tmp_path / "buckets" / "train_config.json").read_text())["loss_history"]
    assert len(set(history.values())) == 4


@pytest.mark.slow
def test_two_processes_train_data_parallel_under_accelerate_launch(data, tmp_path):
    res = _train(data, tmp_path, "ddp", num_processes=2, max_steps=2, checkpointing_steps=1)
    assert (res.processes, res.global_step) == (2, 2) and np.isfinite(res.final_loss)
    assert [s for s, _ in checkpoints.complete(tmp_path / "ck_ddp")] == [1, 2]  # rank 0 wrote them, once
    pipe = load_flux_pipeline(str(data["pipeline"].path))
    pipe.load_lora_weights(str(tmp_path / "ddp"), weight_name="transformer_lora.safetensors")
