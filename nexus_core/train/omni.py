"""Omni conversion: compose a text LLM with a vision encoder through a trainable projector into a
model that plain ``AutoModelForImageTextToText`` / ``AutoProcessor`` load.

Design (how LLaVA, LLaMA-Factory and TRL build understanding models on transformers' own classes):

- **Vision: LLaVA composition.** ``LlavaForConditionalGeneration`` holds the SigLIP vision tower, a
  two-layer GELU projector (``multi_modal_projector``, new weights) and the text LLM, unchanged
  (``LlavaConfig(text_config=<the LLM's config>)``, so any causal LM family transformers knows works).
  Every patch feature of the tower's last layer becomes one image token (``vision_feature_select_strategy
  = "full"``: SigLIP has no CLS token), ``(image_size / patch_size)^2`` tokens per image.
- **Processor.** ``LlavaProcessor`` = the encoder's image processor + the LLM's tokenizer with an added
  ``<image>`` special token + a chat template that accepts OpenAI-style content parts
  (``{"type": "image"}`` / ``{"type": "text"}``) in front of the LLM's own template (parts are flattened
  to text with ``<image>`` placeholders, then the LLM's template renders as before).
- **Audio is a documented sibling class** (``audio:``, with ``vision: none``). No class registered for
  ``AutoModelForImageTextToText`` in transformers 4.57 composes an arbitrary text LLM with both SigLIP and
  a Whisper encoder (Qwen2.5-Omni's thinker, Phi-4-multimodal and Gemma 3n carry their own text models).
  The audio path is ``Qwen2AudioForConditionalGeneration`` (Whisper encoder → linear projector → any
  causal LM via ``text_config``, ``WhisperFeatureExtractor`` in its processor), a sibling model of the
  same LLM that ``AutoModelForSeq2SeqLM`` / ``AutoProcessor`` load (:mod:`nexus_core.train.audio`).

Weights are assigned, not copied through a random init: the composite is built on the meta device and
the LLM's and tower's state dicts are assigned into it (a 7B LLM composes in the memory of its weights);
only the projector is initialised (seeded). Before publishing, the saved directory is loaded back with
``AutoModelForImageTextToText`` / ``AutoProcessor`` and run on one blank image.

Inputs: ``model`` (text LLM dir) and ``vision`` (encoder dir; absent when the config's encoder is
``tiny``, which is built here from ``tiny_vision``). Output: the composed model artifact.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from nexus_core.artifacts import ArtifactRef, atomic_write_text
from nexus_core.config import NexusModel, PathOrName
from nexus_core.context import StepContext
from nexus_core.contract import model, step
from nexus_core.errors import InputError
from nexus_core.runner import StepResult
from nexus_core.train.audio import TinyAudioConfig, build_tiny_audio, compose_audio
from nexus_core.train.chat import check_template, stage_tokenizer, template_reads
from nexus_core.train.encoders import VISION_TYPES, TinyVisionConfig, build_tiny_vision, encoder_spec
from nexus_core.train.modalities import detect_modalities

IMAGE_TOKEN = "<image>"
# Flattens content parts into text with <image> placeholders; the LLM's own template follows it.
PARTS_PREAMBLE = (
    "{%- set flat = namespace(msgs=[]) -%}"
    "{%- for m in messages -%}"
    "{%- if m['content'] is string or m['content'] is none -%}{%- set flat.msgs = flat.msgs + [m] -%}"
    "{%- else -%}{%- set t = namespace(s='') -%}"
    "{%- for p in m['content'] -%}"
    "{%- if p['type'] == 'image' or p['type'] == 'image_url' -%}{%- set t.s = t.s + '" + IMAGE_TOKEN + "' -%}"
    "{%- elif p['type'] == 'text' -%}{%- set t.s = t.s + p['text'] -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- set flat.msgs = flat.msgs + [{'role': m['role'], 'content': t.s}] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- set messages = flat.msgs -%}"
)


class OmniConfig(NexusModel):
    """Which encoders to compose with the text LLM, and the projector between them."""

    vision: str = Field(default="default", description="Vision encoder: a name under encoders.vision in "
                        "configs/encoders.yaml, or a hub id / dir / NAME@vN; 'tiny' builds one from tiny_vision; "
                        "'none' with audio: (an audio model has no vision tower)")
    tiny_vision: TinyVisionConfig = Field(default_factory=TinyVisionConfig,
                                          description="Shape of the tiny vision tower (vision: tiny)")
    projector_act: str = Field(default="gelu", description="Activation between the projector's two layers")
    vision_feature_layer: int = Field(default=-1, description="Tower layer whose patch features feed the projector")
    chat_template: PathOrName | None = Field(default=None, description="Chat template for an LLM without one "
                                             "(a shipped name or a .jinja file); none: the LLM's own")
    seed: int = Field(default=0, description="Seed for the projector's initial weights")
    audio: str | None = Field(default=None, description="Audio encoder (Whisper): a name under "
                              "encoders.audio_input in configs/encoders.yaml, or a hub id / dir / NAME@vN; 'tiny' "
                              "builds one from tiny_audio. Composes Qwen2AudioForConditionalGeneration, a sibling "
                              "of the vision model (needs vision: none)")
    tiny_audio: TinyAudioConfig = Field(default_factory=TinyAudioConfig,
                                        description="Shape of the tiny Whisper encoder (audio: tiny)")

    @model_validator(mode="after")
    def _one_modality(self) -> OmniConfig:
        if self.audio and self.vision != "none":
            raise ValueError("audio: the audio model (Qwen2-Audio) and the vision model (LLaVA) are sibling classes; "
                             "transformers has none that composes an arbitrary LLM with both. Set vision: none for "
                             "an audio model (and compose vision in another config)")
        if not self.audio and self.vision == "none":
            raise ValueError("vision: none and no audio: there is nothing to compose")
        return self

    def vision_spec(self) -> str:
        """The reference the ``vision`` choice stands for (``tiny`` for a built one)."""
        return encoder_spec(self.vision, "vision")

    def audio_spec(self) -> str | None:
        """The reference the ``audio`` choice stands for (``tiny`` for a built one; None: no audio)."""
        return encoder_spec(self.audio, "audio_input") if self.audio else None


class OmniResult(StepResult):
    """The composed model."""

    architecture: str
    modalities: list[str]
    image_tokens: int = Field(description="Tokens each image takes in the LLM's sequence")
    audio_tokens: int = Field(default=0, description="Most tokens one clip takes (an audio model)")
    projector_params: int


def vision_ref(cfg: OmniConfig) -> ArtifactRef | None:
    """The ``vision`` input of an omni config, resolved by the flow before the step runs (its identity
    joins the cache key); None for a tiny tower built from config."""
    from nexus_core.models.io import resolve_model

    spec = cfg.vision_spec()
    return None if spec in ("tiny", "none") else resolve_model(spec, "omni.vision")


def audio_ref(cfg: OmniConfig) -> ArtifactRef | None:
    """The ``audio`` input of an omni config (as :func:`vision_ref`); None for tiny or no audio."""
    from nexus_core.models.io import resolve_model

    spec = cfg.audio_spec()
    return None if spec in (None, "tiny") else resolve_model(spec, "omni.audio")


def parts_template(template: str) -> str:
    """The LLM's chat template made to accept content parts with images (see PARTS_PREAMBLE)."""
    return PARTS_PREAMBLE + template


