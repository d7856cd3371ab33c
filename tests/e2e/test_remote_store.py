"""The store on a real S3 API (moto's server on loopback), driven through the ``nexus`` CLI.

Issue 15's done-when: with ``NEXUS_DATA=s3://...`` the tiny lifecycle writes its artifacts only to the
store; a second machine (a fresh ``NEXUS_HOME``, same store and tracking DB) re-runs it without new
versions; every registered model loads through ``mlflow.transformers`` after both machines' local
state is deleted; ``nexus lineage`` reaches the raw corpus.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.prefect_server import clean_env, free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
BUCKET = "nexus-store"


@pytest.fixture(scope="module")
def s3() -> Iterator[dict[str, str]]:
    """A moto S3 server on a free loopback port with one bucket; the env that points clients at it."""
    port = free_port()
    proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1"}
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"{url}/moto-api/", timeout=1)
                break
            except OSError:
                time.sleep(0.2)
        import boto3

        boto3.client("s3", endpoint_url=url, aws_access_key_id="test", aws_secret_access_key="test",
                     region_name="us-east-1").create_bucket(Bucket=BUCKET)
        yield env
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _fs(s3: dict[str, str]):  # noqa: ANN202 - an s3fs filesystem on the moto server
    import s3fs

    return s3fs.S3FileSystem(key="test", secret="test", client_kwargs={"endpoint_url": s3["AWS_ENDPOINT_URL"]},
                             use_listings_cache=False)


def _versions(s3: dict[str, str]) -> list[str]:
    return sorted(p.rsplit("/", 1)[0] for p in _fs(s3).glob(f"{BUCKET}/data/processed/*/*_v*/manifest.json"))


def _nexus(args: list[str], env: dict[str, str], timeout: int = 900) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([str(BIN / "nexus"), *args], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, f"nexus {' '.join(args)} exited {out.returncode}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def _local_files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} if root.is_dir() else set()


def test_lifecycle_on_s3_two_machines_registry_and_lineage(s3: dict[str, str], tmp_path: Path) -> None:
    tracking = f"sqlite:///{tmp_path / 'shared' / 'mlflow.db'}"
    (tmp_path / "shared").mkdir()
    store = f"s3://{BUCKET}/data"

    def machine(name: str) -> dict[str, str]:
        return clean_env(tmp_path / name, **s3, NEXUS_DATA=store, MLFLOW_TRACKING_URI=tracking)

    repo_data_before = _local_files(REPO / "data" / "processed")

    # machine A runs the whole lifecycle: artifacts land in the store, nothing in the repo's data dir
    _nexus(["run", "lifecycle", "configs/presets/tiny.yaml"], machine("a"))
    first = _versions(s3)
    assert len(first) >= 15, first
    assert all(v.endswith("_v1") for v in first), first
    assert _local_files(REPO / "data" / "processed") == repo_data_before  # the local data root is untouched
    home_a = tmp_path / "a"
    assert not list(home_a.glob("**/processed/*/*_v1/manifest.json"))  # no published artifact on local disk
    assert not any((home_a / "staging").rglob("*.parquet"))  # staging was emptied by publishing
    fs = _fs(s3)
    assert fs.glob(f"{BUCKET}/data/mlflow/**/registered_model/MLmodel"), "MLflow artifacts are not in the store"
    root_id = fs.cat_file(f"{BUCKET}/data/.nexus-root-id").decode()
    assert len(root_id) == 32

    # machine B: fresh NEXUS_HOME, same store and tracking DB -> every step is found finished, no new version
    out = _nexus(["run", "lifecycle", "configs/presets/tiny.yaml"], machine("b"))
    assert _versions(s3) == first, "the second machine made new versions instead of reusing the store's"
    assert "v2" not in out.stdout

    # both machines' local state is gone: every registered model still loads through mlflow.transformers
    shutil.rmtree(tmp_path / "a")
    shutil.rmtree(tmp_path / "b")
    loader = """
import json, sys
import mlflow, mlflow.transformers
from mlflow import MlflowClient
out = {}
for rm in MlflowClient().search_registered_models():
    for mv in MlflowClient().search_model_versions(f"name = '{rm.name}'"):
        pipe = mlflow.transformers.load_model(f"models:/{rm.name}/{mv.version}")
        text = pipe("The protein", max_new_tokens=3, do_sample=False)[0]["generated_text"]
        out[f"{rm.name}/{mv.version}"] = {"text": text, "adapter": mv.tags.get("nexus.adapter"),
                                          "uri": mv.tags.get("nexus.artifact_uri")}
