"""Memory-saving setups every method shares: the accelerate config files of configs/accelerate/ (parsed
by accelerate's own launcher; the stage's num_processes wins), their up-front refusals (DeepSpeed not
installed, FSDP/DeepSpeed on CPU, a bad file), the attention implementation reaching the model, Liger
kernels, and LoRA + gradient checkpointing (non-reentrant, really checkpointing) in every method."""

from __future__ import annotations

import functools

import pytest
import torch
import transformers.modeling_utils
from accelerate.commands.launch import _validate_launch_command, launch_command_parser

from nexus_core.errors import InputError, StepError
from nexus_core.runner import run_step
from nexus_core.train.backends import (
    accelerate_file,
    launch_flags,
    launched_strategy_problem,
    load_accelerate_config,
    shipped_accelerate_configs,
)
from nexus_core.train.common import load_model, save_model_artifact, trainer_kwargs
from nexus_core.train.cpt import CPTConfig, run_cpt
from nexus_core.train.dpo import DPOConfig, run_dpo
from nexus_core.train.grpo import GRPOConfig, run_grpo
from nexus_core.train.kd import KDConfig, run_kd
from nexus_core.train.orpo import ORPOConfig, run_orpo
from nexus_core.train.reward import RewardConfig, run_reward
from nexus_core.train.sft import SFTConfig, build_trainer, run_sft

SHIPPED = {"ddp": ("ddp", False), "fsdp": ("fsdp", True), "deepspeed_zero2": ("deepspeed", False),
           "deepspeed_zero3": ("deepspeed", True)}


def _launch_args(cfg: SFTConfig):
    """What ``accelerate launch`` makes of the flags run_stage passes (its own parser and checks)."""
    flags = ["--num_processes", str(cfg.num_processes), "--num_machines", "1", "--mixed_precision", "no",
             "--dynamo_backend", "no", *launch_flags(cfg), "-m", "nexus_core.train.launch"]
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(flags))
    return args


def test_every_shipped_accelerate_config_parses_and_launches_what_it_says():
    assert shipped_accelerate_configs() == sorted(SHIPPED)
    for name, (strategy, sharded) in SHIPPED.items():
        setup = load_accelerate_config(accelerate_file(SFTConfig(accelerate_config=name)))
        assert (setup.strategy, setup.sharded) == (strategy, sharded), name
        args = _launch_args(SFTConfig(accelerate_config=name, num_processes=3))
        assert args.num_processes == 3  # the stage's count, not the file's 2
        assert (args.multi_gpu, args.use_fsdp, args.use_deepspeed) == (
            strategy == "ddp", strategy == "fsdp", strategy == "deepspeed"), name
        assert args.mixed_precision == "no"  # precision is the stage's (Trainer autocast)
    fsdp = _launch_args(SFTConfig(accelerate_config="fsdp", num_processes=2))
    assert fsdp.fsdp_use_orig_params is True and fsdp.fsdp_auto_wrap_policy == "TRANSFORMER_BASED_WRAP"
    assert fsdp.fsdp_state_dict_type == "FULL_STATE_DICT"  # rank 0 saves an ordinary from_pretrained checkpoint
    assert _launch_args(SFTConfig(accelerate_config="deepspeed_zero3", num_processes=2)).zero_stage == 3


def test_distributed_names_the_shipped_file_and_accelerate_config_takes_a_path(tmp_path):
    assert accelerate_file(SFTConfig()).name == "ddp.yaml"
    assert accelerate_file(SFTConfig(distributed="fsdp")).name == "fsdp.yaml"
    own = tmp_path / "mine.yaml"
    own.write_text(accelerate_file(SFTConfig(accelerate_config="fsdp")).read_text())
    assert accelerate_file(SFTConfig(accelerate_config=str(own))) == own
    with pytest.raises(InputError, match=r"accelerate_config 'zero9'.*ddp, deepspeed_zero2, deepspeed_zero3, fsdp"):
        accelerate_file(SFTConfig(accelerate_config="zero9"))


