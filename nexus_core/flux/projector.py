"""LLM → Flux.2 Klein conditioning projector: the pieces both image-generation steps use.

Klein conditions its DiT on ``prompt_embeds`` of shape ``(L, joint_attention_dim)``: the hidden
states of layers (9, 18, 27) of its Qwen3 text encoder, stacked per token, for the caption wrapped
in the chat template and padded to ``max_sequence_length`` tokens; the positions (``text_ids``) are
``(0, 0, 0, l)`` for token ``l`` whatever the content (``Flux2KleinPipeline._prepare_text_ids``).

Here another (frozen) causal LM reads the caption the same way -- its chat template when it has one,
right-padded or truncated to the same ``L`` tokens -- and the hidden states of ``llm_layers`` are
concatenated per token (``len(llm_layers) x hidden_size``) and mapped, token by token, by a small MLP
(LayerNorm → Linear → GELU → Linear) to ``joint_attention_dim``. The result takes the place of the
text encoder's ``prompt_embeds`` and gets the same ``text_ids``, so the pipeline runs unchanged with
``prompt_embeds=...`` and Klein's own text encoder is never loaded at render time.

An artifact of the projector holds ``projector.safetensors`` (the MLP) and ``projector_config.json``
(:class:`ProjectorSpec`: dimensions, layers, sequence length, and the LLM and pipeline it was trained
with, by URI and digest).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from nexus_core.errors import InputError

WEIGHTS = "projector.safetensors"
CONFIG = "projector_config.json"
CAPTIONS = "captions.txt"


class ProjectorSpec(BaseModel):
    """What a projector maps from and to (saved as ``projector_config.json``)."""

    llm_layers: list[int] = Field(description="LLM hidden-state indices concatenated per token (0 = embeddings)")
    llm_hidden_size: int = Field(description="Width of one LLM hidden state")
    hidden_size: int = Field(description="Inner width of the MLP")
    joint_attention_dim: int = Field(description="Output width: the DiT's joint_attention_dim")
    max_sequence_length: int = Field(description="Tokens per prompt (padded/truncated), as precomputed")
    chat_template: bool = Field(description="Prompts wrapped as a user turn of the LLM's chat template")
    llm: dict[str, Any] = Field(default_factory=dict, description="The LLM trained with: uri, digest")
    pipeline: dict[str, Any] = Field(default_factory=dict, description="The pipeline trained with: uri, digest")

    @property
    def in_dim(self) -> int:
        """Input width of the MLP."""
        return len(self.llm_layers) * self.llm_hidden_size


def build_projector(spec: ProjectorSpec) -> Any:
    """The projector MLP (``torch.nn.Sequential``), float32, freshly initialised."""
    from torch import nn

    return nn.Sequential(nn.LayerNorm(spec.in_dim), nn.Linear(spec.in_dim, spec.hidden_size), nn.GELU(),
                         nn.Linear(spec.hidden_size, spec.joint_attention_dim))


def save_projector(out: Path, projector: Any, spec: ProjectorSpec) -> None:
    """Write the weights and the spec into ``out``."""
    from safetensors.torch import save_file

    from nexus_core.artifacts import atomic_write_json

    save_file({k: v.detach().float().cpu().contiguous() for k, v in projector.state_dict().items()},
              str(out / WEIGHTS), metadata={"format": "pt", "nexus.kind": "flux_projector"})
    atomic_write_json(out / CONFIG, spec.model_dump(mode="json"))


def load_projector(root: Path) -> tuple[Any, ProjectorSpec]:
    """(projector in eval mode, its spec) from a projector artifact directory."""
    from safetensors.torch import load_file

    for name in (WEIGHTS, CONFIG):
        if not (root / name).is_file():
            raise InputError(f"{root}: not a projector artifact (no {name})")
    spec = ProjectorSpec.model_validate(json.loads((root / CONFIG).read_text(encoding="utf-8")))
    projector = build_projector(spec)
    projector.load_state_dict(load_file(str(root / WEIGHTS)))
    return projector.eval(), spec


def llm_hidden_size(llm: Any) -> int:
    """Width of the LLM's hidden states (text config of a multimodal model)."""
    cfg = llm.config
    return int(getattr(cfg, "hidden_size", None) or cfg.get_text_config().hidden_size)


