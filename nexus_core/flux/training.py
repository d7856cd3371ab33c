"""Training plumbing for the flux train step: which rows make each batch, batch collation into
same-shape groups, LoRA targets and files, optimizers, EMA and checkpoints. Kept out of the step
module so the loop itself stays readable."""

from __future__ import annotations

import fnmatch
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nexus_core.errors import ConfigError, InputError


class BatchPlan:
    """Which rows make micro-batch number ``pos``: a pure function of (rows, seed, pos), so a resumed
    run draws exactly the batches the interrupted run would have drawn next.

    Each *pool* (all rows; or DreamBooth's instance rows and class rows) is shuffled once per epoch,
    split by bucket (rows of one bucket share a latent shape) into batches of ``per_pool`` rows, and
    the batches are shuffled. A row with ``repeats`` = k appears k times per epoch. Micro-batch ``pos``
    takes the ``pos``-th batch of every pool's endless sequence of epochs.
    """

    def __init__(self, pools: list[list[int]], buckets: list[str], per_pool: int, seed: int) -> None:
        self.pools, self.buckets, self.per_pool, self.seed = pools, buckets, per_pool, seed
        self._epochs: dict[int, tuple[int, list[list[int]]]] = {}  # pool → (epoch, its batches): one epoch kept
        self.lengths = [len(self._epoch(k, 0)) for k in range(len(pools))]

    def _epoch(self, k: int, epoch: int) -> list[list[int]]:
        if self._epochs.get(k, (-1,))[0] != epoch:
            rng = np.random.default_rng([self.seed, k, epoch])
            order = [self.pools[k][int(i)] for i in rng.permutation(len(self.pools[k]))]
            by_bucket: dict[str, list[int]] = {}
            for row in order:
                by_bucket.setdefault(self.buckets[row], []).append(row)
            batches = [rows[i:i + self.per_pool] for rows in by_bucket.values()
                       for i in range(0, len(rows), self.per_pool)]
            self._epochs[k] = (epoch, [batches[int(i)] for i in rng.permutation(len(batches))])
        return self._epochs[k][1]

    def batch(self, pos: int) -> list[tuple[int, int]]:
        """(row, pool) for every sample of micro-batch ``pos``."""
        out = []
        for k, length in enumerate(self.lengths):
            epoch, i = divmod(pos, length)
            out += [(row, k) for row in self._epoch(k, epoch)[i]]
        return out


@dataclass
class Group:
    """Samples of one micro-batch that share a latent shape: one transformer forward."""

    pools: list[int]
    x0: Any  # packed latents (n, tokens, channels)
    img_ids: Any
    emb: Any
    txt_ids: Any
    mask: Any = None  # (n, tokens) or None


def collate(rows: list[dict[str, Any]], meta: dict[str, Any], latent_norm: str, *, pools: list[int] | None = None,
            flips: list[bool] | None = None, drop_captions: list[bool] | None = None, empty: Any = None,
            use_mask: bool = False) -> list[Group]:
    """Stored rows → same-shape groups of (packed latents, latent ids, text embeds, text ids, mask).

    ``flips[i]`` takes row i's horizontally flipped latents (``<latent column>_flip``);
    ``drop_captions[i]`` replaces its caption embedding with ``empty`` (text_embeds, text_ids) of "".
    """
    import torch

    from nexus_core.flux import encode

    col, dt = meta["latent_column"], meta["save_dtype"]
    n = len(rows)
    pools, flips, drop_captions = pools or [0] * n, flips or [False] * n, drop_captions or [False] * n
    shapes: dict[tuple, list[int]] = {}
    for i, row in enumerate(rows):
        shapes.setdefault(tuple(row[col].shape), []).append(i)
    groups = []
    for idx in shapes.values():
        lat = torch.stack([encode.from_storage(rows[i][f"{col}_flip" if flips[i] else col], dt) for i in idx])
        if latent_norm == "dataset":
            lat = encode.normalize(lat, meta["dataset_mean"], meta["dataset_var"], 1e-6)
        else:
            lat = encode.normalize(lat, meta["vae_bn_mean"], meta["vae_bn_var"], meta["vae_bn_eps"])
        tokens, ids = encode.pack(lat)
        emb = torch.stack([empty[0] if drop_captions[i] else encode.from_storage(rows[i]["text_embeds"], dt)
                           for i in idx])
        txt_ids = torch.stack([empty[1] if drop_captions[i] else torch.from_numpy(rows[i]["text_ids"].astype("int64"))
                               for i in idx])
        mask = None
        if use_mask:
            masks = [torch.from_numpy(np.asarray(rows[i]["mask"], dtype=np.float32)) for i in idx]
            mask = torch.stack([m.flip(-1) if flips[i] else m for m, i in zip(masks, idx, strict=True)])
            mask = mask.reshape(len(idx), -1)  # the row-major token order of encode.pack
        groups.append(Group([pools[i] for i in idx], tokens, ids, emb, txt_ids, mask))
    return groups


def expand_targets(model: Any, patterns: list[str]) -> list[str]:
    """LoRA target module names: a plain name is kept (peft matches it as a module-name suffix); a
    name with ``*`` is expanded against the model's module names into explicit names. A pattern that
    matches no module is an error naming it."""
    names = [n for n, _ in model.named_modules()]
    out, unmatched = [], []
    for pattern in patterns:
        hits = ([n for n in names if fnmatch.fnmatchcase(n, pattern)] if "*" in pattern
                else [pattern] if any(n == pattern or n.endswith("." + pattern) for n in names) else [])
        if not hits:
            unmatched.append(pattern)
        out += [h for h in hits if h not in out]
    if unmatched:
        raise ConfigError([f"train.lora.target_modules: {p!r} matches no module of the transformer" for p in unmatched],
                          "flux train")
    return out


