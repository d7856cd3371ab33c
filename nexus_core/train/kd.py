"""Knowledge distillation: the student learns from a teacher's token distribution (forward or reverse
KL at a temperature) mixed with the ordinary hard-label loss.

Two teachers:
- ``source: model`` — a local teacher model (input ``teacher``) run alongside the student; full-vocab KL.
- ``source: logprobs`` — top-k logprobs stored by teacher collection (``logprobs_json``, the OpenAI
  ``choices[0].logprobs.content`` list); KL over the teacher's top-k, renormalised on both sides.

Teacher and student must share a tokenizer: differing vocabularies (model) or teacher tokens that are
not single student tokens (logprobs) stop the stage before any compute, with the differences named.

The loss is a few lines in a ``transformers.Trainer`` subclass, kept here in plain sight:
``loss = alpha * T² * KL(teacher ‖ student) + (1 - alpha) * CE(labels)``.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import Field

from nexus_core.artifacts import ArtifactRef
from nexus_core.context import StepContext
from nexus_core.contract import model as model_input  # `model` names the student and teacher here
from nexus_core.contract import step, table
from nexus_core.errors import InputError
from nexus_core.models.io import load_tokenizer
from nexus_core.models.losses import distill_kl
from nexus_core.train.chat import check_template, encode_chat, stage_tokenizer, template_reads
from nexus_core.train.common import (
    StageBase,
    TrainResult,
    add_lora,
    checkpoint_dir,
    load_model,
    model_dir,
    preflight,
    trainer_kwargs,
)
from nexus_core.train.data import load_rows, need
from nexus_core.train.launch import run_stage

PROMPT_COLS, RESPONSE_COLS = ("input", "user_prompt", "prompt"), ("output", "response", "completion")
_PAD_LOGPROB = -1e4  # stands for "no entry" in a top-k row; exp() is 0 and log_softmax stays finite


class KDConfig(StageBase):
    """Knowledge distillation."""

    method: Literal["kd"] = Field(default="kd", description="Stage method")
    source: Literal["model", "logprobs"] = Field(default="model", description="Teacher model, or stored teacher logprobs")
    divergence: Literal["forward", "reverse"] = Field(default="forward", description="KL(teacher‖student) or reverse")
    temperature: float = Field(default=2.0, gt=0, description="Softening temperature for both distributions")
    alpha: float = Field(default=0.5, ge=0, le=1, description="Weight of the KD term (1 - alpha for the hard labels)")
    logprobs_column: str = Field(default="logprobs_json", description="Column with the teacher's per-token top-k logprobs")
    chat: bool = Field(default=True, description="Render prompts with the chat template")


class KDResult(TrainResult):
    """A distilled student."""

    method: str = "kd"


def _column(df, names: tuple[str, ...], where: str, what: str) -> str:  # noqa: ANN001
    for n in names:
        if n in df.columns:
            return n
    raise InputError(f"{where}: method 'kd' needs a {what} column ({' or '.join(names)}); has: {', '.join(df.columns)}")


def _rows(cfg: KDConfig, inputs: dict[str, ArtifactRef]) -> tuple[list[dict[str, Any]], str]:
    df, where = load_rows(need(inputs, "data", "kd"))
    p, r = _column(df, PROMPT_COLS, where, "prompt"), _column(df, RESPONSE_COLS, where, "response")
    if cfg.source == "logprobs":
        _column(df, (cfg.logprobs_column,), where, "teacher logprobs")
    if "status" in df.columns:
        df = df.filter(df["status"] == "ok")
    keep = [c for c in (p, r, "system_prompt", cfg.logprobs_column) if c in df.columns]
    rows = [x for x in df.select(keep).rename({p: "prompt", r: "response"}).to_dicts() if x["response"]]
    if cfg.source == "logprobs":
        rows = [x for x in rows if x.get(cfg.logprobs_column)]
    if not rows:
        raise InputError(f"{where}: no usable rows for kd (need a response{' and logprobs' * (cfg.source == 'logprobs')})")
    return rows, where


def _token_map(tokenizer) -> dict[str, int]:  # noqa: ANN001
    """Decoded text of each student token → id (what an OpenAI-style server reports as ``token``)."""
    out: dict[str, int] = {}
    for i in range(len(tokenizer)):
        out.setdefault(tokenizer.decode([i]), i)
    return out


def check_tokenizers(cfg: KDConfig, inputs: dict[str, ArtifactRef], rows: list[dict[str, Any]], where: str) -> None:
    """Stop before compute when teacher and student tokenizers differ."""
    student = load_tokenizer(model_dir(inputs["model"]))
    if cfg.source == "model":
        teacher = load_tokenizer(model_dir(need(inputs, "teacher", "kd"), "teacher"))
        sv, tv = student.get_vocab(), teacher.get_vocab()
        if sv != tv:
            diff = sorted(set(sv.items()) ^ set(tv.items()))[:5]
            raise InputError(f"kd: teacher {inputs['teacher'].uri} and student {inputs['model'].uri} have different "
                             f"tokenizers (vocab {len(tv)} vs {len(sv)}; e.g. {diff}); logit distillation needs one "
                             "shared vocabulary")
        return
    # Teacher tokens must be student tokens, and the teacher's segmentation of each response must be the
    # student's own (a different tokenizer that happens to share short tokens still segments differently).
    tmap, bad, total, odd_rows = _token_map(student), [], 0, 0
    for row in rows:
        tokens = [e["token"] for e in _entries(row[cfg.logprobs_column])]
        total += len(tokens)
        bad += [t for t in tokens if t not in tmap]
        if tokens and all(t in tmap for t in tokens):
            odd_rows += student("".join(tokens), add_special_tokens=False)["input_ids"] != [tmap[t] for t in tokens]
    if bad or odd_rows > 0.1 * len(rows):
        raise InputError(f"{where}: teacher tokens are not tokens of the student's tokenizer ({len(bad)} of {total} "
                         f"tokens unknown, e.g. {sorted(set(bad))[:5]}; {odd_rows} of {len(rows)} responses segmented "
                         "differently): teacher and student tokenizers differ; distil from a teacher with the "
                         "student's tokenizer, or use SFT on its responses")


def _entries(value: Any) -> list[dict[str, Any]]:
    return json.loads(value) if isinstance(value, str) else list(value or [])


@step(area="train", kind="model", inputs={
    "model": model_input(description="the student"),
    # a prompt and a response column: SFT data, or teacher collection rows (user_prompt/response)
    "data": table(one_of=[(p, r) for p in PROMPT_COLS for r in RESPONSE_COLS]),
    "teacher": model_input(optional=True, description="the teacher model (source=model)"),
}, reads=template_reads)
def run_kd(cfg: KDConfig, *, inputs: dict[str, ArtifactRef], out_uri: str, ctx: StepContext) -> KDResult:
    """Check rows, chat template and tokenizers, train, save."""
    if cfg.source == "model":
        need(inputs, "teacher", "kd")
    if cfg.chat:
        check_template(cfg, model_dir(inputs["model"]), "kd")
    rows, where = _rows(cfg, inputs)
    check_tokenizers(cfg, inputs, rows, where)
    preflight(cfg)
    m = run_stage(_train, cfg, inputs, out_uri, "kd", ctx)
    return KDResult.from_metrics(m)


def encode(cfg: KDConfig, row: dict[str, Any], tokenizer, tmap: dict[str, int] | None) -> dict[str, Any]:  # noqa: ANN001
    """input_ids/labels (prompt masked), plus the teacher's top-k ids/logprobs per label position.

    With a teacher model and ``chat``, the whole exchange is rendered by the template (its end-of-turn
    token joins the labels); stored logprobs fix the response's tokens, so only the prompt is rendered."""
    msgs = ([{"role": "system", "content": row["system_prompt"]}] if row.get("system_prompt") else [])
    msgs.append({"role": "user", "content": row["prompt"]})
    if cfg.chat and tmap is None:
        enc = encode_chat(tokenizer, [*msgs, {"role": "assistant", "content": row["response"]}], cfg.max_length)
        return {"input_ids": enc["input_ids"],
                "labels": [t if m else -100 for t, m in zip(enc["input_ids"], enc["assistant_masks"], strict=True)]}
    prompt = (tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True) if cfg.chat
              else tokenizer(row["prompt"], add_special_tokens=False)["input_ids"])
    prompt = list(prompt["input_ids"] if isinstance(prompt, dict) else prompt)
    if tmap is None:
        resp = tokenizer(row["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rec: dict[str, Any] = {}
    else:
        entries = _entries(row[cfg.logprobs_column])
        resp = [tmap[e["token"]] for e in entries]
        ids, lps = [], []
        for e in entries:
            top = [t for t in (e.get("top_logprobs") or [{"token": e["token"], "logprob": e["logprob"]}])
                   if t["token"] in tmap]
            ids.append([tmap[t["token"]] for t in top])
            lps.append([float(t["logprob"]) for t in top])
        rec = {"topk_ids": [[]] * len(prompt) + ids, "topk_logprobs": [[]] * len(prompt) + lps}
    ids = (prompt + resp)[: cfg.max_length]
    rec = {k: v[: cfg.max_length] for k, v in rec.items()}
    return {"input_ids": ids, "labels": ([-100] * len(prompt) + resp)[: cfg.max_length], **rec}


def collate(pad_id: int):  # noqa: ANN201 - collator
    """Pad a batch of encoded rows (top-k rows padded to the batch's widest k)."""
    import torch

    def fn(batch: list[dict[str, Any]]) -> dict[str, Any]:
        n = max(len(b["input_ids"]) for b in batch)
        out = {"input_ids": torch.full((len(batch), n), pad_id), "attention_mask": torch.zeros(len(batch), n, dtype=torch.long),
               "labels": torch.full((len(batch), n), -100)}
        for i, b in enumerate(batch):
            m = len(b["input_ids"])
            out["input_ids"][i, :m] = torch.tensor(b["input_ids"])
            out["attention_mask"][i, :m] = 1
            out["labels"][i, :m] = torch.tensor(b["labels"])
        if "topk_ids" in batch[0]:
            k = max((len(r) for b in batch for r in b["topk_ids"]), default=1) or 1
            out["topk_ids"] = torch.zeros(len(batch), n, k, dtype=torch.long)
            out["topk_logprobs"] = torch.full((len(batch), n, k), _PAD_LOGPROB)
            for i, b in enumerate(batch):
                for j, (ids, lps) in enumerate(zip(b["topk_ids"], b["topk_logprobs"], strict=True)):
                    out["topk_ids"][i, j, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                    out["topk_logprobs"][i, j, : len(lps)] = torch.tensor(lps)
        return out

    return fn


def kd_loss(cfg: KDConfig, logits, labels, teacher_logits=None, topk_ids=None, topk_logprobs=None):  # noqa: ANN001, ANN201
    """alpha * T² * KL + (1 - alpha) * CE over response positions (logits at t predict token t+1)."""
    import torch.nn.functional as F

    logits, labels = logits[:, :-1], labels[:, 1:]
    mask = labels != -100
    s = logits[mask].float()
    ce = F.cross_entropy(s, labels[mask])
    t = cfg.temperature
    if teacher_logits is not None:
        s_lp, t_lp = F.log_softmax(s / t, -1), F.log_softmax(teacher_logits[:, :-1][mask].float() / t, -1)
    else:  # stored top-k: compare both distributions restricted to the teacher's top-k tokens
        assert topk_ids is not None and topk_logprobs is not None
        ids, t_raw = topk_ids[:, 1:][mask], topk_logprobs[:, 1:][mask].float()
        s_lp = F.log_softmax(s.gather(-1, ids) / t + (t_raw <= _PAD_LOGPROB) * _PAD_LOGPROB, -1)
        t_lp = F.log_softmax(t_raw / t, -1)
    kl = distill_kl(s_lp, t_lp, cfg.divergence).mean()
    return cfg.alpha * t * t * kl + (1 - cfg.alpha) * ce


def _train(cfg: KDConfig, inputs: dict[str, ArtifactRef], out_uri: str, ctx: StepContext) -> dict[str, float]:
    import torch
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    from nexus_core.train.control import train_and_save

    base = model_dir(inputs["model"])
    tokenizer = stage_tokenizer(cfg, base)
    rows, _ = _rows(cfg, inputs)
    tmap = _token_map(tokenizer) if cfg.source == "logprobs" else None
    dataset = Dataset.from_list([encode(cfg, r, tokenizer, tmap) for r in rows])
    teacher = None
    if cfg.source == "model":
        teacher = load_model(cfg.model_copy(update={"finetune": "full", "load_in_4bit": False}),
                             model_dir(inputs["teacher"], "teacher"), frozen=True)
        teacher.eval().requires_grad_(False)

    class KDTrainer(Trainer):
        def compute_loss(self, model, batch, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001, ANN202
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            t_logits = None
            if teacher is not None:
                teacher.to(out.logits.device)
                with torch.no_grad():
                    t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = kd_loss(cfg, out.logits, batch["labels"], t_logits, batch.get("topk_ids"), batch.get("topk_logprobs"))
            return (loss, out) if return_outputs else loss

    model = load_model(cfg, base)
    if cfg.adapters:
        model = add_lora(cfg, model)
    args = TrainingArguments(**trainer_kwargs(cfg, checkpoint_dir(ctx.work_dir), remove_unused_columns=False))
    trainer = KDTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                        data_collator=collate(tokenizer.pad_token_id))
    return train_and_save(trainer, cfg, ctx, base, out_uri, "kd")
