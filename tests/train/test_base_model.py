"""The base model step: a tiny model built on the run's text, or a pretrained one pinned as an artifact,
published under the ``models`` area."""

from __future__ import annotations

import shutil
from pathlib import Path

from nexus_core.artifacts import raw_ref
from nexus_core.runner import run_step
from nexus_core.train.base_model import BaseModelConfig, pretrained_ref, run_base_model
from tests.train.conftest import QA, _write_jsonl

TINY = {"vocab_size": 300, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1}


def test_tiny_base_model_is_a_model_artifact_under_models(tmp_path):
    corpus = raw_ref(_write_jsonl(tmp_path / "corpus.jsonl", [{"text": f"{q} {a}"} for q, a in QA] * 4))
    r = run_step(run_base_model, BaseModelConfig(source="tiny", tiny=TINY), name="t_base_tiny",
                 inputs={"corpus": corpus})
    assert r.ref.path.parent.name == "models" and r.ref.kind == "model"
    assert (r.ref.path / "config.json").is_file() and r.parameters > 0


def test_pinned_local_model_is_keyed_by_its_files(tiny_model, tmp_path):
    local = Path(shutil.copytree(str(tiny_model.path), tmp_path / "pretrained"))
    cfg = BaseModelConfig(source="pretrained", pretrained=str(local))

    def pin():  # noqa: ANN202 - as the flows do: resolve the reference, then run the step on it
        return run_step(run_base_model, cfg, name="t_base_pinned", inputs={"pretrained": pretrained_ref(cfg)})

    first = pin()
    assert pin().reused
    (local / "README.md").write_text("same path, different files\n")  # e.g. the model was re-downloaded
    changed = pin()
    assert not changed.reused and changed.ref.version == first.ref.version + 1
