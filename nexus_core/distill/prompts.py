"""Prompt templates and the teacher config, shared by teacher inputs, collection and regeneration."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field

from nexus_core.config import NexusModel, validate
from nexus_core.errors import InputError
from nexus_core.llm.client import LLMConfig

# ---------------------------------------------------------------- teacher


class TeacherConfig(LLMConfig):
    """The teacher model (any litellm provider) plus how many rows to ask it about."""

    max_samples: int | None = Field(default=None, ge=1, description="Ask the teacher about at most this many rows (null: all)")
    processes: int = Field(default=1, ge=1, le=64, description="Worker processes for collection, each with its own "
                           "litellm client (one process tops out near 100 requests/s of CPU); 1: in-process")


# ---------------------------------------------------------------- templates


class PromptTemplate(NexusModel):
    """A prompt template file: system prompt and a user template with ``{placeholders}``."""

    name: str = Field(description="Template id (the file stem)")
    system: str = Field(description="System prompt")
    user: str = Field(description="User message template; placeholders: {text} {title} {domain} and, for "
                                  "regeneration, {previous} {reasons} {round}")
    text: str = Field(description="The file's raw text (its hash names the template version in every row)")

    @property
    def hash(self) -> str:
        """sha256 of the template file, 16 hex chars."""
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()[:16]

    def render(self, **values: Any) -> str:
        """The user message with placeholders filled; an unknown placeholder names the template."""
        try:
            return self.user.format(**values)
        except (KeyError, IndexError) as exc:
            raise InputError(f"prompt template {self.name!r}: unknown placeholder {exc}") from None


def template_path(prompts_dir: str | Path, name: str) -> Path:
    """``<prompts_dir>/<name>.yaml``."""
    return Path(prompts_dir) / f"{name}.yaml"


def load_template(prompts_dir: str | Path, name: str) -> PromptTemplate:
    """Load one template; an unknown name lists the templates that exist."""
    path = template_path(prompts_dir, name)
    if not path.is_file():
        known = sorted(p.stem for p in Path(prompts_dir).glob("*.yaml")) if Path(prompts_dir).is_dir() else []
        raise InputError(f"unknown prompt template {name!r}: {path} not found (known: {', '.join(known) or 'none'})")
    text = path.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a mapping with system and user")
    return validate(PromptTemplate, {"name": name, "text": text, **data}, str(path))
