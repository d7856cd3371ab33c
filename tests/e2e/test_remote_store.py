"""The store on a real S3 API (moto's server on loopback), driven through the ``nexus`` CLI.

Issue 15's done-when: with ``NEXUS_DATA=s3://...`` the tiny lifecycle writes its artifacts only to the
store; a second machine (a fresh ``NEXUS_HOME``, same store and tracking DB) re-runs it without new
versions; every registered model loads through ``mlflow.transformers`` after both machines' local
state is deleted; ``nexus lineage`` reaches the raw corpus.
"""

from __future__ import annotations

import json
import os
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
