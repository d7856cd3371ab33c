"""Multimodal training data for the audio composite: ``messages`` + ``audios`` rows, checked, encoded, batched.

The sibling of :mod:`nexus_core.train.mm_data` with the same rules: ``audios`` is a list of PCM WAV files
(or one file) relative to the media folder; a turn's ``<audio>`` placeholders mark where each clip goes,
in order; a row without placeholders gets its clips in front of its first user turn. Bad media fails
fast naming the row (missing or unreadable file, wrong sample rate with resampling off, too long, a
placeholder count that does not match), or is skipped and counted within ``max_skipped``.

Encoding renders the chat with the processor's template (each audio part becomes ``<|audio_bos|>
<|AUDIO|><|audio_eos|>``), expands each ``<|AUDIO|>`` to that clip's token count (as
``Qwen2AudioProcessor`` does) and puts the loss on assistant tokens only. Clips are decoded again per
batch, in the collator, into ``input_features`` + ``feature_attention_mask``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl

from nexus_core.errors import InputError
from nexus_core.train.audio import (
    AUDIO_TOKEN,
    AudioSpec,
    audio_features,
    audio_token_counts,
    check_audio,
    load_audio,
)
from nexus_core.train.mm_data import IGNORE, IMAGE_TOKEN, _as_list

DATA_AUDIO_TOKEN = "<audio>"


def to_audio_parts(messages: list[dict[str, Any]], n_audios: int) -> list[dict[str, Any]] | str:
    """Messages with ``<audio>`` placeholders as content parts, or why they do not fit ``n_audios``."""
    if any(IMAGE_TOKEN in str(m.get("content") or "") for m in messages):
        return f"has {IMAGE_TOKEN} placeholders but the audio model takes no images"
    placed = sum(str(m.get("content") or "").count(DATA_AUDIO_TOKEN) for m in messages)
    if placed == 0 and n_audios:
        first = next((i for i, m in enumerate(messages) if m.get("role") == "user"), None)
        if first is None:
            return "has audios but no user turn to put them in"
        messages = [dict(m) for m in messages]
        messages[first]["content"] = DATA_AUDIO_TOKEN * n_audios + str(messages[first].get("content") or "")
    elif placed != n_audios:
        return f"has {placed} {DATA_AUDIO_TOKEN} placeholder(s) for {n_audios} audio clip(s)"
    out = []
    for m in messages:
        pieces = str(m.get("content") or "").split(DATA_AUDIO_TOKEN)
        parts: list[dict[str, Any]] = []
        for i, text in enumerate(pieces):
            if i:
                parts.append({"type": "audio"})
            if text:
                parts.append({"type": "text", "text": text})
        out.append({"role": m["role"], "content": parts if len(pieces) > 1 else str(m.get("content") or "")})
    return out


def audio_records(df: pl.DataFrame, where: str, media_root: Path, spec: AudioSpec,
                  max_skipped: float = 0.0) -> tuple[list[dict], int]:
    """Checked records ``{"messages": <parts>, "audios": [paths]}`` and how many rows were skipped."""
    if "messages" not in df.columns:
        raise InputError(f"{where}: missing column 'messages'; has: {', '.join(df.columns)}")
    records, bad = [], []
    for i, row in enumerate(df.iter_rows(named=True)):
        try:
            messages = _as_list(row["messages"])
            files = [str(f) for f in _as_list(row.get("audios"))]
            if _as_list(row.get("images")) or _as_list(row.get("videos")):
                bad.append(f"row {i}: has images/videos but the audio model takes audio and text only")
                continue
        except (ValueError, TypeError) as exc:
            bad.append(f"row {i}: messages/audios are not lists ({exc})")
            continue
        paths = [(media_root / f) if not Path(f).is_absolute() else Path(f) for f in files]
        problem = next((f"audio {f!r} ({p}) {why}" for f, p in zip(files, paths, strict=True)
                        if (why := check_audio(p, spec))), None)
        parts = to_audio_parts(messages, len(paths)) if problem is None else problem
        if isinstance(parts, str):
            bad.append(f"row {i}: {parts}")
            continue
        records.append({"messages": parts, "audios": [str(p) for p in paths]})
    n = df.height
    if bad and (max_skipped <= 0 or len(bad) / max(n, 1) > max_skipped):
        more = f" ({len(bad)} of {n} rows are bad; max_skipped={max_skipped})" if len(bad) > 1 or max_skipped else ""
        raise InputError(f"{where}: {bad[0]}{more}")
    if not records:
        raise InputError(f"{where}: no usable rows")
    return records, len(bad)


def encode_audio_mm(processor: Any, record: dict[str, Any], spec: AudioSpec, max_length: int,
                    assistant_only: bool = True) -> dict[str, Any]:
    """``input_ids`` and ``labels`` (assistant tokens only) of one record, each clip's tokens expanded.

    Text past ``max_length`` is cut; a row whose audio tokens would be cut raises."""
    from nexus_core.train.chat import assistant_spans

    tokenizer = processor.tokenizer
    counts = audio_token_counts(processor.feature_extractor, [load_audio(Path(f), spec) for f in record["audios"]])
    text, spans = assistant_spans(tokenizer, record["messages"])

    def expand(s: str) -> str:
        pieces = s.split(AUDIO_TOKEN)
        return pieces[0] + "".join(AUDIO_TOKEN * counts[k] + p for k, p in enumerate(pieces[1:]))

    spans = [(len(expand(text[:a])), len(expand(text[:b]))) for a, b in spans]
    enc = tokenizer(expand(text), add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    audio_id = tokenizer.convert_tokens_to_ids(AUDIO_TOKEN)
    if audio_id in ids[max_length:]:
        raise InputError(f"max_length={max_length} cuts a clip's audio tokens (the row needs {len(ids)} tokens)")
    ids = ids[:max_length]
    if assistant_only:
        labels = [t if any(s < b and e > a for a, b in spans) else IGNORE
                  for t, (s, e) in zip(ids, enc["offset_mapping"][: len(ids)], strict=True)]
    else:
        labels = [IGNORE if t == audio_id else t for t in ids]
    return {"input_ids": ids, "labels": labels, "audios": record["audios"]}


class AudioCollator:
    """Pads a batch of encoded rows and turns their clips into ``input_features`` (+ mask)."""

    def __init__(self, feature_extractor: Any, pad_id: int, spec: AudioSpec):
        self.feature_extractor = feature_extractor
        self.pad_id = pad_id
        self.spec = spec

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """The model's keyword arguments for one batch (right padding)."""
        import torch

        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            labels[i, :n] = torch.tensor(r["labels"])
            mask[i, :n] = 1
        batch: dict[str, Any] = {"input_ids": ids, "labels": labels, "attention_mask": mask}
        waves = [load_audio(Path(f), self.spec) for r in rows for f in r["audios"]]
        if waves:
            batch.update(audio_features(self.feature_extractor, waves))
        return batch