def check_layers(llm: Any, layers: list[int], key: str) -> None:
    """Every index names a hidden state the LLM returns (``num_hidden_layers + 1`` of them; negative from the end)."""
    n = int(llm.config.get_text_config().num_hidden_layers) + 1
    bad = [i for i in layers if not -n <= i < n]
    if bad:
        from nexus_core.errors import ConfigError

        raise ConfigError([f"{key}: {bad} out of range; the LLM returns {n} hidden states (0 = embeddings, "
                           f"-1 = last)"])


def llm_features(llm: Any, tokenizer: Any, prompts: list[str], spec: ProjectorSpec) -> Any:
    """``(B, L, in_dim)``: the frozen LLM's hidden states of ``spec.llm_layers`` for each prompt, per token,
    the prompt read as Klein reads it (chat template user turn + generation prompt when ``chat_template``
    and the tokenizer has one), right-padded / truncated to ``L`` tokens."""
    import torch

    use_chat = spec.chat_template and getattr(tokenizer, "chat_template", None)
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True) if use_chat else p for p in prompts]
    side = tokenizer.padding_side
    tokenizer.padding_side = "right"  # token l at position l, like the text_ids the DiT gets
    try:
        enc = tokenizer(texts, return_tensors="pt", padding="max_length", truncation=True,
                        max_length=spec.max_sequence_length, add_special_tokens=not use_chat)
    finally:
        tokenizer.padding_side = side
    device = next(llm.parameters()).device
    with torch.no_grad():
        out = llm.base_model(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device),
                             output_hidden_states=True, use_cache=False)
    return torch.cat([out.hidden_states[i] for i in spec.llm_layers], dim=-1).float()


def project(llm: Any, tokenizer: Any, projector: Any, spec: ProjectorSpec, prompts: list[str]) -> Any:
    """``prompt_embeds`` ``(B, L, joint_attention_dim)`` for ``prompts`` (gradients reach the projector only)."""
    device = next(projector.parameters()).device
    return projector(llm_features(llm, tokenizer, prompts, spec).to(device))


def load_render_pipeline(path: str, dtype: str = "float32") -> Any:
    """The Klein pipeline without its text encoder and tokenizer (the LLM + projector replace them)."""
    import torch
    from diffusers import Flux2KleinPipeline

    p = Path(path)
    if p.exists() and not (p / "model_index.json").is_file():
        raise InputError(f"{p}: not a diffusers pipeline directory (no model_index.json)")
    pipe = Flux2KleinPipeline.from_pretrained(path, text_encoder=None, tokenizer=None,
                                              torch_dtype=getattr(torch, dtype))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def render(pipe: Any, llm: Any, tokenizer: Any, projector: Any, spec: ProjectorSpec, prompt: str, *,
           height: int, width: int, steps: int, guidance_scale: float, negative_prompt: str, seed: int,
           images_per_prompt: int = 1) -> list[Any]:
    """PIL images of ``prompt`` drawn by the pipeline from the projected embeddings (classifier-free
    guidance against the projected ``negative_prompt`` when the scale is above 1)."""
    import torch

    dtype = pipe.transformer.dtype
    with torch.no_grad():
        emb = project(llm, tokenizer, projector, spec, [prompt]).to(dtype)
        negative = project(llm, tokenizer, projector, spec, [negative_prompt]).to(dtype) \
            if guidance_scale > 1 else None
    return pipe(prompt_embeds=emb, negative_prompt_embeds=negative,  # pyright: ignore[reportArgumentType] - diffusers mistypes it as str
                height=height, width=width, num_inference_steps=steps, guidance_scale=guidance_scale,
                num_images_per_prompt=images_per_prompt, generator=torch.Generator().manual_seed(seed)).images
