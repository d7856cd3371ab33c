"""Every YAML under configs/compress loads and validates; bad variant specs fail with the key named."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.common import load_flow_config
from flows.compress import CompressConfig
from nexus_core.errors import ConfigError

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs" / "compress").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_validates(path: Path) -> None:
    cfg = load_flow_config(CompressConfig, str(path))
    assert cfg.variants, path
    assert len({v.name for v in cfg.variants}) == len(cfg.variants)


def test_tiny_preset_builds_its_own_base_offline() -> None:
    cfg = load_flow_config(CompressConfig, str(CONFIGS[0].parent / "tiny.yaml"))
    assert cfg.model is None and cfg.corpus is not None and cfg.base_model.source == "tiny"
    methods = {(v.prune.method if v.prune else None, v.quantize.method if v.quantize else None) for v in cfg.variants}
    assert {("magnitude", None), ("structured", None), ("layer_drop", None), (None, "int8_dynamic"),
            (None, "int8_static"), (None, "mixed")} <= methods


def test_bad_variants_name_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("variants:\n  - name: x\n    prune: {method: magnitude, sparsity: 1.2}\n  - name: y\n")
    with pytest.raises(ConfigError) as err:
        load_flow_config(CompressConfig, str(bad))
    text = str(err.value)
    assert "sparsity" in text and "needs prune and/or quantize" in text


def test_deployment_style_parameters_resolve_nested_extends(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import yaml

    monkeypatch.chdir(repo)
    deployments = yaml.safe_load((repo / "prefect.yaml").read_text())["deployments"]
    dep = next(d for d in deployments if d["name"] == "compress")
    assert dep["entrypoint"] == "flows/compress.py:compress"
    cfg = CompressConfig.model_validate(dep["parameters"]["cfg"])
    assert cfg.name == "tiny" and cfg.corpus is not None and len(cfg.variants) >= 6
