"""Registry entries are real mlflow.transformers models; models:/ URIs resolve as model refs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from nexus_core.artifacts import raw_ref
from nexus_core.errors import InputError
from nexus_core.models.io import load_causal_lm, resolve_model
from nexus_core.models.registry import register_model_version


def test_registered_version_loads_through_mlflow_transformers_and_by_alias(tiny_llm: Path, tmp_path: Path) -> None:
    import mlflow.transformers

    src = tmp_path / "model"
    shutil.copytree(tiny_llm, src)
    (src / "adapter").mkdir()
    (src / "adapter" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    ref = raw_ref(src).model_copy(update={"kind": "model"})
    version = register_model_version(ref, "t-registry", run_id=None, tags={"nexus.stage": "sft"},
                                     description="test", alias="champion")
    # idempotent by digest: the same artifact is the same version, and the alias stays on it
    assert register_model_version(ref, "t-registry", run_id=None, tags={}, description="again") == version

    pipe = mlflow.transformers.load_model(f"models:/t-registry/{version}")  # the plain MLflow path
    assert pipe("alpha", max_new_tokens=2, do_sample=False)[0]["generated_text"]

    shutil.rmtree(src)  # the registry entry does not point at the training machine's directory
    resolved = resolve_model("models:/t-registry@champion")
    assert resolved.digest == ref.digest  # same identity in cache keys as the artifact itself
    model, tokenizer = load_causal_lm(resolved.path, int8=False)
    assert model.config.vocab_size == tokenizer.vocab_size or model.config.vocab_size >= len(tokenizer)

    from nexus_core import lineage

    mv = lineage.client().get_model_version("t-registry", version)
    assert mv.tags["nexus.adapter"] == "adapter/" and mv.tags["nexus.flavor"] == "transformers"


def test_unknown_registry_alias_is_an_input_error_naming_it() -> None:
    with pytest.raises(InputError, match="models:/nope@champion"):
        resolve_model("models:/nope@champion")
