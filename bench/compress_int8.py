"""INT8 dynamic vs fp32 on CPU for the same model: prefill, generation, tokens/s and size on disk.

    python -m bench.compress_int8 [--hidden 512 --layers 4 --threads 1 --rounds 15 --warmup 2]

Builds a small Llama from config (random weights, tokenizer trained on the preset corpus), saves it,
quantizes it with the quantize step's own helpers into the shipped INT8 format, and measures both
through their real loaders with the compress benchmark's own method (``nexus_core.compress.benchmark
.measure``): models interleaved over rounds in rotated order, warm-up rounds discarded, the fp32 base
measured in every round, median and IQR per figure, int8/fp32 ratios paired per round, torch threads
pinned. Prefill (a forward pass over a batch) is timed the same way. Sizes count every file shipped.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _iqr(values: list[float]) -> tuple[float, float]:
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q2, q3 - q1


def main() -> None:
    """Run the benchmark and print the table."""
    import torch

    from nexus_core.compress.benchmark import BenchmarkConfig, measure
    from nexus_core.compress.common import shipped_bytes
    from nexus_core.models.compressed import (
        linear_names,
        load_compressed,
        quantize_dynamic_int8,
        save_int8_model,
    )
    from nexus_core.models.io import load_causal_lm
    from nexus_core.models.tiny import TinyLLMConfig, build_tiny_llm

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args()

    texts = [json.loads(line)["text"] for line in (REPO / "data/raw/scientific/abstracts.jsonl").open()]
    with tempfile.TemporaryDirectory() as tmp:
        fp_dir, q_dir = Path(tmp) / "fp32", Path(tmp) / "int8"
        cfg = TinyLLMConfig(vocab_size=1024, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                            num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4)
        build_tiny_llm(fp_dir, texts, cfg)
        model, tok = load_causal_lm(fp_dir, int8=False)
        names = linear_names(model)
        qmodel = quantize_dynamic_int8(copy.deepcopy(model), names)
        save_int8_model(qmodel, model, tok, q_dir, "int8_dynamic", names, {})
        params = sum(p.numel() for p in model.parameters())

        bcfg = BenchmarkConfig(new_tokens=args.new_tokens, rounds=args.rounds, warmup_rounds=args.warmup,
                               batch_sizes=[1, 8], threads=args.threads)
        rows, settings = measure({"base": str(fp_dir), "int8": str(q_dir)}, bcfg)

        # prefill 8x128, timed the same way: interleaved, rotated, warm-up discarded, paired ratios
        loaded = {"base": load_compressed(fp_dir)[0], "int8": load_compressed(q_dir)[0]}
        batch = tok(texts[0], return_tensors="pt", truncation=True, max_length=128)["input_ids"].repeat(8, 1)
        before = torch.get_num_threads()
        torch.set_num_threads(args.threads)
        prefill: dict[str, list[float]] = {"base": [], "int8": []}
        try:
            with torch.inference_mode():
                for r in range(args.warmup + args.rounds):
                    for name in (["base", "int8"] if r % 2 == 0 else ["int8", "base"]):
                        t0 = time.perf_counter()
                        loaded[name](input_ids=batch)
                        if r >= args.warmup:
                            prefill[name].append((time.perf_counter() - t0) * 1e3)
        finally:
            torch.set_num_threads(before)
        sizes = {"base": shipped_bytes(fp_dir), "int8": shipped_bytes(q_dir)}

    print(f"model: llama hidden={args.hidden} layers={args.layers} params={params / 1e6:.1f}M ({len(names)} Linears "
          f"quantized; embeddings/LM head stay fp32)")
    print(f"machine: {settings['cpu']}, {settings['cpu_count']} logical CPUs, torch {settings['torch']}, "
          f"{settings['threads']} torch thread(s) pinned, load average {settings['loadavg_1m']} at start")
    print(f"method: {args.rounds} rounds after {args.warmup} warm-up, models interleaved in rotated order, "
          f"median [IQR]; ratio = median of per-round int8/fp32")
    base, int8 = rows
    ratio_prefill = _iqr([b / a for a, b in zip(prefill["base"], prefill["int8"], strict=True)])
    figures = [
        ("prefill_8x128_ms", _iqr(prefill["base"]), _iqr(prefill["int8"]), ratio_prefill),
        (f"generate_{args.new_tokens}tok_ms", (base["latency_p50_ms"], base["latency_iqr_ms"]),
         (int8["latency_p50_ms"], int8["latency_iqr_ms"]), (int8["latency_ratio"], int8["latency_ratio_iqr"])),
        ("ttft_ms", (base["ttft_ms"], base["ttft_iqr_ms"]), (int8["ttft_ms"], int8["ttft_iqr_ms"]), None),
        ("tokens_per_s_b1", (base["tokens_per_s_b1"], base["tokens_per_s_b1_iqr"]),
         (int8["tokens_per_s_b1"], int8["tokens_per_s_b1_iqr"]), None),
        ("tokens_per_s_b8", (base["tokens_per_s_b8"], base["tokens_per_s_b8_iqr"]),
         (int8["tokens_per_s_b8"], int8["tokens_per_s_b8_iqr"]), None),
        ("size_mb (every file)", (sizes["base"] / 1e6, 0.0), (sizes["int8"] / 1e6, 0.0), None),
    ]
    print(f"{'metric':<24}{'fp32':>20}{'int8':>20}{'int8/fp32':>18}")
    for key, a, b, paired in figures:
        ratio = f"{paired[0]:.2f} [{paired[1]:.2f}]" if paired else f"{b[0] / a[0]:.2f}"
        print(f"{key:<24}{a[0]:>12.2f} [{a[1]:>5.2f}]{b[0]:>12.2f} [{b[1]:>5.2f}]{ratio:>18}")


if __name__ == "__main__":
    main()
