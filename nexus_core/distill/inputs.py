"""Teacher inputs: raw scientific text × prompt templates → one prompt per (record, template).

Sources are JSONL records (``title``, ``abstract``, ``domain``, ``text``) and "enhanced prompt" JSON
files (``{"texts": [...], "generated_at": ...}``, each text a string or ``{"text", "domain", "title"}``),
and an evaluation's feedback artifact (``evaluate/<name>_feedback@latest``): the samples a model failed,
as JSONL records in its ``teacher_inputs.jsonl``; one that fed back nothing adds nothing.
Templates are YAML files in ``prompts_dir``; their hash is a column, and the step's contract names
the template files so their content joins the cache key.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl
from pydantic import Field

from nexus_core.artifacts import ArtifactRef
from nexus_core.config import ConfigPath, NexusModel
from nexus_core.context import StepContext
from nexus_core.contract import step
from nexus_core.distill.prompts import load_template, template_path
from nexus_core.errors import InputError
from nexus_core.io import iter_jsonl, row_id, schema_of, write_parquet
from nexus_core.runner import StepResult

JSONL_REQUIRED = ("title", "abstract", "domain", "text")
FEEDBACK_FILE = "teacher_inputs.jsonl"  # what an evaluation's feedback artifact holds


class TeacherInputsConfig(NexusModel):
    """Which templates to apply to the raw sources."""

    templates: list[str] = Field(default_factory=lambda: ["hypothesis", "methodology"],
                                 description="Template names (files <prompts_dir>/<name>.yaml)")
    prompts_dir: ConfigPath = Field(default="configs/distill/prompts", validate_default=True, description="Directory of prompt templates")
    default_domain: str = Field(default="general", description="Domain for enhanced-prompt texts that name none")
    min_text_chars: int = Field(default=20, ge=1, description="Source texts shorter than this are skipped (counted)")


class TeacherInputsResult(StepResult):
    """Counts per source and template."""

    rows_per_source: dict[str, int] = Field(default_factory=dict)
    skipped_short: int = 0


def _jsonl_records(path: Path) -> list[dict[str, Any]]:
    out = []
    for n, rec in enumerate(iter_jsonl(path), start=1):
        missing = [c for c in JSONL_REQUIRED if c not in rec]
        if missing:
            raise InputError(f"{path}: record {n}: missing field(s) {', '.join(missing)}")
        wrong = [f"{c} is {type(rec[c]).__name__}" for c in ("title", "domain", "text") if not isinstance(rec[c], str)]
        if wrong:  # `"title": 5` would become "5" silently
            raise InputError(f"{path}: record {n}: expected text field(s): {', '.join(wrong)}")
        out.append({"title": rec["title"], "domain": rec["domain"], "text": rec["text"],
                    "generated_at": rec.get("generated_at")})
    return out


def _enhanced_records(path: Path, default_domain: str) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(data, dict) or not isinstance(data.get("texts"), list):
        raise InputError(f"{path}: expected an object with a 'texts' list")
    out = []
    for i, item in enumerate(data["texts"]):
        if isinstance(item, str):
            item = {"text": item}
        if not isinstance(item, dict) or not isinstance(item.get("text"), str):
            raise InputError(f"{path}: texts[{i}]: expected a string or an object with 'text'")
        wrong = [f"{c} is {type(item[c]).__name__}" for c in ("title", "domain") if item.get(c) is not None
                 and not isinstance(item[c], str)]
        if wrong:
            raise InputError(f"{path}: texts[{i}]: expected text field(s): {', '.join(wrong)}")
        out.append({"title": str(item.get("title") or item["text"].split(".")[0][:120]),
                    "domain": str(item.get("domain") or data.get("domain") or default_domain),
                    "text": item["text"], "generated_at": data.get("generated_at")})
    return out


# Sources are raw files named by the caller (source_0, ..., feedback): the step checks each itself.
@step(area="distill", reads=lambda cfg, inputs: [template_path(cfg.prompts_dir, n) for n in cfg.templates])
def run_teacher_inputs(cfg: TeacherInputsConfig, *, inputs: dict[str, ArtifactRef], out_uri: str,
                       ctx: StepContext) -> TeacherInputsResult:
    """Read every source, render every template on every record, write ``data.parquet``."""
    if not inputs:
        raise InputError("teacher inputs: no source files given")
    if not cfg.templates:
        raise InputError("teacher inputs: no templates named (inputs.templates)")
    templates = [load_template(cfg.prompts_dir, name) for name in cfg.templates]
    rows, per_source, skipped = [], {}, 0
    for ref in inputs.values():
        path, label = ref.path, ref.path.name
        if path.is_dir():  # an artifact: an evaluation's feedback, the samples the model failed
            if not (path / FEEDBACK_FILE).is_file():
                raise InputError(f"{ref.uri}: an artifact source must be an evaluation's feedback "
                                 f"(with {FEEDBACK_FILE})")
            path, label = path / FEEDBACK_FILE, ref.name
            records = _jsonl_records(path)
            if not records:  # the model failed nothing: nothing to feed back
                per_source[label] = 0
                continue
        elif path.suffix == ".json":
            records = _enhanced_records(path, cfg.default_domain)
        elif path.name.endswith((".jsonl", ".jsonl.gz", ".jsonl.zst")):
            records = _jsonl_records(path)
        else:
            raise InputError(f"{path}: unknown source format (expected .jsonl or enhanced-prompt .json)")
        if not records:
            raise InputError(f"{path}: no records")
        per_source[label] = len(records)
        for rec in records:
            if len(rec["text"].strip()) < cfg.min_text_chars:
                skipped += 1
                continue
            for tpl in templates:
                user = tpl.render(text=rec["text"].strip(), title=rec["title"], domain=rec["domain"])
                rows.append({
                    "row_id": row_id(label, tpl.name, tpl.hash, user),
                    "domain": rec["domain"], "title": rec["title"], "source_text": rec["text"],
                    "template_name": tpl.name, "template_hash": tpl.hash, "template_prompt": tpl.user,
                    "system_prompt": tpl.system, "user_prompt": user, "source_file": label,
                    "generated_at": None if rec["generated_at"] is None else str(rec["generated_at"]),
                })
    if not rows:
        raise InputError("teacher inputs: every source text was empty or too short")
    df = pl.DataFrame(rows, schema_overrides={"generated_at": pl.Utf8})
    df = df.unique(subset=["row_id"], keep="first", maintain_order=True)
    write_parquet(df, Path(out_uri) / "data.parquet")
    return TeacherInputsResult(rows=df.height, columns=schema_of(df), rows_per_source=per_source,
                               skipped_short=skipped,
                               metrics={"rows": df.height, "sources": len(per_source), "skipped_short": skipped})
