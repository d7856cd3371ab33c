"""Benchmark: the base model and every compressed variant side by side, in one table.

Inputs: ``base`` (model), any number of variants under their own names (model artifacts), and an
optional ``heldout`` dataset for quality. Per model: latency p50/p95 of a fixed greedy generation,
time to first token, tokens/s at several batch sizes, peak memory, size on disk, parameters,
perplexity and task accuracy on the held-out set, plus ratios against the base. Written as
``data.parquet`` and ``report.md``; every figure also goes to MLflow as ``<model>.<metric>``.
"""

from __future__ import annotations

import statistics
import threading
import time
from pathlib import Path
from typing import Any

from pydantic import Field

from nexus_core import contract  # contract.model/table: `model` and `table` are local names here
from nexus_core.artifacts import ArtifactRef, atomic_write_text
from nexus_core.compress.common import count_params, dir_bytes, load_texts, perplexity
from nexus_core.config import NexusModel
from nexus_core.context import StepContext
from nexus_core.contract import step
from nexus_core.io import load_table, write_parquet
from nexus_core.models.compressed import int8_runtime_bytes, load_compressed
from nexus_core.models.io import check_model_dir
from nexus_core.runner import StepResult

PROMPT = "The results of the experiment show that"


class BenchmarkConfig(NexusModel):
    """What to measure, and how much."""

    new_tokens: int = Field(default=16, ge=1, description="Tokens generated per timed request")
    repeats: int = Field(default=5, ge=1, description="Timed repetitions per measurement (after one warm-up)")
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 4], description="Batch sizes for tokens/s")
    heldout_rows: int = Field(default=16, ge=1, description="Held-out texts for perplexity and accuracy")
    heldout_column: str | None = Field(default=None, description="Text column of the held-out set (default: auto)")
    threads: int | None = Field(default=None, ge=1, description="torch CPU threads while timing (default: unchanged)")


class BenchmarkResult(StepResult):
    """The comparison table, in small form."""

    models: list[str]
    table: list[dict[str, Any]] = Field(description="One row per model, as in data.parquet")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        import os

        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _PeakRSS:
    """Samples resident memory in a thread: the peak above the level at start."""

    def __enter__(self) -> _PeakRSS:
        self.start, self.peak, self._stop = _rss_bytes(), 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss_bytes() - self.start)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes() - self.start)


def _generate(model: Any, tokenizer: Any, prompts: list[str], new_tokens: int) -> tuple[float, Any]:
    import torch

    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], do_sample=False,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             pad_token_id=tokenizer.pad_token_id)
    return time.perf_counter() - t0, out[:, enc["input_ids"].shape[1]:]


def _accuracy(model: Any, tokenizer: Any, ref: ArtifactRef, texts: list[str], rows: int) -> tuple[float, str]:
    """Exact-prefix accuracy of greedy answers when the set has input/output; else next-token top-1."""
    import torch

    df = load_table(ref)
    if {"input", "output"} <= set(df.columns):
        pairs = [(a, b) for a, b in zip(df["input"].to_list(), df["output"].to_list(), strict=True) if a and b][:rows]
        hits = 0
        for prompt, answer in pairs:
            want = tokenizer(answer, add_special_tokens=False)["input_ids"][:8]
            _, got = _generate(model, tokenizer, [prompt], len(want))
            hits += got[0].tolist() == want
        return hits / max(len(pairs), 1), "answer_prefix_exact"
    correct = total = 0
    with torch.inference_mode():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=256)["input_ids"]
            if ids.shape[1] < 2:
                continue
            pred = model(input_ids=ids).logits[0, :-1].argmax(-1)
            correct += int((pred == ids[0, 1:]).sum())
            total += ids.shape[1] - 1
    return correct / max(total, 1), "next_token_top1"


