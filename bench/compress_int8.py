"""INT8 dynamic vs fp32 on CPU for the same model: latency (prefill and generation) and size on disk.

    python -m bench.compress_int8 [--hidden 512 --layers 4 --threads 1]

Builds a small Llama from config (random weights, tokenizer trained on the preset corpus), saves it,
quantizes it with the quantize step's own helpers, reloads both through their real loaders, and prints
the figures side by side with the int8/fp32 ratio.
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


def _time(fn, repeats: int) -> tuple[float, float]:  # noqa: ANN001
    fn()  # warm-up
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    runs.sort()
    return statistics.median(runs), runs[min(len(runs) - 1, int(0.95 * len(runs)))]


def main() -> None:
    """Run the benchmark and print the table."""
    import torch

    from nexus_core.compress.common import dir_bytes, save_model
    from nexus_core.models.compressed import (
        dequantized_state,
        int8_runtime_bytes,
        linear_names,
        load_compressed,
        quantize_dynamic_int8,
        save_quantized,
    )
    from nexus_core.models.io import load_causal_lm
    from nexus_core.models.tiny import TinyLLMConfig, build_tiny_llm

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    texts = [json.loads(line)["text"] for line in (REPO / "data/raw/scientific/abstracts.jsonl").open()]
    with tempfile.TemporaryDirectory() as tmp:
        fp_dir, q_dir = Path(tmp) / "fp32", Path(tmp) / "int8"
        cfg = TinyLLMConfig(vocab_size=1024, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                            num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4)
        build_tiny_llm(fp_dir, texts, cfg)
        model, tok = load_causal_lm(fp_dir, int8=False)
        names = linear_names(model)
        qmodel = quantize_dynamic_int8(copy.deepcopy(model), names)
        save_model(dequantized_state(qmodel, copy.deepcopy(model), names, "dynamic"), tok, q_dir)
        save_quantized(qmodel, q_dir, "int8_dynamic", names, {})
        fp32, _, _ = load_compressed(fp_dir)
        int8, _, meta = load_compressed(q_dir)
        assert meta["method"] == "int8_dynamic"

        prompt = tok(texts[0], return_tensors="pt", truncation=True, max_length=128)["input_ids"]
        batch = prompt.repeat(8, 1)
        rows = {}
        for name, m in (("fp32", fp32), ("int8", int8)):
            with torch.inference_mode():
                prefill = _time(lambda m=m: m(input_ids=batch), args.repeats)
                gen = _time(lambda m=m: m.generate(input_ids=prompt[:, :32], max_new_tokens=args.new_tokens,
                                                   min_new_tokens=args.new_tokens, do_sample=False,
                                                   pad_token_id=tok.pad_token_id), args.repeats)
            size = dir_bytes(fp_dir, "*.safetensors") if name == "fp32" else int8_runtime_bytes(q_dir)
            rows[name] = {"prefill_8x128_p50_ms": prefill[0] * 1e3, "prefill_8x128_p95_ms": prefill[1] * 1e3,
                          f"generate_{args.new_tokens}tok_p50_ms": gen[0] * 1e3,
                          "tokens_per_s": args.new_tokens / gen[0], "size_mb": size / 1e6}
        params = sum(p.numel() for p in model.parameters())
    print(f"model: llama hidden={args.hidden} layers={args.layers} params={params / 1e6:.1f}M "
          f"threads={args.threads} ({len(names)} Linears quantized; embeddings/LM head stay fp32)")
    print(f"{'metric':<26}{'fp32':>12}{'int8':>12}{'int8/fp32':>12}")
    for key in rows["fp32"]:
        a, b = rows["fp32"][key], rows["int8"][key]
        print(f"{key:<26}{a:>12.2f}{b:>12.2f}{b / a:>12.2f}")


if __name__ == "__main__":
    main()
