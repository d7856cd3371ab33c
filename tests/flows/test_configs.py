"""Every YAML/JSON file under configs/ loads and validates, and none is left unchecked; so does every
deployment's ``cfg`` parameter in prefect.yaml, through Prefect's own parameter validation. Both from
a working directory other than the repository root: shipped configs must not depend on it."""

import importlib
from pathlib import Path

import pytest
import yaml

from flows.common import load_flow_config
from flows.compress import CompressConfig
from flows.distill import DistillConfig
from flows.evaluate import EvaluateConfig
from flows.flux import FluxConfig
from flows.image_gen import ImageGenConfig
from flows.lifecycle import LifecycleConfig
from flows.llm_train import LLMTrainConfig
from flows.podcast import PodcastConfig
from flows.serve import ServeFlowConfig
from flows.video_gen import VideoGenConfig
from nexus_core.distill.prompts import load_template
from nexus_core.distill.rules import load_rules
from nexus_core.evaluate.harness import task_files
from nexus_core.evaluate.rubric import load_rubric
from nexus_core.train.backends import load_accelerate_config
from nexus_core.train.encoders import load_encoders

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
# configs/<dir>/... holds configs of this flow
FLOW_DIRS = {"presets": LifecycleConfig, "distill": DistillConfig, "train": LLMTrainConfig,
             "compress": CompressConfig, "eval": EvaluateConfig, "flux": FluxConfig, "serve": ServeFlowConfig,
             "image_gen": ImageGenConfig, "podcast": PodcastConfig, "video_gen": VideoGenConfig}
# data files that are not flow configs, each with its own loader
DATA_FILES = {
    "distill/filters.yaml": lambda p: load_rules(p),
    "distill/prompts/*.yaml": lambda p: load_template(p.parent, p.stem),
    "podcast/filters.yaml": lambda p: load_rules(p),
    "podcast/prompts/*.yaml": lambda p: load_template(p.parent, p.stem),
    "eval/rubric.json": lambda p: load_rubric(p),
    "eval/harness/*.yaml": lambda p: all(f.is_file() for f in task_files(p)),  # lm-eval task files
    "encoders.yaml": lambda p: load_encoders(p).encoders["vision"],  # the omni stage's encoder choices
    "accelerate/*.yaml": lambda p: load_accelerate_config(p),  # training launch files, accelerate's own parser
}
# configs that need run-specific values from the command line (as the README shows)
REQUIRED_OVERRIDES = {"flux/klein4b/run1.yaml": ["precomputed_data_dir=/tmp/x", "output_dir=/tmp/y"]}


def _all_files() -> list[Path]:
    return sorted(p for p in CONFIGS.rglob("*") if p.suffix in {".yaml", ".yml", ".json"}
                  and "recorded" not in p.parts)


def _data_loader(rel: str):
    return next((fn for pattern, fn in DATA_FILES.items() if Path(rel).match(pattern)), None)


@pytest.mark.parametrize("path", _all_files(), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_config_file_validates(path, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    rel = str(path.relative_to(CONFIGS))
    loader = _data_loader(rel)
    if loader:
        assert loader(path)
        return
    model = FLOW_DIRS.get(path.relative_to(CONFIGS).parts[0])
    assert model is not None, f"configs/{rel}: not a known flow config or data file; add it to this test"
    cfg = load_flow_config(model, str(path), REQUIRED_OVERRIDES.get(rel, []))
    assert cfg.model_dump()


DEPLOYMENTS = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]


def _validated_cfg(deployment: dict):
    file, name = deployment["entrypoint"].split(":")
    flow = getattr(importlib.import_module(file.removesuffix(".py").replace("/", ".")), name)
    return flow.validate_parameters(deployment["parameters"])["cfg"]


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=lambda d: d["name"])
def test_deployment_parameters_validate(deployment, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # a worker's directory need not be the repo: extends is from the repo root
    cfg = _validated_cfg(deployment)
    assert cfg.extends is None and cfg.name  # the preset was merged in


def test_flux_run1_deployment_reads_its_list_from_the_environment(monkeypatch, tmp_path):
    """``data.source: ${FLUX_RUN1_LIST:-data/raw/flux/run1/images.txt}`` in the preset the deployment
    extends: the default when the variable is unset, the variable otherwise; never the literal text."""
    deployment = next(d for d in DEPLOYMENTS if d["name"] == "flux-klein4b-run1")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FLUX_RUN1_LIST", raising=False)
    assert _validated_cfg(deployment).data.source.endswith("data/raw/flux/run1/images.txt")
    monkeypatch.setenv("FLUX_RUN1_LIST", "/mnt/lists/run1.txt")
    assert _validated_cfg(deployment).data.source == "/mnt/lists/run1.txt"
