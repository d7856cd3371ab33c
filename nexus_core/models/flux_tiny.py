"""Tiny Flux.2 Klein preset: a Klein-compatible pipeline (transformer, VAE, Qwen3 text encoder, Qwen2
tokenizer, flow-matching scheduler) with random weights, built from config and saved with
``save_pretrained`` so every consumer loads it through the real ``from_pretrained`` path.

The text encoder keeps Klein's 28 layers (so the pipeline's default ``text_encoder_out_layers``
(9, 18, 27) work unchanged) but is a few thousand parameters wide; the transformer's
``joint_attention_dim`` is 3 x the encoder width, exactly as in the real model.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from pydantic import Field

from nexus_core.config import NexusModel

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen-style chat template; the Klein pipeline passes enable_thinking=False, which this ignores.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TEXT_LAYERS = (9, 18, 27)
BASE_CORPUS = [
    "a photo of a red square on a blue background", "a painting of a cat", "a dog in the snow",
    "a green circle", "a portrait of a person", "a landscape with mountains and a lake",
]


class TinyFluxConfig(NexusModel):
    """Shape of a tiny Klein-compatible pipeline built from scratch (random weights)."""

    vocab_size: int = Field(default=384, ge=300, description="BPE vocabulary size of the tiny Qwen2 tokenizer")
    text_hidden_size: int = Field(default=16, ge=8, description="Width of the tiny Qwen3 text encoder")
    text_layers: int = Field(default=28, ge=28, description="Text encoder layers (>= 28 so layers 9/18/27 exist)")
    latent_channels: int = Field(default=4, ge=1, description="VAE latent channels (transformer sees 4x after 2x2 patchify)")
    vae_block_out_channels: list[int] = Field(default=[16, 16], description="VAE encoder widths; 2**(n-1) is the scale")
    vae_norm_groups: int = Field(default=8, ge=1, description="GroupNorm groups in the VAE (must divide the widths)")
    attention_head_dim: int = Field(default=16, ge=8, description="Transformer head width (= sum of the 4 rope axes)")
    num_attention_heads: int = Field(default=2, ge=1, description="Transformer heads")
    num_layers: int = Field(default=1, ge=1, description="Double-stream transformer blocks")
    num_single_layers: int = Field(default=1, ge=0, description="Single-stream transformer blocks")
    seed: int = Field(default=0, description="Seed for weight initialisation")


def train_qwen_tokenizer(texts: Iterable[str], vocab_size: int):  # noqa: ANN201 - transformers type
    """A byte-level BPE tokenizer trained on ``texts``, wrapped as the Qwen2TokenizerFast Klein expects."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([*BASE_CORPUS, *texts], trainer=trainer)
    fast = Qwen2TokenizerFast(tokenizer_object=tok, unk_token=None, bos_token=None, eos_token="<|im_end|>",  # pyright: ignore[reportArgumentType] - Qwen2's tokenizer has no unk token
                              pad_token="<|endoftext|>", additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_flux(out_dir: str | Path, captions: Iterable[str], cfg: TinyFluxConfig | None = None) -> Path:
    """Build a tiny Flux2KleinPipeline from ``cfg`` and save it (model_index.json + components) to ``out_dir``."""
    import torch
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = cfg or TinyFluxConfig()
    torch.manual_seed(cfg.seed)
    tokenizer = train_qwen_tokenizer(captions, cfg.vocab_size)
    heads = max(1, cfg.text_hidden_size // 8)
    text_encoder = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=cfg.text_hidden_size, intermediate_size=2 * cfg.text_hidden_size,
        num_hidden_layers=cfg.text_layers, num_attention_heads=heads, num_key_value_heads=heads, head_dim=8,
        max_position_embeddings=1024, tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    ))
    n = len(cfg.vae_block_out_channels)
    vae = AutoencoderKLFlux2(
        block_out_channels=tuple(cfg.vae_block_out_channels), down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, layers_per_block=1, latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.vae_norm_groups, sample_size=64, mid_block_add_attention=False,
    )
    axis = cfg.attention_head_dim // 4
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=4 * cfg.latent_channels, num_layers=cfg.num_layers,
        num_single_layers=cfg.num_single_layers, attention_head_dim=4 * axis,
        num_attention_heads=cfg.num_attention_heads, joint_attention_dim=len(TEXT_LAYERS) * cfg.text_hidden_size,
        timestep_guidance_channels=32, axes_dims_rope=(axis,) * 4, guidance_embeds=False,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                max_image_seq_len=4096)
    pipe = Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              transformer=transformer, is_distilled=False)
    pipe.save_pretrained(str(out_dir), safe_serialization=True)
    return Path(out_dir)


def load_flux_pipeline(path: str, dit: str | None = None, dtype: str = "float32", transformer=None):  # noqa: ANN001, ANN201
    """Load a Flux2KleinPipeline from ``path`` (hub id or dir); ``dit`` swaps in a transformer from elsewhere,
    ``transformer`` an already loaded one (the pipeline's own is then never read from disk).

    ``pipeline.pretrained_model_name_or_path`` is the single source of VAE, scheduler and text encoder;
    the DiT may come from a separate directory (a fine-tuned or distilled one).
    """
    import torch
    from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel

    from nexus_core.errors import InputError

    p = Path(path)
    if p.exists() and not (p / "model_index.json").is_file():
        raise InputError(f"{p}: not a diffusers pipeline directory (no model_index.json)")
    torch_dtype = getattr(torch, dtype)
    kwargs = {"transformer": transformer} if transformer is not None else {}
    if dit and transformer is None:
        sub = "transformer" if (Path(dit) / "transformer" / "config.json").is_file() else None
        kwargs["transformer"] = Flux2Transformer2DModel.from_pretrained(dit, subfolder=sub, torch_dtype=torch_dtype)
    pipe = Flux2KleinPipeline.from_pretrained(str(path), torch_dtype=torch_dtype, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe
