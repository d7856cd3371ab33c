"""ORPO: odds-ratio preference optimisation (SFT + preference in one loss, no reference model) with
``trl.experimental.orpo.ORPOTrainer``.

Inputs: ``model`` and ``data`` (``prompt``/``chosen``/``rejected``); more datasets to mix in as
``data_1``, ... (``data_weights``) and an optional ``eval_data`` (or ``eval_split``): see
:mod:`nexus_core.train.steer`. Data files above ``stream_threshold_mb`` are streamed
(:mod:`nexus_core.train.preference`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from nexus_core.artifacts import ArtifactRef
from nexus_core.context import StepContext
from nexus_core.contract import model as model_input  # `model` names the trainers' models here
from nexus_core.contract import step, table
from nexus_core.errors import InputError
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
from nexus_core.train.data import to_dataset
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


class ORPOConfig(StageBase, Steering, PreferenceStreaming):
    """Odds-ratio preference optimisation."""

    method: Literal["orpo"] = Field(default="orpo", description="Stage method")
    beta: float = Field(default=0.1, gt=0, description="Weight of the odds-ratio term (lambda in the paper)")
    chat: bool = Field(default=True, description="Format prompts/responses with the chat template")
    learning_rate: float = Field(default=8e-5, gt=0, description="Peak learning rate")


ORPO_LAYOUTS = [("prompt", "chosen", "rejected"), ("input", "chosen", "rejected")]


class ORPOResult(TrainResult, EvalResult):
    """A preference-tuned model."""

    method: str = "orpo"
    streamed: bool = Field(default=False, description="The data was streamed")


@step(area="train", kind="model", inputs={
    "model": model_input(description="the policy to tune"),
    "data": table(one_of=ORPO_LAYOUTS),
    EVAL_INPUT: table(one_of=ORPO_LAYOUTS, optional=True, description="pairs to evaluate on")}, reads=template_reads)
def run_orpo(cfg: ORPOConfig, *, inputs: dict[str, ArtifactRef], out_uri: str,
             ctx: StepContext) -> ORPOResult:
    """Check inputs, train, save."""
    found, tables = check_preference(cfg, inputs)
    problems = steer_problems(cfg, inputs) + found
    for name, df, where in tables:
        if "prompt" not in df.columns and "input" not in df.columns:
            raise InputError(f"{where} ({name}): method 'orpo' needs column prompt (or input) besides chosen/rejected")
    if cfg.chat:
        check_template(cfg, model_dir(inputs["model"]), "orpo")
    preflight(cfg, problems)
    m = run_stage(_train, cfg, inputs, out_uri, "orpo", ctx)
    return ORPOResult.from_metrics(m, streamed=bool(m.get("streamed")), **EvalResult.fields(m))


def _train(cfg: ORPOConfig, inputs: dict[str, ArtifactRef], out_uri: str, ctx: StepContext) -> dict[str, float]:
    from trl.experimental.orpo import ORPOConfig as TrlORPOConfig
    from trl.experimental.orpo import ORPOTrainer

    from nexus_core.train.control import train_and_save

    base = model_dir(inputs["model"])
    train_dataset, eval_dataset, found = preference_data(cfg, inputs)
    streamed = bool(found.get("streamed"))
    # The experimental trainer tokenizes chosen and rejected itself; it needs remove_unused_columns off.
    # A stream's batches are not dispatched from one process (accelerate would try to measure and
    # concatenate the string columns), as trl's DPO and reward trainers do for an IterableDataset.
    stream_kw = {"accelerator_config": {"dispatch_batches": False}} if streamed else {}
    args = TrlORPOConfig(**trainer_kwargs(cfg, checkpoint_dir(ctx.work_dir), beta=cfg.beta,
                                          max_length=cfg.max_length, remove_unused_columns=False, **stream_kw,
                                          **eval_kwargs(cfg, eval_dataset is not None)))
    # The experimental trainer maps its train dataset with num_proc, which a stream's map does not take:
    # it is built on the stream's first pair, then given the stream through its own row functions.
    tokenizer = stage_tokenizer(cfg, base)
    trainer = ORPOTrainer(model=load_model(cfg, base), args=args,
                          train_dataset=to_dataset([next(iter(train_dataset))]) if streamed else train_dataset,
                          eval_dataset=eval_dataset, processing_class=tokenizer,
                          peft_config=peft_config(cfg), callbacks=callbacks(cfg))
    if streamed:
        trainer.train_dataset = _orpo_rows(trainer, train_dataset, tokenizer)
    metrics = train_and_save(trainer, cfg, ctx, base, out_uri, "orpo")
    return {**metrics, **found, **eval_metrics(trainer, cfg)}


def _orpo_rows(trainer, stream, tokenizer):  # noqa: ANN001, ANN202 - datasets.IterableDataset
    """The stream prepared as ORPOTrainer prepares an in-memory dataset (prompt extracted, chat template
    applied, tokenized by the trainer's own ``tokenize_row``), lazily as training reads it."""
    from trl.data_utils import maybe_apply_chat_template, maybe_extract_prompt

    return (stream.map(maybe_extract_prompt)
            .map(maybe_apply_chat_template, fn_kwargs={"processing_class": tokenizer})
            .map(trainer.tokenize_row))
