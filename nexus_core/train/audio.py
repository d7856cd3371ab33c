"""Audio input: WAV decoding and checks, the tiny Whisper encoder, and the audio composite.

**Audio is a sibling class of the LLaVA composite** (:mod:`nexus_core.train.omni`): transformers 4.57 has
no class that puts an arbitrary text LLM behind both SigLIP and Whisper, so an omni section with
``audio:`` composes ``Qwen2AudioForConditionalGeneration`` instead: the Whisper encoder's weights
(``WhisperModel``'s encoder, same layout as ``Qwen2AudioEncoder``) → a new linear projector
(``multi_modal_projector``, seeded) → the text LLM unchanged (``Qwen2AudioConfig(text_config=<the LLM's
config>)``). Weights are assigned on the meta device as for vision. transformers registers
``qwen2_audio`` under ``AutoModelForSeq2SeqLM`` (and ``AutoModelForPreTraining``), not
``AutoModelForImageTextToText``: load it with ``Qwen2AudioForConditionalGeneration.from_pretrained`` or
``AutoModelForSeq2SeqLM.from_pretrained``, and ``AutoProcessor`` (a ``Qwen2AudioProcessor``: the encoder's
``WhisperFeatureExtractor`` + the LLM's tokenizer with ``<|audio_bos|>``, ``<|AUDIO|>``, ``<|audio_eos|>``
added + a chat template that accepts ``{"type": "audio"}`` parts in front of the LLM's own template).
Each clip becomes ``((frames - 1) // 2 + 1 - 2) // 2 + 1`` tokens (frames = samples / hop length), at
most half the encoder's ``max_source_positions``.

Decoding needs no new dependency: PCM WAV (8/16/24/32-bit, any channels, averaged to mono) through the
stdlib ``wave`` and numpy; another sample rate is resampled with ``scipy.signal.resample_poly``
(polyphase, anti-aliased; scipy comes with mlflow) unless resampling is off, when it is a "wrong sample
rate" error. A clip longer than ``max_audio_seconds`` or the encoder's window (Whisper: 30 s) is "too long".
"""

from __future__ import annotations

import io
import json
import wave
from dataclasses import dataclass
from math import gcd
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from nexus_core.artifacts import atomic_write_text
from nexus_core.config import NexusModel
from nexus_core.errors import InputError

AUDIO_TOKEN = "<|AUDIO|>"
AUDIO_BOS = "<|audio_bos|>"
AUDIO_EOS = "<|audio_eos|>"
AUDIO_TYPES = ("whisper",)
# Flattens content parts into text, each audio part becoming bos + placeholder + eos (the processor
# expands the placeholder per clip); images are not this model's; the LLM's own template follows it.
AUDIO_PARTS_PREAMBLE = (
    "{%- set flat = namespace(msgs=[]) -%}"
    "{%- for m in messages -%}"
    "{%- if m['content'] is string or m['content'] is none -%}{%- set flat.msgs = flat.msgs + [m] -%}"
    "{%- else -%}{%- set t = namespace(s='') -%}"
    "{%- for p in m['content'] -%}"
    "{%- if p['type'] in ['audio', 'input_audio', 'audio_url'] -%}"
    "{%- set t.s = t.s + '" + AUDIO_BOS + AUDIO_TOKEN + AUDIO_EOS + "' -%}"
    "{%- elif p['type'] == 'text' -%}{%- set t.s = t.s + p['text'] -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- set flat.msgs = flat.msgs + [{'role': m['role'], 'content': t.s}] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- set messages = flat.msgs -%}"
)


class TinyAudioConfig(NexusModel):
    """Shape of a tiny Whisper encoder built from config (random weights) and its feature extractor."""

    num_mel_bins: int = Field(default=16, ge=4, description="Mel bins of the feature extractor and encoder")
    chunk_length: int = Field(default=2, ge=1, le=30, description="Encoder window in seconds (Whisper: 30)")
    d_model: int = Field(default=32, ge=8, description="Width of the encoder")
    encoder_ffn_dim: int = Field(default=64, ge=8, description="MLP inner width")
    encoder_layers: int = Field(default=2, ge=1, description="Transformer blocks")
    encoder_attention_heads: int = Field(default=4, ge=1, description="Attention heads")
    seed: int = Field(default=0, description="Seed for weight initialisation")


def build_tiny_audio(out_dir: str | Path, cfg: TinyAudioConfig) -> Path:
    """A random-weight ``WhisperModel`` (one-layer decoder: only the encoder is used) and its
    ``WhisperFeatureExtractor`` at 16 kHz, saved with ``save_pretrained``."""
    import torch
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

    torch.manual_seed(cfg.seed)
    fe = WhisperFeatureExtractor(feature_size=cfg.num_mel_bins, chunk_length=cfg.chunk_length)
    conf = WhisperConfig(vocab_size=64, num_mel_bins=cfg.num_mel_bins, d_model=cfg.d_model,
                         encoder_layers=cfg.encoder_layers, encoder_attention_heads=cfg.encoder_attention_heads,
                         encoder_ffn_dim=cfg.encoder_ffn_dim, decoder_layers=1, decoder_attention_heads=1,
                         decoder_ffn_dim=cfg.d_model, max_source_positions=fe.nb_max_frames // 2,
                         max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                         decoder_start_token_id=1, begin_suppress_tokens=None, suppress_tokens=None)
    WhisperModel(conf).save_pretrained(out_dir, safe_serialization=True)
    fe.save_pretrained(out_dir)
    return Path(out_dir)