def test_bad_accelerate_files_are_named(tmp_path):
    cpu = tmp_path / "cpu.yaml"
    cpu.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_CPU\nnum_processes: 2\n")
    with pytest.raises(InputError, match=rf"{cpu}: distributed_type MULTI_CPU is not run by the stage launcher"):
        load_accelerate_config(cpu)
    typo = tmp_path / "typo.yaml"
    typo.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: FSDP\nfsdp_confg: {}\n")
    with pytest.raises(InputError, match=rf"{typo}: not a valid accelerate config file.*fsdp_confg"):
        load_accelerate_config(typo)


def _refusal(tiny_model, refs, **kw) -> str:
    with pytest.raises(StepError) as err:
        run_step(run_sft, SFTConfig(max_steps=1, **kw), name="t_backend_refused",
                 inputs={"model": tiny_model, "data": refs["sft"]})
    return str(err.value)


def test_missing_packages_and_cpu_only_setups_are_refused_before_training(tiny_model, refs):
    """deepspeed, flash_attn and liger-kernel are not installed here, and this machine has no GPU."""
    msg = _refusal(tiny_model, refs, accelerate_config="deepspeed_zero3", num_processes=2,
                   attn_implementation="flash_attention_2", liger_kernel=True)
    assert "deepspeed_zero3.yaml uses DeepSpeed (ZeRO-3), but the deepspeed package cannot be imported" in msg
    assert "flash_attention_2 needs a CUDA GPU" in msg and "needs the flash_attn package" in msg
    assert "liger_kernel: true needs the liger-kernel package" in msg
    msg = _refusal(tiny_model, refs, distributed="fsdp", num_processes=2)
    assert "distributed: " in msg and "fsdp.yaml is FSDP, which needs GPUs here" in msg and "MULTI_CPU" in msg
    msg = _refusal(tiny_model, refs, distributed="fsdp", num_processes=2, finetune="lora")
    assert "fsdp.yaml is FSDP, and LoRA/QLoRA under it fails in the first training step" in msg
    assert "train adapters with accelerate_config: ddp" in msg
    msg = _refusal(tiny_model, refs, distributed="fsdp", accelerate_config="ddp")
    assert "distributed: fsdp, but accelerate_config ddp" in msg and "set only one of them" in msg


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_attn_implementation_reaches_the_trained_model(tiny_model, refs, impl, tmp_path):
    assert load_model(SFTConfig(attn_implementation=impl, finetune="full"), tiny_model.path
                      ).config._attn_implementation == impl
    trainer = build_trainer(SFTConfig(attn_implementation=impl, finetune="lora"),
                            {"model": tiny_model, "data": refs["sft"]}, tmp_path / "ckpt")
    assert trainer.model.config._attn_implementation == impl  # through the stage's trainer, under LoRA
    assert load_model(SFTConfig(), tiny_model.path).config._attn_implementation == "sdpa"  # auto: transformers' pick


def test_liger_kernel_is_the_trainers_use_liger_kernel(tmp_path):
    assert trainer_kwargs(SFTConfig(liger_kernel=True), tmp_path)["use_liger_kernel"] is True
    assert "use_liger_kernel" not in trainer_kwargs(SFTConfig(), tmp_path)


LORA_GC = {"finetune": "lora", "gradient_checkpointing": True, "max_steps": 1, "batch_size": 2, "seed": 41,
           "learning_rate": 1e-3, "checkpoint": {"save_steps": 100}}
METHODS = {
    "sft": (run_sft, SFTConfig(**LORA_GC), "sft"),
    "cpt": (run_cpt, CPTConfig(max_length=32, **LORA_GC), "text"),
    "kd": (run_kd, KDConfig(source="model", **LORA_GC), "sft"),
    "dpo": (run_dpo, DPOConfig(**LORA_GC), "prefs"),
    "orpo": (run_orpo, ORPOConfig(**LORA_GC), "prefs"),
    "reward": (run_reward, RewardConfig(**LORA_GC), "prefs"),
    "grpo": (run_grpo, GRPOConfig(rewards=[], reward_funcs=["tests.train.custom_rewards:brevity"],  # varies: a gradient
                                  num_generations=2, max_completion_length=8, temperature=1.5, **LORA_GC), "math"),
}


