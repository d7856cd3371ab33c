"""Crash consistency: a run killed at any point leaves nothing that lies.

- killed between publishing an artifact and cataloguing it: the next reuse (or the next flow start)
  adds the missing catalog row;
- killed in the middle of a step (SIGKILL): the next start marks its MLflow runs KILLED and its Prefect
  flow run Crashed, and deletes its staging directory; earlier versions are untouched;
- several first runs at once on a fresh home: every one succeeds (schema creation is locked).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nexus_core import catalog
from nexus_core.runner import run_step
from tests.support.crash_child import ProbeConfig, run_probe

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def fresh_home(tmp_path, monkeypatch):
    """A new NEXUS_HOME (MLflow store and catalog inside it) and data root for one probe."""
    env = {"NEXUS_HOME": str(tmp_path / "home"), "NEXUS_DATA": str(tmp_path / "data"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}"}
    (tmp_path / "home").mkdir()
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env


def test_a_kill_between_publish_and_catalog_row_is_repaired(fresh_home, monkeypatch):
    real_add = catalog.add

    def killed(*rows):  # noqa: ANN002, ANN202 - the process dies right after publishing
        if any(isinstance(r, catalog.ArtifactRow) for r in rows):
            raise KeyboardInterrupt("killed after publish")
        return real_add(*rows)

    monkeypatch.setattr(catalog, "add", killed)
    with pytest.raises(KeyboardInterrupt):
        run_step(run_probe, ProbeConfig(text="a"), name="torn")
    monkeypatch.setattr(catalog, "add", real_add)
    assert not catalog.artifacts(name="torn")  # published, but the catalog never heard of it

    again = run_step(run_probe, ProbeConfig(text="a"), name="torn")
    assert again.reused and [r.uri for r in catalog.artifacts(name="torn")] == [again.ref.uri]

    with catalog.Session(catalog.engine()) as session:  # and a full repair from the manifests alone
        for row in session.exec(catalog.select(catalog.ArtifactRow)):
            session.delete(row)
        session.commit()
    assert catalog.repair() == 1 and catalog.repair() == 0


def _child(mode: str, arg: str, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tests.support.crash_child", mode, arg], cwd=REPO,
                            env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_a_killed_flow_is_marked_crashed_and_its_staging_swept(prefect_harness, fresh_home, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    from flows import common
    from nexus_core import lineage

    env = {**fresh_home, "PREFECT_API_URL": PREFECT_API_URL.value()}
    ready = tmp_path / "ready"
    child = _child("hang", str(ready), env)
    deadline = time.monotonic() + 300
    while not ready.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ready.exists(), child.stdout.read() if child.stdout else ""
    os.kill(child.pid, signal.SIGKILL)
    child.wait()

    staging = list((Path(fresh_home["NEXUS_DATA"]) / "processed" / "probe").glob(".hung.staging-*"))
    assert len(staging) == 1  # what the killed step was building
    c = lineage.client()
    exps = [e.experiment_id for e in c.search_experiments()]
    running = c.search_runs(exps, filter_string="attributes.status = 'RUNNING'")
    assert {r.data.tags["nexus.kind"] for r in running} == {"flow", "step"}
    flow_run_id = next(r.data.tags["prefect.flow_run_id"] for r in running if r.data.tags["nexus.kind"] == "flow")

    common._recovered.discard(fresh_home["NEXUS_HOME"])
    common.recover_from_crashes()  # what the next flow start does

    for r in running:
        after = c.get_run(r.info.run_id)
        assert after.info.status == "KILLED" and "nexus.crashed" in after.data.tags
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(flow_run_id).state.type.value == "CRASHED"
    assert not staging[0].exists()


def test_a_sigterm_to_a_steps_process_ends_its_run_killed(fresh_home, tmp_path):
    """No Prefect, SIGTERM's default action: the runner turns it into SystemExit(143) while the step runs,
    so the MLflow run reads KILLED (not RUNNING), the catalog says killed and the staging dir is gone."""
    from nexus_core import lineage

    ready = tmp_path / "ready"
    child = _child("term", str(ready), fresh_home)
    deadline = time.monotonic() + 300
    while not ready.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ready.exists(), child.stdout.read() if child.stdout else ""
    os.kill(child.pid, signal.SIGTERM)
    assert child.wait(timeout=120) == 143
    c = lineage.client()
    runs = c.search_runs([e.experiment_id for e in c.search_experiments()])
    assert [(r.data.tags["nexus.step"].rsplit(".", 1)[-1], r.info.status) for r in runs] == [("run_probe", "KILLED")]
    with catalog.Session(catalog.engine()) as session:
        rows = list(session.exec(catalog.select(catalog.StepRunRow)))
    assert [(r.status, r.error) for r in rows] == [("killed", "SystemExit: 143")]
    assert not list((Path(fresh_home["NEXUS_DATA"]) / "processed" / "probe").glob(".termed.staging-*"))


@pytest.mark.slow
def test_concurrent_first_runs_on_a_fresh_home_all_succeed(fresh_home):
    children = [_child("quick", f"first{i}", fresh_home) for i in range(3)]
    outputs = [(p.wait(timeout=600), p.stdout.read() if p.stdout else "") for p in children]
    assert [code for code, _ in outputs] == [0, 0, 0], [out[-2000:] for _, out in outputs]
    assert sorted(r.name for r in catalog.artifacts(area="probe")) == ["first0", "first1", "first2"]


def test_publish_flushes_every_file_and_the_directory_before_the_rename(fresh_home, monkeypatch):
    """A power cut after the rename must not leave a manifest over files still in the page cache."""
    flushed: list[str] = []
    real_fsync, real_rename = os.fsync, os.rename
    renamed: list[str] = []

    def fsync(fd: int) -> None:
        flushed.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    def rename(src, dst):  # noqa: ANN001, ANN202
        renamed.append(str(dst))
        flushed.append(f"rename -> {dst}")
        real_rename(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    result = run_step(run_probe, ProbeConfig(text="durable"), name="flushed")
    target = str(result.ref.path)
    at_rename = flushed.index(f"rename -> {target}")
    before = flushed[:at_rename]
    assert any(p.endswith("/data.txt") for p in before)  # the data file, before the rename
    assert any(p.endswith("/manifest.json") or ".manifest.json." in p for p in before)
    assert str(Path(target).parent) in flushed[at_rename:]  # the area directory after it
