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
    if final == "never-starts":          # e.g. the image pull failed: the run stays Pending
        return
    await set_state(client, flow_run_id, Running())
    await asyncio.sleep(0.2)
    if final == "completed":
        await set_state(client, flow_run_id, Completed())
    elif final == "cancel":
        await set_state(client, flow_run_id, Cancelling())
    elif final == "hang":
        pass
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
    # a machine the worker terminates must not have its engine report the run Crashed
    assert "PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR=relinquish" in inst["user_data"]
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
    assert pod["env"]["PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR"] == "relinquish"
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


def test_run_stuck_pending_is_crashed_after_pending_timeout(clouds):
    from nexus_core import catalog

    tmpl = template(LambdaWorker, clouds, pending_timeout_s=0.3)
    result, flow_run, after = asyncio.run(run_one(LambdaWorker, clouds, tmpl, final="never-starts"))
    assert result.status_code == 1 and after.state.is_crashed()
    assert "pending_timeout_s=0.3s" in after.state.message and result.identifier in after.state.message
    assert clouds.live() == []
    assert [r.gpu_seconds > 0 for r in catalog.costs() if r.flow_run_id == str(flow_run.id)] == [True]


def test_hung_run_is_crashed_after_max_runtime(clouds):
    tmpl = template(RunPodWorker, clouds, max_runtime_s=0.5)
    result, _, after = asyncio.run(run_one(RunPodWorker, clouds, tmpl, final="hang"))
    assert result.status_code == 1 and after.state.is_crashed()
    assert "max_runtime_s=0.5s" in after.state.message
    assert clouds.live() == []


def test_pool_templates_expose_idle_and_limit_knobs_with_documented_defaults(repo):
    readme = (repo / "infra" / "README.md").read_text()
    for worker_cls in (LambdaWorker, RunPodWorker):
        t = worker_cls.get_default_base_job_template()
        props = t["variables"]["properties"]
        defaults = {k: props[k]["default"] for k in ("max_runtime_s", "pending_timeout_s", "paused_release_s")}
        assert defaults == {"max_runtime_s": 86400, "pending_timeout_s": 1200, "paused_release_s": 600}
        for name, value in defaults.items():
            assert t["job_configuration"][name] == "{{ " + name + " }}"
            assert f"`{name}`" in readme and f"{value:g}" in readme


async def deployed_run(client, pool: str):
    """A flow run of a deployment on ``pool``, scheduled now (suspend and resume need a deployment)."""
    flow_id = await client.create_flow_from_name("remote-review-job")
    deployment_id = await client.create_deployment(flow_id=flow_id, name=f"d-{pool}", work_pool_name=pool)
    return (await client.create_flow_run_from_deployment(deployment_id)).id


async def machine_up(clouds: FakeClouds, name: str) -> dict:
    """The Lambda instance called ``name`` once it is active."""
    for _ in range(500):
        found = [i for i in clouds.instances.values() if i["name"] == name and i["status"] == "active"]
        if found:
            return found[0]
        await asyncio.sleep(0.02)
    raise AssertionError(f"no machine {name} came up")


async def until(check, what: str) -> None:
    for _ in range(500):
        if await check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting until {what}")


async def engine_sets(client, flow_run_id, state):
    """Propose ``state`` through Prefect's orchestration rules, as the flow engine on the machine does."""
    return (await client.set_flow_run_state(flow_run_id, state)).state


@pytest.mark.parametrize("how", ["suspend", "pause"])
def test_suspended_or_long_paused_run_releases_its_machine_and_relaunches_on_resume(clouds, how):
    """run → suspend (or pause past paused_release_s) → machine terminated → resume → a new machine,
    named apart from the first and left alone by a sibling worker's sweep → the run completes."""
    from prefect.states import Completed, Paused, Running, Suspended

    from nexus_core import catalog

    async def go():
        pool = f"pool-{uuid.uuid4().hex[:8]}"
        tmpl = template(LambdaWorker, clouds, paused_release_s=0.3, gpu_types=["gpu_1x_a100_sxm4"],
                        regions=["us-west-1"])
        async with LambdaWorker(work_pool_name=pool, base_job_template=tmpl) as worker:
            client = worker.client
            run_id = await deployed_run(client, pool)
            assert [r.id for r in await worker.get_and_submit_flow_runs()] == [run_id]
            first = await machine_up(clouds, f"nexus-{run_id}")
            await engine_sets(client, run_id, Running())
            gate = (Suspended if how == "suspend" else Paused)(timeout_seconds=3600, pause_key="review-1")
            assert (await engine_sets(client, run_id, gate)).is_paused()

            async def first_released():
                return first["status"] == "terminated"

            await until(first_released, "the first machine is terminated")
            run = await client.read_flow_run(run_id)
            assert run.state.name == "Suspended" and run.state.state_details.pause_reschedule
            assert run.state.state_details.pause_key == "review-1"
            if how == "pause":
                assert "paused_release_s=0.3s" in run.state.message

            await client.resume_flow_run(run_id)
            assert (await client.read_flow_run(run_id)).state.name == "Resuming"
            assert [r.id for r in await worker.get_and_submit_flow_runs()] == [run_id]
            second = await machine_up(clouds, f"nexus-{run_id}-2")
            async with LambdaWorker(work_pool_name=pool) as sibling:  # sweeps at start-up, and again here
                assert await sibling.reap_orphans() == []
            assert second["status"] == "active"
            await engine_sets(client, run_id, Running())
            # The flow re-runs from the top; its gate has fired, so Prefect refuses it and the flow goes on.
            assert (await engine_sets(client, run_id, gate)).is_running()
            await engine_sets(client, run_id, Completed())

            async def second_released():
                return second["status"] == "terminated"

            await until(second_released, "the second machine is terminated")
        return run_id, first, second

    run_id, first, second = asyncio.run(go())
    assert first["id"] != second["id"] and clouds.live() == []
    assert [b["name"] for b in clouds.calls("POST", "launch")] == [f"nexus-{run_id}", f"nexus-{run_id}-2"]
    assert [t["value"] for b in clouds.calls("POST", "launch") for t in b["tags"]] == [str(run_id)] * 2
    rows = [r for r in catalog.costs() if r.flow_run_id == str(run_id)]
    assert len(rows) == 2 and all(r.gpu_seconds > 0 for r in rows)    # both machines' time is billed


