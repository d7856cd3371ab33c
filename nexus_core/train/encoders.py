"""Encoder choices (``configs/encoders.yaml``) and the tiny encoders built from config for offline runs.

``configs/encoders.yaml`` names encoders per role (``vision``, ``audio_input``) by a short name; each
value is a model reference (hub id ``ORG/NAME[@REV]``, a local directory, an artifact ``NAME@vN``) or
``tiny`` (random weights built from the omni section's ``tiny_vision`` shape: offline tests and
presets). An omni config picks one by name (``default`` unless told) or names a reference directly.

Vision encoders must be SigLIP-architecture towers (``model_type`` ``siglip`` or
``siglip_vision_model``: SigLIP and the fixed-resolution SigLIP 2 releases); LLaVA feeds them a fixed
square image and takes every patch feature. NaFlex SigLIP 2 (``siglip2``) needs per-image patch masks
LLaVA does not pass, and is refused by name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from nexus_core.config import NexusModel, load_yaml, repo_root, validate

ENCODERS_FILE = Path("configs") / "encoders.yaml"
Role = Literal["vision", "audio_input", "audio_output"]
VISION_TYPES = ("siglip", "siglip_vision_model")


class EncodersFile(NexusModel):
    """``configs/encoders.yaml``: encoder references by role and short name."""

    encoders: dict[Role, dict[str, str]] = Field(description="role → {name: hub id | dir | NAME@vN | tiny}")
    decoders: dict[str, dict[str, str]] = Field(default_factory=dict, description="Output decoders by role "
                                                "(not used by the understanding stages)")


class TinyVisionConfig(NexusModel):
    """Shape of a tiny SigLIP vision tower built from config (random weights)."""

    image_size: int = Field(default=32, ge=8, description="Square input size in pixels")
    patch_size: int = Field(default=8, ge=2, description="Patch size; (image_size/patch_size)^2 image tokens")
    hidden_size: int = Field(default=32, ge=8, description="Width of the tower")
    intermediate_size: int = Field(default=64, ge=8, description="MLP inner width")
    num_hidden_layers: int = Field(default=2, ge=1, description="Transformer blocks")
    num_attention_heads: int = Field(default=4, ge=1, description="Attention heads")
    seed: int = Field(default=0, description="Seed for weight initialisation")


def load_encoders(path: str | Path | None = None) -> EncodersFile:
    """The encoders file (``configs/encoders.yaml`` of this checkout unless ``path``), validated."""
    p = Path(path) if path else repo_root() / ENCODERS_FILE
    return validate(EncodersFile, load_yaml(p), str(p))


def encoder_spec(choice: str, role: Role, path: str | Path | None = None) -> str:
    """The reference an omni config's encoder ``choice`` stands for: a name in the encoders file's
    ``role`` section, else the choice itself (a hub id, dir or artifact spec)."""
    names = load_encoders(path).encoders.get(role, {})
    return names.get(choice, choice)


def build_tiny_vision(out_dir: str | Path, cfg: TinyVisionConfig) -> Path:
    """A random-weight SigLIP vision tower and its image processor, saved with ``save_pretrained``."""
    import torch
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(cfg.seed)
    conf = SiglipVisionConfig(image_size=cfg.image_size, patch_size=cfg.patch_size, hidden_size=cfg.hidden_size,
                              intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
                              num_attention_heads=cfg.num_attention_heads)
    SiglipVisionModel(conf).save_pretrained(out_dir, safe_serialization=True)
    SiglipImageProcessor(size={"height": cfg.image_size, "width": cfg.image_size}).save_pretrained(out_dir)
    return Path(out_dir)