@step(area="train", kind="model", inputs={"model": model(description="the text LLM to give eyes"),
                                          "vision": model(optional=True, description="the vision encoder"),
                                          "audio": model(optional=True, description="the audio encoder")},
      reads=template_reads)
def run_omni(cfg: OmniConfig, *, inputs: dict[str, ArtifactRef], out_uri: str, ctx: StepContext) -> OmniResult:
    """Compose the LLM, the vision tower and a new projector; save model + processor; prove they load."""
    if "model" not in inputs:
        raise InputError("omni: missing input 'model' (the text LLM)")
    llm_dir = inputs["model"].path
    has = detect_modalities(llm_dir)
    if has != ["text"]:
        raise InputError(f"omni: model {llm_dir} already takes {', '.join(has)}; omni composes a text-only LLM")
    check_template(cfg, llm_dir, "omni")
    if cfg.audio:
        return _run_audio(cfg, llm_dir, inputs, Path(out_uri), ctx)
    if cfg.vision_spec() == "tiny":
        vision_dir = build_tiny_vision(ctx.work_dir / "tiny_vision", cfg.tiny_vision)
    elif "vision" in inputs:
        vision_dir = inputs["vision"].path
    else:
        raise InputError(f"omni: vision encoder {cfg.vision!r} needs the 'vision' input (resolve it with vision_ref)")
    out = Path(out_uri)
    result = compose(cfg, llm_dir, vision_dir, out)
    ctx.info(f"composed {result.architecture}: {result.image_tokens} tokens per image, "
             f"{result.projector_params} projector parameters")
    return result


def _run_audio(cfg: OmniConfig, llm_dir: Path, inputs: dict[str, ArtifactRef], out: Path,
               ctx: StepContext) -> OmniResult:
    """The audio sibling: LLM + Whisper encoder + projector as Qwen2AudioForConditionalGeneration."""
    if cfg.audio_spec() == "tiny":
        audio_dir = build_tiny_audio(ctx.work_dir / "tiny_audio", cfg.tiny_audio)
    elif "audio" in inputs:
        audio_dir = inputs["audio"].path
    else:
        raise InputError(f"omni: audio encoder {cfg.audio!r} needs the 'audio' input (resolve it with audio_ref)")
    made = compose_audio(cfg, llm_dir, audio_dir, out)
    ctx.info(f"composed {made['architecture']}: up to {made['audio_tokens']} tokens per clip, "
             f"{made['projector_params']} projector parameters")
    return OmniResult(architecture=made["architecture"], modalities=detect_modalities(out), image_tokens=0,
                      audio_tokens=made["audio_tokens"], projector_params=made["projector_params"],
                      metrics={"parameters": float(made["parameters"]), "audio_tokens": float(made["audio_tokens"]),
                               "projector_params": float(made["projector_params"])})