def make_optimizer(name: str, params: list, lr: float, weight_decay: float) -> Any:
    """AdamW, bitsandbytes' 8-bit AdamW (CUDA) or Prodigy (learning rate ~1.0)."""
    import torch

    if name == "adamw8bit":
        import bitsandbytes as bnb  # pyright: ignore[reportMissingImports] - installed on GPU images only

        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)
    if name == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(params, lr=lr, weight_decay=weight_decay, decouple=True,  # pyright: ignore[reportArgumentType] - a float decay safeguard_warmup=True,
                       use_bias_correction=True)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


class Ema:
    """Exponential moving average of the trainable weights (float32), with diffusers' warm-up:
    the decay at optimizer step t is ``min(decay, (1 + t) / (10 + t))``."""

    def __init__(self, params: list, decay: float) -> None:
        self.decay = decay
        self.shadow = [p.detach().float().clone() for p in params]

    def update(self, params: list, step: int) -> None:
        """Move the average towards the current weights after optimizer step ``step``."""
        import torch

        d = min(self.decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for s, p in zip(self.shadow, params, strict=True):
                s.lerp_(p.detach().float(), 1 - d)

    def swap(self, params: list) -> None:
        """Exchange the live weights and the average (twice restores both)."""
        import torch

        with torch.no_grad():
            for s, p in zip(self.shadow, params, strict=True):
                live = p.detach().float().clone()
                p.copy_(s.to(p.dtype))
                s.copy_(live)


def save_checkpoint(ck: Path, named: dict[str, Any], state: dict[str, Any], trainer_state: dict[str, Any]) -> None:
    """Only what training changes: the trainable weights (LoRA: a few MB, not the frozen base),
    the optimizer, LR scheduler and EMA state, the RNG and the step count."""
    import torch
    from safetensors.torch import save_file

    from nexus_core.artifacts import atomic_write_json

    shutil.rmtree(ck, ignore_errors=True)
    ck.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in named.items()}, str(ck / "trainable.safetensors"))
    torch.save({**state, "rng": torch.get_rng_state()}, ck / "state.pt")
    atomic_write_json(ck / "trainer_state.json", trainer_state)


def load_checkpoint(ck: Path, named: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load the trainable weights of ``ck`` into ``named`` (in place); return (state, trainer state)."""
    import torch
    from safetensors.torch import load_file

    if not (ck / "trainable.safetensors").is_file():
        raise InputError(f"{ck}: not a flux train checkpoint (no trainable.safetensors)")
    saved = load_file(str(ck / "trainable.safetensors"))
    if set(saved) != set(named):
        missing, extra = sorted(set(named) - set(saved)), sorted(set(saved) - set(named))
        raise InputError(f"{ck}: its trainable weights do not match this run's (missing {missing[:3]}, "
                         f"unexpected {extra[:3]}); was it written with another train_mode or lora settings?")
    with torch.no_grad():
        for k, p in named.items():
            p.copy_(saved[k].to(p.dtype))
    state = torch.load(ck / "state.pt", map_location="cpu", weights_only=True)
    torch.set_rng_state(state.pop("rng"))
    return state, json.loads((ck / "trainer_state.json").read_text(encoding="utf-8"))


def save_lora(out: Path, model: Any) -> list[str]:
    """Write the adapter twice, both at the trained strength (alpha / rank):

    * ``transformer_lora.safetensors``: diffusers/peft naming with the adapter config (rank, alpha,
      targets) in the file's metadata, which ``Flux2KleinPipeline.load_lora_weights`` reads;
    * ``comfyui/transformer_lora.safetensors``: the same keys with alpha/rank folded into ``lora_B``,
      for loaders that read no metadata and apply alpha = rank (ComfyUI). In a folder of its own, so
      ``load_lora_weights(<artifact dir>)`` finds exactly one LoRA file.
    """
    from diffusers import Flux2KleinPipeline
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    state = {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}
    config = model.peft_config["default"]
    Flux2KleinPipeline.save_lora_weights(str(out), transformer_lora_layers=state,  # pyright: ignore[reportArgumentType] - a state dict of tensors is what diffusers takes
                                         weight_name="transformer_lora.safetensors",
                                         transformer_lora_adapter_metadata=config.to_dict())
    scale = config.lora_alpha / config.r
    folded = {f"transformer.{k}": v * scale if ".lora_B." in k else v for k, v in state.items()}
    (out / "comfyui").mkdir(exist_ok=True)
    save_file(folded, str(out / "comfyui" / "transformer_lora.safetensors"),
              metadata={"format": "pt", "nexus.lora_scale_folded": str(scale)})
    return ["transformer_lora.safetensors", "comfyui/transformer_lora.safetensors"]


def export_outputs(artifact: str | Path, output_dir: str | Path) -> list[str]:
    """Copy a train artifact's weights, config copy and validation images to ``output_dir``."""
    src, dst = Path(artifact), Path(output_dir)
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in ("transformer_lora.safetensors", "transformer.safetensors", "train_config.json", "manifest.json"):
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    for sub in ("transformer", "comfyui", "validation"):
        if (src / sub).is_dir():
            shutil.copytree(src / sub, dst / sub, dirs_exist_ok=True)
            copied.append(sub)
    return copied
