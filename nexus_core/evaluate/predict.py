"""Predictions: batched greedy generation of a model on a validation set, plus reference log-likelihoods.

Validation set: any table with ``input`` and ``output`` (reference) columns — the SFT dataset format —
or ``prompt``/``completion``. Writes ``data.parquet`` and the same table as
``predictions_<run_id>.parquet`` with one row per example: the prediction, the reference's summed
negative log-likelihood and token count (for perplexity), and, when ``labels`` are configured, the
label the model finds most likely and the positive-class probability (for accuracy/F1/AUROC).

What is evaluated is what ships: the model loads through :func:`nexus_core.models.io.load_causal_lm`,
so a quantize-step INT8 variant runs through its INT8 runtime (``runtime: int8`` in the result), and
long prompts are truncated from the *left*, keeping the question and the chat template's generation
prompt at the end. Perplexity, accuracy and the judged answers all come from this one table, so they
are computed on the same rows; ``rows_digest`` names those rows, equal for every variant evaluated on
the same data.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
from pydantic import Field

from nexus_core.artifacts import ArtifactRef
from nexus_core.config import NexusModel, PathOrName
from nexus_core.context import StepContext
from nexus_core.contract import columns_of, step, table
from nexus_core.contract import model as model_dir
from nexus_core.errors import InputError
from nexus_core.evaluate.vqa import is_vqa, media_reads, media_root, predict_vqa, vqa_problems, vqa_rows
from nexus_core.io import load_table, read_table, schema_of, write_parquet
from nexus_core.runner import Cost, StepResult

PASS_THROUGH = ("label", "target", "meta", "domain", "title", "abstract", "quality", "harmful")


class PredictConfig(NexusModel):
    """How to generate predictions."""

    run_id: str = Field(default="adhoc", description="Evaluation run id; names predictions_<run_id>.parquet")
    max_rows: int | None = Field(default=None, ge=1, description="Evaluate only the first N rows (None: all)")
    batch_size: int = Field(default=8, ge=1, description="Prompts generated together (left-padded)")
    max_new_tokens: int = Field(default=64, ge=1, description="Longest generated answer")
    max_input_tokens: int = Field(default=384, ge=8, description="Prompts are truncated from the left to this length")
    system_prompt: str | None = Field(default=None, description="System message prepended to every prompt")
    use_chat_template: bool = Field(default=True, description="Format prompts with the tokenizer's chat template if it has one")
    perplexity: bool = Field(default=True, description="Score the reference under the model (ref_nll, ref_tokens)")
    labels: list[str] | None = Field(default=None, description="Classification: candidate labels scored by likelihood; "
                                                       "the second is the positive class for AUROC")
    dtype: str = Field(default="float32", description="torch dtype to load the model in")
    seed: int = Field(default=0, description="Torch seed (generation is greedy; this pins any randomness)")
    media_dir: PathOrName | None = Field(default=None, description="VQA sets: folder the rows' image paths are "
                                         "relative to (default: the data file's folder)")


class PredictResult(StepResult):
    """Where the predictions are and how long they took."""

    run_id: str
    predictions_file: str
    model_uri: str
    seconds_per_row: float
    runtime: str = Field(default="float", description="int8: a quantized variant run through its INT8 runtime; "
                                                      "float: HF weights (adapters merged)")
    rows_digest: str = Field(default="", description="sha256 over the evaluated rows' ids and inputs")


def _prompt_text(tokenizer: Any, cfg: PredictConfig, text: str) -> str:
    if cfg.use_chat_template and getattr(tokenizer, "chat_template", None):
        msgs = ([{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else [])
        msgs.append({"role": "user", "content": text})
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return f"{cfg.system_prompt}\n\n{text}\n" if cfg.system_prompt else f"{text}\n"


def _continuation_nll(model: Any, tokenizer: Any, prompts: list[str], conts: list[str], max_in: int,
                      on_row: Callable[[], None] | None = None) -> list[tuple[float, int]]:
    """Summed NLL (nats) and token count of each continuation given its prompt, teacher-forced;
    ``on_row()`` after each row (progress)."""
    import torch

    out = []
    for prompt, cont in zip(prompts, conts, strict=True):
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"][-max_in:]
        c_ids = tokenizer(cont, add_special_tokens=False)["input_ids"]
        if not c_ids:
            out.append((0.0, 0))
        else:
            ids = torch.tensor([p_ids + c_ids])
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0, :-1].float()
            logp = torch.log_softmax(logits, dim=-1)
            targets = ids[0, 1:]
            tok_lp = logp.gather(1, targets[:, None])[:, 0][len(p_ids) - 1:]
            out.append((float(-tok_lp.sum()), len(c_ids)))
        if on_row is not None:
            on_row()
    return out


def encode_prompts(tokenizer: Any, prompts: list[str], max_input_tokens: int) -> Any:
    """Batch-encode ``prompts`` left-padded and truncated from the left: a long prompt loses its start,
    never the question and generation prompt at its end (what the model must answer)."""
    tokenizer.padding_side = "left"  # decoder-only generation needs the prompt flush right
    tokenizer.truncation_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True, truncation=True, max_length=max_input_tokens,
                    add_special_tokens=False)
    enc.pop("token_type_ids", None)  # PreTrainedTokenizerFast emits it; causal LMs reject it
    return enc


def rows_digest(row_ids: list[str], inputs: list[str]) -> str:
    """sha256 over (row id, input) of every evaluated row, in order."""
    h = hashlib.sha256()
    for rid, text in zip(row_ids, inputs, strict=True):
        h.update(json.dumps([rid, text], ensure_ascii=False).encode("utf-8") + b"\n")
    return h.hexdigest()


def _read_validation(ref: ArtifactRef) -> pl.DataFrame:
    df = load_table(ref)
    if "input" not in df.columns and {"prompt", "completion"} <= set(df.columns):
        df = df.rename({"prompt": "input", "completion": "output"})
    missing = [c for c in ("input", "output") if c not in df.columns]
    if missing:
        raise InputError(f"{ref.uri}: validation set missing column(s) {', '.join(missing)} "
                         f"(needs input/output or prompt/completion; has: {', '.join(df.columns)})")
    if df.height == 0:
        raise InputError(f"{ref.uri}: validation set has no rows")
    return df


def _first_number(text: str | None) -> float | None:
    m = re.search(r"-?\d+(?:\.\d+)?", text or "")
    return float(m.group(0)) if m else None


def _media_reads(cfg: PredictConfig, inputs: dict[str, ArtifactRef]) -> list[Path]:
    return media_reads(inputs["dataset"], cfg.media_dir) if "dataset" in inputs else []


@step(area="evaluate", inputs={"model": model_dir(),
                               "dataset": table(one_of=[("input", "output"), ("prompt", "completion"),
                                                        ("image", "question", "answer"),
                                                        ("images", "question", "answer")])}, reads=_media_reads)
def run_predict(cfg: PredictConfig, *, inputs: dict[str, ArtifactRef], out_uri: str,
                ctx: StepContext) -> PredictResult:
    """Generate a prediction for every validation row with the model in ``inputs['model']``
    (VQA rows with images: :mod:`nexus_core.evaluate.vqa`)."""
    import torch

    if is_vqa(columns_of(inputs["dataset"])):
        return _run_vqa(cfg, inputs, Path(out_uri), ctx)
    from nexus_core.models.compressed import QUANT_DIR
    from nexus_core.models.io import load_causal_lm

    df = _read_validation(inputs["dataset"])
    if cfg.max_rows:
        df = df.head(cfg.max_rows)
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_causal_lm(inputs["model"].path, dtype=cfg.dtype, int8=True)  # INT8 variants run as INT8
    runtime = "int8" if (inputs["model"].path / QUANT_DIR).is_dir() else "float"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token

    texts = [str(x) for x in df["input"].to_list()]
    refs = [None if x is None else str(x) for x in df["output"].to_list()]
    prompts = [_prompt_text(tokenizer, cfg, t) for t in texts]
    preds, n_gen, latency = [], [], []
    t_start = time.perf_counter()
    # progress in row passes: generation, then the reference and each label scored per row
    passes = 1 + int(cfg.perplexity) + len(cfg.labels or [])
    total, scored = passes * len(prompts), [0]

    def score_tick(what: str) -> Callable[[], None]:
        rows = [0]

        def tick() -> None:
            rows[0] += 1
            scored[0] += 1
            ctx.progress(len(prompts) + scored[0], total,
                         f"{len(prompts)} predictions; {what} scored {rows[0]}/{len(prompts)}")
        return tick

    for i in range(0, len(prompts), cfg.batch_size):
        batch = prompts[i:i + cfg.batch_size]
        enc = encode_prompts(tokenizer, batch, cfg.max_input_tokens)
        t0 = time.perf_counter()
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=cfg.max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        per_row = (time.perf_counter() - t0) / len(batch)
        new = gen[:, enc["input_ids"].shape[1]:]
        for row in new:
            ids = [t for t in row.tolist() if t != tokenizer.pad_token_id]
            if tokenizer.eos_token_id in ids:
                ids = ids[:ids.index(tokenizer.eos_token_id)]
            preds.append(tokenizer.decode(ids, skip_special_tokens=True).strip())
            n_gen.append(len(ids))
            latency.append(per_row)
        ctx.progress(len(preds), total, f"{len(preds)}/{len(prompts)} predictions")

    cols: dict[str, Any] = {
        "row_id": [str(x) for x in df["row_id"].to_list()] if "row_id" in df.columns else [str(i) for i in range(df.height)],
        "input": texts, "reference": refs, "prediction": preds, "generated_tokens": n_gen, "latency_s": latency,
    }
    if cfg.perplexity:
        nll = _continuation_nll(model, tokenizer, prompts, [r or "" for r in refs], cfg.max_input_tokens,
                                score_tick("references"))
        cols["ref_nll"] = [n for n, _ in nll]
        cols["ref_tokens"] = [c for _, c in nll]
    if cfg.labels:
        by_label = [_continuation_nll(model, tokenizer, prompts, [lab] * len(prompts), cfg.max_input_tokens,
                                      score_tick(f"label {lab!r}")) for lab in cfg.labels]
        pred_label, score = [], []
        for r in range(len(prompts)):
            lls = [-by_label[k][r][0] for k in range(len(cfg.labels))]
            top = max(lls)
            probs = [math.exp(x - top) for x in lls]
            pred_label.append(cfg.labels[lls.index(top)])
            score.append(probs[min(1, len(probs) - 1)] / sum(probs))
        cols["pred_label"], cols["score"] = pred_label, score
    table = pl.DataFrame(cols)
    for name in PASS_THROUGH:
        if name in df.columns and name not in table.columns:
            col = df[name]
            if col.dtype == pl.Object or isinstance(col.dtype, pl.Struct | pl.List):
                col = pl.Series(name, [json.dumps(v, default=str) for v in col.to_list()])
            table = table.with_columns(col.alias(name))
    if "target" in table.columns:
        table = table.with_columns(pl.Series("pred_value", [_first_number(p) for p in preds], dtype=pl.Float64))

    out = Path(out_uri)
    write_parquet(table, out / "data.parquet")
    fname = f"predictions_{cfg.run_id}.parquet"
    shutil.copyfile(out / "data.parquet", out / fname)
    seconds = time.perf_counter() - t_start
    return PredictResult(rows=table.height, columns=schema_of(table), run_id=cfg.run_id, predictions_file=fname,
                         model_uri=inputs["model"].uri, seconds_per_row=seconds / max(1, table.height),
                         runtime=runtime, rows_digest=rows_digest(cols["row_id"], texts),
                         metrics={"predict_seconds": seconds, "mean_generated_tokens": sum(n_gen) / max(1, len(n_gen))},
                         cost=Cost(provider="local", model=inputs["model"].path.name))


def _run_vqa(cfg: PredictConfig, inputs: dict[str, ArtifactRef], out: Path, ctx: StepContext) -> PredictResult:
    """Predictions for a VQA set: checked rows, the model's processor answers (nexus_core.evaluate.vqa)."""
    import torch

    ref, model = inputs["dataset"], inputs["model"]
    problems = vqa_problems(model, cfg.perplexity, cfg.labels)
    if problems:
        raise InputError("; ".join(problems))
    df = load_table(ref) if ref.path.is_dir() else read_table(ref.path)
    if cfg.max_rows:
        df = df.head(cfg.max_rows)
    rows = vqa_rows(df, ref.uri, media_root(cfg.media_dir, ref))
    torch.manual_seed(cfg.seed)
    t_start = time.perf_counter()
    cols = predict_vqa(model.path, rows, system_prompt=cfg.system_prompt, batch_size=cfg.batch_size,
                       max_new_tokens=cfg.max_new_tokens, dtype=cfg.dtype,
                       on_batch=lambda n: ctx.progress(n, len(rows), f"{n}/{len(rows)} answers"))
    row_ids = [str(x) for x in df["row_id"].to_list()] if "row_id" in df.columns else [str(i) for i in range(df.height)]
    table = pl.DataFrame({"row_id": row_ids, **cols})
    for name in PASS_THROUGH:
        if name in df.columns and name not in table.columns:
            table = table.with_columns(df[name].alias(name))
    write_parquet(table, out / "data.parquet")
    fname = f"predictions_{cfg.run_id}.parquet"
    shutil.copyfile(out / "data.parquet", out / fname)
    seconds = time.perf_counter() - t_start
    n_gen = cols["generated_tokens"]
    return PredictResult(rows=table.height, columns=schema_of(table), run_id=cfg.run_id, predictions_file=fname,
                         model_uri=model.uri, seconds_per_row=seconds / max(1, table.height),
                         rows_digest=rows_digest(row_ids, [f"{q}\n{m}" for q, m in zip(cols["input"], cols["media"],
                                                                                         strict=True)]),
                         metrics={"predict_seconds": seconds, "mean_generated_tokens": sum(n_gen) / max(1, len(n_gen))},
                         cost=Cost(provider="local", model=model.path.name))
