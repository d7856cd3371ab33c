"""DPO: direct preference optimisation on chosen/rejected pairs with trl.DPOTrainer.

Inputs: ``model`` and ``data`` (``chosen``/``rejected``, optional ``prompt``); more datasets to mix in
as ``data_1``, ... (``data_weights``) and an optional ``eval_data`` (or ``eval_split``): see
:mod:`nexus_core.train.steer`. Data files above ``stream_threshold_mb`` are streamed
(:mod:`nexus_core.train.preference`). With LoRA the frozen base serves as the reference model (no
second copy in memory).
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


class DPOConfig(StageBase, Steering, PreferenceStreaming):
    """Direct preference optimisation."""

    method: Literal["dpo"] = Field(default="dpo", description="Stage method")
    beta: float = Field(default=0.1, gt=0, description="Strength of the KL penalty towards the reference model")
    loss_type: str = Field(default="sigmoid", description="trl DPO loss: sigmoid, ipo, hinge, robust, ...")
    chat: bool = Field(default=True, description="Format prompts/responses with the chat template")
    learning_rate: float = Field(default=5e-5, gt=0, description="Peak learning rate")


class DPOResult(TrainResult, EvalResult):
    """A preference-tuned model."""

    method: str = "dpo"
    streamed: bool = Field(default=False, description="The data was streamed")


@step(area="train", kind="model", inputs={
    "model": model_input(description="the policy to tune (and, with LoRA, its reference)"),
    "data": table("chosen", "rejected"),
    EVAL_INPUT: table("chosen", "rejected", optional=True, description="pairs to evaluate on")}, reads=template_reads)
def run_dpo(cfg: DPOConfig, *, inputs: dict[str, ArtifactRef], out_uri: str, ctx: StepContext) -> DPOResult:
    """Check inputs, train, save."""
    problems = steer_problems(cfg, inputs) + check_preference(cfg, inputs)[0]
    if cfg.chat:
        check_template(cfg, model_dir(inputs["model"]), "dpo")
    preflight(cfg, problems)
    m = run_stage(_train, cfg, inputs, out_uri, "dpo", ctx)
    return DPOResult.from_metrics(m, streamed=bool(m.get("streamed")), **EvalResult.fields(m))


def _train(cfg: DPOConfig, inputs: dict[str, ArtifactRef], out_uri: str, ctx: StepContext) -> dict[str, float]:
    from trl import DPOConfig as TrlDPOConfig
    from trl import DPOTrainer

    from nexus_core.train.control import train_and_save

    base = model_dir(inputs["model"])
    train_dataset, eval_dataset, found = preference_data(cfg, inputs)
    args = TrlDPOConfig(**trainer_kwargs(cfg, checkpoint_dir(ctx.work_dir), beta=cfg.beta,
                                         loss_type=[cfg.loss_type], max_length=cfg.max_length,
                                         **eval_kwargs(cfg, eval_dataset is not None)))
    trainer = DPOTrainer(model=load_model(cfg, base), args=args, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=stage_tokenizer(cfg, base),
                         peft_config=peft_config(cfg), callbacks=callbacks(cfg))
    metrics = train_and_save(trainer, cfg, ctx, base, out_uri, "dpo")
    return {**metrics, **found, **eval_metrics(trainer, cfg)}
