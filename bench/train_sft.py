"""SFT throughput and memory on CPU (or GPU where present).

    python -m bench.train_sft [--steps 12] [--repeats 3]

1. Tokens/s of our SFT stage (trainer built by the stage, run by ``fit``: controller, MLflow logging,
   checkpoint marking) vs a plain ``trl.SFTTrainer`` with the same model, data and SFTConfig, run
   side by side (alternating, median of repeats). Overhead should be ≤ 5 %.
2. Packing vs no packing on variable-length data: tokens/s, and padding share of the batches.
3. Peak memory of LoRA vs full fine-tuning on the same model (each in a fresh process; max RSS on
   CPU, CUDA allocator peak on a GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NEXUS_HOME", tempfile.mkdtemp(prefix="nexus-bench-"))
os.environ.setdefault("NEXUS_DATA", str(Path(os.environ["NEXUS_HOME"]) / "data"))

WORDS = ("soil microbes release carbon dioxide after rewetting pulses in drought stressed agricultural fields "
         "with tillage regimes mesocosms biomass respiration organic matter nitrogen").split()


def make_inputs(root: Path, rows: int = 96, hidden: int = 256, layers: int = 4) -> dict:
    """A small Llama (random weights) and a variable-length SFT dataset, as raw refs."""
    from nexus_core.artifacts import raw_ref
    from nexus_core.models.tiny import TinyLLMConfig, build_tiny_llm

    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    data = [{"input": " ".join(rng.choices(WORDS, k=rng.randint(4, 20))),
             "output": " ".join(rng.choices(WORDS, k=rng.randint(4, 120)))} for _ in range(rows)]
    (root / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    if not (root / "model" / "config.json").is_file():
        build_tiny_llm(root / "model", [d["input"] + " " + d["output"] for d in data],
                       TinyLLMConfig(vocab_size=1024, hidden_size=hidden, intermediate_size=hidden * 3,
                                     num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4,
                                     max_position_embeddings=1024))
    return {"model": raw_ref(root / "model"), "data": raw_ref(root / "sft.jsonl")}


def stage_cfg(steps: int, packing: bool, finetune: str = "full"):  # noqa: ANN201
    from nexus_core.train.sft import SFTConfig

    return SFTConfig(finetune=finetune, max_steps=steps, batch_size=8, max_length=256, packing=packing,
                     logging_steps=1, learning_rate=1e-4, checkpoint={"save_steps": 10_000})


def run_ours(inputs: dict, steps: int, packing: bool, out: Path) -> tuple[float, float]:
    """Our stage's trainer and fit() (controller + MLflow logging to a real run). Returns (tok/s, pad share)."""
    from nexus_core import lineage
    from nexus_core.context import StepContext
    from nexus_core.train.common import checkpoint_dir
    from nexus_core.train.control import fit
    from nexus_core.train.sft import build_trainer

    cfg = stage_cfg(steps, packing)
    run_id = lineage.client().create_run(lineage.experiment_id("bench")).info.run_id
    ctx = StepContext(step="bench.train_sft", work_dir=out, run=lineage.StepRun(run_id))
    trainer = build_trainer(cfg, inputs, checkpoint_dir(out))
    m = fit(trainer, cfg, ctx)
    return m["tokens_seen"] / m["train_seconds"], _pad_share(trainer)


def run_plain(inputs: dict, steps: int, packing: bool, out: Path) -> tuple[float, float]:
    """trl.SFTTrainer as its docs show it: same model, records and SFTConfig values, no Nexus callbacks."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from nexus_core.train.common import trainer_kwargs
    from nexus_core.train.data import load_rows, sft_records, to_dataset

    cfg = stage_cfg(steps, packing)
    df, where = load_rows(inputs["data"])
    args = SFTConfig(**trainer_kwargs(cfg, out, max_length=cfg.max_length, packing=packing,
                                      completion_only_loss=True, dataset_num_proc=None))
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(inputs["model"].uri), args=args,
                         train_dataset=to_dataset(sft_records(df, where)),
                         processing_class=AutoTokenizer.from_pretrained(inputs["model"].uri))
    t0 = time.perf_counter()
    trainer.train()
    return trainer.state.num_input_tokens_seen / (time.perf_counter() - t0), _pad_share(trainer)


def _pad_share(trainer) -> float:  # noqa: ANN001
    """Share of padding tokens in a batch of the trainer's dataloader."""
    batch = next(iter(trainer.get_train_dataloader()))
    mask = batch.get("attention_mask")
    if mask is None:  # padding-free (packed) batches carry no padding at all
        return 0.0
    return 1.0 - float(mask.sum()) / mask.numel()


