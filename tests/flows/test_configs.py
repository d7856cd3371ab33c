"""Every YAML/JSON file under configs/ loads and validates (DESIGN.md §6), and none is left unchecked."""

from pathlib import Path

import pytest

from flows.common import load_flow_config
from flows.compress import CompressConfig
from flows.distill import DistillConfig
from flows.evaluate import EvaluateConfig
from flows.flux import FluxConfig
from flows.lifecycle import LifecycleConfig
from flows.llm_train import LLMTrainConfig
from nexus_core.distill.prompts import load_template
from nexus_core.distill.rules import load_rules
from nexus_core.evaluate.rubric import load_rubric

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
# configs/<dir>/... holds configs of this flow
FLOW_DIRS = {"presets": LifecycleConfig, "distill": DistillConfig, "train": LLMTrainConfig,
             "compress": CompressConfig, "eval": EvaluateConfig, "flux": FluxConfig}
# data files that are not flow configs, each with its own loader
DATA_FILES = {
    "distill/filters.yaml": lambda p: load_rules(p),
    "distill/prompts/*.yaml": lambda p: load_template(p.parent, p.stem),
    "eval/rubric.json": lambda p: load_rubric(p),
}
# configs that need run-specific values from the command line (as the README shows)
REQUIRED_OVERRIDES = {"flux/klein4b/run1.yaml": ["precomputed_data_dir=/tmp/x", "output_dir=/tmp/y"]}


def _all_files() -> list[Path]:
    return sorted(p for p in CONFIGS.rglob("*") if p.suffix in {".yaml", ".yml", ".json"}
                  and "recorded" not in p.parts)


def _data_loader(rel: str):
    return next((fn for pattern, fn in DATA_FILES.items() if Path(rel).match(pattern)), None)


@pytest.mark.parametrize("path", _all_files(), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_config_file_validates(path, monkeypatch):
    monkeypatch.chdir(REPO)  # nested `extends` in flow configs are relative to the repo root
    rel = str(path.relative_to(CONFIGS))
    loader = _data_loader(rel)
    if loader:
        assert loader(path)
        return
    model = FLOW_DIRS.get(path.relative_to(CONFIGS).parts[0])
    assert model is not None, f"configs/{rel}: not a known flow config or data file; add it to this test"
    cfg = load_flow_config(model, str(path), REQUIRED_OVERRIDES.get(rel, []))
    assert cfg.model_dump()
