"""Preference pairs (``chosen``/``rejected``, optional ``prompt``/``input``) for the DPO, ORPO and reward
stages: checked by schema, then loaded once in memory or, above ``stream_threshold_mb``, streamed.

- **Checks** read the inputs' schemas only (parquet schema, first JSONL row, an artifact's manifest), so
  a table is not read once to check it and again to train on it.
- **In memory** (the default below the threshold): every data input read, split by ``eval_split`` and
  mixed by ``data_weights`` as :func:`nexus_core.train.steer.steered_records` does.
- **Streamed** (a data file above ``stream_threshold_mb``): as SFT streams (:mod:`nexus_core.train.stream`):
  each file read in frames of ``BATCH_ROWS`` rows as training consumes them (a ``datasets``
  IterableDataset the trainer tokenizes lazily), shuffled in a seeded buffer, several files mixed by
  ``data_weights`` through ``interleave_datasets``; the eval split is a threshold on each row's hash
  (those rows are read once into memory); ``max_steps`` must be set.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
from pydantic import Field

from nexus_core.artifacts import ArtifactRef
from nexus_core.config import NexusModel
from nexus_core.contract import columns_of
from nexus_core.errors import InputError
from nexus_core.train.data import load_rows, preference_records, to_dataset
from nexus_core.train.steer import EVAL_INPUT, check_tables, data_inputs, steered_records
from nexus_core.train.stream import SHUFFLE_BUFFER, stream_rows, streams, table_file


class PreferenceStreaming(NexusModel):
    """When a preference stage streams its data."""

    stream_threshold_mb: float = Field(default=512.0, ge=0, description="Stream the data (read in batches and "
                                       "tokenized as training goes, never whole in memory) when a data file is "
                                       "larger; max_steps must then be set. 0: always stream")


def streaming(cfg: Any, inputs: dict[str, ArtifactRef]) -> bool:
    """Whether the stage streams: any data input's table file is above ``stream_threshold_mb``."""
    return any(streams(ref, cfg.stream_threshold_mb) for _, ref in data_inputs(inputs))


def _schema(ref: ArtifactRef) -> tuple[pl.DataFrame, str]:
    """An empty frame with the input's columns, read from its schema; the whole table only for a format
    whose columns cannot be read cheaply."""
    cols = columns_of(ref)
    if cols is None:
        return load_rows(ref)
    return pl.DataFrame({c: [] for c in cols}), str(table_file(ref) or ref.path)


def check_preference(cfg: Any, inputs: dict[str, ArtifactRef]) -> tuple[list[str], list[tuple[str, Any, str]]]:
    """Problems that stop the stage before any work (streaming needs ``max_steps`` and streamable files),
    and every data/eval input as (name, empty frame of its columns, where). InputError when a table
    lacks chosen/rejected, or when some datasets have a prompt column and others not (they cannot mix)."""
    method, problems = cfg.method, []
    if streaming(cfg, inputs):
        if cfg.max_steps <= 0:
            problems.append(f"max_steps: streamed data (a file above stream_threshold_mb={cfg.stream_threshold_mb:g}) "
                            "has no length; set max_steps > 0")
        problems += [f"{ref.path} ({name}): cannot be streamed (a .parquet or .jsonl[.zst] table is); raise "
                     "stream_threshold_mb to load it whole" for name, ref in data_inputs(inputs) if not table_file(ref)]
    tables = check_tables(inputs, method, "preference", _schema)
    prompted = {name: "prompt" in df.columns or "input" in df.columns for name, df, _ in tables}
    if len(set(prompted.values())) > 1:
        raise InputError(f"{method}: datasets {', '.join(n for n, p in prompted.items() if p)} have a prompt (or input) "
                         f"column and {', '.join(n for n, p in prompted.items() if not p)} have not; pairs with and "
                         "without prompts cannot be mixed in one stage")
    return problems, tables


def preference_data(cfg: Any, inputs: dict[str, ArtifactRef]) -> tuple[Any, Any, dict[str, float]]:
    """(train dataset, eval dataset or None, metrics) of a preference stage: an in-memory ``Dataset``, or
    a streamed ``IterableDataset`` when :func:`streaming` (metric ``streamed`` = 1)."""
    method, chat = cfg.method, cfg.chat
    if streaming(cfg, inputs):
        return _streamed(cfg, inputs)
    rows, held, found = steered_records(cfg, inputs, lambda ref: preference_records(*load_rows(ref), method, chat))
    return to_dataset(rows), to_dataset(held) if held else None, found


def _frame_pairs(frame: pl.DataFrame, where: str, method: str, chat: bool) -> list[dict[str, Any]]:
    try:
        return preference_records(frame, where, method, chat)
    except InputError:  # a batch whose pairs all have a null: nothing to learn from it, the next may have
        return []


def _pairs(path: str, method: str, chat: bool, share: float, evaluation: bool) -> Iterator[dict[str, Any]]:
    """One file's pairs, frame by frame: the training side of the split or (``evaluation``) the eval side
    (``datasets`` calls this for the training side as training consumes it)."""
    yield from stream_rows(Path(path), lambda f: _frame_pairs(f, path, method, chat), share, evaluation)


def _features(prompted: bool, chat: bool):  # noqa: ANN202 - datasets.Features
    from datasets import Features, List, Value

    messages = List({"role": Value("string"), "content": Value("string")})
    if not prompted:  # pairs without a prompt stay plain text (the trainers read them as whole sequences)
        return Features({"chosen": Value("string"), "rejected": Value("string")})
    kind = messages if chat else Value("string")
    return Features({"prompt": kind, "chosen": kind, "rejected": kind})


def _streamed(cfg: Any, inputs: dict[str, ArtifactRef]) -> tuple[Any, Any, dict[str, float]]:
    from datasets import IterableDataset, interleave_datasets

    method, chat = cfg.method, cfg.chat
    named = [(name, str(table_file(ref))) for name, ref in data_inputs(inputs)]
    cols = columns_of(inputs["data"]) or []
    features = _features("prompt" in cols or "input" in cols, chat)
    parts = [IterableDataset.from_generator(_pairs, features=features, gen_kwargs={
        "path": path, "method": method, "chat": chat, "share": cfg.eval_split, "evaluation": False})
        .shuffle(seed=cfg.seed, buffer_size=SHUFFLE_BUFFER) for _, path in named]
    weights = cfg.data_weights or [1.0] * len(parts)
    train = parts[0] if len(parts) == 1 else interleave_datasets(
        parts, probabilities=[w / sum(weights) for w in weights], seed=cfg.seed, stopping_strategy="all_exhausted")
    if EVAL_INPUT in inputs:
        held = preference_records(*load_rows(inputs[EVAL_INPUT]), method, chat)
    else:
        held = [r for _, path in named for r in _pairs(path, method, chat, cfg.eval_split, True)] if cfg.eval_split else []
    return train, to_dataset(held) if held else None, {"streamed": 1.0, "eval_rows": float(len(held))}
