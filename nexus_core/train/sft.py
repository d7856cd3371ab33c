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
Data files above ``stream_threshold_mb`` are streamed (:mod:`nexus_core.train.stream`).
Output: the fine-tuned model artifact (see ``save_model_artifact``).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import polars as pl
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
    data_inputs,
    eval_kwargs,
    eval_metrics,
    steer_problems,
    steered_records,
)
from nexus_core.train.stream import SHUFFLE_BUFFER, columns, stream_rows, streams, table_file


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
    stream_threshold_mb: float = Field(default=512.0, ge=0, description="Stream the data (read and tokenized in "
                                       "batches as training goes, never whole in memory) when a data file is larger; "
                                       "max_steps must then be set. 0: always stream")


class SFTResult(TrainResult, EvalResult):
    """A fine-tuned model."""

    method: str = "sft"
    trainable_params: int = 0
    total_params: int = 0
    streamed: bool = Field(default=False, description="The data was streamed")


@step(area="train", kind="model", inputs={
    "model": model_input(description="the model to fine-tune"),
    "data": table(one_of=contract_layouts("sft")),
    EVAL_INPUT: table(one_of=contract_layouts("sft"), optional=True, description="rows to evaluate on")},
    reads=template_reads)
def run_sft(cfg: SFTConfig, *, inputs: dict[str, ArtifactRef], out_uri: str, ctx: StepContext) -> SFTResult:
    """Check every dataset's rows and the chat template, train (here or under accelerate), save the model artifact."""
    problems = steer_problems(cfg, inputs)
    streamed = streaming(cfg, inputs)
    if streamed:
        if cfg.max_steps <= 0:
            problems.append(f"max_steps: streamed data (a file above stream_threshold_mb={cfg.stream_threshold_mb:g}) "
                            "has no length; set max_steps > 0")
        problems += [f"{ref.path} ({name}): cannot be streamed (a .parquet or .jsonl[.zst] table is); raise "
                     "stream_threshold_mb to load it whole" for name, ref in data_inputs(inputs) if not table_file(ref)]
    for _, df, where in check_tables(inputs, "sft", "sft", _peek if streamed and not problems else load_rows):
        if renders_chats(cfg, layout(df, "sft", where, "sft")):
            check_template(cfg, model_dir(inputs["model"]), "sft")
            break
    preflight(cfg, problems)
    m = run_stage(_train, cfg, inputs, out_uri, "sft", ctx)
    return SFTResult.from_metrics(m, trainable_params=int(m["trainable_params"]), total_params=int(m["total_params"]),
                                  streamed=bool(m.get("streamed")), **EvalResult.fields(m))


def streaming(cfg: SFTConfig, inputs: dict[str, ArtifactRef]) -> bool:
    """Whether the stage streams its data: any data input's file is above ``stream_threshold_mb``."""
    return any(streams(ref, cfg.stream_threshold_mb) for _, ref in data_inputs(inputs))


def _peek(ref: ArtifactRef) -> tuple[pl.DataFrame, str]:
    """A streamed input's columns (an empty frame) and its file, without reading its rows."""
    return columns(ref), str(table_file(ref) or ref.path)


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


MIXED_KINDS = ("sft: the datasets mix chat rows (messages, prompt/response) with plain text rows; train them in "
               "separate stages")


def _records(cfg: SFTConfig, ref: ArtifactRef) -> list[dict]:
    df, where = load_rows(ref)
    return sft_records(df, where, "sft", cfg.chat)


def _frame_records(cfg: SFTConfig, frame: pl.DataFrame, where: str) -> list[dict]:
    try:
        return sft_records(frame, where, "sft", cfg.chat)
    except InputError:  # a batch whose pairs all have a null: nothing to learn from it, the next may have
        return []


def _tokenized(cfg: SFTConfig, records: Iterator[dict], tokenizer, chat: bool) -> Iterator[dict]:  # noqa: ANN001
    """Streamed records, tokenized in batches when they are chats (rows without an assistant token dropped)."""
    batch: list[dict] = []
    for r in itertools.chain(records, [None]):
        if r is not None:
            batch.append(r)
        if batch and (r is None or len(batch) == 256):
            if not chat:
                yield from batch
            else:
                with contextlib.suppress(InputError):  # no row of this batch fits an assistant token
                    yield from tokenize_chats(cfg, batch, tokenizer)
            batch = []


