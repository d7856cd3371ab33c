"""SFT: supervised fine-tuning with trl.SFTTrainer — full, LoRA or QLoRA; chat template, packing,
completion-only loss.

Conversations (``messages``, capability data, and prompt/response pairs when ``chat``) are rendered
with the model's chat template (or the ``chat_template`` setting) and tokenized here, with the loss
on the assistant turns found by rendering prefixes (:mod:`nexus_core.train.chat`), so templates
without ``{% generation %}`` markers (Qwen2.5, Llama 3) train on the assistant's tokens only.

Inputs: ``model`` (HF model dir artifact) and ``data`` (table with messages | input/output |
prompt/completion | text, or capability data such as tool calls or reasoning: ``train.capabilities``);
more datasets to mix in as ``data_1``, ``data_2``, ... (``data_weights``) and an optional ``eval_data``
(or ``eval_split``): see :mod:`nexus_core.train.steer`.
Output: the fine-tuned model artifact (see ``save_model_artifact``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from nexus_core.artifacts import ArtifactRef
from nexus_core.context import StepContext
from nexus_core.contract import model as model_input  # `model` names the trainers' models here
from nexus_core.contract import step, table
from nexus_core.errors import InputError
from nexus_core.train.chat import check_template, encode_chat, stage_tokenizer, template_reads
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
from nexus_core.train.data import contract_layouts, layout, load_rows, sft_records, to_dataset
from nexus_core.train.launch import run_stage
from nexus_core.train.steer import (
    EVAL_INPUT,
    EvalResult,
    Steering,
    callbacks,
    check_tables,
    eval_kwargs,
    eval_metrics,
    steer_problems,
    steered_records,
)


class SFTConfig(StageBase, Steering):
    """Supervised fine-tuning."""

    method: Literal["sft"] = Field(default="sft", description="Stage method")
    chat: bool = Field(default=True, description="Format string prompt/response pairs with the model's chat template")
    packing: bool = Field(default=False, description="Pack several samples per sequence (less padding). Samples are kept "
                                             "apart only with flash-attention (GPU); with sdpa/eager they attend "
                                             "to earlier samples in their pack")
    packing_strategy: Literal["bfd", "bfd_split", "wrapped"] = Field(
        default="bfd", description="trl packing: best-fit decreasing (padding-free), bfd that splits long rows, or wrapped")
    completion_only_loss: bool = Field(default=True, description="Loss on the response tokens only, not the prompt")
    assistant_only_loss: bool = Field(default=True, description="messages data: loss on assistant turns only (found "
                                      "by rendering prefixes: any chat template, no {% generation %} markers needed)")


class SFTResult(TrainResult, EvalResult):
    """A fine-tuned model."""

    method: str = "sft"
    trainable_params: int = 0
    total_params: int = 0


@step(area="train", kind="model", inputs={
    "model": model_input(description="the model to fine-tune"),
    "data": table(one_of=contract_layouts("sft")),
    EVAL_INPUT: table(one_of=contract_layouts("sft"), optional=True, description="rows to evaluate on")},
    reads=template_reads)
def run_sft(cfg: SFTConfig, *, inputs: dict[str, ArtifactRef], out_uri: str, ctx: StepContext) -> SFTResult:
    """Check every dataset's rows and the chat template, train (here or under accelerate), save the model artifact."""
    problems = steer_problems(cfg, inputs)
    for _, df, where in check_tables(inputs, "sft", "sft"):
        if renders_chats(cfg, layout(df, "sft", where, "sft")):
            check_template(cfg, model_dir(inputs["model"]), "sft")
            break
    preflight(cfg, problems)
    m = run_stage(_train, cfg, inputs, out_uri, "sft", ctx)
    return SFTResult.from_metrics(m, trainable_params=int(m["trainable_params"]), total_params=int(m["total_params"]),
                                  **EvalResult.fields(m))


def renders_chats(cfg: SFTConfig, cols: tuple[str, ...]) -> bool:
    """Whether data of this column layout is rendered with a chat template."""
    return cols in (("messages",), ("capability",)) or (cfg.chat and cols != ("text",))


def tokenize_chats(cfg: SFTConfig, records: list[dict], tokenizer) -> list[dict[str, list[int]]]:  # noqa: ANN001
    """Conversational records as ``input_ids`` + ``assistant_masks`` (trl builds labels from the mask)."""
    rows = []
    for r in records:
        if "messages" in r:
            rows.append(encode_chat(tokenizer, r["messages"], cfg.max_length, cfg.assistant_only_loss,
                                    tools=r.get("tools")))
        else:
            rows.append(encode_chat(tokenizer, r["prompt"] + r["completion"], cfg.max_length,
                                    cfg.completion_only_loss))
    kept = [r for r in rows if any(r["assistant_masks"])]
    if not kept:
        raise InputError(f"sft: no row has an assistant token within max_length={cfg.max_length}")
    return kept


def _records(cfg: SFTConfig, ref: ArtifactRef) -> list[dict]:
    df, where = load_rows(ref)
    return sft_records(df, where, "sft", cfg.chat)


def _is_chat(record: dict) -> bool:
    return "messages" in record or isinstance(record.get("prompt"), list)


def build_trainer(cfg: SFTConfig, inputs: dict[str, ArtifactRef], output_dir: Path,  # noqa: ANN201
                  data_metrics: dict[str, float] | None = None):
    """The trl SFTTrainer for this stage (also used by bench/train_sft.py and bench/train_gpu.py);
    ``data_metrics`` (when given) receives the rows trained and held out, and drawn per dataset."""
    from trl import SFTConfig as TrlSFTConfig
    from trl import SFTTrainer

    base = model_dir(inputs["model"])
    records, held, found = steered_records(cfg, inputs, lambda ref: _records(cfg, ref))
    tokenizer = stage_tokenizer(cfg, base)
    chats = {_is_chat(r) for r in records + held}
    if len(chats) > 1:
        raise InputError("sft: the datasets mix chat rows (messages, prompt/response) with plain text rows; "
                         "train them in separate stages")
    chat = chats == {True}
    dataset = to_dataset(tokenize_chats(cfg, records, tokenizer) if chat else records)
    eval_dataset = (to_dataset(tokenize_chats(cfg, held, tokenizer) if chat else held)) if held else None
    args = TrlSFTConfig(**trainer_kwargs(
        cfg, output_dir, max_length=cfg.max_length, packing=cfg.packing, packing_strategy=cfg.packing_strategy,
        completion_only_loss=cfg.completion_only_loss if "prompt" in dataset.column_names else None,
        assistant_only_loss=False, dataset_num_proc=None, **eval_kwargs(cfg, eval_dataset is not None)))
    model = load_model(cfg, base)
    if data_metrics is not None:
        data_metrics.update(found)
    return SFTTrainer(model=model, args=args, train_dataset=dataset, eval_dataset=eval_dataset,
                      processing_class=tokenizer, peft_config=peft_config(cfg), callbacks=callbacks(cfg))


def _train(cfg: SFTConfig, inputs: dict[str, ArtifactRef], out_uri: str, ctx: StepContext) -> dict[str, float]:
    """One process's share of the stage; rank 0 saves the artifact."""
    from nexus_core.train.control import train_and_save

    data_metrics: dict[str, float] = {}
    trainer = build_trainer(cfg, inputs, checkpoint_dir(ctx.work_dir), data_metrics)
    metrics = train_and_save(trainer, cfg, ctx, model_dir(inputs["model"]), out_uri, "sft")
    return {**metrics, **data_metrics, **eval_metrics(trainer, cfg)}
