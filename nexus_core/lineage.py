"""MLflow lineage: one run per flow run, one nested run per step execution.

Uses ``MlflowClient`` with explicit run ids rather than mlflow's global "active run", because
Prefect runs tasks in worker threads and the active-run stack does not cross threads.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nexus_core.config import flatten
from nexus_core.settings import mlflow_uri, nexus_home

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from nexus_core.artifacts import ArtifactRef

DEFAULT_EXPERIMENT = "nexus"
# The MLflow run of the step executing in this thread/task, for steps that log while they work
# (training curves, validation images). Set by step_run.
_current_step_run: ContextVar[str | None] = ContextVar("nexus_current_step_run", default=None)
_flow_runs: dict[str, str] = {}  # prefect flow run id -> mlflow run id


@cache
def _client_for(uri: str) -> MlflowClient:
    from mlflow import MlflowClient

    if not uri.startswith("sqlite"):
        return MlflowClient(tracking_uri=uri)
    from nexus_core.catalog import migration_lock

    with migration_lock("mlflow"):  # creating the client creates and migrates the schema: one process at a time
        return MlflowClient(tracking_uri=uri)


def _owner_tags() -> dict[str, str]:
    """Which process a run belongs to, so a later start can tell a killed run from a live one."""
    return {"nexus.host": socket.gethostname(), "nexus.pid": str(os.getpid())}


def _orphaned(tags: dict[str, str]) -> str | None:
    """Why a RUNNING run's owner is known to be gone (its process on this host has ended), else None
    (alive, or on another host where we cannot tell)."""
    from nexus_core.artifacts import process_alive

    host, pid = socket.gethostname(), tags.get("nexus.pid", "")
    if tags.get("nexus.host") != host or not pid.isdigit() or process_alive(int(pid)):
        return None
    return f"process {pid} on {host} ended without finishing the run"


def reap_crashed_runs() -> list[dict[str, str]]:
    """Mark KILLED every RUNNING MLflow run whose process on this host is gone (killed: SIGKILL, the
    OOM killer, a power cut), tagged ``nexus.crashed``. Returns ``{"mlflow_run_id",
    "prefect_flow_run_id", "kind"}`` for each, so the caller can also end the Prefect flow runs they
    belong to."""
    c, reaped = client(), []
    experiments = [e.experiment_id for e in c.search_experiments()]
    if not experiments:
        return []
    for run in c.search_runs(experiments, filter_string="attributes.status = 'RUNNING'", max_results=1000):
        tags = run.data.tags
        why = _orphaned(tags)
        if why is None:
            continue
        c.set_tag(run.info.run_id, "nexus.crashed", why)
        c.set_terminated(run.info.run_id, "KILLED")
        reaped.append({"mlflow_run_id": run.info.run_id, "kind": tags.get("nexus.kind", ""),
                       "prefect_flow_run_id": tags.get("prefect.flow_run_id", "")})
    return reaped


def client() -> MlflowClient:
    """MlflowClient for the configured tracking URI (SQLite under NEXUS_HOME by default)."""
    return _client_for(mlflow_uri())


def experiment_id(name: str = DEFAULT_EXPERIMENT) -> str:
    """Id of the named experiment, created if missing with its artifacts under NEXUS_HOME, or in the
    store (``<store>/mlflow/<name>``) when the store is remote, so run artifacts and registered models
    outlive the machine. An experiment keeps the location it was created with."""
    from nexus_core.store import store_for

    c = client()
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    store = store_for()
    location = f"{store.url}/mlflow/{name}" if store.remote else (nexus_home() / "mlartifacts" / name).as_uri()
    try:
        return c.create_experiment(name, artifact_location=location)
    except Exception:  # another process created it first
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def _params(config: dict[str, Any]) -> list:
    from mlflow.entities import Param

    flat = flatten(config)
    return [Param(k[:250], json.dumps(v, default=str)[:500] if not isinstance(v, str) else v[:500])
            for k, v in sorted(flat.items())]


def _log_batch(run_id: str, metrics: dict[str, float] | None = None, params: list | None = None,
               tags: dict[str, str] | None = None, step: int = 0) -> None:
    from mlflow.entities import Metric, RunTag

    now = int(time.time() * 1000)
    ms = [Metric(k, float(v), now, step) for k, v in (metrics or {}).items() if v is not None]
    ts = [RunTag(k, str(v)) for k, v in (tags or {}).items() if v is not None]
    params = params or []
    # MLflow caps a batch at 1000 metrics / 100 params / 100 tags.
    for i in range(0, max(len(ms), len(params), len(ts), 1), 100):
        client().log_batch(run_id, metrics=ms[i:i + 100], params=params[i:i + 100], tags=ts[i:i + 100])


def start_flow_run(flow_name: str, prefect_flow_run_id: str | None, config: dict[str, Any] | None = None,
                   experiment: str | None = None, parent_prefect_flow_run_id: str | None = None) -> str:
    """Create the MLflow run for a flow run; its steps nest under it. Returns the MLflow run id.

    A subflow's run (``parent_prefect_flow_run_id`` set) nests under its parent flow's run, in the
    parent's experiment, so a lifecycle run shows as one tree.
    """
    tags = {"mlflow.runName": flow_name, "nexus.kind": "flow", "nexus.flow": flow_name,
            "prefect.flow_run_id": prefect_flow_run_id, **_owner_tags()}
    parent = parent_run_for(parent_prefect_flow_run_id)
    if parent:
        tags["mlflow.parentRunId"] = parent
        exp = client().get_run(parent).info.experiment_id
    else:
        exp = experiment_id(experiment or flow_name)
    run = client().create_run(exp, tags={k: v for k, v in tags.items() if v})
    if config:
        _log_batch(run.info.run_id, params=_params(config))
    if prefect_flow_run_id:
        _flow_runs[prefect_flow_run_id] = run.info.run_id
    return run.info.run_id


def end_run(run_id: str, ok: bool = True, status: str | None = None) -> None:
    """Mark a run finished or failed (or with an explicit MLflow ``status``: KILLED)."""
    client().set_terminated(run_id, status or ("FINISHED" if ok else "FAILED"))


def end_status(exc: BaseException) -> str:
    """The MLflow status of a run its block left by ``exc``: KILLED for a signal or a cancellation (any
    BaseException that is not an Exception: Ctrl-C, SystemExit from SIGTERM, Prefect's TerminationSignal,
    a cancelled task; and a training child killed by a signal: :class:`~nexus_core.errors.Killed`),
    FAILED for any other error."""
    from nexus_core.errors import Killed

    return "KILLED" if isinstance(exc, Killed) or not isinstance(exc, Exception) else "FAILED"


def end_orphaned_run(run_id: str) -> bool:
    """Mark KILLED the run of an earlier attempt at a step (its id kept in the step's work dir) if it is
    still RUNNING and its process on this host is gone; returns whether it did. A re-run uses this
    for its own predecessor, whether or not a flow start has reaped crashed runs since."""
    c = client()
    try:
        run = c.get_run(run_id)
    except Exception:  # noqa: BLE001 - deleted, or from another tracking store: nothing to mark
        return False
    why = _orphaned(run.data.tags) if run.info.status == "RUNNING" else None
    if why is None:
        return False
    c.set_tag(run_id, "nexus.crashed", why)
    c.set_terminated(run_id, "KILLED")
    return True


def parent_run_for(prefect_flow_run_id: str | None) -> str | None:
    """The MLflow run of a Prefect flow run, if the flow started one."""
    if not prefect_flow_run_id:
        return None
    if prefect_flow_run_id in _flow_runs:
        return _flow_runs[prefect_flow_run_id]
    runs = client().search_runs(
        experiment_ids=[e.experiment_id for e in client().search_experiments()],
        filter_string=f"tags.`prefect.flow_run_id` = '{prefect_flow_run_id}' and tags.`nexus.kind` = 'flow'",
        max_results=1,
    )
    if runs:
        _flow_runs[prefect_flow_run_id] = runs[0].info.run_id
        return runs[0].info.run_id
    return None


class StepRun:
    """Handle of one step's MLflow run: log metrics, inputs and the output manifest."""

    def __init__(self, run_id: str):
        self.run_id = run_id

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        """Log a batch of metrics in one call."""
        _log_batch(self.run_id, metrics=metrics, step=step)

    def log(self, metrics: dict[str, float], tags: dict[str, Any]) -> None:
        """Log metrics and set tags in one call (each MLflow call costs ~10 ms on SQLite)."""
        _log_batch(self.run_id, metrics=metrics, tags={k: str(v) for k, v in tags.items()})

    def set_tags(self, tags: dict[str, Any]) -> None:
        """Set tags in one call."""
        _log_batch(self.run_id, tags={k: str(v) for k, v in tags.items()})

    def log_inputs(self, inputs: dict[str, ArtifactRef]) -> None:
        """Record input artifacts as MLflow dataset inputs (name, digest, source URI)."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        datasets = [
            DatasetInput(
                Dataset(name=ref.name, digest=ref.digest[:36], source_type="local",
                        source=json.dumps({"uri": ref.uri, "version": ref.version})),
                tags=[InputTag("mlflow.data.context", key)],
            )
            for key, ref in inputs.items()
        ]
        if datasets:
            client().log_inputs(self.run_id, datasets=datasets)

    def log_params(self, params: dict[str, str]) -> None:
        """Log string params (a key already logged with another value is skipped by MLflow's rules)."""
        from mlflow.entities import Param

        if params:
            _log_batch(self.run_id, params=[Param(k[:250], str(v)[:500]) for k, v in params.items()])

    def log_file(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload one file as a run artifact."""
        client().log_artifact(self.run_id, str(path), artifact_path)

    def log_dict(self, data: dict[str, Any], name: str) -> None:
        """Upload a mapping as a JSON run artifact."""
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_text(json.dumps(data, indent=2, default=str))
            self.log_file(path)


@contextmanager
def step_run(step: str, config: dict[str, Any], tags: dict[str, Any], flow_name: str | None = None,
             prefect_flow_run_id: str | None = None) -> Iterator[StepRun]:
    """An MLflow run for one step execution, nested under its flow's run when there is one.

    Marked FINISHED when the block ends, KILLED if it is interrupted by a signal, FAILED if it raises
    (:func:`end_status`). A process killed outright cannot mark its run: the next flow start
    (:func:`reap_crashed_runs`) or the step's re-run (:func:`end_orphaned_run`) marks it KILLED.
    """
    parent = parent_run_for(prefect_flow_run_id)
    all_tags = {"mlflow.runName": step.rsplit(".", 1)[-1], "nexus.kind": "step", "nexus.step": step,
                "prefect.flow_run_id": prefect_flow_run_id, **_owner_tags(), **tags}
    if parent:
        all_tags["mlflow.parentRunId"] = parent
    experiment = client().get_run(parent).info.experiment_id if parent else experiment_id(
        flow_name or DEFAULT_EXPERIMENT)
    run = client().create_run(experiment, tags={k: str(v) for k, v in all_tags.items() if v is not None})
    handle = StepRun(run.info.run_id)
    _log_batch(handle.run_id, params=_params(config))
    token = _current_step_run.set(handle.run_id)
    try:
        yield handle
    except BaseException as exc:
        end_run(handle.run_id, status=end_status(exc))
        raise
    finally:
        _current_step_run.reset(token)
    end_run(handle.run_id, ok=True)


def current_step_run() -> StepRun | None:
    """The MLflow run of the step now executing (inside run_step), or None outside a step."""
    run_id = _current_step_run.get()
    return StepRun(run_id) if run_id else None
