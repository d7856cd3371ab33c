"""Teacher collection: ask the teacher (any litellm model) about every teacher-input row.

Rows stream through in batches (read with pyarrow, written with a ParquetWriter) so memory stays
flat as the input grows. Every response is committed to the response cache as it arrives, so a
killed run resumes with no duplicate and no lost row, and a re-run asks only for rows that are
missing or failed. A row that still fails after retries is kept with ``status`` and ``error``.
With ``teacher.processes > 1`` each batch is split over worker processes (``nexus_core/llm/pool.py``)
that share the cost cap, the rate limit and the response cache.

With ``teacher.top_logprobs: K`` each request asks for ``logprobs=True, top_logprobs=K`` (part of the
cache key) and every answered row keeps ``choices[0].logprobs.content`` as ``logprobs_json``, what a
``kd`` stage with ``source: logprobs`` trains from. Answered rows without them are counted
(``missing_logprobs``) and warned about; a teacher that returns none for a whole batch is refused.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field

from nexus_core.artifacts import ArtifactRef
from nexus_core.config import NexusModel
from nexus_core.context import StepContext
from nexus_core.contract import step, table
from nexus_core.distill.prompts import TeacherConfig
from nexus_core.errors import InputError, StepError
from nexus_core.llm.client import Completion, LLMClient, check_model, run_async
from nexus_core.llm.pool import ClientPool
from nexus_core.runner import Cost, StepResult
from nexus_core.secrets import scrub

log = logging.getLogger(__name__)

REQUIRED = ("row_id", "domain", "template_name", "template_hash", "system_prompt", "user_prompt")

SCHEMA = pa.schema([
    ("row_id", pa.string()), ("domain", pa.string()), ("title", pa.string()), ("source_file", pa.string()),
    ("template_name", pa.string()), ("template_hash", pa.string()), ("system_prompt", pa.string()),
    ("user_prompt", pa.string()), ("response", pa.string()), ("status", pa.string()), ("error", pa.string()),
    ("model", pa.string()), ("prompt_tokens", pa.int64()), ("completion_tokens", pa.int64()),
    ("cost_usd", pa.float64()), ("latency_s", pa.float64()), ("attempts", pa.int64()), ("cached", pa.bool_()),
    ("cache_key", pa.string()), ("request_json", pa.string()), ("logprobs_json", pa.string()),
])


class CollectConfig(NexusModel):
    """Teacher and batching."""

    teacher: TeacherConfig = Field(default_factory=TeacherConfig, description="Teacher model and limits")
    batch_size: int = Field(default=256, ge=1, description="Rows read, asked and written per batch")


class CollectResult(StepResult):
    """Counts by status and what was paid."""

    ok: int = 0
    failed: int = 0
    skipped: int = 0
    cached: int = 0
    offline_misses: list[str] = Field(default_factory=list, description="row_ids with no cached response offline")
    missing_logprobs: int = Field(default=0, description="Answered rows without logprobs although "
                                  "teacher.top_logprobs asked for them")
    stopped_for_cost: bool = False


def messages_for(row: dict[str, Any]) -> list[dict[str, str]]:
    """The chat messages of one teacher-input row."""
    out = []
    if row.get("system_prompt"):
        out.append({"role": "system", "content": row["system_prompt"]})
    out.append({"role": "user", "content": row["user_prompt"]})
    return out


async def _collect(cfg: CollectConfig, src: Path, out: Path, result: CollectResult, ctx: StepContext) -> float:
    """Stream ``src`` through the teacher into ``out``; returns the USD paid."""
    pf = pq.ParquetFile(src)
    limit = min(cfg.teacher.max_samples or pf.metadata.num_rows, pf.metadata.num_rows)
    seen = 0
    client = ClientPool(cfg.teacher, cfg.teacher.processes) if cfg.teacher.processes > 1 else LLMClient(cfg.teacher)
    writer = pq.ParquetWriter(out, SCHEMA, compression="zstd")
    answered = [0]

    def on_answer(i: int, c: Completion) -> None:  # progress as answers arrive, not only per batch
        answered[0] += 1
        ctx.progress(answered[0], limit, f"{answered[0]}/{limit} rows answered")

    try:
        for batch in pf.iter_batches(batch_size=cfg.batch_size):
            rows = batch.to_pylist()[: max(0, limit - seen)]
            if not rows:
                break
            seen += len(rows)
            requests = [messages_for(r) for r in rows]
            done = await client.map(requests, on_done=on_answer)
            records = []
            for row, req, c in zip(rows, requests, done, strict=True):
                result.ok += c.status == "ok"
                result.failed += c.status == "failed"
                result.skipped += c.status == "skipped"
                result.cached += c.cached
                if cfg.teacher.offline and c.status == "failed" and c.error and c.error.startswith("offline"):
                    result.offline_misses.append(row["row_id"])
                records.append({
                    **{k: row.get(k) for k in ("row_id", "domain", "title", "source_file", "template_name",
                                               "template_hash", "system_prompt", "user_prompt")},
                    "response": c.content, "status": c.status, "error": scrub(c.error), "model": c.model,
                    "prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
                    "cost_usd": c.cost_usd, "latency_s": c.latency_s, "attempts": c.attempts, "cached": c.cached,
                    "cache_key": c.key, "request_json": json.dumps({"messages": req, **cfg.teacher.sampling()}),
                    "logprobs_json": json.dumps(c.logprobs) if c.logprobs else None,
                })
            writer.write_table(pa.Table.from_pylist(records, schema=SCHEMA))
            result.rows = (result.rows or 0) + len(records)
            if cfg.teacher.top_logprobs:
                _check_logprobs(cfg, done, result)
            ctx.progress(seen, limit, f"{seen}/{limit} rows asked ({result.ok} ok, {result.failed} failed)")
    finally:
        writer.close()
        client.close()
    return client.spent_usd


def _check_logprobs(cfg: CollectConfig, done: list[Completion], result: CollectResult) -> None:
    """Count answered rows without logprobs; stop when none of the answers so far has any (a provider
    that ignores ``logprobs``: the rest of the run would pay for rows a kd stage cannot use)."""
    result.missing_logprobs += sum(c.status == "ok" and not c.logprobs for c in done)
    if result.ok and result.missing_logprobs == result.ok:
        raise StepError(f"teacher {cfg.teacher.model}: teacher.top_logprobs is {cfg.teacher.top_logprobs} but none "
                        f"of the {result.ok} answered row(s) so far came with logprobs; the provider does not "
                        "return them (its answers are in the response cache). Use a teacher that returns "
                        "logprobs (nexus serve, vLLM, OpenAI), or set teacher.top_logprobs: 0 for SFT-only data")


# Recorded response caches decide what an offline (or partly recorded) run answers: their content is keyed.
@step(area="distill", inputs={"teacher_inputs": table(*REQUIRED)},
      reads=lambda cfg, inputs: cfg.teacher.recorded_cache)
def run_teacher_collect(cfg: CollectConfig, *, inputs: dict[str, ArtifactRef], out_uri: str,
                        ctx: StepContext) -> CollectResult:
    """Ask the teacher about every row of ``inputs["teacher_inputs"]``; write ``data.parquet``."""
    check_model(cfg.teacher)
    src = inputs["teacher_inputs"].path / "data.parquet"
    if not src.is_file():
        raise InputError(f"{src}: file not found")
    result = CollectResult(rows=0)
    spent = run_async(_collect(cfg, src, Path(out_uri) / "data.parquet", result, ctx))
    result.stopped_for_cost = result.skipped > 0  # only the cost cap skips a row
    if result.offline_misses:
        log.warning("offline: %d row(s) have no recorded response: %s", len(result.offline_misses),
                    ", ".join(result.offline_misses[:20]))
    if result.missing_logprobs:
        log.warning("teacher %s returned no logprobs for %d of %d answered row(s): their logprobs_json is "
                    "null, and a kd stage with source: logprobs skips them", cfg.teacher.model,
                    result.missing_logprobs, result.ok)
    if result.stopped_for_cost:
        log.warning("cost cap %.4f USD reached: %d row(s) skipped, kept with status 'skipped'",
                    cfg.teacher.max_cost_usd, result.skipped)
    table = pq.read_table(Path(out_uri) / "data.parquet", columns=["prompt_tokens", "completion_tokens", "cached"])
    fresh = table.filter(pc.invert(table["cached"]))
    tokens_in = pc.sum(fresh["prompt_tokens"]).as_py() or 0
    tokens_out = pc.sum(fresh["completion_tokens"]).as_py() or 0
    result.columns = {f.name: str(f.type) for f in SCHEMA}
    result.cost = Cost(usd=spent, tokens_in=tokens_in, tokens_out=tokens_out,
                       provider=cfg.teacher.model.split("/")[0], model=cfg.teacher.model)
    result.metrics = {"ok": result.ok, "failed": result.failed, "skipped": result.skipped, "cached": result.cached,
                      "offline_misses": len(result.offline_misses), "usd_spent": spent,
                      **({"missing_logprobs": result.missing_logprobs} if cfg.teacher.top_logprobs else {})}
    return result
