"""Lifecycle sections on pools, for real: a `process` work pool, a deployment of the distill flow on it
and a `prefect worker` subprocess polling it. The lifecycle sends its distill section there with
run_deployment: the section runs in the worker's own process as a subflow of the lifecycle run, and
its typed result comes back through Prefect's result storage. With a paid teacher and a lifecycle
budget below what collection costs, the remote section stops at the lifecycle's budget."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from flows.common import load_flow_config
from flows.lifecycle import LifecycleConfig, lifecycle
from nexus_core import catalog, costs
from nexus_core.artifacts import read_manifest
from nexus_core.costs import BudgetExceededError
from nexus_core.errors import ConfigError

pytestmark = [pytest.mark.integration, pytest.mark.slow]

POOL, DEPLOYMENT = "cpu-sections-test", "distill/cpu-sections-test"
# the tiny lifecycle without the GPU sections: ingest, base model, then distill on the pool
SECTIONS = ["train=null", "evaluate=null", "compress=null", f"deployments.distill={DEPLOYMENT}",
            "deployments.poll_interval_s=1"]


@pytest.fixture(scope="module")
def cpu_pool(prefect_harness, repo, tmp_path_factory):
    """The pool, the deployment (the flow's source is this checkout) and a worker polling every second."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.settings import PREFECT_API_URL
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name=POOL, type="process",
                                               base_job_template=ProcessWorker.get_default_base_job_template()))
        deployment_id = client.create_deployment(
            flow_id=client.create_flow_from_name("distill"), name=POOL, work_pool_name=POOL,
            entrypoint="flows/distill.py:distill", path=str(repo), enforce_parameter_schema=False,
            pull_steps=[{"prefect.deployments.steps.set_working_directory": {"directory": str(repo)}}])
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()), "PREFECT_WORKER_QUERY_SECONDS": "1"}
    with open(log, "w") as out:
        worker = subprocess.Popen([str(Path(sys.executable).parent / "prefect"), "worker", "start", "--pool", POOL,
                                   "--type", "process"], cwd=repo, env=env, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        yield deployment_id, log
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(timeout=30)


def _cfg(repo: Path, *overrides: str) -> LifecycleConfig:
    os.chdir(repo)  # presets name files from the repo root
    return load_flow_config(LifecycleConfig, str(repo / "configs/presets/tiny.yaml"), [*SECTIONS, *overrides])


def _flow_run(run_id: str):  # noqa: ANN202
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(run_id)  # pyright: ignore[reportArgumentType]
        parent = client.read_task_run(run.parent_task_run_id) if run.parent_task_run_id else None
    return run, parent


def test_a_section_runs_on_its_pool_as_a_subflow(cpu_pool, repo):
    deployment_id, log = cpu_pool
    result = lifecycle(_cfg(repo, "name=onpool"))
    assert result.stages["distill"]["sft_rows"] > 0, log.read_text()[-3000:]
    sft = result.artifacts["distill.sft"]
    m = read_manifest(sft.uri)
    distill_run, parent_task = _flow_run(m.prefect["flow_run_id"])
    assert distill_run.deployment_id == deployment_id and distill_run.work_pool_name == POOL
    assert parent_task is not None and str(parent_task.flow_run_id) == result.flow_run_id  # nested under the lifecycle
    assert m.prefect["flow_run_id"] != result.flow_run_id and "distill.sft" not in result.reused
    # the remote section registered itself under the lifecycle run in the shared catalog
    assert costs.flow_ancestors(str(distill_run.id)) == [result.flow_run_id]
    assert [r for r in catalog.artifacts() if r.uri == m.uri]


def test_the_lifecycle_budget_binds_a_section_on_another_process(cpu_pool, repo):
    from tests.support import distill_teacher
    from tests.support.openai_stub import StubServer

    with StubServer(distill_teacher.handler) as stub:
        cfg = _cfg(repo, "name=budgetpool", "budget_usd=0.10", "distill.teacher.offline=false",
                   f"distill.teacher.api_base={stub.url}", "distill.teacher.model=openai/stub-teacher",
                   "distill.teacher.recorded_cache=[]", "distill.teacher.cache=false",
                   "distill.teacher.input_usd_per_mtok=100", "distill.teacher.output_usd_per_mtok=100")
        with pytest.raises(BudgetExceededError, match=r"\(lifecycle\).*\$0\.10 budget is left") as err:
            lifecycle(cfg)
    root = str(err.value).split("flow run ", 1)[1].split(" ", 1)[0]
    collected = [r for r in catalog.costs() if r.step.endswith("run_teacher_collect") and r.flow_run_id != root
                 and costs.flow_ancestors(r.flow_run_id or "") == [root]]
    assert len(collected) == 1 and collected[0].usd > 0.10  # paid in the worker's process, counted here
    assert costs.spent(root) <= 0.10 + collected[0].usd + 1e-9


def test_a_section_deployment_must_be_of_its_own_flow(repo):
    with pytest.raises(ConfigError, match=r"deployments\.train: .*llm_train"):
        _cfg(repo, "deployments.train=distill/cpu")
