"""A flow's budget_usd covers its whole flow-run tree: the parent's budget binds every subflow's steps,
a subflow's own smaller budget binds too, and `nexus run lifecycle` with a budget below the teacher's
spend stops with BudgetExceededError (exit 1) after at most one step's overrun."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from prefect import flow
from prefect.runtime import flow_run
from pydantic import Field

from flows.common import flow_lineage
from nexus_core import costs
from nexus_core.config import FlowConfig, NexusModel
from nexus_core.context import StepContext
from nexus_core.contract import step
from nexus_core.costs import BudgetExceededError, Cost
from nexus_core.runner import StepResult, run_step
from tasks.common import nexus_task, run_context

pytestmark = pytest.mark.integration


class SpendConfig(NexusModel):
    """What the fake paid step spends."""

    usd: float = Field(description="Dollars the step reports")
    tag: str = Field(description="Makes each call a new config (never reused)")


class SpendResult(StepResult):
    """Result of the fake paid step."""


@step(area="distill")
def run_tree_spend(cfg: SpendConfig, *, inputs, out_uri: str, ctx: StepContext) -> SpendResult:
    """A step that pays an API bill (what a teacher step records)."""
    (Path(out_uri) / "paid.txt").write_text(cfg.tag)
    return SpendResult(cost=Cost(usd=cfg.usd, provider="openai", model="stub"))


@nexus_task(run_tree_spend, name="tree-spend")
def spend(cfg: SpendConfig, name: str) -> SpendResult:
    """Task wrapper of the paid step."""
    return run_step(run_tree_spend, cfg, name=name, context=run_context())


class ChildConfig(FlowConfig):
    """A subflow that runs some paid steps."""

    steps: list[SpendConfig] = Field(description="Paid steps, in order")


class ParentConfig(FlowConfig):
    """A parent flow with two subflows."""

    first: ChildConfig
    second: ChildConfig


RUNS: list[str] = []  # flow run ids, in the order the runs started (parameters are copied by Prefect)


@flow
def child(cfg: ChildConfig) -> None:
    RUNS.append(str(flow_run.get_id()))
    with flow_lineage(cfg):
        for i, s in enumerate(cfg.steps):
            spend(s, name=f"spent_{s.tag}_{i}")


@flow
def parent(cfg: ParentConfig) -> None:
    RUNS.append(str(flow_run.get_id()))
    with flow_lineage(cfg):
        child(cfg.first)
        child(cfg.second)


def _steps(tag: str, *usd: float) -> list[SpendConfig]:
    return [SpendConfig(usd=u, tag=f"{tag}{i}") for i, u in enumerate(usd)]


def test_parent_budget_binds_its_subflows(prefect_harness, data_root):
    """$0.10 on the parent; each subflow's step spends $0.06: the second subflow's step (estimated at
    its last run, $0.06) does not start, and the error names the parent's budget and what was spent."""
    RUNS.clear()
    cfg = ParentConfig(budget_usd=0.10, first=ChildConfig(steps=_steps("p1", 0.06)),
                       second=ChildConfig(steps=_steps("p2", 0.06)))
    with pytest.raises(BudgetExceededError) as err:
        parent(cfg)
    root, first, second = RUNS
    msg = str(err.value)
    assert f"flow run {root} (parent)" in msg and "$0.10 budget" in msg and "$0.06 spent" in msg
    assert "estimated at $0.06 (its last run)" in msg
    assert costs.spent(root) == pytest.approx(0.06)  # within budget + one step's overrun
    assert costs.flow_ancestors(first) == costs.flow_ancestors(second) == [root]
    assert not list((data_root / "processed" / "distill").glob("spent_p2*"))


def test_a_subflows_own_smaller_budget_binds_too(prefect_harness, data_root):
    RUNS.clear()
    cfg = ParentConfig(budget_usd=10.0, first=ChildConfig(budget_usd=0.05, steps=_steps("s1", 0.06, 0.01)),
                       second=ChildConfig(steps=_steps("s2", 0.01)))
    with pytest.raises(BudgetExceededError, match=r"\(child\).*\$0\.05 budget"):
        parent(cfg)
    assert len(RUNS) == 2  # the first subflow failed: the second never started
    assert costs.spent(RUNS[0]) <= 0.05 + 0.06


@pytest.mark.slow
def test_nexus_run_lifecycle_stops_at_its_budget(repo, tmp_path):
    """The tiny lifecycle with a paid teacher (a loopback OpenAI-compatible stub, priced per token) and a
    budget below what collection costs: collection overruns once, the next step does not start, exit 1."""
    from tests.support import distill_teacher
    from tests.support.openai_stub import StubServer

    home, data = tmp_path / "home", tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(NEXUS_HOME=str(home), NEXUS_DATA=str(data))
    with StubServer(distill_teacher.handler) as stub:
        out = subprocess.run(
            [sys.executable, "-m", "flows.cli", "run", "lifecycle", "configs/presets/tiny.yaml", "name=budget",
             "budget_usd=0.10", "distill.teacher.offline=false", f"distill.teacher.api_base={stub.url}",
             "distill.teacher.model=openai/stub-teacher", "distill.teacher.recorded_cache=[]",
             "distill.teacher.cache=false", "distill.teacher.input_usd_per_mtok=100",
             "distill.teacher.output_usd_per_mtok=100"],
            cwd=repo, env=env, capture_output=True, text=True, timeout=900)
        asked = len(stub.requests)
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-3000:]
    assert len(errors) == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert "(lifecycle)" in errors[0] and "$0.10 budget is left" in errors[0], errors
    with sqlite3.connect(home / "catalog.db") as db:
        rows = db.execute("select step, usd from costs").fetchall()
    collect = [usd for step_name, usd in rows if step_name.endswith("run_teacher_collect")]
    spent = sum(usd for _, usd in rows)
    assert asked >= 40 and len(collect) == 1 and collect[0] > 0.10  # the one step that overran
    assert spent <= 0.10 + collect[0] + 1e-9
    assert f"${spent:.4f} spent" in errors[0] or f"${spent:.2f} spent" in errors[0], errors
    made = {p.name for p in (data / "processed" / "distill").iterdir()}
    assert any(n.startswith("tiny_collected") for n in made) and not any(n.startswith("tiny_filtered") for n in made)