def compose(cfg: OmniConfig, llm_dir: Path, vision_dir: Path, out: Path) -> OmniResult:
    """Write the composed LLaVA model and its processor to ``out`` (module docstring)."""
    import json

    import torch
    from transformers import (
        AutoConfig,
        AutoImageProcessor,
        AutoModelForCausalLM,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        SiglipVisionConfig,
        SiglipVisionModel,
    )
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    vtype = json.loads((vision_dir / "config.json").read_text()).get("model_type")
    if vtype not in VISION_TYPES:
        raise InputError(f"omni.vision {vision_dir}: model_type {vtype!r} is not a SigLIP tower "
                         f"({' / '.join(VISION_TYPES)}); NaFlex SigLIP 2 (siglip2) is not supported by LLaVA")
    tokenizer = stage_tokenizer(cfg, llm_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": [*tokenizer.additional_special_tokens, IMAGE_TOKEN]})
    tokenizer.model_input_names = ["input_ids", "attention_mask"]  # no token_type_ids: generate() refuses them
    tokenizer.init_kwargs["model_input_names"] = tokenizer.model_input_names
    template = parts_template(tokenizer.chat_template)
    tokenizer.chat_template = template
    llm = AutoModelForCausalLM.from_pretrained(str(llm_dir), dtype="auto")
    llm.resize_token_embeddings(len(tokenizer))
    tower = SiglipVisionModel.from_pretrained(str(vision_dir), dtype=llm.dtype)
    vconf = SiglipVisionConfig.from_pretrained(str(vision_dir))
    image_tokens = (vconf.image_size // vconf.patch_size) ** 2
    text_conf = AutoConfig.from_pretrained(str(llm_dir))
    text_conf.vocab_size = len(tokenizer)
    config = LlavaConfig(vision_config=vconf, text_config=text_conf,
                         image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                         projector_hidden_act=cfg.projector_act, vision_feature_select_strategy="full",
                         vision_feature_layer=cfg.vision_feature_layer, image_seq_length=image_tokens,
                         tie_word_embeddings=text_conf.tie_word_embeddings)
    with torch.device("meta"):
        composed = LlavaForConditionalGeneration(config)
    composed.model.language_model.load_state_dict(llm.model.state_dict(), assign=True)
    composed.lm_head.load_state_dict(llm.lm_head.state_dict(), assign=True)
    composed.model.vision_tower.load_state_dict(tower.state_dict(), assign=True)
    torch.manual_seed(cfg.seed)
    composed.model.multi_modal_projector = LlavaMultiModalProjector(config).to(llm.dtype)
    composed.tie_weights()
    composed.generation_config = llm.generation_config
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):  # the trainer aligns them otherwise, noisily
        setattr(composed.config, key, getattr(tokenizer, key))
    image_processor = AutoImageProcessor.from_pretrained(str(vision_dir))
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=vconf.patch_size,
                               vision_feature_select_strategy="full", chat_template=template,
                               image_token=IMAGE_TOKEN)
    composed.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    atomic_write_text(out / "omni.json", json.dumps({
        "text_model": str(llm_dir), "vision_encoder": str(vision_dir), **cfg.model_dump(mode="json")}, indent=2))
    check_loads(out)
    projector = sum(p.numel() for p in composed.model.multi_modal_projector.parameters())
    return OmniResult(architecture="LlavaForConditionalGeneration", modalities=detect_modalities(out),
                      image_tokens=image_tokens, projector_params=projector,
                      metrics={"parameters": float(sum(p.numel() for p in composed.parameters())),
                               "projector_params": float(projector), "image_tokens": float(image_tokens)})


def check_loads(path: Path) -> None:
    """Load ``path`` the way any user would and run one forward pass on a blank image."""
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    m = AutoModelForImageTextToText.from_pretrained(str(path))
    proc = AutoProcessor.from_pretrained(str(path))
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe"}]}]
    text = proc.apply_chat_template(chat, add_generation_prompt=True)
    enc = proc(text=[text], images=[Image.new("RGB", (8, 8))], return_tensors="pt")
    with torch.no_grad():
        logits = m(**enc).logits
    if not torch.isfinite(logits).all():
        raise InputError(f"omni: the composed model at {path} gives non-finite logits")
