"""Visual question answering in the evaluate flow: rows with ``image`` (one file) or ``images`` (a list),
``question``, ``answer`` and optionally ``answers`` (every accepted answer), media relative to the data
file (or ``predict.media_dir``).

The model must take images (:func:`nexus_core.train.modalities.detect_modalities`: an omni artifact or
any LLaVA-style model); a text-only model stops before work with the "modality validation failed"
message. It answers through its own processor: one user turn with the images as content parts in
front of the question (after ``predict.system_prompt``), greedy decoding, batched with left padding.
Prompts are not truncated (an image's tokens cannot be cut); reference perplexity and label scoring
are text-only features and are refused for these rows.

The predictions table keeps the predict step's columns (``input`` is the question, ``reference`` the
answer) plus ``answers`` (JSON list; the answer alone when the row has none) and ``media`` (the row's
files as given), so ``vqa_exact_match`` / ``vqa_accuracy`` (:mod:`nexus_core.evaluate.metrics`), the
judge and the report read it like any other.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl

from nexus_core.artifacts import ArtifactRef
from nexus_core.errors import InputError
from nexus_core.io import read_table
from nexus_core.train.mm_data import check_image
from nexus_core.train.modalities import detect_modalities, modality_problems

MEDIA = ("image", "images")


def is_vqa(columns: list[str] | None) -> bool:
    """Whether a validation set with these columns is a VQA set (question + answer + image/images)."""
    cols = set(columns or [])
    return {"question", "answer"} <= cols and bool(cols & set(MEDIA))


def table_path(ref: ArtifactRef) -> Path:
    """The table file of a dataset input: the file itself, or an artifact's data.parquet / data.jsonl."""
    if ref.path.is_file():
        return ref.path
    return next((ref.path / n for n in ("data.parquet", "data.jsonl") if (ref.path / n).is_file()),
                ref.path / "data.parquet")


def media_root(media_dir: str | Path | None, ref: ArtifactRef) -> Path:
    """Where a row's relative media paths point: ``media_dir``, else the data file's folder."""
    return Path(media_dir) if media_dir else table_path(ref).parent


def vqa_problems(model: ArtifactRef | None, perplexity: bool, labels: list[str] | None) -> list[str]:
    """Why a VQA set cannot be evaluated with this model and predict settings (empty: it can)."""
    problems = []
    if model is None:
        problems.append("evaluate: modality validation failed: the data needs vision but the offline tiny model "
                        "takes text only; name a model with a vision tower (model=<omni artifact>)")
    else:
        problems += modality_problems(["text", "vision"], detect_modalities(model.path), f"model {model.uri}",
                                      "evaluate")
    if perplexity:
        problems.append("predict.perplexity: reference perplexity is not computed on image rows; set "
                        "predict.perplexity=false")
    if labels:
        problems.append("predict.labels: label scoring is not built for image rows; remove predict.labels")
    return problems


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        text = value.strip()
        return [str(v) for v in json.loads(text)] if text.startswith("[") else [value]
    return [str(v) for v in value]


def vqa_rows(df: pl.DataFrame, where: str, root: Path) -> list[dict[str, Any]]:
    """Checked rows ``{question, answer, answers, media, paths}``; a bad row raises naming it."""
    rows = []
    for i, row in enumerate(df.iter_rows(named=True)):
        try:
            media = _as_list(row.get("image")) + _as_list(row.get("images"))
            answers = _as_list(row.get("answers"))
        except (ValueError, TypeError) as exc:
            raise InputError(f"{where}: row {i}: image/images/answers are not a file or a list ({exc})") from None
        if not media:
            raise InputError(f"{where}: row {i}: no image (set image or images)")
        for key in ("question", "answer"):
            if not str(row.get(key) or "").strip():
                raise InputError(f"{where}: row {i}: empty {key}")
        paths = [p if p.is_absolute() else root / p for p in map(Path, media)]
        for f, p in zip(media, paths, strict=True):
            if why := check_image(p):
                raise InputError(f"{where}: row {i}: image {f!r} ({p}) {why}")
        answer = str(row["answer"])
        rows.append({"question": str(row["question"]), "answer": answer, "answers": answers or [answer],
                     "media": media, "paths": paths})
    if not rows:
        raise InputError(f"{where}: validation set has no rows")
    return rows


def media_reads(ref: ArtifactRef, media_dir: str | Path | None) -> list[Path]:
    """The media files of a VQA set (their bytes join the predict step's cache key); none for other sets."""
    path = table_path(ref)
    if not path.is_file():
        return []
    df = read_table(path)
    if not is_vqa(df.columns):
        return []
    root = media_root(media_dir, ref)
    files = {root / f for col in MEDIA if col in df.columns for v in df[col].to_list() for f in _as_list(v)}
    return sorted(p for p in files if p.is_file())


def predict_vqa(model_path: Path, rows: list[dict[str, Any]], *, system_prompt: str | None, batch_size: int,
                max_new_tokens: int, dtype: str, on_batch: Callable[[int], None]) -> dict[str, list[Any]]:
    """Generate an answer per row with the model's own processor; the predictions table's columns."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from nexus_core.io.images import open_upright

    model = AutoModelForImageTextToText.from_pretrained(str(model_path), dtype=getattr(torch, dtype))
    processor = AutoProcessor.from_pretrained(str(model_path))
    tok = processor.tokenizer
    tok.padding_side = "left"  # generation continues flush right
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    preds, n_gen, latency = [], [], []
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        texts, images = [], []
        for r in batch:
            msgs: list[dict[str, Any]] = [{"role": "system", "content": system_prompt}] if system_prompt else []
            msgs.append({"role": "user", "content": [*({"type": "image"} for _ in r["paths"]),
                                                     {"type": "text", "text": r["question"]}]})
            texts.append(processor.apply_chat_template(msgs, add_generation_prompt=True))
            images += [open_upright(p) for p in r["paths"]]  # EXIF orientation applied, as in training
        enc = processor(text=texts, images=images, return_tensors="pt", padding=True)
        enc.pop("token_type_ids", None)
        t0 = time.perf_counter()
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        per_row = (time.perf_counter() - t0) / len(batch)
        for out in gen[:, enc["input_ids"].shape[1]:]:
            ids = [t for t in out.tolist() if t != tok.pad_token_id]
            if tok.eos_token_id in ids:
                ids = ids[:ids.index(tok.eos_token_id)]
            preds.append(tok.decode(ids, skip_special_tokens=True).strip())
            n_gen.append(len(ids))
            latency.append(per_row)
        on_batch(len(preds))
    return {"input": [r["question"] for r in rows], "reference": [r["answer"] for r in rows],
            "answers": [json.dumps(r["answers"], ensure_ascii=False) for r in rows],
            "media": [json.dumps(r["media"], ensure_ascii=False) for r in rows],
            "prediction": preds, "generated_tokens": n_gen, "latency_s": latency}
