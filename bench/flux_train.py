"""Flux.2 training benchmarks on a small Klein-compatible pipeline (CPU or GPU).

    python -m bench.flux_train [--images 32] [--resolution 64] [--steps 8] [--device auto]

1. Training step time from precomputed latents + text embeddings vs encoding images and captions on
   the fly (VAE + text encoder every step), same transformer, LoRA, batch: ratio on the fly / precomputed.
2. Precompute images/s, batched (batch_size 8) vs one image per forward pass.
3. Peak RSS while streaming every sample of an MDS dataset with 1 .. 64 shards (same shard size,
   each in a fresh subprocess): memory should stay flat as the shard count grows.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _ref(uri: Path):  # noqa: ANN202
    from nexus_core.artifacts import ArtifactRef

    return ArtifactRef(uri=str(uri), kind="dataset", name="bench", version=1, digest="bench")


def _step_times(pipe_dir: Path, pre_dir: Path, prepared: Path, args: argparse.Namespace) -> tuple[float, float]:
    """Mean seconds per optimizer step: (precomputed, on the fly)."""
    import torch
    from peft import LoraConfig

    from nexus_core.flux import encode, losses
    from nexus_core.flux.mds import iter_samples, open_dataset
    from nexus_core.flux.training import collate
    from nexus_core.models.flux_tiny import load_flux_pipeline

    device = args.device
    meta = json.loads((pre_dir / "flux_meta.json").read_text())
    pipe = load_flux_pipeline(str(pipe_dir)).to(device)
    tr = pipe.transformer
    tr.requires_grad_(False)
    tr.add_adapter(LoraConfig(r=8, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    opt = torch.optim.AdamW([p for p in tr.parameters() if p.requires_grad], lr=1e-4)
    raw = list(iter_samples(prepared / "mds", Path(tempfile.mkdtemp())))
    ds = open_dataset(pre_dir / "mds", Path(tempfile.mkdtemp()))
    bs = args.batch_size

    def step(x0, ids, emb, tids):  # noqa: ANN001, ANN202
        gen = torch.Generator().manual_seed(0)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        sig = losses.sample_sigmas(x0.shape[0], "logit_normal", gen).to(device)
        pred = tr(hidden_states=losses.noisy_latents(x0, noise, sig), encoder_hidden_states=emb, timestep=sig,
                  img_ids=ids, txt_ids=tids, guidance=None, return_dict=False)[0]
        loss = losses.flow_matching_loss(pred, noise - x0, sig).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()

    def precomputed(i: int) -> None:
        rows = [ds[(i * bs + j) % ds.num_samples] for j in range(bs)]
        step(*(t.to(device) for t in collate(rows, meta, "vae")))

    def on_the_fly(i: int) -> None:
        rows = [raw[(i * bs + j) % len(raw)] for j in range(bs)]
        pixels = encode.images_to_tensor([r["image"] for r in rows], args.resolution).to(device)
        lat = encode.encode_images(pipe, pixels)
        lat = encode.normalize(lat.cpu(), meta["vae_bn_mean"], meta["vae_bn_var"], meta["vae_bn_eps"]).to(device)
        tokens, ids = encode.pack(lat)
        emb, tids = encode.encode_prompts(pipe, [r["caption"] for r in rows], args.max_sequence_length,
                                          meta["text_encoder_out_layers"])
        step(tokens, ids.to(device), emb, tids.to(device))

    out = []
    for fn in (precomputed, on_the_fly):
        fn(0)  # warm-up
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(1, args.steps + 1):
            fn(i)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        out.append((time.perf_counter() - t0) / args.steps)
    return out[0], out[1]


def _hwm_kb() -> int:
    """Peak RSS of this process in KB (VmHWM; unlike ru_maxrss it is not inherited across fork+exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _memory_child(root: str) -> None:
    """Stream every sample of ``root`` and print the peak RSS in MB (run in a fresh process)."""
    import streaming  # noqa: F401 - count the library itself in the baseline, not in the delta

    from nexus_core.flux.mds import iter_samples

    base = _hwm_kb()
    n, total = 0, 0.0
    for row in iter_samples(root, Path(tempfile.mkdtemp())):
        total += float(row["x"][0, 0])
        n += 1
    peak = _hwm_kb()
    print(json.dumps({"rows": n, "peak_mb": peak / 1024, "delta_mb": (peak - base) / 1024}))


def _memory(work: Path, counts: tuple[int, ...]) -> list[dict]:
    import numpy as np

    from nexus_core.flux.mds import write_mds

    rows_per_shard, out = 8, []
    for n in counts:
        root = work / f"shards_{n}"
        # ~256 KB rows, 8 per shard: shard count grows, shard size stays ~2 MB
        write_mds(root, {"x": "ndarray"}, ({"x": np.full((256, 256), i, np.float32)} for i in range(n * rows_per_shard)),
                  size_limit=rows_per_shard * 256 * 256 * 4 + 1024)
        shards = len(json.loads((root / "index.json").read_text())["shards"])
        res = subprocess.run([sys.executable, "-m", "bench.flux_train", "--memory-child", str(root)],
                             capture_output=True, text=True, check=True)
        out.append({"shards": shards, **json.loads(res.stdout.strip().splitlines()[-1])})
    return out


def main() -> None:
    """Run all three benchmarks and print figures with their ratios."""
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--max-sequence-length", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--shard-counts", default="1,4,16,64")
    p.add_argument("--memory-child")
    args = p.parse_args()
    if args.memory_child:
        _memory_child(args.memory_child)
        return
    import os

    work = Path(tempfile.mkdtemp(prefix="bench-flux-"))
    os.environ.setdefault("NEXUS_DATA", str(work / "data"))
    from nexus_core.artifacts import raw_ref
    from nexus_core.context import StepContext
    from nexus_core.flux.device import resolve_device
    from nexus_core.flux.precompute import PrecomputeConfig, run_precompute
    from nexus_core.flux.prepare import PrepareConfig, run_prepare
    from nexus_core.flux.synthetic import make_shape_images
    from nexus_core.models.flux_tiny import TinyFluxConfig, build_tiny_flux

    args.device = resolve_device(args.device)
    tiny = TinyFluxConfig(text_hidden_size=32, vae_block_out_channels=[32, 32, 32], attention_head_dim=32,
                          num_attention_heads=4, num_layers=2, num_single_layers=2)
    build_tiny_flux(work / "pipe", [], tiny)
    src = make_shape_images(work / "imgs", args.images, size=args.resolution + 16)
    run_prepare(PrepareConfig(size=args.resolution), inputs={"source": raw_ref(src)}, out_uri=str(work / "prep"),
                ctx=StepContext.detached(work_dir=work / "work-prep"))
    ips = {}
    for bs in (1, 8):
        cfg = PrecomputeConfig(resolution=args.resolution, batch_size=bs, max_sequence_length=args.max_sequence_length,
                               device=args.device, group_size=args.images)
        res = run_precompute(cfg, inputs={"prepared": _ref(work / "prep"), "pipeline": _ref(work / "pipe")},
                             out_uri=str(work / f"pre{bs}"), ctx=StepContext.detached(work_dir=work / f"work-pre{bs}"))
        ips[bs] = res.images_per_second
    pre_s, fly_s = _step_times(work / "pipe", work / "pre8", work / "prep", args)
    mem = _memory(work, tuple(int(x) for x in args.shard_counts.split(",")))

    print(f"\nflux_train bench on {args.device}: {args.images} images at {args.resolution}px, batch {args.batch_size}, "
          f"{args.steps} steps, text {args.max_sequence_length} tokens")
    print(f"{'training step (s)':<34}{'precomputed':>14}{'on the fly':>14}{'ratio':>10}")
    print(f"{'':<34}{pre_s:>14.4f}{fly_s:>14.4f}{fly_s / pre_s:>9.2f}x")
    print(f"{'precompute images/s':<34}{'batch 8':>14}{'batch 1':>14}{'ratio':>10}")
    print(f"{'':<34}{ips[8]:>14.1f}{ips[1]:>14.1f}{ips[8] / ips[1]:>9.2f}x")
    print(f"{'streaming peak RSS (MB)':<34}{'shards':>14}{'delta MB':>14}{'vs first':>10}")
    for m in mem:
        print(f"{'':<34}{m['shards']:>14}{m['delta_mb']:>14.1f}{m['peak_mb'] / mem[0]['peak_mb']:>9.2f}x"
              f"   (rows {m['rows']}, peak {m['peak_mb']:.0f} MB)")


if __name__ == "__main__":
    main()
