"""SFT throughput and MFU on a GPU for a Qwen2.5-0.5B-shaped model: full (bf16 autocast over fp32
master weights), LoRA and QLoRA, through the SFT stage's own trainer (``nexus_core.train.sft``).

    python -m bench.train_gpu [--methods full,pure_bf16,lora,qlora] [--steps 30] [--warmup 5] [--seq 2048]
                              [--batch 8] [--peak-tflops 989] [--json OUT.json]

No download: the model is built from Qwen2.5-0.5B's published shape (24 layers, width 896, MLP 4864,
14 query / 2 key-value heads, vocabulary 151 936, tied embeddings) with random weights, saved in bf16
as the release is, with a small BPE tokenizer trained on the synthetic data (the model keeps the full
vocabulary, so the output layer costs what it costs in the real model). Conversations go through the
Qwen2.5 chat template shipped in ``configs/chat_templates`` (assistant-only loss), packed into
``--seq``-token blocks (``wrapped``: no padding, same work with any attention kernel).

Figures, per method: tokens/s over the steps after ``--warmup`` (a TrainerCallback times them), peak
CUDA memory, and MFU = achieved model FLOP/s / the GPU's dense bf16 peak. Model FLOPs per token:
full fine-tuning 6·N + 12·L·d·T (forward 2·N, backward 4·N; attention scores and values over a T-token
context), LoRA and QLoRA 4·N + 8·L·d·T (no weight gradients for the frozen base); the adapters' own
FLOPs and gradient-checkpointing recomputation are not counted (MFU, not hardware utilisation).
N = parameters in matrix products (the tied embedding counts once, as the output layer).

``pure_bf16`` (not in the default methods) is full fine-tuning with bf16 weights and no fp32 master copy,
the setup the stage warns about. For both full rows the table also gives the share of weights that
moved at bf16 resolution (what a bf16 save keeps) after the run at lr 2e-5: the honest-precision check.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NEXUS_HOME", tempfile.mkdtemp(prefix="nexus-bench-"))
os.environ.setdefault("NEXUS_DATA", str(Path(os.environ["NEXUS_HOME"]) / "data"))

QWEN25_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                  rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)
# Dense bf16 TFLOP/s by datasheet, for MFU when --peak-tflops is not given.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}
WORDS = ("soil microbes release carbon dioxide after rewetting pulses in drought stressed agricultural fields "
         "with tillage regimes mesocosms biomass respiration organic matter nitrogen the a of and to is").split()


def build_model(root: Path, shape: dict | None = None) -> Path:
    """Qwen2.5-0.5B's shape (or ``shape``) with random weights, saved in bf16 with a small trained tokenizer."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from nexus_core.models.tiny import train_tokenizer

    out = root / "qwen2.5-0.5b-shaped"
    if (out / "config.json").is_file():
        return out
    rng = random.Random(0)
    tok = train_tokenizer([" ".join(rng.choices(WORDS, k=200)) for _ in range(200)], 2048)
    tok.chat_template = None  # the stage sets the Qwen2.5 template (chat_template: qwen2.5)
    torch.manual_seed(0)
    conf = Qwen2Config(**(shape or QWEN25_05B), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen2ForCausalLM(conf).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def make_data(root: Path, rows: int) -> Path:
    """Synthetic conversations (a short question, a long answer) as a messages JSONL."""
    rng = random.Random(1)
    path = root / "chat.jsonl"
    with path.open("w") as f:
        for _ in range(rows):
            msgs = [{"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randint(10, 60)))},
                    {"role": "assistant", "content": " ".join(rng.choices(WORDS, k=rng.randint(200, 900)))}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    return path


def matmul_params(model_dir: Path) -> tuple[int, int, int]:
    """(N, layers, width) from the config: parameters in matrix products per token."""
    c = json.loads((model_dir / "config.json").read_text())
    d, f, layers, v = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    head = d // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * head
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * f  # q, o; k, v; gate, up, down
    return layers * per_layer + d * v, layers, d


def run_one(method: str, args: argparse.Namespace, root: Path) -> dict:
    """One method in this process: build the stage's trainer, time the steps after warm-up."""
    import torch
    from transformers import TrainerCallback

    from nexus_core.artifacts import raw_ref
    from nexus_core.train.common import checkpoint_dir, param_delta, param_snapshot
    from nexus_core.train.control import fit
    from nexus_core.train.sft import SFTConfig, build_trainer

    model_dir = build_model(root, shape(args))
    data = make_data(root, rows=max(64, args.steps * args.batch * args.seq // 500))
    pure = method == "pure_bf16"  # the comparison row: no fp32 master copy (what the issue measured)
    cfg = SFTConfig(finetune="full" if pure else method, precision="pure_bf16" if pure else "bf16",
                    chat_template="qwen2.5",
                    max_steps=args.steps, batch_size=args.batch, max_length=args.seq, packing=True,
                    packing_strategy="wrapped", learning_rate=2e-5 if method in ("full", "pure_bf16") else 2e-4,
                    gradient_checkpointing=args.gc, lora={"r": 16, "alpha": 32},
                    checkpoint={"save_steps": 100_000}, logging_steps=5)

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.t0, self.tok0, self.t1, self.tok1 = 0.0, 0, 0.0, 0

        def on_step_end(self, a, state, control, **kw):  # noqa: ANN001, ANN201 - transformers API
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if state.global_step == args.warmup:
                self.t0, self.tok0 = time.perf_counter(), state.num_input_tokens_seen
            self.t1, self.tok1 = time.perf_counter(), state.num_input_tokens_seen

    work = root / f"work-{method}"
    trainer = build_trainer(cfg, {"model": raw_ref(model_dir), "data": raw_ref(data)}, checkpoint_dir(work))
    timer = Timer()
    trainer.add_callback(timer)
    gpu = torch.cuda.is_available()
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    full = method in ("full", "pure_bf16")
    before = param_snapshot(trainer.model) if full else {}
    master = str(next(p.dtype for p in trainer.model.parameters() if p.requires_grad)).removeprefix("torch.")
    m = fit(trainer, cfg)
    # full fine-tuning: the share of weights that moved at bf16 resolution (what a bf16 save keeps)
    changed = param_delta(before, trainer.model, torch.bfloat16)["param_changed_frac"] if full else None
    tps = (timer.tok1 - timer.tok0) / (timer.t1 - timer.t0)
    n, layers, d = matmul_params(model_dir)
    flops_per_token = (6 if full else 4) * n + (12 if full else 8) * layers * d * args.seq
    name = torch.cuda.get_device_name() if gpu else "cpu"
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    return {"method": method, "gpu": name, "seq": args.seq, "batch": args.batch,
            "gradient_checkpointing": args.gc, "steps_timed": args.steps - args.warmup,
            "tokens_per_s": round(tps), "tflops": round(tps * flops_per_token / 1e12, 1),
            "mfu": round(tps * flops_per_token / (peak * 1e12), 3) if peak else None,
            "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 1) if gpu else None,
            "train_loss": round(m["train_loss"], 3), "matmul_params_m": round(n / 1e6, 1),
            "trainable_dtype": master, "changed_frac_bf16": None if changed is None else round(changed, 3)}


def _frac(x: float | None) -> str:
    return "–" if x is None else f"{x:.0%}"


def shape(args: argparse.Namespace) -> dict:
    """The model shape: Qwen2.5-0.5B's, or a cut-down one for a CPU smoke run of this script."""
    cut = {"num_hidden_layers": args.layers} if args.layers else {}
    return {**QWEN25_05B, **cut, **({"vocab_size": args.vocab} if args.vocab else {})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="full,lora,qlora")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--gc", action="store_true", help="gradient checkpointing")
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--json", default=None, help="also write the rows here")
    ap.add_argument("--cpu-smoke", action="store_true", help="run on CPU (plumbing check; no figures)")
    ap.add_argument("--layers", type=int, default=None, help=argparse.SUPPRESS)  # smoke runs: fewer layers
    ap.add_argument("--vocab", type=int, default=None, help=argparse.SUPPRESS)  # smoke runs: smaller vocabulary
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child: run one method, print its row
    ap.add_argument("--root", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available() and not args.cpu_smoke:
        sys.exit("bench.train_gpu needs a CUDA GPU (no figures taken)")
    root = Path(args.root or tempfile.mkdtemp(prefix="train-gpu-"))
    if args.one:
        print("ROW " + json.dumps(run_one(args.one, args, root)), flush=True)
        return
    build_model(root, shape(args))
    rows = []
    for method in args.methods.split(","):
        if method == "qlora":
            try:
                import bitsandbytes  # noqa: F401  # pyright: ignore[reportMissingImports]
            except ImportError:
                rows.append({"method": "qlora", "skipped": "bitsandbytes not installed"})
                continue
        # each method in a fresh process: its peak memory is its own, and one failure does not stop the rest
        cmd = [sys.executable, "-m", "bench.train_gpu", "--one", method, "--root", str(root)] + [
            a for a in sys.argv[1:] if a not in ("--one",)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        row = next((json.loads(line[4:]) for line in proc.stdout.splitlines() if line.startswith("ROW ")), None)
        rows.append(row or {"method": method, "failed": (proc.stderr or proc.stdout).strip().splitlines()[-5:]})
        print(json.dumps(rows[-1]), flush=True)
    print("\n| method | GPU | seq × batch | tokens/s | TFLOP/s | MFU | peak GB | weights changed (bf16) |\n"
          "|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "tokens_per_s" in r:
            mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "?"
            print(f"| {r['method']} | {r['gpu']} | {r['seq']} × {r['batch']} | {r['tokens_per_s']:,} | "
                  f"{r['tflops']} | {mfu} | {r['peak_memory_gb']} | {_frac(r.get('changed_frac_bf16'))} |")
        else:
            print(f"| {r['method']} | – | – | – | – | – | {r.get('skipped') or 'failed'} | – |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if any("failed" in r for r in rows):
        sys.exit("bench.train_gpu: a method failed (its row holds the end of its error)")


if __name__ == "__main__":
    main()
