"""CPT: continued pretraining on raw text — packed fixed-length blocks, streamed when the corpus is
large, optional RoPE scaling for a longer context. Uses transformers.Trainer directly.

Inputs: ``model`` and ``data`` (table or file with a ``text`` column, or the column named by
``text_column``: the contract cannot name it, the stage checks it). Files above
``stream_threshold_mb`` are read with ``datasets`` streaming (never fully in memory); ``max_steps``
must then be set, since a stream has no length.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal

from pydantic import Field

from nexus_core.artifacts import ArtifactRef
from nexus_core.config import NexusModel
from nexus_core.context import StepContext
from nexus_core.contract import model as model_input  # `model` names the trainer's model here
from nexus_core.contract import step, table
from nexus_core.errors import InputError
from nexus_core.train.chat import stage_tokenizer
from nexus_core.train.common import (
    StageBase,
    TrainResult,
    add_lora,
    checkpoint_dir,
    full_state_dict,
    is_main_process,
    load_model,
    model_dir,
    param_delta,
    param_snapshot,
    preflight,
    save_model_artifact,
    saved_dtype,
    trainer_kwargs,
)
from nexus_core.train.data import layout, load_rows
from nexus_core.train.launch import run_stage


class RopeScaling(NexusModel):
    """Extend the context window by scaling rotary position embeddings."""

    type: Literal["linear", "dynamic", "yarn"] = Field(default="linear", description="RoPE scaling method")
    factor: float = Field(default=2.0, gt=1, description="Context multiplier (max_position_embeddings is scaled too)")


class CPTConfig(StageBase):
    """Continued pretraining."""

    method: Literal["cpt"] = Field(default="cpt", description="Stage method")
    text_column: str = Field(default="text", description="Column holding the raw text")
    stream_threshold_mb: float = Field(default=512.0, ge=0, description="Stream the corpus when its file is larger")
    rope_scaling: RopeScaling | None = Field(default=None, description="RoPE scaling for long context, or none")


class CPTResult(TrainResult):
    """A continued-pretrained model."""

    method: str = "cpt"
    streamed: bool = False
    context_length: int = 0


def corpus_file(ref: ArtifactRef) -> Path:
    """The table file behind a dataset ref (the artifact's data.parquet, or the raw file itself)."""
    path = ref.path
    return path / "data.parquet" if path.is_dir() else path


@step(area="train", kind="model", inputs={
    "model": model_input(description="the model to continue pretraining"),
    "data": table(description="raw text: a table with the text_column (default 'text')")})
def run_cpt(cfg: CPTConfig, *, inputs: dict[str, ArtifactRef], out_uri: str, ctx: StepContext) -> CPTResult:
    """Check the text column (without loading a large corpus), train, save."""
    path = corpus_file(inputs["data"])
    streamed = path.is_file() and path.stat().st_size > cfg.stream_threshold_mb * 2**20
    problems = []
    if streamed:
        if cfg.max_steps <= 0:
            problems.append(f"{path}: streamed corpus ({path.stat().st_size / 2**20:.0f} MB) needs max_steps > 0")
        cols = _stream(path).column_names or []
        if cols and cfg.text_column not in cols:
            raise InputError(f"{path}: method 'cpt' needs column {cfg.text_column!r}; has: {', '.join(cols)}")
    else:
        df, where = load_rows(inputs["data"])
        if cfg.text_column == "text":
            layout(df, "text", where, "cpt")
        elif cfg.text_column not in df.columns:
            raise InputError(f"{where}: method 'cpt' needs column {cfg.text_column!r}; has: {', '.join(df.columns)}")
    preflight(cfg, problems)
    m = run_stage(_train, cfg, inputs, out_uri, "cpt", ctx)
    return CPTResult.from_metrics(m, streamed=bool(m["streamed"]), context_length=int(m["context_length"]))


def _stream(path: Path):  # noqa: ANN202 - datasets.IterableDataset
    from datasets import load_dataset

    fmt = "parquet" if path.name.endswith(".parquet") else "json"
    return load_dataset(fmt, data_files=str(path), split="train", streaming=True)


def pack(texts: Iterable[str], tokenizer, block: int) -> Iterator[dict[str, list[int]]]:  # noqa: ANN001
    """Concatenate tokenized texts (each ended by EOS) and cut fixed ``block``-token sequences."""
    buf: list[int] = []
    for text in texts:
        if not text:
            continue
        buf.extend(tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
        while len(buf) >= block:
            yield {"input_ids": buf[:block]}
            buf = buf[block:]
    if buf and len(buf) >= block // 4:  # a short tail would mostly be padding; keep it only if substantial
        yield {"input_ids": buf}


def _train(cfg: CPTConfig, inputs: dict[str, ArtifactRef], out_uri: str, ctx: StepContext) -> dict[str, float]:
    from datasets import Dataset, IterableDataset
    from transformers import AutoConfig, DataCollatorForLanguageModeling, Trainer, TrainingArguments

    from nexus_core.train.control import fit

    base = model_dir(inputs["model"])
    tokenizer = stage_tokenizer(cfg, base)  # a chat_template setting is carried to the trained model
    overrides, context = {}, AutoConfig.from_pretrained(str(base)).max_position_embeddings
    if cfg.rope_scaling:
        overrides["rope_scaling"] = {"rope_type": cfg.rope_scaling.type, "factor": cfg.rope_scaling.factor,
                                     "original_max_position_embeddings": context}
        context = int(context * cfg.rope_scaling.factor)
        overrides["max_position_embeddings"] = context
    block = min(cfg.max_length, context)
    path = corpus_file(inputs["data"])
    streamed = path.is_file() and path.stat().st_size > cfg.stream_threshold_mb * 2**20
    if streamed:
        col = cfg.text_column
        dataset = IterableDataset.from_generator(
            lambda: pack((r[col] for r in _stream(path)), tokenizer, block))
    else:
        df, _ = load_rows(inputs["data"])
        dataset = Dataset.from_list(list(pack(df[cfg.text_column].drop_nulls().to_list(), tokenizer, block)))
    model = load_model(cfg, base, config_overrides=overrides)
    if cfg.adapters:
        model = add_lora(cfg, model)
    args = TrainingArguments(**trainer_kwargs(cfg, checkpoint_dir(ctx.work_dir)))
    trainer = Trainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,  # pyright: ignore[reportArgumentType] - datasets' IterableDataset is what Trainer streams
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    before = param_snapshot(trainer.model)
    metrics = fit(trainer, cfg, ctx)
    state = full_state_dict(trainer)  # FSDP/DeepSpeed: gathered on every rank, else None
    metrics.update(param_delta(before, trainer.model, None if cfg.adapters else saved_dtype(cfg, base), state),
                   streamed=float(streamed), context_length=float(context))
    if is_main_process():
        save_model_artifact(cfg, trainer, tokenizer, base, out_uri, "cpt", state=state)
        if overrides:  # merged weights must carry the scaled RoPE config
            from transformers import AutoConfig as _AC

            conf = _AC.from_pretrained(out_uri)
            for k, v in overrides.items():
                setattr(conf, k, v)
            conf.save_pretrained(out_uri)
    return metrics
