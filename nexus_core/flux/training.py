"""Training plumbing for the flux train step: deterministic batch order, batch collation, exporting
outputs. Kept out of the step module so the loop itself stays readable."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np


def stream_indices(pool: list[int], seed: int, start: int, count: int) -> list[int]:
    """Items ``start .. start+count`` of an endless stream of seeded per-epoch permutations of ``pool``.

    A pure function of (pool, seed, position), so a resumed run draws exactly the batches the
    interrupted run would have drawn next.
    """
    n = len(pool)
    out = []
    for pos in range(start, start + count):
        epoch, i = divmod(pos, n)
        perm = np.random.default_rng(seed + epoch).permutation(n)
        out.append(pool[int(perm[i])])
    return out


def collate(rows: list[dict[str, Any]], meta: dict[str, Any], latent_norm: str):  # noqa: ANN201 - tensors
    """Stored rows → (packed latents, latent ids, text embeds, text ids) as the transformer takes them."""
    import torch

    from nexus_core.flux import encode

    col, dt = meta["latent_column"], meta["save_dtype"]
    lat = torch.stack([encode.from_storage(r[col], dt) for r in rows])
    if latent_norm == "dataset":
        lat = encode.normalize(lat, meta["dataset_mean"], meta["dataset_var"], 1e-6)
    else:
        lat = encode.normalize(lat, meta["vae_bn_mean"], meta["vae_bn_var"], meta["vae_bn_eps"])
    tokens, ids = encode.pack(lat)
    emb = torch.stack([encode.from_storage(r["text_embeds"], dt) for r in rows])
    txt_ids = torch.stack([torch.from_numpy(r["text_ids"].astype("int64")) for r in rows])
    return tokens, ids, emb, txt_ids


def export_outputs(artifact: str | Path, output_dir: str | Path) -> list[str]:
    """Copy a train artifact's weights, config copy and validation images to ``output_dir``."""
    src, dst = Path(artifact), Path(output_dir)
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in ("transformer_lora.safetensors", "transformer.safetensors", "train_config.json", "manifest.json"):
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    for sub in ("transformer", "validation"):
        if (src / sub).is_dir():
            shutil.copytree(src / sub, dst / sub, dirs_exist_ok=True)
            copied.append(sub)
    return copied
