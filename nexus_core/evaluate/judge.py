"""Rubric judge: score every prediction on the rubric's dimensions with an LLM judge or the heuristic one.

The output is the predictions table plus, per row: ``judge`` (model name, or ``heuristic``),
``judge_kind`` (``llm`` | ``heuristic``), ``status`` (ok | unparseable | failed) and ``reason``, one
integer column per rubric dimension (null unless ok), the rationale and raw verdict, ``judge_reasked``
(the first verdict was unusable and the judge was asked once more), and the ``steps_count`` of the
answer's methodology block (counted by rule for both judges: the gates use it).

The result counts what was judged: ``ok`` rows (usable verdicts, after the re-ask), ``unparseable``
(first verdicts that were unusable, before the re-ask recovered any), ``recovered`` (of those, fixed by
the re-ask), ``failed`` (no answer) and ``coverage`` = ok / rows, which reports and gates state.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Literal

import polars as pl
from pydantic import Field, model_validator

from nexus_core.artifacts import ArtifactRef
from nexus_core.config import ConfigPath, NexusModel
from nexus_core.context import StepContext
from nexus_core.contract import step, table
from nexus_core.errors import ConfigError
from nexus_core.evaluate.rubric import (
    HEURISTIC_LABEL,
    KNOWN_DIMENSIONS,
    JudgeSettings,
    count_ordered_steps,
    heuristic_unknown,
    judge_items,
    load_rubric,
)
from nexus_core.io import load_table, schema_of, write_parquet
from nexus_core.runner import Cost, StepResult
from nexus_core.secrets import scrub


class JudgeConfig(NexusModel):
    """Which judge, which rubric."""

    kind: Literal["heuristic", "llm"] = Field(default="heuristic", description="llm: litellm judge; heuristic: offline rules")
    rubric: ConfigPath = Field(default="configs/eval/rubric.json", validate_default=True, description="Rubric JSON file (dimensions and scale)")
    llm: JudgeSettings = Field(default_factory=JudgeSettings, description="LLM judge endpoint (kind=llm)")
    methodology_min_steps: int = Field(default=3, ge=1, description="Ordered steps that make a methodology block")

    @model_validator(mode="after")
    def _heuristic_knows_the_rubric(self) -> JudgeConfig:
        if self.kind == "heuristic":
            try:
                unknown = heuristic_unknown(load_rubric(self.rubric))
            except ConfigError:
                return self  # a bad rubric file is reported, with its keys, when the step loads it
            if unknown:
                raise ValueError(f"the heuristic judge cannot score {', '.join(map(repr, unknown))} "
                                 f"(it knows {', '.join(KNOWN_DIMENSIONS)}); use kind: llm for this rubric")
        return self


class JudgeResult(StepResult):
    """Verdict counts and per-dimension medians over rows judged ok."""

    judge: str
    judge_kind: str
    label: str
    ok: int = 0
    unparseable: int = Field(default=0, description="First verdicts that were unusable (before the re-ask)")
    recovered: int = Field(default=0, description="Unusable first verdicts the re-ask turned into usable ones")
    failed: int = 0
    coverage: float | None = Field(default=None, description="Rows with a usable verdict / rows")
    dimensions: list[str] = Field(default_factory=list, description="The rubric's dimensions, in order")
    rubric: str = ""
    json_mode: str | None = Field(default=None, description="response_format the LLM judge was sent (none: plain text)")
    medians: dict[str, float] = Field(default_factory=dict)


def _files_read(cfg: JudgeConfig, inputs: dict[str, ArtifactRef]) -> list[str]:
    """The rubric (editing it re-judges) and, for an LLM judge, its recorded response caches."""
    return [cfg.rubric, *(cfg.llm.recorded_cache if cfg.kind == "llm" else [])]


@step(area="evaluate", inputs={"predictions": table("input", "prediction", "reference")}, reads=_files_read)
def run_judge(cfg: JudgeConfig, *, inputs: dict[str, ArtifactRef], out_uri: str, ctx: StepContext) -> JudgeResult:
    """Judge ``inputs['predictions']`` (columns input, prediction, reference) on the rubric."""
    rubric = load_rubric(cfg.rubric)
    preds = load_table(inputs["predictions"])
    answers = preds["prediction"].to_list()
    references = preds["reference"].to_list()

    items = [{"question": q, "answer": a or "", "reference": r}
             for q, a, r in zip(preds["input"].to_list(), answers, references, strict=True)]
    results = judge_items(items, rubric, cfg.kind, cfg.llm,
                          progress=lambda done, total: ctx.progress(done, total, f"{done}/{total} rows judged"))
    judge_name = "heuristic" if cfg.kind == "heuristic" else cfg.llm.model
    label = HEURISTIC_LABEL if cfg.kind == "heuristic" else f"llm judge {cfg.llm.model}"

    cols: dict[str, list] = {
        "judge": [judge_name] * preds.height, "judge_kind": [cfg.kind] * preds.height,
        "rubric": [f"{rubric.name}@v{rubric.version}"] * preds.height,
        "status": [r["status"] for r in results], "reason": [scrub(r["reason"]) for r in results],
    }
    for dim in rubric.names:
        cols[dim] = [r["verdict"][dim] if r["verdict"] else None for r in results]
    cols["rationale"] = [str(r["verdict"].get("rationale", "")) if r["verdict"] else None for r in results]
    cols["raw_verdict"] = [scrub(r["raw"]) for r in results]
    cols["judge_reasked"] = [bool(r.get("reasked")) for r in results]
    cols["steps_count"] = [count_ordered_steps(a) for a in answers]
    cols["has_methodology"] = [n >= cfg.methodology_min_steps for n in cols["steps_count"]]
    for key in ("attempts", "prompt_tokens", "completion_tokens", "cost_usd"):
        cols[f"judge_{key}"] = [r[key] for r in results]
    cols["judge_latency_s"] = [r["latency_s"] for r in results]
    judged = preds.with_columns([pl.Series(k, v, dtype=pl.Int64 if k in rubric.names else None)
                                 for k, v in cols.items()])
    write_parquet(judged, Path(out_uri) / "data.parquet")

    counts = {s: cols["status"].count(s) for s in ("ok", "unparseable", "failed")}
    recovered = sum(1 for a, s in zip(cols["judge_reasked"], cols["status"], strict=True) if a and s == "ok")
    first_unparseable = counts["unparseable"] + recovered  # re-asks happen only after an unusable verdict
    coverage = counts["ok"] / preds.height if preds.height else 0.0
    medians = {d: float(statistics.median(v)) for d in rubric.names if (v := [x for x in cols[d] if x is not None])}
    prefix = f"{cfg.kind}_judge"  # heuristic scores are never logged under an LLM-judge name
    metrics = {f"{prefix}.{d}.median": m for d, m in medians.items()}
    metrics.update({f"{prefix}.ok": counts["ok"], f"{prefix}.unparseable": first_unparseable,
                    f"{prefix}.recovered": recovered, f"{prefix}.failed": counts["failed"],
                    f"{prefix}.coverage": coverage,
                    "methodology_share": sum(cols["has_methodology"]) / max(1, preds.height)})
    cost = Cost(usd=sum(cols["judge_cost_usd"]), tokens_in=sum(cols["judge_prompt_tokens"]),
                tokens_out=sum(cols["judge_completion_tokens"]),
                provider="litellm" if cfg.kind == "llm" else "local", model=judge_name)
    return JudgeResult(rows=judged.height, columns=schema_of(judged), judge=judge_name, judge_kind=cfg.kind,
                       label=label, medians=medians, metrics=metrics, cost=cost, ok=counts["ok"],
                       unparseable=first_unparseable, recovered=recovered, failed=counts["failed"],
                       coverage=coverage, dimensions=rubric.names,
                       json_mode=results[0].get("json_mode") if results else None, rubric=f"{rubric.name}@v{rubric.version}")