# ---- decoding and checks --------------------------------------------------------------------------

@dataclass(frozen=True)
class AudioSpec:
    """What a model's audio input takes: its sample rate and longest clip, and whether to resample."""

    sampling_rate: int
    max_seconds: float
    resample: bool = True


def audio_spec(model_dir: str | Path, max_seconds: float, resample: bool = True) -> AudioSpec:
    """The spec of the audio model in ``model_dir`` (its feature extractor's rate and window), the
    longest clip capped at ``max_seconds``."""
    conf = json.loads((Path(model_dir) / "preprocessor_config.json").read_text())
    window = float(conf.get("chunk_length") or 30)
    return AudioSpec(int(conf.get("sampling_rate") or 16000), min(max_seconds, window), resample)


def read_wav(source: str | Path | bytes) -> tuple[np.ndarray, int]:
    """Mono float32 samples in [-1, 1] and the sample rate of a PCM WAV file or its bytes."""
    handle = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")  # noqa: SIM115
    with handle, wave.open(handle, "rb") as w:
        width, channels, rate = w.getsampwidth(), w.getnchannels(), w.getframerate()
        raw = w.readframes(w.getnframes())
    if width == 1:
        data = (np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 3:  # 24-bit little-endian: widen to int32
        b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3)
        ints = (b[:, 0].astype(np.int32) | (b[:, 1].astype(np.int32) << 8) | (b[:, 2].astype(np.int32) << 16))
        data = (np.where(ints >= 1 << 23, ints - (1 << 24), ints) / float(1 << 23)).astype(np.float32)
    elif width in (2, 4):
        kind = np.int16 if width == 2 else np.int32
        data = np.frombuffer(raw, dtype=f"<{np.dtype(kind).str[1:]}").astype(np.float32) / float(np.iinfo(kind).max)
    else:
        raise wave.Error(f"{width * 8}-bit samples are not supported")
    if channels > 1:
        data = data.reshape(-1, channels).mean(axis=1)
    return data.astype(np.float32), rate