print(json.dumps(out))
"""
    env = clean_env(tmp_path / "c", **s3, MLFLOW_TRACKING_URI=tracking)
    loaded = subprocess.run([sys.executable, "-c", loader], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    models = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert {"nexus-tiny-sft/1", "nexus-tiny-kd/1"} <= set(models), models
    for name, info in models.items():
        assert isinstance(info["text"], str) and info["text"], (name, info)
        assert info["uri"].startswith("processed/"), info  # store-relative, not a path on machine A
    assert models["nexus-tiny-sft/1"]["adapter"] == "adapter/"  # a LoRA stage: the adapter is noted

    # nexus lineage reaches the raw corpus from the registry entry, with the store as the only state
    lin = json.loads(_nexus(["lineage", "nexus-tiny-kd/1", "--json"], machine("d")).stdout)
    assert lin["registry"]["name"] == "nexus-tiny-kd"
    steps = {n["step"].rsplit(".", 1)[-1] for n in lin["chain"]}
    assert {"run_kd", "run_sft", "run_sft_package", "run_review", "run_teacher_collect", "run_ingest"} <= steps
    assert any(r["uri"].endswith("data/raw/scientific/abstracts.jsonl") for r in lin["raw"]), lin["raw"]
    review = next(n for n in lin["chain"] if n["step"].endswith("run_review"))
    assert sum(review["reviews"]["decisions"].values()) == review["rows"]
    collect = next(n for n in lin["chain"] if n["step"].endswith("run_teacher_collect"))
    assert collect["teachers"]["teacher.model"] and collect["git_sha"] and collect["prefect_flow_run_id"]
    assert any(n["files_read"] for n in lin["chain"]), "no step recorded the files it read (prompt hashes)"
    assert os.environ.get("NEXUS_DATA") != store  # the test never pointed this process at the bucket


FLOW_SRC = '''
from prefect import flow

from nexus_core.artifacts import raw_ref
from nexus_core.corpus.ingest import IngestConfig
from tasks.ingest import ingest


@flow(name="durable")
def durable(src: str) -> str:
    result = ingest(IngestConfig(sources=[src], required_columns=["text"]), {"source_0": raw_ref(src)},
                    name="durable")
    return f"{result.ref.uri} reused={result.reused}"
'''


def test_gpu_pool_machine_disk_is_wiped_yet_results_survive(s3: dict[str, str], tmp_path: Path,
                                                              prefect_harness: None,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A RunPod pool (fake cloud, the provider's documented API): each flow run gets a machine that runs
    the real `prefect flow-run execute` with the env the worker launched it with; its disk (NEXUS_HOME,
    PREFECT_HOME) is deleted after the run. The artifact is in the store, and the next machine reuses it."""
    import asyncio
    import uuid

    from prefect.client.orchestration import get_client

    from infra.workers import RunPodWorker
    from tests.infra.fake_clouds import FakeClouds
    from tests.infra.test_workers import KEY, template

    job = tmp_path / "job"
    job.mkdir()
    (job / "durable.py").write_text(FLOW_SRC)
    raw = job / "rows.jsonl"
    raw.write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(5)))
    store = f"s3://{BUCKET}/gpu-pool"
    machine_env = {**s3, "NEXUS_DATA": store, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}

    async def play_machine(clouds: FakeClouds, run_id: str, disk: Path) -> int:
        """Wait for the pod, then be it: run its start command with its env on a disk of its own."""
        for _ in range(2000):
            pods = [p for p in clouds.pods.values() if p["name"] == f"nexus-{run_id}" and p["runtime"]]
            if pods:
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("no pod came up")
        pod = pods[0]
        env = {"PATH": f"{BIN}:{os.environ['PATH']}", "HOME": str(disk), **pod["env"],
               "NEXUS_HOME": str(disk / "nexus"), "PREFECT_HOME": str(disk / "prefect")}
        command = shlex.split(pod["dockerStartCmd"][-1])  # `bash -lc CMD` in the image; here CMD with our prefect
        assert command[:3] == ["prefect", "flow-run", "execute"], command
        proc = await asyncio.create_subprocess_exec(str(BIN / "prefect"), *command[1:], cwd=job, env=env,
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out, _ = await proc.communicate()
        assert proc.returncode == 0, out.decode()[-3000:]
        return proc.returncode

    async def one_run(clouds: FakeClouds, disk: Path) -> str:
        tmpl = template(RunPodWorker, clouds, launch_timeout_s=30, pending_timeout_s=240)
        pool = f"pool-{uuid.uuid4().hex[:8]}"
        async with get_client() as client:
            flow_id = await client.create_flow_from_name("durable")
            dep = await client.create_deployment(flow_id=flow_id, name=f"d-{uuid.uuid4().hex[:6]}", path=str(job),
                                                 entrypoint="durable.py:durable")
            run = await client.create_flow_run_from_deployment(dep, parameters={"src": str(raw)})
        async with RunPodWorker(work_pool_name=pool, base_job_template=tmpl) as worker:
            cfg = await worker.job_configuration.from_template_and_values(tmpl, {"env": machine_env},
                                                                           client=worker.client)
            cfg.prepare_for_flow_run(run)
            result, _ = await asyncio.gather(worker.run(run, cfg), play_machine(clouds, str(run.id), disk))
            after = await worker.client.read_flow_run(run.id)
        assert result.status_code == 0 and after.state.is_completed(), after.state
        assert clouds.live() == []  # the machine was terminated
        return str(run.id)

    # the worker records each machine's time in the ledger: a catalog of this test's own, so the
    # session's ledger (read by other tests' cost totals) is not changed by it
    monkeypatch.setenv("NEXUS_CATALOG_URL", f"sqlite:///{tmp_path / 'worker-catalog.db'}")
    monkeypatch.setenv("RUNPOD_API_KEY", KEY)
    with FakeClouds(api_key=KEY) as clouds:
        asyncio.run(one_run(clouds, tmp_path / "machine-1"))
        shutil.rmtree(tmp_path / "machine-1")  # the provider reclaims the disk
        fs = _fs(s3)
        first = sorted(fs.glob(f"{BUCKET}/gpu-pool/processed/*/*/manifest.json"))
        assert first == [f"{BUCKET}/gpu-pool/processed/corpus/durable_v1/manifest.json"], first
        asyncio.run(one_run(clouds, tmp_path / "machine-2"))
        shutil.rmtree(tmp_path / "machine-2")
        assert sorted(fs.glob(f"{BUCKET}/gpu-pool/processed/*/*/manifest.json")) == first  # reused