def test_suspend_and_resume_between_two_polls_still_releases_the_machine(clouds):
    """The watch never sees the Suspended state (it is resumed at once), yet the process has exited."""
    from prefect.states import Pending, Running, Suspended

    async def go():
        pool = f"pool-{uuid.uuid4().hex[:8]}"
        tmpl = template(LambdaWorker, clouds, poll_interval_s=1.0, max_runtime_s=8)
        async with LambdaWorker(work_pool_name=pool, base_job_template=tmpl) as worker:
            client = worker.client
            run_id = await deployed_run(client, pool)
            await set_state(client, run_id, Pending())
            flow_run = await client.read_flow_run(run_id)
            cfg = await worker.job_configuration.from_template_and_values(tmpl, {}, client=client)
            cfg.prepare_for_flow_run(flow_run)

            async def machine():
                await machine_up(clouds, f"nexus-{run_id}")
                await engine_sets(client, run_id, Running())
                await engine_sets(client, run_id, Suspended(timeout_seconds=3600, pause_key="k"))
                await client.resume_flow_run(run_id)

            player = asyncio.create_task(machine())
            result = await worker.run(flow_run, cfg)
            await player
            return result, await client.read_flow_run(run_id)

    result, after = asyncio.run(go())
    assert result.status_code == 0 and after.state.name == "Resuming"   # released, not crashed
    assert clouds.live() == []


@pytest.mark.slow
def test_relinquish_keeps_a_paused_run_paused_when_its_machine_is_terminated(tmp_path):
    """The premise of releasing paused machines, on the installed Prefect: with the SIGTERM behaviour
    the workers set, a real `prefect flow-run execute` stopped during `pause_flow_run` leaves the run
    Paused for the worker to suspend (Prefect's default would report it Crashed)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    (tmp_path / "gate.py").write_text(
        "from prefect import flow\nfrom prefect.flow_runs import pause_flow_run\n\n"
        "@flow(name='gate')\ndef gate():\n    pause_flow_run(timeout=600, poll_interval=1)\n")

    async def go():
        async with get_client() as client:
            flow_id = await client.create_flow_from_name("gate")
            dep = await client.create_deployment(flow_id=flow_id, name="relinquish", path=str(tmp_path),
                                                 entrypoint="gate.py:gate")
            run = await client.create_flow_run_from_deployment(dep)
            env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(),
                   "PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR": "relinquish"}
            proc = subprocess.Popen([sys.executable, "-m", "prefect", "flow-run", "execute", str(run.id)],
                                    cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            children: list[int] = []
            try:
                deadline = time.monotonic() + 120
                while (await client.read_flow_run(run.id)).state.type.value != "PAUSED":
                    assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()[-3000:]
                    await asyncio.sleep(0.3)
                children = [int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                                           text=True).stdout.split()]
                proc.send_signal(signal.SIGTERM)          # what `docker stop` / a pod delete sends PID 1
                await asyncio.to_thread(proc.wait, 60)
                await asyncio.sleep(1.0)
                return await client.read_flow_run(run.id), children
            finally:
                for pid in [proc.pid, *children]:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass

    def alive(pid: int) -> bool:
        try:
            return open(f"/proc/{pid}/stat").read().split(")")[-1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    after, children = asyncio.run(go())
    assert after.state.type.value == "PAUSED", after.state
    assert children and not any(alive(pid) for pid in children)   # the engine exited too


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
    from prefect.states import Completed, Pending, Running, Suspended

    async def go():
        tmpl = template(LambdaWorker, clouds)
        pool = f"pool-{uuid.uuid4().hex[:8]}"
        from prefect.client.orchestration import get_client

        async with get_client() as client:
            done = await new_flow_run(client)
            await set_state(client, done.id, Completed())
            alive = await new_flow_run(client)
            await set_state(client, alive.id, Running())
            suspended = await new_flow_run(client)
            await set_state(client, suspended.id, Suspended(timeout_seconds=3600, pause_key="review"))
            resumed = await new_flow_run(client)
            await set_state(client, resumed.id, Pending())
        ids = {"done": clouds.add_instance(f"nexus-{done.id}"),
               "alive": clouds.add_instance(f"nexus-{alive.id}"),
               "unknown": clouds.add_instance(f"nexus-{uuid.uuid4()}"),
               "foreign": clouds.add_instance("jupyter-of-a-colleague"),
               "suspended": clouds.add_instance(f"nexus-{suspended.id}"),
               # a resumed run's first machine (left by a crashed worker) and its new one
               "resumed-1": clouds.add_instance(f"nexus-{resumed.id}"),
               "resumed-2": clouds.add_instance(f"nexus-{resumed.id}-2")}
        # "Restart": a fresh worker process starts on the pool and sweeps at start-up.
        async with LambdaWorker(work_pool_name=pool, base_job_template=tmpl):
            pass
        return ids

    ids = asyncio.run(go())
    status = {k: clouds.instances[v]["status"] for k, v in ids.items()}
    assert status == {"done": "terminated", "alive": "active", "unknown": "terminated", "foreign": "active",
                      "suspended": "terminated", "resumed-1": "terminated", "resumed-2": "active"}


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
