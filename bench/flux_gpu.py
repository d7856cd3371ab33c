"""Flux.2 Klein 4B training step on a GPU: seconds per step and peak memory, LoRA vs full, 512 and 1024 px.

    python -m bench.flux_gpu [--modes lora,full] [--resolutions 512,1024] [--steps 10] [--warmup 3]
                             [--batch 1] [--text-len 512] [--rank 16] [--no-gc] [--json OUT.json]
    python -m bench.flux_gpu --tiny        # same code path, tiny shape, on CPU (plumbing check, no figures)

No download: the transformer is ``diffusers.Flux2Transformer2DModel(**KLEIN_4B)`` with random weights,
built directly in bf16 on the GPU. ``KLEIN_4B`` is the ``klein-4b`` transformer config of diffusers'
``scripts/convert_flux2_to_diffusers.py`` (``get_flux2_transformer_config``), the script that converted
the FLUX.2 [klein] 4B checkpoints; the script uses that one config for the distilled and the base
(``FLUX.2-klein-base-4B``) checkpoint alike, which differ in weights only. It has 3.88B parameters.

One training step as the flux train step takes it: precomputed inputs (image latents as (res/16)² tokens
of 128 channels, ``--text-len`` text tokens of 7680 = 3 × Qwen3-4B width; 512 is Klein's precompute
length), flow-matching loss at a random sigma, bf16 autocast, gradient checkpointing (``--no-gc`` to
turn it off), gradient clipping, optimizer step. Modes:

- ``lora``: frozen bf16 base, rank ``--rank`` adapters in fp32 on diffusers' Klein targets (``to_q``,
  ``to_k``, ``to_v``, ``to_out.0``, ``to_qkv_mlp_proj`` and ``single_transformer_blocks.*.attn.to_out``),
  torch AdamW.
- ``full``: every weight trained in bf16 (fp32 master weights plus Adam would be ~62 GB before any
  activation for 3.9B parameters), with bitsandbytes' 8-bit AdamW when it is installed, else torch
  AdamW with bf16 states; the row says which.

Figures per (mode, resolution): median seconds per step over ``--steps`` after ``--warmup``, peak CUDA
memory (``torch.cuda.max_memory_allocated`` from before the model is built: weights, gradients, optimizer
state, activations), trainable parameters. A run out of memory is a row (``oom``), not a crash. Each row
is printed as a JSON line when done, then a table with full/LoRA ratios at the same resolution.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import gc
import json
import statistics
import sys
import time
from pathlib import Path

# diffusers' scripts/convert_flux2_to_diffusers.py, get_flux2_transformer_config("klein-4b")
KLEIN_4B = dict(patch_size=1, in_channels=128, num_layers=5, num_single_layers=20, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=7680, timestep_guidance_channels=256, mlp_ratio=3.0,
                axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, eps=1e-6, guidance_embeds=False)
# --tiny: the same architecture, ~60k parameters (head dim = sum of the 4 rope axes)
TINY = {**KLEIN_4B, "in_channels": 8, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16,
        "num_attention_heads": 2, "joint_attention_dim": 24, "timestep_guidance_channels": 16,
        "axes_dims_rope": (4, 4, 4, 4)}
# diffusers' Klein LoRA script's targets; the wildcard is expanded against the model's module names
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "to_qkv_mlp_proj", "single_transformer_blocks.*.attn.to_out")


def lora_targets(model, patterns: tuple[str, ...] = LORA_TARGETS) -> list[str]:  # noqa: ANN001 - torch module
    """peft ``target_modules``: plain names as they are (peft matches them as name suffixes), each pattern
    with a ``*`` replaced by the full names of the modules it matches."""
    names = [n for n, _ in model.named_modules()]
    out = []
    for pat in patterns:
        if "*" in pat:
            hits = [n for n in names if fnmatch.fnmatchcase(n, pat)]
            if not hits:
                raise ValueError(f"LoRA target {pat!r} matches no module")
            out += hits
        else:
            out.append(pat)
    return out


@contextlib.contextmanager
def _default_dtype(dtype):  # noqa: ANN001, ANN202
    import torch

    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _optimizer(mode: str, params: list, lr: float):  # noqa: ANN202
    import torch

    if mode == "full":
        try:
            import bitsandbytes as bnb  # pyright: ignore[reportMissingImports]
        except ImportError:
            return torch.optim.AdamW(params, lr=lr), "torch AdamW, bf16 states (bitsandbytes not installed)"
        return bnb.optim.AdamW8bit(params, lr=lr), "bitsandbytes AdamW8bit"
    return torch.optim.AdamW(params, lr=lr), "torch AdamW, fp32"


def run_row(mode: str, resolution: int, args: argparse.Namespace, shape: dict, device: str) -> dict:
    """One (mode, resolution) row; out of memory is reported in the row. Everything the row allocated is
    freed before the next (it lives in :func:`_train`'s frame)."""
    import torch

    cuda = device.startswith("cuda")
    row: dict = {"mode": mode, "resolution": resolution, "image_tokens": (resolution // 16) ** 2,
                 "text_tokens": args.text_len, "batch": args.batch, "gradient_checkpointing": args.gc,
                 "device": torch.cuda.get_device_name(device) if cuda else "cpu"}
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    try:
        _train(row, args, shape, device)
    except torch.cuda.OutOfMemoryError as e:
        row["oom"] = True
        row["error"] = str(e).splitlines()[0][:200]
    row["peak_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if cuda else None
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row


def _train(row: dict, args: argparse.Namespace, shape: dict, device: str) -> None:
    """Build the transformer, take ``warmup + steps`` training steps, record parameters and step times in ``row``."""
    import torch
    from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel

    mode, cuda = row["mode"], device.startswith("cuda")
    torch.manual_seed(0)
    with torch.device(device), _default_dtype(torch.bfloat16):
        model = Flux2Transformer2DModel(**shape)
    if args.gc:
        model.enable_gradient_checkpointing()
    model.train()
    if mode == "lora":
        from peft import LoraConfig
        from peft.tuners.tuners_utils import BaseTunerLayer

        model.requires_grad_(False)
        model.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=lora_targets(model)))
        row["lora_modules"] = sum(isinstance(m, BaseTunerLayer) for m in model.modules())
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()  # fp32 adapters over the bf16 base, as LoRA training keeps them
    elif mode != "full":
        raise ValueError(f"unknown mode {mode!r} (lora or full)")
    params = [p for p in model.parameters() if p.requires_grad]
    opt, row["optimizer"] = _optimizer(mode, params, args.lr)
    row["params"] = sum(p.numel() for p in model.parameters())
    row["trainable_params"] = sum(p.numel() for p in params)

    side = row["resolution"] // 16  # VAE /8, then 2x2 patchify
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(args.batch, shape["in_channels"], side, side, generator=gen)
    x0 = latents.flatten(2).transpose(1, 2).to(device)  # (B, side², C), as Flux2KleinPipeline packs them
    img_ids = Flux2KleinPipeline._prepare_latent_ids(latents).to(device)
    text = torch.randn(args.batch, args.text_len, shape["joint_attention_dim"], generator=gen)
    txt_ids = Flux2KleinPipeline._prepare_text_ids(text).to(device)
    text = text.to(device, torch.bfloat16)

    def step() -> float:
        noise = torch.randn(x0.shape, generator=gen).to(device)
        sigma = torch.rand(args.batch, generator=gen).to(device)
        noisy = (1 - sigma[:, None, None]) * x0 + sigma[:, None, None] * noise
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16):
            pred = model(hidden_states=noisy.to(torch.bfloat16), encoder_hidden_states=text, timestep=sigma,
                         img_ids=img_ids, txt_ids=txt_ids, guidance=None, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(pred.float(), noise - x0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(device)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{mode} {row['resolution']}px: loss is {loss.item()}")
        return time.perf_counter() - t0

    for _ in range(args.warmup):
        step()
    row["s_per_step"] = round(statistics.median([step() for _ in range(args.steps)]), 4)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "–"


def table(rows: list[dict]) -> str:
    """Markdown table of the rows, each against LoRA at the same resolution (the baseline)."""
    base = {r["resolution"]: r for r in rows if r["mode"] == "lora" and "s_per_step" in r}
    lines = ["| mode | px | image tokens | trainable params | optimizer | s/step | × LoRA | peak GB | × LoRA |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b = base.get(r["resolution"], {})
        trainable = _count(r["trainable_params"]) if "trainable_params" in r else "–"
        peak = "–" if r.get("peak_memory_gb") is None else f"{r['peak_memory_gb']:.1f}"
        secs = "OOM" if r.get("oom") else f"{r['s_per_step']:.3f}"
        lines.append(f"| {r['mode']} | {r['resolution']} | {r['image_tokens']:,} | {trainable} | "
                     f"{r.get('optimizer', '–')} | {secs} | {_ratio(r.get('s_per_step'), b.get('s_per_step'))} | "
                     f"{peak} | {_ratio(r.get('peak_memory_gb'), b.get('peak_memory_gb'))} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, run every (mode, resolution) row, print JSON lines and the table."""
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--modes", default="lora,full")
    ap.add_argument("--resolutions", default=None, help="pixels, comma-separated (default 512,1024; --tiny 32,64)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps (the median is reported)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--text-len", type=int, default=None, help="text tokens (default 512; --tiny 8)")
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = rank)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--no-gc", dest="gc", action="store_false", help="no gradient checkpointing")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json", default=None, help="also write the rows here")
    ap.add_argument("--tiny", action="store_true", help="tiny shape on CPU: checks the code path, no figures")
    args = ap.parse_args(argv)
    import torch

    if args.tiny:
        shape, device = TINY, "cpu"
    elif not torch.cuda.is_available():
        sys.exit("bench.flux_gpu needs a CUDA GPU (no figures taken); --tiny runs the code path on CPU")
    else:
        shape, device = KLEIN_4B, args.device
    args.text_len = args.text_len or (8 if args.tiny else 512)
    resolutions = [int(x) for x in (args.resolutions or ("32,64" if args.tiny else "512,1024")).split(",")]
    print(f"bench.flux_gpu: {'tiny shape' if args.tiny else 'FLUX.2 klein 4B shape'} on {device}, batch {args.batch}, "
          f"text {args.text_len} tokens, gradient checkpointing {'on' if args.gc else 'off'}, "
          f"{args.warmup} warm-up + {args.steps} timed steps, torch {torch.__version__}", flush=True)
    rows = []
    for res in resolutions:
        for mode in args.modes.split(","):
            rows.append(run_row(mode, res, args, shape, device))
            print(json.dumps(rows[-1]), flush=True)
    print("\n" + table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
