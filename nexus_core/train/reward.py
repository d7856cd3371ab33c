"""Reward model: a sequence-classification head trained on chosen/rejected pairs with trl.RewardTrainer.

This is how the PPO use case is served (trl no longer ships PPO): train a reward model here, then run
a GRPO stage with ``reward_model`` pointing at it (RL against the learned reward). Several datasets
mix by ``data_weights`` (``data_1``, ...); ``eval_split`` or an ``eval_data`` input evaluates (eval
loss and accuracy): see :mod:`nexus_core.train.steer`. Data files above ``stream_threshold_mb`` are
streamed (:mod:`nexus_core.train.preference`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from nexus_core.artifacts import ArtifactRef
from nexus_core.context import StepContext
from nexus_core.contract import model as model_input  # `model` names the trainers' models here
from nexus_core.contract import step, table
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
from nexus_core.train.launch import run_stage
from nexus_core.train.preference import PreferenceStreaming, check_preference, preference_data
from nexus_core.train.steer import (
    EVAL_INPUT,
    EvalResult,
    Steering,
    callbacks,
    eval_kwargs,
    eval_metrics,
    steer_problems,
)


class RewardConfig(StageBase, Steering, PreferenceStreaming):
    """Reward-model training."""

    method: Literal["reward"] = Field(default="reward", description="Stage method")
    chat: bool = Field(default=True, description="Format prompts/responses with the chat template")
    center_rewards_coefficient: float | None = Field(default=None, description="Pull mean reward towards 0 (trl option)")
    learning_rate: float = Field(default=5e-5, gt=0, description="Peak learning rate")


class RewardResult(TrainResult, EvalResult):
    """A reward model (AutoModelForSequenceClassification, one label)."""

    method: str = "reward"
    streamed: bool = Field(default=False, description="The data was streamed")


@step(area="train", kind="model", inputs={
    "model": model_input(description="the base of the reward model"),
    "data": table("chosen", "rejected"),
    EVAL_INPUT: table("chosen", "rejected", optional=True, description="pairs to evaluate on")}, reads=template_reads)
def run_reward(cfg: RewardConfig, *, inputs: dict[str, ArtifactRef], out_uri: str,
               ctx: StepContext) -> RewardResult:
    """Check inputs, train, save."""
    problems = steer_problems(cfg, inputs) + check_preference(cfg, inputs)[0]
    if cfg.chat:
        check_template(cfg, model_dir(inputs["model"]), "reward")
    preflight(cfg, problems)
    m = run_stage(_train, cfg, inputs, out_uri, "reward", ctx)
    return RewardResult.from_metrics(m, streamed=bool(m.get("streamed")), **EvalResult.fields(m))


def _train(cfg: RewardConfig, inputs: dict[str, ArtifactRef], out_uri: str, ctx: StepContext) -> dict[str, float]:
    from transformers import set_seed
    from trl import RewardConfig as TrlRewardConfig
    from trl import RewardTrainer

    from nexus_core.train.control import train_and_save

    base = model_dir(inputs["model"])
    tokenizer = stage_tokenizer(cfg, base)
    train_dataset, eval_dataset, found = preference_data(cfg, inputs)
    args = TrlRewardConfig(**trainer_kwargs(cfg, checkpoint_dir(ctx.work_dir),
                                            max_length=cfg.max_length,
                                            center_rewards_coefficient=cfg.center_rewards_coefficient,
                                            **eval_kwargs(cfg, eval_dataset is not None)))
    set_seed(cfg.seed)  # the new score head is drawn from the global generator: same seed, same head
    model = load_model(cfg, base, kind="reward")
    model.config.pad_token_id = tokenizer.pad_token_id
    trainer = RewardTrainer(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                            processing_class=tokenizer, peft_config=peft_config(cfg, task_type="SEQ_CLS"),
                            callbacks=callbacks(cfg))
    metrics = train_and_save(trainer, cfg, ctx, base, out_uri, "reward", kind="reward")
    return {**metrics, **found, **eval_metrics(trainer, cfg)}