def load_audio(source: str | Path | bytes, spec: AudioSpec) -> np.ndarray:
    """The clip at ``spec.sampling_rate``; ``ValueError`` says why it is not usable (unreadable, wrong
    sample rate, too long, empty)."""
    try:
        data, rate = read_wav(source)
    except (OSError, EOFError, wave.Error, ValueError) as exc:
        raise ValueError(f"cannot be read as a PCM WAV ({type(exc).__name__}: {str(exc)[:120]})") from exc
    if not len(data):
        raise ValueError("holds no samples")
    seconds = len(data) / rate
    if seconds > spec.max_seconds + 1e-9:
        raise ValueError(f"is too long: {seconds:.2f} s > {spec.max_seconds:g} s (max_audio_seconds, or the "
                         f"encoder's window)")
    if rate != spec.sampling_rate:
        if not spec.resample:
            raise ValueError(f"has the wrong sample rate: {rate} Hz; the encoder takes {spec.sampling_rate} Hz "
                             f"(resample_audio: false)")
        from scipy.signal import resample_poly

        g = gcd(rate, spec.sampling_rate)
        data = resample_poly(data, spec.sampling_rate // g, rate // g).astype(np.float32)
    return data


def check_audio(path: Path, spec: AudioSpec) -> str | None:
    """Why ``path`` is not a usable clip for ``spec`` (None when it is)."""
    if not path.is_file():
        return "does not exist"
    try:
        load_audio(path, spec)
    except ValueError as exc:
        return str(exc)
    return None


def audio_token_counts(feature_extractor: Any, waves: list[np.ndarray]) -> list[int]:
    """Tokens each clip takes in the LLM's sequence (as ``Qwen2AudioProcessor`` expands them)."""
    counts = []
    for w in waves:
        frames = int(feature_extractor(w, sampling_rate=feature_extractor.sampling_rate, return_attention_mask=True,
                                       padding="max_length", return_tensors="np")["attention_mask"].sum())
        counts.append(((frames - 1) // 2 + 1 - 2) // 2 + 1)
    return counts


def audio_features(feature_extractor: Any, waves: list[np.ndarray]) -> dict[str, Any]:
    """``input_features`` and ``feature_attention_mask`` of clips (torch tensors), as the model takes them."""
    out = feature_extractor(waves, sampling_rate=feature_extractor.sampling_rate, return_attention_mask=True,
                            padding="max_length", return_tensors="pt")
    return {"input_features": out["input_features"], "feature_attention_mask": out["attention_mask"]}


# ---- composition ----------------------------------------------------------------------------------

def is_audio_model(model_dir: str | Path) -> bool:
    """Whether ``model_dir`` holds a Qwen2-Audio-style model (what the audio composite is)."""
    p = Path(model_dir) / "config.json"
    return p.is_file() and json.loads(p.read_text()).get("model_type") == "qwen2_audio"


def compose_audio(cfg: Any, llm_dir: Path, audio_dir: Path, out: Path) -> dict[str, Any]:
    """Write the composed Qwen2-Audio model and its processor to ``out`` (module docstring); returns
    ``architecture``, ``audio_tokens`` (most per clip), ``projector_params`` and ``parameters``."""
    import torch
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        Qwen2AudioConfig,
        Qwen2AudioEncoderConfig,
        Qwen2AudioForConditionalGeneration,
        Qwen2AudioProcessor,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperModel,
    )
    from transformers.models.qwen2_audio.modeling_qwen2_audio import Qwen2AudioMultiModalProjector

    from nexus_core.train.chat import stage_tokenizer

    atype = json.loads((audio_dir / "config.json").read_text()).get("model_type")
    if atype not in AUDIO_TYPES:
        raise InputError(f"omni.audio {audio_dir}: model_type {atype!r} is not a Whisper model "
                         f"({' / '.join(AUDIO_TYPES)}); the audio composite takes a Whisper encoder")
    tokenizer = stage_tokenizer(cfg, llm_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": [*tokenizer.additional_special_tokens,
                                                                AUDIO_BOS, AUDIO_TOKEN, AUDIO_EOS]})
    tokenizer.model_input_names = ["input_ids", "attention_mask"]  # no token_type_ids: generate() refuses them
    tokenizer.init_kwargs["model_input_names"] = tokenizer.model_input_names
    template = AUDIO_PARTS_PREAMBLE + tokenizer.chat_template
    tokenizer.chat_template = template
    llm = AutoModelForCausalLM.from_pretrained(str(llm_dir), dtype="auto")
    llm.resize_token_embeddings(len(tokenizer))
    wconf = WhisperConfig.from_pretrained(str(audio_dir))
    encoder = WhisperModel.from_pretrained(str(audio_dir), dtype=llm.dtype).get_encoder()
    aconf = Qwen2AudioEncoderConfig(
        num_mel_bins=wconf.num_mel_bins, encoder_layers=wconf.encoder_layers, d_model=wconf.d_model,
        encoder_attention_heads=wconf.encoder_attention_heads, encoder_ffn_dim=wconf.encoder_ffn_dim,
        activation_function=wconf.activation_function, scale_embedding=wconf.scale_embedding,
        max_source_positions=wconf.max_source_positions)
    text_conf = AutoConfig.from_pretrained(str(llm_dir))
    text_conf.vocab_size = len(tokenizer)
    config = Qwen2AudioConfig(audio_config=aconf, text_config=text_conf,
                              audio_token_index=tokenizer.convert_tokens_to_ids(AUDIO_TOKEN),
                              tie_word_embeddings=text_conf.tie_word_embeddings)
    with torch.device("meta"):
        composed = Qwen2AudioForConditionalGeneration(config)
    composed.language_model.load_state_dict(llm.state_dict(), assign=True)
    composed.audio_tower.load_state_dict(encoder.state_dict(), assign=True)
    torch.manual_seed(cfg.seed)
    composed.multi_modal_projector = Qwen2AudioMultiModalProjector(config).to(llm.dtype)
    composed.tie_weights()
    composed.generation_config = llm.generation_config
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        setattr(composed.config, key, getattr(tokenizer, key))
    fe = WhisperFeatureExtractor.from_pretrained(str(audio_dir))
    processor = Qwen2AudioProcessor(feature_extractor=fe, tokenizer=tokenizer, chat_template=template)
    composed.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    atomic_write_text(out / "omni.json", json.dumps({
        "text_model": str(llm_dir), "audio_encoder": str(audio_dir), **cfg.model_dump(mode="json")}, indent=2))
    check_audio_loads(out)
    projector = sum(p.numel() for p in composed.multi_modal_projector.parameters())
    return {"architecture": "Qwen2AudioForConditionalGeneration", "projector_params": projector,
            "audio_tokens": audio_token_counts(fe, [np.zeros(fe.n_samples, dtype=np.float32)])[0],
            "parameters": sum(p.numel() for p in composed.parameters())}


def check_audio_loads(path: Path) -> None:
    """Load ``path`` with plain transformers (``AutoModelForSeq2SeqLM`` / ``AutoProcessor``) and run one
    forward pass on half a second of silence."""
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoProcessor

    m = AutoModelForSeq2SeqLM.from_pretrained(str(path))
    proc = AutoProcessor.from_pretrained(str(path))
    chat = [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "describe"}]}]
    text = proc.apply_chat_template(chat, add_generation_prompt=True)
    rate = proc.feature_extractor.sampling_rate
    enc = proc(text=[text], audio=[np.zeros(rate // 2, dtype=np.float32)], sampling_rate=rate, return_tensors="pt")
    with torch.no_grad():
        logits = m(**enc).logits
    if not torch.isfinite(logits).all():
        raise InputError(f"omni: the composed audio model at {path} gives non-finite logits")
