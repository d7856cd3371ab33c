"""Training reports its progress through the step's progress reporter (the Prefect UI's progress
artifact under a flow): in this process, and from a launched child process."""

from __future__ import annotations

import pytest

from nexus_core.runner import RunContext, run_step
from nexus_core.train.sft import SFTConfig, run_sft


def _train(tiny_model, refs, name: str, **cfg) -> list[tuple[float, str]]:
    reports: list[tuple[float, str]] = []
    run_step(run_sft, SFTConfig(finetune="lora", batch_size=2, seed=5, **cfg), name=name,
             inputs={"model": tiny_model, "data": refs["sft"]},
             context=RunContext(progress=lambda f, m: reports.append((f, m))))
    return reports


def test_training_reports_steps_until_done(tiny_model, refs, data_root):
    reports = _train(tiny_model, refs, "t_progress", max_steps=3)
    assert reports and reports[0][1].startswith("step 1/3")  # the first step shows at once
    assert reports[-1][0] == 1.0 and reports[-1][1].startswith("step 3/3")  # the last always shows


@pytest.mark.slow  # a child process that imports torch/trl: ~20-50 s on a shared 2-core machine
def test_a_launched_stage_reports_through_the_parent(tiny_model, refs, data_root):
    reports = _train(tiny_model, refs, "t_progress_child", max_steps=2, isolate=True)
    assert reports and reports[-1][0] == 1.0 and reports[-1][1].startswith("step 2/2")
