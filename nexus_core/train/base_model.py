"""Base model: build a tiny preset model on the run's own text, or pin a pretrained one as an artifact."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from nexus_core.artifacts import ArtifactRef
from nexus_core.config import NexusModel
from nexus_core.context import StepContext
from nexus_core.contract import step, table
from nexus_core.errors import InputError
from nexus_core.models.tiny import TinyLLMConfig, build_tiny_llm, load_llm
from nexus_core.runner import StepResult
from nexus_core.train.data import load_rows


class BaseModelConfig(NexusModel):
    """Where the base model comes from."""

    source: Literal["tiny", "pretrained"] = Field("tiny", description="Build a tiny model, or copy a real one")
    pretrained: str | None = Field(None, description="Hub id or local path (source=pretrained)")
    tiny: TinyLLMConfig = Field(default_factory=TinyLLMConfig, description="Shape of the tiny model")
    text_column: str = Field("text", description="Corpus column the tiny tokenizer is trained on")

    @model_validator(mode="after")
    def _pretrained_named(self) -> BaseModelConfig:
        if self.source == "pretrained" and not self.pretrained:
            raise ValueError("pretrained: required when source is 'pretrained'")
        return self


class BaseModelResult(StepResult):
    """What was built."""

    architecture: str
    parameters: int
    vocab_size: int


def _local_pretrained(cfg: BaseModelConfig, inputs: dict[str, ArtifactRef]) -> list[Path]:
    """A pretrained model given as a local directory: its files join the cache key (a hub id does not)."""
    if cfg.source == "pretrained" and cfg.pretrained and Path(cfg.pretrained).exists():
        return [Path(cfg.pretrained)]
    return []


@step(area="models", kind="model",
      inputs={"corpus": table(optional=True, description="text to train the tiny tokenizer on (source=tiny)")},
      reads=_local_pretrained)
def run_base_model(cfg: BaseModelConfig, *, inputs: dict[str, ArtifactRef], out_uri: str,
                   ctx: StepContext) -> BaseModelResult:
    """Write an HF model directory (weights, config, tokenizer) to ``out_uri``."""
    out = Path(out_uri)
    if cfg.source == "tiny":
        if "corpus" not in inputs:
            raise InputError("base_model: source=tiny needs a 'corpus' input to train the tokenizer on")
        texts, where = load_rows(inputs["corpus"])  # an artifact or a raw table file
        if cfg.text_column not in texts.columns:
            raise InputError(f"{where}: missing column {cfg.text_column!r}; has: {', '.join(texts.columns)}")
        build_tiny_llm(out, texts[cfg.text_column].drop_nulls().to_list(), cfg.tiny)
        model, tokenizer = load_llm(out)  # prove the from_pretrained path works before publishing
    else:
        model, tokenizer = load_llm(cfg.pretrained)
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
    params = sum(p.numel() for p in model.parameters())
    return BaseModelResult(architecture=model.config.architectures[0], parameters=params,
                           vocab_size=len(tokenizer), metrics={"parameters": params})
