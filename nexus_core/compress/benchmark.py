"""Benchmark: the base model and every compressed variant side by side, in one table.

Inputs: ``base`` (model), any number of variants under their own names (model artifacts), and an
optional ``heldout`` dataset for quality. Timing is built to be believed on a shared machine:

- every model is loaded once, then measured in **rounds**: each round times every model (the base
  included) once per figure, in an order rotated each round, so a burst of load hits all models
  alike. ``warmup_rounds`` run first and are discarded;
- each figure is the **median over rounds** with its **IQR** (75th - 25th percentile);
- ratios to the base are **paired**: variant / base within the same round, then the median (and IQR)
  of those per-round ratios;
- torch's intra-op thread count is **pinned** for the whole measurement and written in the report,
  with the CPU, torch version and load average.

Per model: generation latency (``new_tokens`` greedy, batch 1), time to first token, tokens/s per
batch size, peak RSS while loading and warming up, size (every file of the artifact but its
manifest), parameters, and perplexity and accuracy on the held-out set. Written as ``data.parquet``,
``report.md`` and ``settings.json``; every figure also goes to MLflow as ``<model>.<metric>``.
"""

from __future__ import annotations

import statistics
import threading
import time
from pathlib import Path
from typing import Any

from pydantic import Field

from nexus_core import contract  # contract.model/table: `model` and `table` are local names here
from nexus_core.artifacts import ArtifactRef, atomic_write_json, atomic_write_text
from nexus_core.compress.common import count_params, load_rows, load_texts, perplexity, shipped_bytes
from nexus_core.config import NexusModel
from nexus_core.context import StepContext
from nexus_core.contract import step
from nexus_core.errors import InputError
from nexus_core.io import write_parquet
from nexus_core.models.compressed import load_compressed
from nexus_core.models.io import check_model_dir
from nexus_core.runner import StepResult

PROMPT = "The results of the experiment show that"


class BenchmarkConfig(NexusModel):
    """What to measure, and how much."""

    new_tokens: int = Field(default=16, ge=1, description="Tokens generated per timed request")
    rounds: int = Field(default=7, ge=2, description="Timed rounds; each measures every model once per figure, "
                                                     "the base included, in an order rotated each round")
    warmup_rounds: int = Field(default=1, ge=0, description="Rounds run first and discarded")
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 4], description="Batch sizes for tokens/s")
    heldout_rows: int = Field(default=16, ge=1, description="Held-out texts for perplexity and accuracy")
    heldout_column: str | None = Field(default=None, description="Text column of the held-out set (default: auto)")
    threads: int | None = Field(default=None, ge=1, description="torch intra-op threads, pinned while measuring and "
                                                        "printed in the report (default: torch's current count)")


class BenchmarkResult(StepResult):
    """The comparison table, in small form."""

    models: list[str]
    table: list[dict[str, Any]] = Field(description="One row per model, as in data.parquet")
    settings: dict[str, Any] = Field(default_factory=dict, description="Threads, rounds, machine: as in the report")


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

    df = load_rows(ref)
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


def _quartiles(values: list[float]) -> tuple[float, float]:
    """Median and interquartile range (75th - 25th percentile, inclusive method)."""
    if len(values) < 2:
        return values[0], 0.0
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q2, q3 - q1


def _load(name: str, uri: str) -> dict[str, Any]:
    """Load one model (the runtime that serves it: int8 for INT8 variants) and warm it up once."""
    check_model_dir(uri)
    with _PeakRSS() as mem:
        model, tokenizer, qmeta = load_compressed(uri)
        tokenizer.padding_side = "left"
        _generate(model, tokenizer, [PROMPT], 2)
    return {"name": name, "uri": uri, "model": model, "tokenizer": tokenizer, "qmeta": qmeta, "mem": mem.peak}


def _time_round(m: dict[str, Any], cfg: BenchmarkConfig) -> dict[str, float]:
    """One sample of every timed figure of model ``m``."""
    model, tok = m["model"], m["tokenizer"]
    sample = {"latency": _generate(model, tok, [PROMPT], cfg.new_tokens)[0],
              "ttft": _generate(model, tok, [PROMPT], 1)[0]}
    for b in cfg.batch_sizes:
        secs = sample["latency"] if b == 1 else _generate(model, tok, [PROMPT] * b, cfg.new_tokens)[0]
        sample[f"tps_b{b}"] = b * cfg.new_tokens / secs
    return sample


def _quality(m: dict[str, Any], cfg: BenchmarkConfig, heldout: ArtifactRef) -> dict[str, Any]:
    texts = load_texts(heldout, cfg.heldout_column, cfg.heldout_rows)
    tok = m["tokenizer"]
    tok.padding_side = "right"
    accuracy, kind = _accuracy(m["model"], tok, heldout, texts, cfg.heldout_rows)
    tok.padding_side = "left"
    return {"perplexity": perplexity(m["model"], tok, texts), "accuracy": accuracy, "accuracy_kind": kind,
            "heldout_rows": len(texts)}


def machine() -> dict[str, Any]:
    """What the figures were measured on (CPU model, cores, OS, torch, load average)."""
    import os
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "os": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "loadavg_1m": round(os.getloadavg()[0], 2)}


