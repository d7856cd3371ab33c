"""Checks the flux flow and steps make before any work: can a model be loaded here, and what size
multiple its VAE needs (read from ``vae/config.json``, no weights loaded)."""

from __future__ import annotations

import json
import os
from pathlib import Path


def loadable(ref: str) -> bool:
    """A local path must exist; a hub id must be cached when the hub is off (otherwise it may download)."""
    from nexus_core.doctor import resolve_model

    if ref.startswith((".", "/", "~")) or Path(ref).exists():
        return Path(ref).expanduser().exists()
    return os.environ.get("HF_HUB_OFFLINE", "0") not in {"1", "true", "True"} or resolve_model(ref)[0]


def factor_of_vae_config(config: dict) -> int:
    """VAE scale x patch size (2) of a Flux.2 VAE config: the multiple every image side must be."""
    return 2 ** (len(config["block_out_channels"]) - 1) * 2


def vae_patch_factor(ref: str) -> int | None:
    """The VAE x patch factor of the pipeline ``ref`` (local dir or hub id) from its ``vae/config.json``;
    None when that file cannot be read here (the loadability check reports why)."""
    path = Path(ref).expanduser() / "vae" / "config.json"
    if not path.is_file() and ref.count("/") == 1 and not ref.startswith((".", "/", "~")):
        try:
            from huggingface_hub import hf_hub_download, try_to_load_from_cache

            hit = try_to_load_from_cache(ref, "vae/config.json")
            if not isinstance(hit, str) and os.environ.get("HF_HUB_OFFLINE", "0") not in {"1", "true", "True"}:
                hit = hf_hub_download(ref, "vae/config.json")  # a few hundred bytes; the run needs the model anyway
            path = Path(hit) if isinstance(hit, str) else path
        except Exception:  # noqa: BLE001 - no network, no such repo: the factor is unknown here
            return None
    try:
        return factor_of_vae_config(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError):
        return None