def _measure(name: str, uri: str, cfg: BenchmarkConfig, heldout: ArtifactRef | None) -> dict[str, Any]:
    check_model_dir(uri)
    with _PeakRSS() as mem:
        model, tokenizer, qmeta = load_compressed(uri)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"
        _generate(model, tokenizer, [PROMPT], cfg.new_tokens)  # warm-up
        latencies = [_generate(model, tokenizer, [PROMPT], cfg.new_tokens)[0] for _ in range(cfg.repeats)]
        ttft = [_generate(model, tokenizer, [PROMPT], 1)[0] for _ in range(cfg.repeats)]
        tps = {}
        for b in cfg.batch_sizes:
            secs = min(_generate(model, tokenizer, [PROMPT] * b, cfg.new_tokens)[0] for _ in range(cfg.repeats))
            tps[b] = b * cfg.new_tokens / secs
    root = Path(uri)
    # INT8: quantized/model_int8.safetensors + the float modules (what the runtime holds), not the fp32 root copy
    size = int8_runtime_bytes(root) if qmeta else dir_bytes(root, "*.safetensors")
    row: dict[str, Any] = {
        "model": name, "uri": uri, "quantization": qmeta.get("method"),
        "params": count_params(model), "size_mb": size / 1e6,
        "latency_p50_ms": statistics.median(latencies) * 1e3,
        "latency_p95_ms": sorted(latencies)[min(len(latencies) - 1, int(0.95 * len(latencies)))] * 1e3,
        "ttft_ms": statistics.median(ttft) * 1e3, "peak_mem_mb": mem.peak / 1e6,
        **{f"tokens_per_s_b{b}": v for b, v in tps.items()},
        "perplexity": None, "accuracy": None, "accuracy_kind": None,
    }
    if heldout is not None:
        texts = load_texts(heldout, cfg.heldout_column, cfg.heldout_rows)
        tokenizer.padding_side = "right"
        row["perplexity"] = perplexity(model, tokenizer, texts)
        row["accuracy"], row["accuracy_kind"] = _accuracy(model, tokenizer, heldout, texts, cfg.heldout_rows)
    return row


def _report(rows: list[dict[str, Any]], cols: list[str]) -> str:
    lines = ["# Compression benchmark", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [f"{r[c]:.4g}" if isinstance(r[c], float) else ("" if r[c] is None else str(r[c])) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Ratios are variant / base (latency < 1 is faster, size < 1 is smaller). "
              "Peak memory is the process RSS increase while loading and running the model."]
    return "\n".join(lines) + "\n"


# Variants come under their own names (dynamic): _measure checks each model dir itself.
@step(area="compress", kind="report",
      inputs={"base": contract.model(description="The model the variants are compared against"),
              "heldout": contract.table(optional=True,
                                        description="Held-out texts for perplexity and accuracy")})
def run_benchmark(cfg: BenchmarkConfig, *, inputs: dict[str, ArtifactRef], out_uri: str,
                  ctx: StepContext) -> BenchmarkResult:
    """Measure ``base`` and every other model input; write the side-by-side table under ``out_uri``."""
    import polars as pl
    import torch

    heldout = inputs.get("heldout")
    models = {"base": inputs["base"], **{k: v for k, v in inputs.items() if k not in {"base", "heldout"}}}
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rows = []
    try:
        for name, ref in models.items():
            rows.append(_measure(name, str(ref.path), cfg, heldout))
            ctx.progress(len(rows), len(models), f"{len(rows)}/{len(models)} models measured ({name})")
    finally:
        torch.set_num_threads(threads)
    base = rows[0]
    for r in rows:
        r["latency_ratio"] = r["latency_p50_ms"] / base["latency_p50_ms"]
        r["size_ratio"] = r["size_mb"] / base["size_mb"]
        r["params_ratio"] = r["params"] / base["params"]
        r["perplexity_ratio"] = r["perplexity"] / base["perplexity"] if base["perplexity"] else None
    out = Path(out_uri)
    table = pl.DataFrame(rows, infer_schema_length=None)
    write_parquet(table, out / "data.parquet")
    cols = ["model", "quantization", "params", "size_mb", "size_ratio", "latency_p50_ms", "latency_p95_ms",
            "latency_ratio", "ttft_ms", *[f"tokens_per_s_b{b}" for b in cfg.batch_sizes], "peak_mem_mb",
            "perplexity", "perplexity_ratio", "accuracy"]
    atomic_write_text(out / "report.md", _report(rows, cols))
    metrics = {f"{r['model']}.{k}": float(v) for r in rows for k, v in r.items()
               if isinstance(v, int | float) and not isinstance(v, bool)}
    return BenchmarkResult(models=list(models), table=rows, rows=len(rows),
                           columns={c: str(t) for c, t in table.schema.items()}, metrics=metrics)