def _stream_records(path: str, cfg: SFTConfig, evaluation: bool) -> Iterator[dict]:
    return stream_rows(Path(path), lambda f: _frame_records(cfg, f, path), cfg.eval_split, evaluation)


def _train_rows(path: str, cfg: SFTConfig, tokenizer, chat: bool, keys: tuple[str, ...]) -> Iterator[dict]:  # noqa: ANN001
    """The training side of one streamed dataset, as the trainer's columns (``datasets`` calls this)."""
    for row in _tokenized(cfg, _stream_records(path, cfg, False), tokenizer, chat):
        yield {k: row[k] for k in keys}


def _streamed(cfg: SFTConfig, inputs: dict[str, ArtifactRef], tokenizer):  # noqa: ANN001, ANN202
    """(training stream, eval rows, chat?, metrics) of a streamed stage: each data input read in
    batches, the eval split's rows left out (and read once into memory), shuffled in a buffer, mixed
    by ``data_weights``."""
    from datasets import Features, IterableDataset, List, Value, interleave_datasets

    named = [(name, table_file(ref)) for name, ref in data_inputs(inputs)]
    cols = {layout(columns(inputs[name]), "sft", str(path), "sft") for name, path in named}
    kinds = {renders_chats(cfg, c) for c in cols}
    if len(kinds) > 1:
        raise InputError(MIXED_KINDS)
    chat = kinds == {True}
    keys = ["input_ids", "assistant_masks"] if chat else ["text"] if ("text",) in cols else ["prompt", "completion"]
    features = Features({k: List(Value("int64")) if chat else Value("string") for k in keys})

    parts = [IterableDataset.from_generator(_train_rows, features=features, gen_kwargs={
        "path": str(p), "cfg": cfg, "tokenizer": tokenizer, "chat": chat, "keys": tuple(keys)})  # a list would shard
        .shuffle(seed=cfg.seed, buffer_size=SHUFFLE_BUFFER) for _, p in named]
    weights = cfg.data_weights or [1.0] * len(parts)
    dataset = parts[0] if len(parts) == 1 else interleave_datasets(
        parts, probabilities=[w / sum(weights) for w in weights], seed=cfg.seed, stopping_strategy="all_exhausted")
    if EVAL_INPUT in inputs:
        held = _records(cfg, inputs[EVAL_INPUT])
    else:
        held = [r for _, p in named for r in _stream_records(str(p), cfg, True)] if cfg.eval_split else []
    return dataset, held, chat, {"streamed": 1.0, "eval_rows": float(len(held))}


def _is_chat(record: dict) -> bool:
    return "messages" in record or isinstance(record.get("prompt"), list)


def build_trainer(cfg: SFTConfig, inputs: dict[str, ArtifactRef], output_dir: Path,  # noqa: ANN201
                  data_metrics: dict[str, float] | None = None):
    """The trl SFTTrainer for this stage (also used by bench/train_sft.py and bench/train_gpu.py);
    ``data_metrics`` (when given) receives the rows trained and held out, and drawn per dataset."""
    from trl import SFTConfig as TrlSFTConfig
    from trl import SFTTrainer

    base = model_dir(inputs["model"])
    tokenizer = stage_tokenizer(cfg, base)
    if streaming(cfg, inputs):
        dataset, held, chat, found = _streamed(cfg, inputs, tokenizer)
    else:
        records, held, found = steered_records(cfg, inputs, lambda ref: _records(cfg, ref))
        chats = {_is_chat(r) for r in records + held}
        if len(chats) > 1:
            raise InputError(MIXED_KINDS)
        chat = chats == {True}
        dataset = to_dataset(tokenize_chats(cfg, records, tokenizer) if chat else records)
    eval_dataset = (to_dataset(tokenize_chats(cfg, held, tokenizer) if chat else held)) if held else None
    args = TrlSFTConfig(**trainer_kwargs(
        cfg, output_dir, max_length=cfg.max_length, packing=cfg.packing, packing_strategy=cfg.packing_strategy,
        completion_only_loss=cfg.completion_only_loss if "prompt" in (dataset.column_names or []) else None,
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
