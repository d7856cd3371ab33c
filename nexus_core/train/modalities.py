"""Modality detection: which inputs a model takes, read from its ``config.json`` (no weights loaded).

``detect_modalities(model_dir)`` answers with a subset of ``text``, ``vision``, ``video``, ``audio``:

- ``vision`` — a vision tower (``vision_config``) or an image placeholder token (``image_token_index`` /
  ``image_token_id``): LLaVA, Qwen2-VL, Gemma 3, ... and the omni stage's composed models;
- ``video`` — a video placeholder token or ``video_config`` (LLaVA-OneVision, Qwen2-VL, ...);
- ``audio`` — an audio tower (``audio_config``) or an audio placeholder token (Qwen2-Audio, ...).

Composite configs nest these (``thinker_config`` of Qwen2.5-Omni); nested sections are searched too.
A training stage declares what its data needs (:func:`needed_by_columns`); :func:`modality_problems`
turns a mismatch into the "modality validation failed" message a flow raises before any work.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

MODALITIES = ("text", "vision", "video", "audio")
# config keys that show a modality, wherever they sit in a (nested) config
_MARKERS = {
    "vision": ("vision_config", "image_token_index", "image_token_id"),
    "video": ("video_config", "video_token_index", "video_token_id"),
    "audio": ("audio_config", "audio_token_index", "audio_token_id"),
}
# data columns (the sharegpt convention) and the modality each needs
# (videos are read as sampled frames, one image each, so a vision tower takes them)
MEDIA_COLUMNS = {"images": "vision", "videos": "vision", "audios": "audio"}
# stage methods that train a model with encoders; the others train text-only causal LMs
MULTIMODAL_METHODS = ("mm_align", "mm_sft")


def _keys(conf: dict[str, Any]) -> set[str]:
    keys = set(conf)
    for value in conf.values():
        if isinstance(value, dict):
            keys |= _keys(value)
    return keys


def modalities_of_config(conf: dict[str, Any]) -> list[str]:
    """Modalities of a parsed ``config.json`` (``text`` always first)."""
    keys = _keys(conf)
    return ["text", *(m for m in MODALITIES[1:] if keys & set(_MARKERS[m]))]


def detect_modalities(model_dir: str | Path) -> list[str]:
    """Which inputs the model in ``model_dir`` takes, from its ``config.json`` (module docstring)."""
    return modalities_of_config(json.loads((Path(model_dir) / "config.json").read_text()))


def needed_by_columns(columns: Iterable[str]) -> list[str]:
    """Modalities a dataset with these columns needs: ``text`` plus one per media column."""
    cols = set(columns)
    return ["text", *dict.fromkeys(m for c, m in MEDIA_COLUMNS.items() if c in cols)]


def modality_problems(needs: Iterable[str], has: Iterable[str], model: str, where: str) -> list[str]:
    """One "modality validation failed" line when ``needs`` holds a modality ``has`` lacks, else none.
    ``model`` names the model in words ("model /path", "the base model")."""
    missing = [m for m in needs if m not in set(has)]
    if not missing:
        return []
    return [f"{where}: modality validation failed: the data needs {', '.join(missing)} but {model} takes "
            f"{', '.join(has)} only; add an `omni:` section (encoders from configs/encoders.yaml, see "
            f"configs/train/omni_tiny.yaml) or train a model that has a {missing[0]} encoder"]


def queue_modality_problems(stages: list[Any], base: list[str] | None, named: dict[str, Any],
                            data: dict[str, Any]) -> list[str]:
    """Every stage of a queue whose data needs a modality its model lacks, or that trains a model with
    encoders by a text-only method (sft, dpo, ...: they load causal LMs), found before the first stage
    trains. ``base`` is the base model's modalities (None: unknown); a stage's model keeps the modalities of
    its input model. ``stages`` are the flow's stage entries (name, model, dataset, train); ``named`` maps
    model references to resolved refs; ``data`` dataset keys to refs (columns read from schemas only)."""
    from nexus_core.contract import columns_of
    from nexus_core.errors import InputError

    has: dict[str, list[str] | None] = {"base": base}
    has.update({spec: detect_modalities(ref.path) for spec, ref in named.items()})
    current, problems = "base", []
    for s in stages:
        source = s.model or current
        ref = data.get(s.dataset)
        try:
            cols = columns_of(ref) if ref is not None else None
        except InputError:
            cols = None  # the contract check names the data's own problem
        model_has = has.get(source)
        label = f"model {named[source].uri}" if source in named else (
            "the base model" if source == "base" else f"the model of stage {source}")
        if cols is not None and model_has is not None:
            problems += modality_problems(needed_by_columns(cols), model_has, label, f"stages.{s.name}")
        if model_has is not None and model_has != ["text"] and s.train.method not in MULTIMODAL_METHODS:
            problems.append(f"stages.{s.name}: modality validation failed: {s.train.method} trains text-only "
                            f"causal LMs but {label} takes {', '.join(model_has)}; use mm_sft (messages + "
                            f"images rows; a row's images may be empty)")
        has[s.name] = model_has
        if s.train.method != "reward":  # a reward model is not the next stage's policy
            current = s.name
    return problems
