"""A tiny two-speaker VITS text-to-speech model built from config (random weights), for offline runs.

Like the tiny LLM and Flux presets it is saved with ``save_pretrained`` and every consumer loads it with
``VitsModel.from_pretrained``, the path a real checkpoint takes (``kakao-enterprise/vits-vctk``, a
multi-speaker VITS, or ``facebook/mms-tts-*``, one voice per checkpoint). Its vocabulary is characters
(lowercase letters, digits, punctuation), so no phonemizer is needed. With random weights its
durations are arbitrary (VITS rounds each token up to at least one frame): a 64-sample hop and
``speaking_rate`` keep lines short on CPU, and the speech step pads any line below its ``min_line_s``
with silence. It speaks noise shaped by text, not words.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

from pydantic import Field

from nexus_core.artifacts import ArtifactRef
from nexus_core.config import NexusModel
from nexus_core.context import StepContext
from nexus_core.contract import step
from nexus_core.runner import StepResult

CHARS = list(" " + string.ascii_lowercase + string.digits + "'.,?!-:;")


class TinyTTSConfig(NexusModel):
    """Shape of the tiny VITS."""

    num_speakers: int = Field(default=2, ge=1, description="Voices in the model (speaker_id 0..num_speakers-1)")
    hidden_size: int = Field(default=32, ge=8, description="Text encoder width")
    num_hidden_layers: int = Field(default=2, ge=1, description="Text encoder layers")
    sampling_rate: int = Field(default=16000, ge=8000, description="Audio sampling rate in Hz")
    speaking_rate: float = Field(default=20.0, gt=0, description="Durations are divided by this (random weights "
                                 "predict long ones; a higher rate keeps CPU synthesis short)")
    seed: int = Field(default=0, description="Weight initialisation seed")


class TinyTTSResult(StepResult):
    """The built model's size."""

    parameters: int = 0


@step(area="models", kind="model")
def run_tiny_tts(cfg: TinyTTSConfig, *, inputs: dict[str, ArtifactRef], out_uri: str,
                 ctx: StepContext) -> TinyTTSResult:
    """Build the tiny VITS and its character tokenizer into ``out_uri`` (a Hugging Face model directory)."""
    import torch
    from transformers import VitsConfig, VitsModel, VitsTokenizer

    out = Path(out_uri)
    out.mkdir(parents=True, exist_ok=True)
    vocab = {c: i for i, c in enumerate(["<pad>", *CHARS])}
    vocab_file = ctx.work_dir / "vocab.json"
    vocab_file.write_text(json.dumps(vocab), encoding="utf-8")
    tokenizer = VitsTokenizer(str(vocab_file), pad_token="<pad>", unk_token="<pad>", language=None,
                              add_blank=True, normalize=True, phonemize=False, is_uroman=False)
    config = VitsConfig(
        vocab_size=len(vocab), hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=2, ffn_dim=cfg.hidden_size * 2, flow_size=cfg.hidden_size, spectrogram_bins=65,
        upsample_initial_channel=32, upsample_rates=[4, 4, 4], upsample_kernel_sizes=[8, 8, 8],
        resblock_kernel_sizes=[3], resblock_dilation_sizes=[[1, 3]], prior_encoder_num_flows=2,
        prior_encoder_num_wavenet_layers=2, posterior_encoder_num_wavenet_layers=2, duration_predictor_num_flows=2,
        duration_predictor_filter_channels=32, depth_separable_num_layers=2, wavenet_dilation_rate=1,
        num_speakers=cfg.num_speakers, speaker_embedding_size=16 if cfg.num_speakers > 1 else 0,
        sampling_rate=cfg.sampling_rate, speaking_rate=cfg.speaking_rate)
    torch.manual_seed(cfg.seed)
    model = VitsModel(config)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    n = sum(p.numel() for p in model.parameters())
    ctx.info(f"tiny VITS: {n:,} parameters, {cfg.num_speakers} speaker(s), {cfg.sampling_rate} Hz")
    return TinyTTSResult(parameters=n, metrics={"parameters": float(n)})
