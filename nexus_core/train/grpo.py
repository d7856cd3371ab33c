"""GRPO: group-relative policy optimisation with trl.GRPOTrainer, rewarded by rules and verifiers
(exact-match answers, format checks, length) and optionally a reward model (RL against a learned
reward: the PPO use case, since trl no longer ships PPO).

Inputs: ``model``, ``data`` (``prompt`` or ``input``; ``answer`` for exact_match) and optionally
``reward_model`` (an artifact from the reward stage).

Custom rewards are named by import path (``reward_funcs: ["my_pkg.rewards:brevity"]``), in trl's
shape ``f(prompts, completions, **dataset_columns) -> list[float]``; they are imported before
training starts (an error names the path) and their source files join the cache key.

Generation (the slow half of GRPO) runs through the policy's own ``generate`` by default. With
``use_vllm: true`` trl generates with vLLM instead: ``vllm_mode: colocate`` starts vLLM inside the
training process on the same GPU (``vllm_gpu_memory_utilization`` of its memory), ``server`` sends
prompts to a ``trl vllm-serve`` server (``vllm_server_url``) and syncs the policy's weights to it after
each step. Both need the ``vllm`` package and a CUDA GPU; the server must answer its ``/health/`` check.
All of it is checked before training (the server with one request), each problem named.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from nexus_core.artifacts import ArtifactRef
from nexus_core.config import RESUME_NEUTRAL, runtime_field
from nexus_core.context import StepContext
from nexus_core.contract import model as model_input  # `model` names the trainer's model here
from nexus_core.contract import step, table
from nexus_core.errors import InputError
from nexus_core.models.io import load_tokenizer
from nexus_core.train.chat import check_template, stage_tokenizer, template_reads
from nexus_core.train.common import (
    StageBase,
    TrainResult,
    checkpoint_dir,
    load_model,
    model_dir,
    peft_config,
    preflight,
    trainer_kwargs,
)
from nexus_core.train.data import contract_layouts, layout, load_rows, need, prompt_records, to_dataset
from nexus_core.train.launch import run_stage
from nexus_core.train.steer import callable_files, resolve_callable

Rule = Literal["exact_match", "format", "length"]


class GRPOConfig(StageBase):
    """GRPO with rule rewards and an optional reward model."""

    method: Literal["grpo"] = Field(default="grpo", description="Stage method")
    rewards: list[Rule] = Field(default_factory=lambda: ["exact_match"], description="Rule rewards to sum")
    reward_funcs: list[str] = Field(default_factory=list, description="Your own reward functions by import path "
                                    "('package.module:function', trl's reward signature); their source files "
                                    "join the cache key")
    reward_weights: list[float] | None = Field(default=None, description="Weight per reward (rules, reward_funcs, "
                                               "then the reward model)")
    format_pattern: str = Field(default=r"<think>.*</think>", description="Regex the format reward checks for")
    max_chars: int = Field(default=400, ge=1, description="Length reward: penalty starts beyond this many characters")
    num_generations: int = Field(default=4, ge=2, description="Completions sampled per prompt (the group)")
    max_completion_length: int = Field(default=64, ge=1, description="Tokens generated per completion")
    temperature: float = Field(default=1.0, gt=0, description="Sampling temperature")
    beta: float = Field(default=0.0, ge=0, description="KL penalty towards the reference model (0 = none)")
    chat: bool = Field(default=True, description="Format prompts with the chat template")
    learning_rate: float = Field(default=1e-5, gt=0, description="Peak learning rate")
    # vLLM generation samples differently but leaves checkpoints valid (resume-neutral); where the server
    # lives changes nothing (runtime: out of both keys).
    use_vllm: bool = Field(default=False, description="Generate completions with vLLM (trl's use_vllm; needs the "
                           "vllm package and a CUDA GPU)", json_schema_extra=RESUME_NEUTRAL)
    vllm_mode: Literal["colocate", "server"] = Field(default="colocate", description="colocate: vLLM in the "
                                                     "training process; server: a `trl vllm-serve` server",
                                                     json_schema_extra=RESUME_NEUTRAL)
    vllm_server_url: str = runtime_field("http://127.0.0.1:8000", "The `trl vllm-serve` server (vllm_mode=server)")
    vllm_gpu_memory_utilization: float = runtime_field(0.3, "Share of GPU memory vLLM takes (vllm_mode=colocate)",
                                                       gt=0, le=1)


class GRPOResult(TrainResult):
    """A policy trained with GRPO."""

    method: str = "grpo"
    reward_mean: float = 0.0


@step(area="train", kind="model", inputs={
    "model": model_input(description="the policy"),
    "data": table(one_of=contract_layouts("prompt"), description="prompts (and 'answer' for exact_match)"),
    "reward_model": model_input(optional=True, description="a reward model (from the reward stage) to score with"),
}, reads=lambda cfg, inputs: [*template_reads(cfg, inputs), *callable_files(cfg.reward_funcs, "reward_funcs")])
def run_grpo(cfg: GRPOConfig, *, inputs: dict[str, ArtifactRef], out_uri: str, ctx: StepContext) -> GRPOResult:
    """Check the rows against the rewards, train, save."""
    df, where = load_rows(need(inputs, "data", "grpo"))
    layout(df, "prompt", where, "grpo")
    if "exact_match" in cfg.rewards and "answer" not in df.columns:
        raise InputError(f"{where}: reward 'exact_match' needs column answer; has: {', '.join(df.columns)}")
    for i, path in enumerate(cfg.reward_funcs):  # before any compute: a typo fails here, naming the path
        resolve_callable(path, f"reward_funcs[{i}]")
    if not cfg.rewards and not cfg.reward_funcs and "reward_model" not in inputs:
        raise InputError("grpo: no rewards, no reward_funcs and no 'reward_model' input")
    n_rewards = len(cfg.rewards) + len(cfg.reward_funcs) + ("reward_model" in inputs)
    problems = []
    if cfg.reward_weights is not None and len(cfg.reward_weights) != n_rewards:
        problems.append(f"reward_weights: {len(cfg.reward_weights)} weights for {n_rewards} rewards")
    if (cfg.batch_size * cfg.grad_accum) % cfg.num_generations:
        problems.append(f"batch_size*grad_accum ({cfg.batch_size * cfg.grad_accum}) must be a multiple of "
                        f"num_generations ({cfg.num_generations})")
    if cfg.use_vllm:
        problems += vllm_problems(cfg)
    if cfg.chat:
        check_template(cfg, model_dir(inputs["model"]), "grpo")
    preflight(cfg, problems)
    m = run_stage(_train, cfg, inputs, out_uri, "grpo", ctx)
    return GRPOResult.from_metrics(m, reward_mean=m.get("reward_mean", 0.0))


def vllm_problems(cfg: GRPOConfig) -> list[str]:
    """What stops ``use_vllm`` on this machine: the package, a GPU, and (server mode) the server."""
    import importlib.util

    from nexus_core.train.common import cuda_available

    problems = []
    if importlib.util.find_spec("vllm") is None:
        problems.append("use_vllm: the vllm package is not installed (pip install vllm, on a CUDA machine); "
                        "or set use_vllm: false to generate with the policy itself")
    if not cuda_available():
        problems.append("use_vllm: vLLM generation needs a CUDA GPU; this machine has none")
    if cfg.vllm_mode == "server":
        import httpx

        url = cfg.vllm_server_url.rstrip("/") + "/health/"
        try:
            status = httpx.get(url, timeout=5.0).status_code
            if status != 200:
                problems.append(f"use_vllm: vllm_server_url {cfg.vllm_server_url} answered {status} to GET "
                                "/health/; is it a `trl vllm-serve` server?")
        except httpx.HTTPError as exc:
            problems.append(f"use_vllm: vllm_server_url {cfg.vllm_server_url} is not reachable ({exc}); start "
                            "it with `trl vllm-serve --model <the policy>`")
    return problems


def _vllm_kwargs(cfg: GRPOConfig) -> dict:
    """trl's GRPOConfig fields for vLLM generation (none when it is off)."""
    if not cfg.use_vllm:
        return {}
    kw: dict = {"use_vllm": True, "vllm_mode": cfg.vllm_mode}
    if cfg.vllm_mode == "server":
        kw["vllm_server_base_url"] = cfg.vllm_server_url.rstrip("/")
    else:
        kw["vllm_gpu_memory_utilization"] = cfg.vllm_gpu_memory_utilization
    return kw


