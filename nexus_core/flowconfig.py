"""Base of flow configs: a pydantic model that may name a YAML preset to start from.

A flow's config is its Prefect parameter (so the deployment's parameter schema is the model).
``{"extends": "configs/presets/tiny.yaml", "base_model.tiny.hidden_size": ...}`` style
parameters let a deployment point at a preset and override any field on top of it.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from nexus_core.config import NexusModel, deep_merge, load_yaml, parse_overrides


class FlowConfig(NexusModel):
    """Flow config base: ``extends`` loads a YAML preset (with its own extends) under the given values."""

    extends: str | None = Field(None, description="YAML preset this config starts from (path from repo root)")
    overrides: list[str] = Field(default_factory=list, description="key.sub=value overrides applied last")
    budget_usd: float | None = Field(None, ge=0, description="Spend limit for one run of this flow (API + GPU); "
                                     "steps refuse to start once it is used up")

    @model_validator(mode="before")
    @classmethod
    def _resolve_extends(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if data.get("extends"):
            base = load_yaml(data["extends"])
            base.pop("overrides", None)
            data = deep_merge(base, data)
        if data.get("overrides"):
            data = deep_merge(data, parse_overrides(data["overrides"]))
        return data
