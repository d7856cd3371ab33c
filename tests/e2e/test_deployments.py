"""`make up` for real: Prefect server, `local` process pool + worker, `prefect deploy --all`, then
`prefect deployment run 'lifecycle/tiny'` executes on the worker, the distill deployment suspends at
its review gates and resumes; `make down` stops it all."""

import os
import subprocess

import pytest

from tests.support.prefect_server import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.mark.nightly  # 2.3 minutes: `make test-nightly` (kept out of `make test` so CI stays under 30 minutes)
def test_up_deploy_run_down(repo, tmp_path):
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(NEXUS_HOME=str(home), NEXUS_DATA=str(tmp_path / "data"), PREFECT_PORT=str(free_port()),
               MLFLOW_PORT=str(free_port()), STREAMLIT_PORT=str(free_port()))
    try:
        up = subprocess.run(["bash", "deployments/up.sh"], cwd=repo, env=env, capture_output=True, text=True,
                            timeout=300)
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        assert "lifecycle/tiny" in up.stdout
        run = subprocess.run(
            ["bash", "-c", f"source {home}/env.sh && {repo}/.venv/bin/prefect deployment run 'lifecycle/tiny' --watch"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        assert "Completed" in run.stdout
        manifests = list((tmp_path / "data" / "processed").glob("*/*/manifest.json"))
        assert len(manifests) >= 2, manifests
        # the distill deployment in human mode: a real suspend at each review gate, resumed with typed input
        review = subprocess.run(
            ["bash", "-c", f"source {home}/env.sh && {repo}/.venv/bin/python {repo}/tests/e2e/suspend_resume.py"],
            cwd=repo, env=env, capture_output=True, text=True, timeout=600)
        assert review.returncode == 0, review.stdout[-3000:] + review.stderr[-3000:]
        assert "GATE _filtered Suspended" in review.stdout and "GATE _recheck Suspended" in review.stdout
        assert "FINAL Completed waiting-requests=0" in review.stdout, review.stdout[-3000:]
    finally:
        subprocess.run(["bash", "deployments/down.sh"], cwd=repo, env=env, timeout=60)
    assert not list((home / "run").glob("*.pid"))