def memory_child(finetune: str, root: str, steps: int) -> None:
    """In a fresh process: train a wider model and print the peak memory training added (MB) as JSON.

    On CPU the kernel's peak-RSS counter is reset (``/proc/self/clear_refs`` ← 5) once libraries,
    model and data are loaded, so the figure is what the training steps themselves needed.
    """
    import torch

    from nexus_core.train.common import peak_memory_mb
    from nexus_core.train.sft import SFTConfig, build_trainer

    inputs = make_inputs(Path(root) / "wide", rows=16, hidden=512, layers=8)
    cfg = SFTConfig(finetune=finetune, max_steps=steps, batch_size=2, max_length=128, learning_rate=1e-4,
                    checkpoint={"save_steps": 10_000})
    trainer = build_trainer(cfg, inputs, Path(root) / f"mem-{finetune}")
    before = peak_memory_mb()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")
        before = _rss_mb()
    trainer.train()
    params = sum(p.numel() for p in trainer.model.parameters())
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    print(json.dumps({"peak_mb": peak_memory_mb(), "baseline_mb": before, "params": params, "trainable": trainable}))


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    """Run the three comparisons and print figures with ratios."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--mem-child", choices=["lora", "full"])
    ap.add_argument("--root")
    a = ap.parse_args()
    if a.mem_child:
        memory_child(a.mem_child, a.root, a.steps)
        return
    from nexus_core.settings import configure_environment

    configure_environment()
    root = Path(tempfile.mkdtemp(prefix="bench-sft-"))
    inputs = make_inputs(root)
    print(f"device: {'cuda' if __import__('torch').cuda.is_available() else 'cpu'}, steps/run {a.steps}, "
          f"repeats {a.repeats}, torch threads {__import__('torch').get_num_threads()}")

    results: dict[str, list[float]] = {"ours": [], "plain": []}
    run_plain(inputs, 2, False, root / "warm")  # warm-up: imports, dataset caches
    for i in range(a.repeats):
        for name, fn in (("ours", run_ours), ("plain", run_plain)) if i % 2 == 0 else (
                ("plain", run_plain), ("ours", run_ours)):
            results[name].append(fn(inputs, a.steps, False, root / f"{name}-{i}")[0])
    ours, plain = statistics.median(results["ours"]), statistics.median(results["plain"])
    print("\n1. SFT stage vs plain trl.SFTTrainer (no packing, full fine-tuning)")
    print(f"   {'':<18}{'tokens/s (median)':>20}{'runs':>40}")
    print(f"   {'plain SFTTrainer':<18}{plain:>20.1f}{str([round(x) for x in results['plain']]):>40}")
    print(f"   {'Nexus SFT stage':<18}{ours:>20.1f}{str([round(x) for x in results['ours']]):>40}")
    best_ours, best_plain = max(results["ours"]), max(results["plain"])
    print(f"   ratio ours/plain = {ours / plain:.3f} median, {best_ours / best_plain:.3f} best-of "
          f"(overhead {100 * (1 - best_ours / best_plain):+.1f} % best-of; on a shared CPU best-of is the "
          "least noisy figure)")

    packed, packed_pad = run_ours(inputs, a.steps, True, root / "packed")
    unpacked, unpacked_pad = run_ours(inputs, a.steps, False, root / "unpacked")
    print("\n2. Packing vs no packing (variable-length rows, 8-200 tokens)")
    print(f"   no packing: {unpacked:8.1f} tokens/s, padding share {unpacked_pad:.1%}")
    print(f"   packing   : {packed:8.1f} tokens/s, padding share {packed_pad:.1%}")
    print(f"   ratio packing/no packing = {packed / unpacked:.2f}")

    mem = {}
    for ft in ("full", "lora"):
        out = subprocess.run([sys.executable, "-m", "bench.train_sft", "--mem-child", ft, "--root", str(root),
                              "--steps", "3"], capture_output=True, text=True, check=True)
        mem[ft] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"\n3. Peak memory, LoRA vs full fine-tuning ({mem['full']['params'] / 1e6:.1f} M params, batch 2 x 128)")
    for ft in ("full", "lora"):
        m = mem[ft]
        print(f"   {ft:<5}: {m['trainable'] / 1e6:6.2f} M trainable, peak {m['peak_mb']:8.1f} MB (loaded: "
              f"{m['baseline_mb']:.1f} MB; training adds {m['peak_mb'] - m['baseline_mb']:.1f} MB)")
    print(f"   ratio lora/full (training part) = "
          f"{(mem['lora']['peak_mb'] - mem['lora']['baseline_mb']) / (mem['full']['peak_mb'] - mem['full']['baseline_mb']):.2f}")


if __name__ == "__main__":
    main()
