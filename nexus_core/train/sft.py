"""SFT: supervised fine-tuning with trl.SFTTrainer — full, LoRA or QLoRA; chat template, packing,
completion-only loss.

Conversations (``messages``, capability data, and prompt/response pairs when ``chat``) are rendered
with the model's chat template (or the ``chat_template`` setting) and tokenized here, with the loss
on the assistant turns found by rendering prefixes (:mod:`nexus_core.train.chat`), so templates
without ``{% generation %}`` markers (Qwen2.5, Llama 3) train on the assistant's tokens only.

Inputs: ``model`` (HF model dir artifact) and ``data`` (table with messages | input/output |
prompt/completion | text, or capability data such as tool calls or reasoning: ``train.capabilities``).
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
from nexus_core.train.data import check_table, contract_layouts, layout, load_rows, sft_records, to_dataset
from nexus_core.train.launch import run_stage


class SFTConfig(StageBase):
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


class SFTResult(TrainResult):
    """A fine-tuned model."""

    method: str = "sft"
    trainable_params: int = 0
    total_params: int = 0


@step(area="train", kind="model", inputs={
    "model": model_input(description="the model to fine-tune"),
    "data": table(one_of=contract_layouts("sft"))}, reads=template_reads)
def run_sft(cfg: SFTConfig, *, inputs: dict[str, ArtifactRef], out_uri: str, ctx: StepContext) -> SFTResult:
    """Check the data's rows and the chat template, train (here or under accelerate), save the model artifact."""
    df, where = check_table(inputs, "sft", "sft")
    if renders_chats(cfg, layout(df, "sft", where, "sft")):
        check_template(cfg, model_dir(inputs["model"]), "sft")
    preflight(cfg)
    m = run_stage(_train, cfg, inputs, out_uri, "sft", ctx)
    return SFTResult.from_metrics(m, trainable_params=int(m["trainable_params"]), total_params=int(m["total_params"]))


def renders_chats(cfg: SFTConfig, cols: tuple[str, ...]) -> bool:
    """Whether data of this column layout is rendered with a chat template."""
    return cols in (("messages",), ("capability",)) or (cfg.chat and cols != ("text",))


def tokenize_chats(cfg: SFTConfig, records: list[dict], tokenizer) -> list[dict[str, list[int]]]:  # noqa: ANN001
    """Conversational records as ``input_ids`` + ``assistant_masks`` (trl builds labels from the mask)."""
    rows = []
    for r in records:
        if "messages" in r:
            rows.append(encode_chat(tokenizer, r["messages"], cfg.max_length, cfg.assistant_only_loss))
        else:
            rows.append(encode_chat(tokenizer, r["prompt"] + r["completion"], cfg.max_length,
                                    cfg.completion_only_loss))
    kept = [r for r in rows if any(r["assistant_masks"])]
    if not kept:
        raise InputError(f"sft: no row has an assistant token within max_length={cfg.max_length}")
    return kept


def build_trainer(cfg: SFTConfig, inputs: dict[str, ArtifactRef], output_dir: Path):  # noqa: ANN201
    """The trl SFTTrainer for this stage (also used by bench/train_sft.py and bench/train_gpu.py)."""
    from trl import SFTConfig as TrlSFTConfig
    from trl import SFTTrainer

    base = model_dir(inputs["model"])
    df, where = load_rows(inputs["data"])
    records = sft_records(df, where, "sft", cfg.chat)
    tokenizer = stage_tokenizer(cfg, base)
    chats = "messages" in records[0] or isinstance(records[0].get("prompt"), list)
    dataset = to_dataset(tokenize_chats(cfg, records, tokenizer) if chats else records)
    args = TrlSFTConfig(**trainer_kwargs(
        cfg, output_dir, max_length=cfg.max_length, packing=cfg.packing, packing_strategy=cfg.packing_strategy,
        completion_only_loss=cfg.completion_only_loss if "prompt" in dataset.column_names else None,
        assistant_only_loss=False, dataset_num_proc=None))
    model = load_model(cfg, base)
    return SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                      peft_config=peft_config(cfg))


def _train(cfg: SFTConfig, inputs: dict[str, ArtifactRef], out_uri: str, ctx: StepContext) -> dict[str, float]:
    """One process's share of the stage; rank 0 saves the artifact."""
    from nexus_core.train.control import train_and_save

    trainer = build_trainer(cfg, inputs, checkpoint_dir(ctx.work_dir))
    return train_and_save(trainer, cfg, ctx, model_dir(inputs["model"]), out_uri, "sft")
