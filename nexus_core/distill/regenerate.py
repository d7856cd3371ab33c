"""Regeneration: ask the teacher again about rejected rows with a stricter prompt, re-filter.

The stricter template stresses falsifiability and reproducibility and shows the teacher its previous
answer and why it was rejected. Up to ``max_rounds`` rounds; each attempt (response, verdict,
reasons) is kept in the row's ``history_json``. Accepted rows pass through unchanged.

``final_logprobs_json`` holds the teacher's logprobs of ``final_output``: the collected ones while the
output is the collected response, the new answer's after a regeneration, and null for an output a
reviewer edited (no teacher distribution describes it).
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
from pydantic import Field

from nexus_core.artifacts import ArtifactRef
from nexus_core.config import ConfigPath, NexusModel
from nexus_core.context import StepContext
from nexus_core.contract import step, table
from nexus_core.distill.prompts import TeacherConfig, load_template, template_path
from nexus_core.distill.rules import apply_rules, load_rules
from nexus_core.io import read_table, schema_of, write_parquet
from nexus_core.llm.client import LLMClient, check_model
from nexus_core.runner import Cost, StepResult
from nexus_core.secrets import scrub

REQUIRED = ("row_id", "template_name", "system_prompt", "user_prompt", "response", "decision",
            "reviewed_output", "review_reason")


class RegenerateConfig(NexusModel):
    """Rounds, the stricter template, and the teacher and rules (the flow fills these from its own)."""

    max_rounds: int = Field(default=2, ge=0, description="Regeneration rounds for rejected rows (0: none)")
    template: str = Field(default="strict", description="Stricter prompt template name in prompts_dir")
    prompts_dir: ConfigPath = Field(default="configs/distill/prompts", validate_default=True, description="Directory of prompt templates")
    rules: str = Field(default="configs/distill/filters.yaml", description="Filter rules YAML used to re-filter")
    teacher: TeacherConfig = Field(default_factory=TeacherConfig, description="Teacher model and limits")


class RegenerateResult(StepResult):
    """How many rejected rows were rescued and how many stay rejected."""

    attempted: int = 0
    rescued: int = 0
    still_rejected: int = 0
    rounds_run: int = 0


@step(area="distill", inputs={"reviewed": table(*REQUIRED)},
      reads=lambda cfg, inputs: [template_path(cfg.prompts_dir, cfg.template), cfg.rules,
                                 *cfg.teacher.recorded_cache])
def run_regenerate(cfg: RegenerateConfig, *, inputs: dict[str, ArtifactRef], out_uri: str,
                   ctx: StepContext) -> RegenerateResult:
    """Regenerate the rejected rows of ``inputs["reviewed"]``; write every row with its final state."""
    df = read_table(inputs["reviewed"].path / "data.parquet", columns=REQUIRED)
    rules, _ = load_rules(cfg.rules)
    tpl = load_template(cfg.prompts_dir, cfg.template)
    accepted = df["decision"] == "accept"
    lp = df["logprobs_json"] if "logprobs_json" in df.columns else pl.Series([None] * df.height, dtype=pl.Utf8)
    state = {r["row_id"]: {"response": r["reviewed_output"], "keep": r["decision"] == "accept",
                           "reasons": r["review_reason"] or "", "history": [],
                           "logprobs": lpj if r["reviewed_output"] == r["response"] else None}
             for r, lpj in zip(df.select("row_id", "reviewed_output", "response", "decision", "review_reason")
                               .iter_rows(named=True), lp.to_list(), strict=True)}
    by_id = {r["row_id"]: r for r in df.filter(~accepted).iter_rows(named=True)}
    pending = list(by_id)
    attempted = len(pending)
    client, rounds = None, 0
    if pending and cfg.max_rounds:
        check_model(cfg.teacher, "regenerate.teacher")
        client = LLMClient(cfg.teacher)
    for rnd in range(1, cfg.max_rounds + 1):
        if not pending or client is None:
            break
        rounds = rnd
        ctx.progress(rnd - 1, cfg.max_rounds, f"round {rnd}/{cfg.max_rounds}: asking about {len(pending)} row(s)",
                     force=True)
        batch = []
        for rid in pending:
            row, st = by_id[rid], state[rid]
            user = tpl.render(text=row["user_prompt"], previous=st["response"] or "(no answer)",
                              reasons=st["reasons"] or "unspecified", round=rnd, title="", domain="")
            batch.append([{"role": "system", "content": f"{row['system_prompt']}\n\n{tpl.system}".strip()},
                          {"role": "user", "content": user}])
        done = client.map_sync(batch)
        frame = pl.DataFrame({"row_id": pending, "template_name": [by_id[r]["template_name"] for r in pending],
                              "response": [c.content if c.status == "ok" else None for c in done]},
                             schema={"row_id": pl.Utf8, "template_name": pl.Utf8, "response": pl.Utf8})
        verdicts = apply_rules(frame, rules)
        still = []
        for rid, c, v in zip(pending, done, verdicts.iter_rows(named=True), strict=True):
            reasons = v["reason"] if c.status == "ok" else f"teacher {c.status}: {scrub(c.error)}"
            st = state[rid]
            st["history"].append({"round": rnd, "response": c.content, "keep": bool(v["keep"]), "reasons": reasons,
                                  "status": c.status, "cache_key": c.key, "cost_usd": c.cost_usd})
            answer_lp = json.dumps(c.logprobs) if c.logprobs else None
            if v["keep"]:
                st.update(response=c.content, keep=True, reasons="", logprobs=answer_lp)
            else:
                if c.content:
                    st.update(response=c.content, logprobs=answer_lp)
                st.update(reasons=reasons)
                still.append(rid)
        pending = still
    if client is not None:
        client.close()
    ids = df["row_id"].to_list()
    out = df.with_columns(
        final_output=pl.Series([state[r]["response"] for r in ids], dtype=pl.Utf8),
        final_keep=pl.Series([state[r]["keep"] for r in ids], dtype=pl.Boolean),
        final_logprobs_json=pl.Series([state[r]["logprobs"] for r in ids], dtype=pl.Utf8),
        final_reasons=pl.Series([state[r]["reasons"] for r in ids], dtype=pl.Utf8),
        attempts=pl.Series([len(state[r]["history"]) for r in ids], dtype=pl.Int64),
        history_json=pl.Series([json.dumps(state[r]["history"]) for r in ids], dtype=pl.Utf8),
        origin=pl.Series(["regenerated" if state[r]["history"] and state[r]["keep"] else "original" for r in ids],
                         dtype=pl.Utf8),
    )
    write_parquet(out, Path(out_uri) / "data.parquet")
    rescued = sum(1 for r in by_id if state[r]["keep"])
    spent = client.spent_usd if client else 0.0
    return RegenerateResult(
        rows=out.height, columns=schema_of(out), attempted=attempted, rescued=rescued,
        still_rejected=attempted - rescued, rounds_run=rounds,
        cost=Cost(usd=spent, provider=cfg.teacher.model.split("/")[0], model=cfg.teacher.model),
        metrics={"attempted": attempted, "rescued": rescued, "still_rejected": attempted - rescued,
                 "rounds_run": rounds, "usd_spent": spent})
