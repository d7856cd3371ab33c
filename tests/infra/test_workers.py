"""Lambda and RunPod workers against a loopback server speaking the providers' documented APIs.

A real Prefect API (the session harness) holds the flow runs; the "remote machine" is played by
the test, which moves the flow run through its states the way `prefect flow-run execute` would.
"""

from __future__ import annotations

import asyncio
import logging
import uuid

import pytest
from pydantic import ValidationError

from infra.providers.base import CapacityError, MissingAPIKeyError, UnknownGPUTypeError
from infra.workers import LambdaWorker, RunPodWorker
from infra.workers.lambda_worker import LambdaJobConfiguration
from infra.workers.runpod_worker import RunPodJobConfiguration
from tests.infra.fake_clouds import FakeClouds

pytestmark = pytest.mark.usefixtures("prefect_harness")
KEY = "sk-test-SECRET-9f8e7d"


@pytest.fixture
def clouds(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("LAMBDA_API_KEY", KEY)
    monkeypatch.setenv("RUNPOD_API_KEY", KEY)
    with FakeClouds(api_key=KEY) as c:
        yield c


def template(worker_cls, clouds: FakeClouds, **defaults) -> dict:
    """The worker's default base job template pointed at the fake server, with fast polling."""
    t = worker_cls.get_default_base_job_template()
    props = t["variables"]["properties"]
    base = {"poll_interval_s": 0.05, "launch_timeout_s": 5}
    if worker_cls is LambdaWorker:
        base.update(api_url=clouds.lambda_url, gpu_types=["gpu_1x_h100_pcie", "gpu_1x_a100_sxm4"],
                    regions=["us-east-1", "us-west-1"])
    else:
        base.update(api_url=clouds.runpod_url, graphql_url=clouds.runpod_graphql_url,
                    gpu_types=["NVIDIA H100 80GB HBM3", "NVIDIA A100 80GB PCIe"])
    for k, v in {**base, **defaults}.items():
        props[k]["default"] = v
    return t


async def new_flow_run(client):
    from prefect import flow
    from prefect.states import Pending

    @flow(name="remote-job")
    def remote_job() -> None:  # pragma: no cover - runs "on the machine"
        pass

    return await client.create_flow_run(remote_job, state=Pending())


async def set_state(client, flow_run_id, state) -> None:
    await client.set_flow_run_state(flow_run_id, state, force=True)


async def play_machine(clouds: FakeClouds, client, flow_run_id, final="completed") -> None:
    """Wait for a running machine of this run, then move the run Running → final (like the engine)."""
    from prefect.states import Cancelling, Completed, Running

    name = f"nexus-{flow_run_id}"
    for _ in range(400):
        running = [i for i in clouds.instances.values() if i["name"] == name and i["status"] == "active"]
        running += [p for p in clouds.pods.values() if p["name"] == name and p["runtime"]
                    and p["desiredStatus"] == "RUNNING"]
        if running:
            break
        await asyncio.sleep(0.02)
    else:
        raise AssertionError("no machine came up")
    await set_state(client, flow_run_id, Running())
    await asyncio.sleep(0.2)
    if final == "completed":
        await set_state(client, flow_run_id, Completed())
    elif final == "cancel":
        await set_state(client, flow_run_id, Cancelling())
    elif final == "die":
        for i in running:
            if "status" in i:
                i["status"] = "terminated"
            else:
                i["desiredStatus"] = "EXITED"


async def run_one(worker_cls, clouds, tmpl, final="completed", values=None):
    """Create a pool + flow run, run the worker on it while the test plays the machine."""
    pool = f"pool-{uuid.uuid4().hex[:8]}"
    async with worker_cls(work_pool_name=pool, base_job_template=tmpl) as worker:
        flow_run = await new_flow_run(worker.client)
        cfg = await worker.job_configuration.from_template_and_values(tmpl, values or {}, client=worker.client)
        cfg.prepare_for_flow_run(flow_run)
        machine = asyncio.create_task(play_machine(clouds, worker.client, flow_run.id, final))
        try:
            result = await worker.run(flow_run, cfg)
        finally:
            machine.cancel()
        after = await worker.client.read_flow_run(flow_run.id)
    return result, flow_run, after


def test_workers_register_as_prefect_worker_types():
    from prefect.workers.base import BaseWorker

    assert BaseWorker.get_worker_class_from_type("nexus-lambda") is LambdaWorker
    assert BaseWorker.get_worker_class_from_type("nexus-runpod") is RunPodWorker


def test_lambda_falls_back_on_capacity_runs_and_terminates(clouds):
    from nexus_core import catalog

    result, flow_run, after = asyncio.run(run_one(LambdaWorker, clouds, template(LambdaWorker, clouds)))
    launches = [(b["instance_type_name"], b["region_name"]) for b in clouds.calls("POST", "launch")]
    # h100 has no capacity in either region, so the a100 in us-east-1 then us-west-1 is tried.
    assert launches == [("gpu_1x_h100_pcie", "us-east-1"), ("gpu_1x_h100_pcie", "us-west-1"),
                        ("gpu_1x_a100_sxm4", "us-east-1"), ("gpu_1x_a100_sxm4", "us-west-1")]
    assert result.status_code == 0 and after.state.is_completed()
    inst = clouds.instances[result.identifier]
    assert inst["name"] == f"nexus-{flow_run.id}" and inst["status"] == "terminated"
    assert f"PREFECT__FLOW_RUN_ID={flow_run.id}" in inst["user_data"]
    assert KEY not in inst["user_data"]           # the provider key never travels to the machine
    assert clouds.live() == []
    rows = [r for r in catalog.costs() if r.flow_run_id == str(flow_run.id)]
    assert len(rows) == 1 and rows[0].provider == "lambda" and rows[0].model == "gpu_1x_a100_sxm4"
    assert rows[0].gpu_seconds > 0 and rows[0].usd > 0


def test_runpod_falls_back_on_capacity_runs_and_terminates(clouds):
    result, flow_run, after = asyncio.run(run_one(RunPodWorker, clouds, template(RunPodWorker, clouds)))
    creates = clouds.calls("POST", "/runpod/v1/pods")
    assert [c["gpuTypeIds"] for c in creates] == [["NVIDIA H100 80GB HBM3"], ["NVIDIA A100 80GB PCIe"]]
    pod = clouds.pods[result.identifier]
    assert result.status_code == 0 and after.state.is_completed()
    assert pod["env"]["PREFECT__FLOW_RUN_ID"] == str(flow_run.id)
    assert pod["dockerStartCmd"][-1].startswith("prefect flow-run execute")
    assert pod["desiredStatus"] == "TERMINATED" and clouds.live() == []


def test_launch_timeout_terminates_and_tries_next_then_fails(clouds):
    clouds.boot_after = None            # machines launch but never come up
    clouds.lambda_capacity = {("gpu_1x_h100_pcie", "us-east-1"), ("gpu_1x_a100_sxm4", "us-west-1")}
    tmpl = template(LambdaWorker, clouds, launch_timeout_s=0.3)
    with pytest.raises(CapacityError, match="not running after 0.3s") as err:
        asyncio.run(run_one(LambdaWorker, clouds, tmpl))
    assert "gpu_1x_h100_pcie@us-east-1" in str(err.value) and "gpu_1x_a100_sxm4@us-west-1" in str(err.value)
    assert len(clouds.calls("POST", "launch")) == 4
    assert len(clouds.calls("POST", "terminate")) == 2 and clouds.live() == []


def test_cancellation_terminates_the_machine(clouds):
    result, _, after = asyncio.run(run_one(LambdaWorker, clouds, template(LambdaWorker, clouds), final="cancel"))
    assert result.status_code == 0
    assert after.state.is_cancelled()
    assert clouds.live() == []


def test_machine_dying_mid_run_is_reported(clouds):
    result, _, _ = asyncio.run(run_one(RunPodWorker, clouds, template(RunPodWorker, clouds), final="die"))
    assert result.status_code == 1           # the base worker turns this into a Crashed state
    assert clouds.live() == []


def test_kill_infrastructure_terminates(clouds):
    iid = clouds.add_instance("nexus-whatever")

    async def go():
        tmpl = template(LambdaWorker, clouds)
        cfg = await LambdaJobConfiguration.from_template_and_values(tmpl, {})
        async with LambdaWorker(work_pool_name=f"pool-{uuid.uuid4().hex[:8]}", base_job_template=tmpl) as w:
            await w.kill_infrastructure(iid, cfg)

    asyncio.run(go())
    assert clouds.instances[iid]["status"] == "terminated"


def test_restarted_worker_reaps_orphans_only(clouds):
    from prefect.states import Completed, Running

    async def go():
        tmpl = template(LambdaWorker, clouds)
        pool = f"pool-{uuid.uuid4().hex[:8]}"
        from prefect.client.orchestration import get_client

        async with get_client() as client:
            done = await new_flow_run(client)
            await set_state(client, done.id, Completed())
            alive = await new_flow_run(client)
            await set_state(client, alive.id, Running())
        ids = {"done": clouds.add_instance(f"nexus-{done.id}"),
               "alive": clouds.add_instance(f"nexus-{alive.id}"),
               "unknown": clouds.add_instance(f"nexus-{uuid.uuid4()}"),
               "foreign": clouds.add_instance("jupyter-of-a-colleague")}
        # "Restart": a fresh worker process starts on the pool and sweeps at start-up.
        async with LambdaWorker(work_pool_name=pool, base_job_template=tmpl):
            pass
        return ids

    ids = asyncio.run(go())
    status = {k: clouds.instances[v]["status"] for k, v in ids.items()}
    assert status == {"done": "terminated", "alive": "active", "unknown": "terminated", "foreign": "active"}


def test_unknown_gpu_type_launches_nothing(clouds):
    tmpl = template(RunPodWorker, clouds, gpu_types=["NVIDIA H100 80GB HBM3", "NVIDIA TPU v9"])
    with pytest.raises(UnknownGPUTypeError, match="'NVIDIA TPU v9' not offered.*nothing was launched"):
        asyncio.run(run_one(RunPodWorker, clouds, tmpl))
    assert clouds.calls("POST", "/runpod/v1/pods") == [] and clouds.live() == []


def test_missing_api_key_is_named_not_printed(clouds, monkeypatch, caplog):
    monkeypatch.delenv("LAMBDA_API_KEY")
    caplog.set_level(logging.DEBUG)
    with pytest.raises(MissingAPIKeyError, match="LAMBDA_API_KEY is not set"):
        asyncio.run(run_one(LambdaWorker, clouds, template(LambdaWorker, clouds)))
    assert clouds.calls("POST", "launch") == []


def test_api_errors_never_contain_the_key(clouds, caplog):
    from infra.providers.base import ProviderError
    from infra.providers.lambda_cloud import LambdaCloud

    caplog.set_level(logging.DEBUG)

    async def go():
        bad = LambdaCloud("wrong-" + KEY, clouds.lambda_url, retries=0)
        try:
            await bad.list()
        finally:
            await bad.aclose()

    with pytest.raises(ProviderError, match="invalid-api-key") as err:
        asyncio.run(go())
    assert KEY not in str(err.value) and KEY not in caplog.text
    assert "wrong-" + KEY not in repr(LambdaCloud("wrong-" + KEY).api)


def test_wrong_type_job_variable_is_one_clear_error(clouds):
    tmpl = template(LambdaWorker, clouds)
    with pytest.raises(ValidationError) as err:
        asyncio.run(LambdaJobConfiguration.from_template_and_values(tmpl, {"disk_gb": "lots", "gpu_count": 1}))
    assert "disk_gb" in str(err.value) and "gpu_count" not in str(err.value)
    with pytest.raises(ValidationError, match="cloud_type"):
        asyncio.run(RunPodJobConfiguration.from_template_and_values(template(RunPodWorker, clouds),
                                                                    {"cloud_type": "CHEAPEST"}))
    assert clouds.log == []


def test_prefect_collections_entry_point_finds_the_workers(tmp_path, repo):
    """The exact entry-point line proposed for pyproject.toml makes Prefect find both worker types
    without anything importing infra first (a stand-in dist-info carries the line)."""
    import os
    import subprocess
    import sys

    dist = tmp_path / "nexus_infra_ep-0.0.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: nexus-infra-ep\nVersion: 0.0.0\n")
    (dist / "entry_points.txt").write_text('[prefect.collections]\nnexus_infra = infra.workers\n')
    code = ("import sys; from prefect.workers.base import BaseWorker; "
            "assert 'infra.workers' not in sys.modules; "
            "print(sorted(t for t in BaseWorker.get_all_available_worker_types() if t.startswith('nexus-')))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(repo)])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "['nexus-lambda', 'nexus-runpod']" in out.stdout
