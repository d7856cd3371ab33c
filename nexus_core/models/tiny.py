"""Tiny LLM preset: a small Llama or Qwen2 model with random weights and a BPE tokenizer trained on
the run's own text, saved with ``save_pretrained`` so every consumer loads it through the real
``from_pretrained`` path. Runs anywhere, offline, in seconds.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from nexus_core.config import NexusModel

SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>", "<|unk|>"]

# ChatML-style template; `{% generation %}` marks assistant turns for completion-only loss in trl.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class TinyLLMConfig(NexusModel):
    """Shape of a tiny causal LM built from scratch (random weights)."""

    architecture: Literal["llama", "qwen2"] = Field(default="llama", description="Model family to instantiate")
    vocab_size: int = Field(default=512, ge=64, description="BPE vocabulary size (specials included)")
    hidden_size: int = Field(default=64, ge=8, description="Width of the residual stream")
    intermediate_size: int = Field(default=128, ge=8, description="MLP inner width")
    num_hidden_layers: int = Field(default=2, ge=1, description="Transformer blocks")
    num_attention_heads: int = Field(default=4, ge=1, description="Query heads")
    num_key_value_heads: int = Field(default=2, ge=1, description="Key/value heads (grouped-query attention)")
    max_position_embeddings: int = Field(default=512, ge=16, description="Longest sequence the model accepts")
    seed: int = Field(default=0, description="Seed for weight initialisation")


def train_tokenizer(texts: Iterable[str], vocab_size: int):  # noqa: ANN201 - transformers type
    """Train a byte-level BPE tokenizer on ``texts`` and wrap it as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|im_end|>", pad_token="<|pad|>",
        unk_token="<|unk|>", additional_special_tokens=["<|im_start|>", "<|eos|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "right"
    return fast


def build_tiny_llm(out_dir: str | Path, texts: Iterable[str], cfg: TinyLLMConfig | None = None) -> Path:
    """Build a tiny model + tokenizer from ``cfg`` and save both to ``out_dir`` with save_pretrained."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    cfg = cfg or TinyLLMConfig()
    out = Path(out_dir)
    tokenizer = train_tokenizer(texts, cfg.vocab_size)
    common: dict[str, Any] = dict(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, max_position_embeddings=cfg.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    torch.manual_seed(cfg.seed)
    if cfg.architecture == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, max_new_tokens=32,
    )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
