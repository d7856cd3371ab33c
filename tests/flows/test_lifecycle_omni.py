"""The lifecycle's omni section: checked and planned with the rest before anything runs; it must compose
(an `omni:` block) and start from the trained model (no base_model of its own)."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.common import load_flow_config
from flows.lifecycle import LifecycleConfig, check_lifecycle
from nexus_core.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
PRESET = REPO / "configs" / "presets" / "tiny_omni.yaml"


def test_the_omni_preset_plans_composition_and_mm_stages_after_the_rest():
    cfg = load_flow_config(LifecycleConfig, PRESET)
    plan = check_lifecycle(cfg)
    assert plan[-3][:12] == "omni.compose" and "align: mm_align" in plan[-2] and "vqa: mm_sft" in plan[-1], plan
    assert plan.index("omni.compose") > max(i for i, p in enumerate(plan) if p.startswith(("train.", "compress.")))
    assert cfg.omni is not None and cfg.omni.name == "tiny_omni"


@pytest.mark.parametrize(("override", "message"), [
    ("omni.omni=null", "omni: needs an `omni:` block naming the encoders"),
    ("omni.base_model=Qwen/Qwen2.5-0.5B", "omni.base_model: the omni section starts from the model training ended"),
])
def test_an_omni_section_that_would_not_compose_from_the_trained_model_is_refused(override, message):
    with pytest.raises(ConfigError, match=message.replace("`", ".")):
        load_flow_config(LifecycleConfig, PRESET, [override])