def _train(cfg: GRPOConfig, inputs: dict[str, ArtifactRef], out_uri: str, ctx: StepContext) -> dict[str, float]:
    from trl import GRPOConfig as TrlGRPOConfig
    from trl import GRPOTrainer

    from nexus_core.train import rewards
    from nexus_core.train.control import train_and_save

    base = model_dir(inputs["model"])
    df, where = load_rows(inputs["data"])
    dataset = to_dataset(prompt_records(df, where, "grpo", cfg.chat))
    rule = {"exact_match": rewards.exact_match, "format": rewards.format_reward(cfg.format_pattern),
            "length": rewards.length_penalty(cfg.max_chars)}
    funcs: list = [rule[name] for name in cfg.rewards]
    funcs += [resolve_callable(path, f"reward_funcs[{i}]") for i, path in enumerate(cfg.reward_funcs)]
    reward_tokenizers: list = [None] * len(funcs)
    if "reward_model" in inputs:
        from transformers import AutoModelForSequenceClassification

        rm_path = model_dir(inputs["reward_model"], "reward_model")
        funcs.append(AutoModelForSequenceClassification.from_pretrained(str(rm_path), num_labels=1))
        reward_tokenizers.append(load_tokenizer(rm_path))
    args = TrlGRPOConfig(**trainer_kwargs(
        cfg, checkpoint_dir(ctx.work_dir), num_generations=cfg.num_generations,
        max_completion_length=cfg.max_completion_length, temperature=cfg.temperature, beta=cfg.beta,
        reward_weights=cfg.reward_weights, generation_batch_size=cfg.batch_size * cfg.grad_accum,
        **_vllm_kwargs(cfg)))
    trainer = GRPOTrainer(model=load_model(cfg, base), reward_funcs=funcs, args=args, train_dataset=dataset,
                          processing_class=stage_tokenizer(cfg, base), reward_processing_classes=reward_tokenizers,
                          peft_config=peft_config(cfg))
    metrics = train_and_save(trainer, cfg, ctx, base, out_uri, "grpo")
    rewards_logged = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    metrics["reward_mean"] = float(sum(rewards_logged) / len(rewards_logged)) if rewards_logged else 0.0
    return metrics