def measure(models: dict[str, str], cfg: BenchmarkConfig, heldout: ArtifactRef | None = None,
            progress: Any = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows (one per model, ``base`` first) and settings: the interleaved, paired measurement above.

    ``models`` maps names to model dirs and must contain ``base``. Torch threads are pinned for the
    duration and restored after."""
    import torch

    if "base" not in models:
        raise InputError("benchmark: no 'base' model to compare against")
    names = ["base", *[n for n in models if n != "base"]]
    before = torch.get_num_threads()
    threads = cfg.threads or before
    torch.set_num_threads(threads)
    settings = {"threads": threads, "rounds": cfg.rounds, "warmup_rounds": cfg.warmup_rounds,
                "new_tokens": cfg.new_tokens, "batch_sizes": cfg.batch_sizes, "order": "rotated each round",
                **machine()}
    try:
        loaded = {n: _load(n, models[n]) for n in names}
        samples: dict[str, list[dict[str, float]]] = {n: [] for n in names}
        total = cfg.warmup_rounds + cfg.rounds
        for r in range(total):
            shift = r % len(names)
            for n in names[shift:] + names[:shift]:
                s = _time_round(loaded[n], cfg)
                if r >= cfg.warmup_rounds:
                    samples[n].append(s)
            if progress is not None:
                progress(r + 1, total, f"round {r + 1}/{total} ({cfg.warmup_rounds} warm-up)")
        quality = {n: _quality(loaded[n], cfg, heldout) if heldout is not None else {} for n in names}
    finally:
        torch.set_num_threads(before)
    base = samples["base"]
    rows = []
    for n in names:
        m, ss = loaded[n], samples[n]
        lat, lat_iqr = _quartiles([s["latency"] * 1e3 for s in ss])
        ttft, ttft_iqr = _quartiles([s["ttft"] * 1e3 for s in ss])
        ratio, ratio_iqr = _quartiles([s["latency"] / b["latency"] for s, b in zip(ss, base, strict=True)])
        row: dict[str, Any] = {
            "model": n, "uri": m["uri"], "quantization": m["qmeta"].get("method"),
            "params": count_params(m["model"]), "size_mb": shipped_bytes(m["uri"]) / 1e6,
            "latency_p50_ms": lat, "latency_iqr_ms": lat_iqr, "latency_ratio": ratio, "latency_ratio_iqr": ratio_iqr,
            "ttft_ms": ttft, "ttft_iqr_ms": ttft_iqr, "peak_mem_mb": m["mem"] / 1e6,
        }
        for b in cfg.batch_sizes:
            row[f"tokens_per_s_b{b}"], row[f"tokens_per_s_b{b}_iqr"] = _quartiles([s[f"tps_b{b}"] for s in ss])
        row.update({"perplexity": None, "accuracy": None, "accuracy_kind": None, "heldout_rows": None, **quality[n]})
        rows.append(row)
    for r in rows:
        r["size_ratio"] = r["size_mb"] / rows[0]["size_mb"]
        r["params_ratio"] = r["params"] / rows[0]["params"]
        r["perplexity_ratio"] = r["perplexity"] / rows[0]["perplexity"] if rows[0]["perplexity"] else None
    return rows, settings


def _report(rows: list[dict[str, Any]], cols: list[str], settings: dict[str, Any]) -> str:
    lines = ["# Compression benchmark", "",
             f"Measured on {settings['cpu']} ({settings['cpu_count']} logical CPUs, {settings['os']}), torch "
             f"{settings['torch']}, **{settings['threads']} torch threads (pinned)**, load average "
             f"{settings['loadavg_1m']} at start.",
             f"{settings['rounds']} timed rounds after {settings['warmup_rounds']} discarded warm-up round(s); each "
             f"round measures every model once, the base included, in an order rotated each round. Figures are "
             f"medians over rounds, `_iqr` their interquartile range; `latency_ratio` is the median of the per-round "
             f"ratios to the base measured in the same round. {settings['new_tokens']} greedy tokens per request.",
             "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [f"{r[c]:.4g}" if isinstance(r[c], float) else ("" if r[c] is None else str(r[c])) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Ratios are variant / base (latency < 1 is faster, size < 1 is smaller). Size counts every "
              "file of the artifact except its manifest. Peak memory is the process RSS increase while loading "
              "the model and generating once. INT8 variants run through the int8 runtime that serves them."]
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

    heldout = inputs.get("heldout")
    models = {"base": str(inputs["base"].path),
              **{k: str(v.path) for k, v in inputs.items() if k not in {"base", "heldout"}}}
    rows, settings = measure(models, cfg, heldout, ctx.progress)
    out = Path(out_uri)
    table = pl.DataFrame(rows, infer_schema_length=None)
    write_parquet(table, out / "data.parquet")
    atomic_write_json(out / "settings.json", settings)
    cols = ["model", "quantization", "params", "size_mb", "size_ratio", "latency_p50_ms", "latency_iqr_ms",
            "latency_ratio", "latency_ratio_iqr", "ttft_ms", "ttft_iqr_ms",
            *[f"tokens_per_s_b{b}" for b in cfg.batch_sizes], "peak_mem_mb", "perplexity", "perplexity_ratio",
            "accuracy"]
    atomic_write_text(out / "report.md", _report(rows, cols, settings))
    metrics = {f"{r['model']}.{k}": float(v) for r in rows for k, v in r.items()
               if isinstance(v, int | float) and not isinstance(v, bool)}
    metrics["threads"] = float(settings["threads"])
    return BenchmarkResult(models=list(models), table=rows, rows=len(rows), settings=settings,
                           columns={c: str(t) for c, t in table.schema.items()}, metrics=metrics)
