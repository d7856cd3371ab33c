"""Multimodal alignment from precomputed tower features vs running the frozen tower every step.

    python -m bench.mm_features [--steps 16] [--repeats 3] [--image-size 224] [--tower-layers 4]

A tiny Llama (the omni preset's shape) composed with a small SigLIP tower built from config (random
weights; 224 px, 16 px patches: 196 tokens per image, 256 wide), mm_align on the shipped caption pairs.
Rows: the stage trained on the fly (tower in every step) and from the mm features shards, side by
side (alternating, median of repeats, each a fresh step run: load + train + save); the one-off
precompute is timed too, and the break-even step count follows from it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NEXUS_HOME", tempfile.mkdtemp(prefix="nexus-bench-"))
os.environ.setdefault("NEXUS_DATA", str(Path(os.environ["NEXUS_HOME"]) / "data"))

DATA = Path(__file__).resolve().parents[1] / "data" / "raw" / "omni" / "captions.jsonl"


def main() -> None:
    """Print seconds per run and per step for both paths, and their ratio."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--tower-layers", type=int, default=4)
    a = p.parse_args()

    import torch

    from nexus_core.artifacts import raw_ref
    from nexus_core.models.tiny import TinyLLMConfig, build_tiny_llm
    from nexus_core.runner import run_step
    from nexus_core.train.encoders import TinyVisionConfig
    from nexus_core.train.mm_features import MMFeaturesConfig, run_mm_features
    from nexus_core.train.mm_train import MMAlignConfig, run_mm_train
    from nexus_core.train.omni import OmniConfig, run_omni

    torch.set_num_threads(max(torch.get_num_threads(), 1))
    root = Path(os.environ["NEXUS_HOME"])
    texts = [line for line in (DATA.parent / "corpus.jsonl").read_text().splitlines() if line.strip()]
    llm = build_tiny_llm(root / "llm", texts, TinyLLMConfig(vocab_size=320, hidden_size=32, intermediate_size=64,
                                                            num_attention_heads=4, num_key_value_heads=2))
    tower = TinyVisionConfig(image_size=a.image_size, patch_size=16, hidden_size=256, intermediate_size=1024,
                             num_hidden_layers=a.tower_layers, num_attention_heads=4)
    omni = run_step(run_omni, OmniConfig(vision="tiny", tiny_vision=tower), name="bench_omni",
                    inputs={"model": raw_ref(llm)}).ref
    data = raw_ref(DATA)
    t0 = time.perf_counter()
    feats = run_step(run_mm_features, MMFeaturesConfig(max_length=512), name="bench_feats",
                     inputs={"model": omni, "data": data}).ref
    pre_s = time.perf_counter() - t0
    stage = MMAlignConfig(max_steps=a.steps, batch_size=4, checkpoint={"save_steps": a.steps})
    times: dict[str, list[float]] = {"on the fly": [], "precomputed": []}
    losses: dict[str, float] = {}
    for rep in range(a.repeats):
        for label in times:
            cfg = stage.model_copy(update={"precomputed": label == "precomputed"})
            inputs = {"model": omni, "data": data} | ({"features": feats} if label == "precomputed" else {})
            t0 = time.perf_counter()
            r = run_step(run_mm_train, cfg, name=f"bench_{label.replace(' ', '_')}_{rep}", inputs=inputs)
            times[label].append(time.perf_counter() - t0)
            losses[label] = r.metrics["train_loss"]
    live, pre = (statistics.median(times[k]) for k in times)
    print(f"tower {a.image_size}px/16 x{a.tower_layers} layers, 256 wide; mm_align {a.steps} steps, batch 4; "
          f"median of {a.repeats}")
    print("| path | s per run | s per step (incl. load/save) | train_loss | x on the fly |")
    print("|---|---|---|---|---|")
    for k, v in (("on the fly", live), ("precomputed", pre)):
        print(f"| {k} | {v:.2f} | {v / a.steps:.3f} | {losses[k]:.4f} | {live / v:.2f} |")
    print(f"precompute (once, {DATA.name}): {pre_s:.2f} s")


if __name__ == "__main__":
    main()