@pytest.mark.parametrize("method", list(METHODS))
def test_lora_with_gradient_checkpointing_trains_in_every_method(tiny_model, refs, method, monkeypatch):
    """Frozen base + checkpointed blocks: every method really checkpoints (non-reentrant, so the
    frozen embeddings need no input grads) and its adapters still get gradients."""
    calls: list[dict] = []
    real = transformers.modeling_utils.checkpoint

    @functools.wraps(real)
    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.modeling_utils, "checkpoint", spy)  # what gradient_checkpointing_enable binds
    fn, cfg, data = METHODS[method]
    inputs = {"model": tiny_model, "data": refs[data]}
    if method == "kd":
        inputs["teacher"] = tiny_model
    r = run_step(fn, cfg, name=f"t_gc_{method}", inputs=inputs)
    assert r.steps == 1 and r.metrics["param_delta"] > 0
    assert calls, f"{method}: gradient checkpointing never ran"
    assert all(c.get("use_reentrant") is False for c in calls)


def test_a_launch_that_did_not_set_up_the_asked_strategy_is_stopped():
    """In each launched process, fit() compares what the Trainer set up with the file's strategy."""
    fsdp = SFTConfig(accelerate_config="fsdp")
    assert launched_strategy_problem(fsdp, fsdp=True, deepspeed=False) is None
    problem = launched_strategy_problem(fsdp, fsdp=False, deepspeed=False)
    assert problem is not None and "fsdp.yaml asks for FSDP, but the Trainer's accelerator set up DDP" in problem
    assert launched_strategy_problem(SFTConfig(), fsdp=False, deepspeed=False) is None


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_a_gathered_state_dict_is_what_rank0_saves(tiny_model, refs, tmp_path, finetune):
    """Under FSDP/ZeRO-3 rank 0 saves the state dict gathered from the shards, not its own module's
    (sharded) parameters: the saved model (full) or adapter (LoRA) loads with from_pretrained and holds
    exactly the gathered tensors."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = SFTConfig(finetune=finetune, max_steps=1, batch_size=2, seed=43, learning_rate=1e-2,
                    checkpoint={"save_steps": 100})
    trainer = build_trainer(cfg, {"model": tiny_model, "data": refs["sft"]}, tmp_path / "ckpt")
    trainer.train()
    gathered = {k: v.detach().clone() + (0.5 if v.is_floating_point() else 0) for k, v in trainer.model.state_dict().items()}
    out = tmp_path / "out"
    save_model_artifact(cfg, trainer, trainer.processing_class, tiny_model.path, str(out), "sft", state=gathered)
    if finetune == "full":
        saved = AutoModelForCausalLM.from_pretrained(str(out)).state_dict()
        assert all(torch.equal(saved[k], gathered[k]) for k in saved)  # the gathered copy, not the module's own
    else:
        base = AutoModelForCausalLM.from_pretrained(str(tiny_model.path))
        adapted = dict(PeftModel.from_pretrained(base, str(out / "adapter")).named_parameters())
        lora = [k for k in gathered if "lora_" in k]
        assert lora and all(torch.equal(adapted[k], gathered[k]) for k in lora)


def test_what_the_settings_do_to_the_cache_and_work_dir_keys():
    """The strategy decides how checkpoints are written: another accelerate config is another work dir
    (and artifact). The attention kernel and Liger change numerics (and, with packing, what samples
    see): another artifact, but a killed run resumes from its checkpoints with them changed."""
    from nexus_core.artifacts import ArtifactRef
    from nexus_core.cachekey import resume_key, step_key

    refs = {"model": ArtifactRef(uri="/m", kind="model", name="m", version=1, digest="d-model"),
            "data": ArtifactRef(uri="/d", kind="dataset", name="d", version=1, digest="d-data")}

    def keys(**kw):
        cfg = SFTConfig(**kw)
        return resume_key(run_sft, cfg, refs, code="c", files={}), step_key(run_sft, cfg, refs, code="c", files={})

    work, cache = keys()
    for change in ({"accelerate_config": "fsdp"}, {"distributed": "fsdp"}):
        assert keys(**change)[0] != work and keys(**change)[1] != cache
    for change in ({"attn_implementation": "eager"}, {"liger_kernel": True}):
        assert keys(**change)[0] == work and keys(**change)[1] != cache
