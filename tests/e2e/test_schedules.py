"""Schedules that run: the nightly deployment, registered from prefect.yaml the way a user does it
(`prefect deploy --name evaluate-nightly` in the repository root), gets Scheduled flow runs from a real
server's scheduler service. Reading the YAML proves nothing about this: with SQLAlchemy 2.1 the
scheduler of Prefect 3.8.8 failed on every loop (`Can't evaluate bulk DML statement`) and the nightly
never ran. The runs are only created here, never executed."""

from __future__ import annotations

import re
import subprocess
import time
from datetime import UTC, datetime

import pytest

from tests.support.prefect_server import BIN, PrefectServer, prefect_server

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NIGHTLY = "evaluate/evaluate-nightly"
SCHEDULED = re.compile(r"prefect\.server\.services\.scheduler - Scheduled [1-9]\d* runs\.")


def _scheduled_runs(server: PrefectServer, deployment_name: str, timeout: float) -> list:
    """The deployment's flow runs, polled until the scheduler has made some and logged it, the server
    has logged a traceback (a broken scheduler fails on every loop: no point waiting), or ``timeout``
    passes."""
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with SyncPrefectClient(server.api_url) as client:
        deployment = client.read_deployment_by_name(deployment_name)
        only_this = DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id]))
        deadline = time.monotonic() + timeout
        while True:
            runs, log = client.read_flow_runs(deployment_filter=only_this), server.log_text()
            if (runs and SCHEDULED.search(log)) or "Traceback" in log or time.monotonic() > deadline:
                return runs
            time.sleep(0.5)


def _create_local_pool(api_url: str) -> None:
    """The `local` process pool prefect.yaml names (`prefect deploy --no-prompt` refuses a missing one),
    with the template `prefect work-pool create local --type process` would give it."""
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.workers.process import ProcessWorker

    with SyncPrefectClient(api_url) as client:
        client.create_work_pool(WorkPoolCreate(name="local", type="process",
                                               base_job_template=ProcessWorker.get_default_base_job_template()))


def test_nightly_deployment_gets_scheduled_runs(repo, tmp_path):
    # The main scheduler loop every second (default 60 s). The recent-deployments loop, which would
    # schedule a just-created deployment on its own, is pushed past the test: the runs must come from
    # the loop that keeps the nightly's schedule topped up day after day. INFO logs the scheduler's
    # "Scheduled N runs." lines, so the log below is known to hold the scheduler's output.
    with prefect_server(tmp_path / "home", PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="1",
                        PREFECT_SERVER_SERVICES_SCHEDULER_RECENT_DEPLOYMENTS_LOOP_SECONDS="3600",
                        PREFECT_SERVER_LOGGING_LEVEL="INFO") as server:
        _create_local_pool(server.api_url)
        before = datetime.now(UTC)
        deploy = subprocess.run([str(BIN / "prefect"), "--no-prompt", "deploy", "--name", "evaluate-nightly"],
                                cwd=repo, env={**server.env, "NEXUS_REPO": str(repo)}, capture_output=True,
                                text=True, timeout=300)
        assert deploy.returncode == 0, deploy.stdout[-3000:] + deploy.stderr[-3000:]
        assert NIGHTLY in deploy.stdout, deploy.stdout[-3000:]

        runs = _scheduled_runs(server, NIGHTLY, timeout=45)
        log = server.log_text()

    assert runs, f"the scheduler created no runs for {NIGHTLY}; server log:\n{log[-4000:]}"
    assert "Traceback" not in log and " | ERROR " not in log, log[-4000:]
    assert SCHEDULED.search(log), log[-4000:]
    starts = sorted(run.expected_start_time for run in runs)
    for run in runs:
        assert run.state_type.value == "SCHEDULED" and run.auto_scheduled, (run.name, run.state_type)
        assert run.created_by is not None and run.created_by.type == "SCHEDULE", run.created_by
    # cron "0 2 * * *" in UTC: every run at 02:00 UTC, in the future, one per day
    assert all(s > before and (s.astimezone(UTC).hour, s.minute, s.second) == (2, 0, 0) for s in starts), starts
    assert len({s.date() for s in starts}) == len(starts), starts
