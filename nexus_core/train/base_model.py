"""Base model: build a tiny preset model on the run's own text, or pin a pretrained one as an artifact."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from nexus_core.artifacts import ArtifactRef
from nexus_core.config import NexusModel, PathOrName
from nexus_core.context import StepContext
from nexus_core.contract import model, step, table
from nexus_core.errors import InputError
from nexus_core.models.io import load_causal_lm, resolve_model
from nexus_core.models.tiny import TinyLLMConfig, build_tiny_llm
from nexus_core.runner import StepResult
from nexus_core.train.data import load_rows


class BaseModelConfig(NexusModel):
    """Where the base model comes from."""

    source: Literal["tiny", "pretrained"] = Field(default="tiny", description="Build a tiny model, or copy a real one")
    pretrained: PathOrName | None = Field(default=None, description="Model reference (source=pretrained): hub id "
                                                     "(ORG/NAME[@REV]), local directory or artifact NAME@vN")
    tiny: TinyLLMConfig = Field(default_factory=TinyLLMConfig, description="Shape of the tiny model")
    text_column: str = Field(default="text", description="Corpus column the tiny tokenizer is trained on")

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


def pretrained_ref(cfg: BaseModelConfig) -> ArtifactRef | None:
    """The ``pretrained`` input of a source=pretrained config, resolved by the flow before the step runs,
    so the model's identity (hub revision or weights digest) joins the cache key."""
    return resolve_model(cfg.pretrained, "base_model.pretrained") if cfg.source == "pretrained" and cfg.pretrained \
        else None


@step(area="models", kind="model",
      inputs={"corpus": table(optional=True, description="text to train the tiny tokenizer on (source=tiny)"),
              "pretrained": model(optional=True, description="the model to pin (source=pretrained)")})
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
        lm, tokenizer = load_causal_lm(out)  # prove the from_pretrained path works before publishing
    else:
        if "pretrained" not in inputs:
            raise InputError("base_model: source=pretrained needs the 'pretrained' input (resolve "
                             "base_model.pretrained with pretrained_ref)")
        lm, tokenizer = load_causal_lm(inputs["pretrained"].path, int8=False)
        lm.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
    params = sum(p.numel() for p in lm.parameters())
    return BaseModelResult(architecture=lm.config.architectures[0], parameters=params,
                           vocab_size=len(tokenizer), metrics={"parameters": params})
