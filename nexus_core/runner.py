"""The spine: run a step, publish its artifact with a manifest, record lineage, catalog and cost.

A step is a plain function ``run_<step>(cfg, *, inputs, out_uri, ctx) -> <Step>Result`` marked with
its contract (:func:`nexus_core.contract.step`). It writes its files under ``out_uri`` and returns a
small result. :func:`run_step` wraps it:

1. Check the inputs against the step's contract, before any work.
2. If a finished version of the artifact has the same cache key (config, input digests, code of the
   step and every in-repo module it imports, files it reads: :mod:`nexus_core.cachekey`), return its
   stored result without work (idempotent re-runs, even outside Prefect).
3. Otherwise run the step in a staging directory, inside an MLflow run, with a
   :class:`~nexus_core.context.StepContext` (MLflow run, work dir, progress).
4. Publish into the store (:mod:`nexus_core.store`): digest the files, write ``manifest.json`` last,
   rename (local store) or upload (remote store) into ``<name>_v<N>``; delete the
   step's work dir (its checkpoints are no longer needed).
5. Record the artifact, the step run and its cost in the catalog. The manifest is the truth: a run
   killed between publishing and this step leaves a published artifact without a row, which the
   next reuse (or ``catalog.repair`` at the start of every flow) adds.

If the step raises, the staging directory is removed: no manifest, earlier versions untouched; the
work dir stays, so a re-run resumes from its checkpoints. The work dir is keyed by
:func:`~nexus_core.cachekey.resume_key` (the cache key less resume-neutral fields such as a training
stage's ``max_steps``), and holds ``attempt.json``, the MLflow run of the last attempt: a re-run marks
that run KILLED if its process died without ending it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from nexus_core import catalog, lineage
from nexus_core.artifacts import (
    ArtifactRef,
    Manifest,
    atomic_write_json,
    code_version,
    dir_digest,
    list_versions,
    now_iso,
    publish,
    read_manifest,
    remove_tree,
    staging_dir,
    version_uri,
)
from nexus_core.cachekey import code_hash, files_read, resume_key, step_key
from nexus_core.config import config_dict, config_hash
from nexus_core.context import ProgressFn, StepContext, log
from nexus_core.contract import check_inputs, contract_of
from nexus_core.costs import (
    Cost,
    Machine,
    add_costs,
    budget_chain,
    check_flow_budgets,
    estimate_step_usd,
    machine,
)
from nexus_core.errors import ConfigError
from nexus_core.logs import hash_functions_quietly
from nexus_core.settings import work_root

R = TypeVar("R", bound="StepResult")


class StepResult(BaseModel):
    """Base of every step result: small, serialisable, never tensors or DataFrames."""

    ref: ArtifactRef | None = Field(default=None, description="The published artifact (set by run_step)")
    rows: int | None = Field(default=None, description="Row count of the output table, if any")
    columns: dict[str, str] | None = Field(default=None, description="Output schema: column -> type")
    metrics: dict[str, float] = Field(default_factory=dict)
    cost: Cost = Field(default_factory=Cost)
    reused: bool = Field(default=False, description="True when an existing artifact was returned")


class RunContext(BaseModel):
    """Where a step runs: filled by the Prefect task wrapper, empty when called directly."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    flow_name: str | None = None
    flow_run_id: str | None = None
    task_run_id: str | None = None
    progress: ProgressFn | None = Field(default=None, exclude=True, description="Progress reporter (Prefect UI)")


def step_name(fn: Callable[..., Any]) -> str:
    """Dotted name of a step function, e.g. ``nexus_core.distill.inputs.run_teacher_inputs``."""
    return f"{fn.__module__}.{fn.__name__}"


def work_dir_for(area: str, name: str, key: str) -> Path:
    """The stable work dir of a step execution: ``<work root>/<area>/<name>-<key>`` (``NEXUS_WORK``,
    default ``NEXUS_HOME/work``); ``key`` is the step's :func:`~nexus_core.cachekey.resume_key`."""
    return work_root() / area / f"{name}-{key[:16]}"


ATTEMPT_FILE = "attempt.json"


def _previous_attempt(work: Path) -> str | None:
    """The MLflow run of the last attempt in this work dir, marked KILLED if its process died
    (SIGKILL, OOM) and left it RUNNING; returns its id for the new run's ``nexus.previous_attempt`` tag."""
    import json

    try:
        run_id = json.loads((work / ATTEMPT_FILE).read_text())["mlflow_run_id"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if lineage.end_orphaned_run(run_id):
        log.info("the previous attempt's MLflow run %s was left RUNNING by a killed process: marked KILLED", run_id)
    return run_id


def find_reusable(area: str, name: str, key: str) -> Manifest | None:
    """The newest finished artifact ``<area>/<name>`` made with the same cache key."""
    for version in reversed(list_versions(area, name)):
        m = read_manifest(version_uri(area, name, version))
        if m.cache_key == key:
            return m
    return None


def priced_machine(flow_run_id: str | None) -> Machine | None:
    """The paid GPU machine this step runs on (:func:`nexus_core.costs.machine`), if its price is known.

    An unknown price is a ConfigError when a budget applies (it could not be enforced), else a warning
    and the step's GPU time is not charged (the worker still records the machine's time).
    """
    found = machine()
    if found is None:
        return None
    try:
        found.cost(0.0)
    except ConfigError as exc:
        if budget_chain(flow_run_id):
            raise
        log.warning("GPU time of steps is not priced: %s", exc)
        return None
    return found


@contextlib.contextmanager
def sigterm_exits() -> Iterator[None]:
    """While a step runs, SIGTERM raises SystemExit (exit code 143) instead of ending the process on the
    spot, so the step's MLflow run is marked KILLED, its staging dir removed and the catalog told.
    Only where SIGTERM still has Python's default action on the main thread: a Prefect flow run (its
    own handler raises TerminationSignal, also KILLED) or a host application keeps its handler."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def _exit(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def run_step(
    fn: Callable[..., R],
    cfg: BaseModel,
    *,
    name: str,
    inputs: dict[str, ArtifactRef | None] | None = None,
    context: RunContext | None = None,
) -> R:
    """Run ``fn`` through the spine (see module docstring) and return its result with ``ref`` set.

    The artifact's area and kind come from the step's contract; ``inputs`` set to None are left out.
    """
    contract = contract_of(fn)
    area, kind = contract.area, contract.kind
    refs: dict[str, ArtifactRef] = {k: v for k, v in (inputs or {}).items() if v is not None}
    context = context or RunContext()
    step = step_name(fn)
    result_cls: type[R] = typing.get_type_hints(fn)["return"]
    check_inputs(fn, refs)
    chash = config_hash(cfg)
    code = code_hash(fn)
    reads = files_read(fn, cfg, refs)
    key = step_key(fn, cfg, refs, code=code, files=reads)
    work = work_dir_for(area, name, resume_key(fn, cfg, refs, code=code, files=reads))

    existing = find_reusable(area, name, key)
    if existing is not None:
        result = result_cls.model_validate(existing.result)
        result.ref, result.reused = existing.ref(), True
        catalog.ensure_artifact(existing)  # a run killed after publishing never wrote the row
        catalog.add(catalog.StepRunRow(step=step, status="reused", config_hash=chash,
                                       artifact_uri=existing.uri, flow_name=context.flow_name,
                                       flow_run_id=context.flow_run_id, task_run_id=context.task_run_id))
        return result

    # Refuse to start a step whose estimate would pass any budget above it (its flow's, the parent
    # flows'); in-step caps (teacher.max_cost_usd) stop a step that is already running.
    gpu_machine = priced_machine(context.flow_run_id)
    if budget_chain(context.flow_run_id):
        estimate, basis = estimate_step_usd(step, chash, on=gpu_machine)
        check_flow_budgets(context.flow_run_id, estimate_usd=estimate, step=step, basis=basis)
    cfg_dict = config_dict(cfg)
    started, t0 = now_iso(), time.perf_counter()
    staging = staging_dir(area, name)
    version_info = code_version()
    tags = {"nexus.config_hash": chash, "nexus.code_hash": code, "nexus.cache_key": key, "prefect.task_run_id": context.task_run_id,
            "mlflow.source.git.commit": version_info["git_sha"], "nexus.previous_attempt": _previous_attempt(work)}
    mlflow_run_id = None
    try:
        with sigterm_exits(), lineage.step_run(step, cfg_dict, tags, context.flow_name, context.flow_run_id) as run:
            mlflow_run_id = run.run_id
            run.log_inputs(refs)
            run.log_params({f"file.{Path(p).name}": d for p, d in reads.items()})  # prompt template hashes
            work.mkdir(parents=True, exist_ok=True)
            atomic_write_json(work / ATTEMPT_FILE, {"mlflow_run_id": run.run_id, "cache_key": key})
            ctx = StepContext(step=step, work_dir=work, run=run, on_progress=context.progress)
            ctx.info(f"pid {os.getpid()}, work dir {work}")
            hash_functions_quietly()  # no bytecode from dill in the step's log
            result = fn(cfg, inputs=refs, out_uri=str(staging), ctx=ctx)
            own_cost, gpu_cost = result.cost, None
            if gpu_machine is not None and not own_cost.gpu_seconds:  # a step that priced its GPU time knows best
                gpu_cost = gpu_machine.cost(time.perf_counter() - t0)
                result.cost = add_costs(own_cost, gpu_cost)
                ctx.info(f"{gpu_cost.gpu_seconds:.0f} GPU-seconds on {gpu_machine.gpu} ({gpu_machine.provider}): "
                         f"${gpu_cost.usd:.4f}")
            digest, nbytes = dir_digest(staging)

            def make_manifest(version: int, uri: str) -> Manifest:
                return Manifest(
                    kind=kind, name=name, version=version, uri=uri, digest=digest,
                    step=step, rows=result.rows, bytes=nbytes, schema=result.columns, config=cfg_dict,
                    config_hash=chash, code_hash=code, cache_key=key, files=reads, inputs=refs,
                    code_version=version_info,
                    metrics=result.metrics, cost=result.cost.model_dump(exclude={"provider", "model"}),
                    result=result.model_dump(mode="json", exclude={"ref", "reused"}),
                    prefect={"flow_run_id": context.flow_run_id, "task_run_id": context.task_run_id,
                             "flow_name": context.flow_name},
                    mlflow_run_id=run.run_id, started_at=started, finished_at=now_iso(),
                )

            manifest = publish(staging, area, name, make_manifest)
            result.ref = manifest.ref()
            run.log({**result.metrics, "rows": float(result.rows or 0), "cost_usd": result.cost.usd,
                     "seconds": time.perf_counter() - t0},
                    {"nexus.output_uri": manifest.uri, "nexus.output_digest": digest,
                     "nexus.artifact": f"{name}@v{manifest.version}"})
            run.log_dict(manifest.model_dump(mode="json", by_alias=True), "manifest.json")
        remove_tree(work)  # published: checkpoints of this execution are no longer needed
    except BaseException as exc:
        remove_tree(staging)
        catalog.add(catalog.StepRunRow(
            step=step, status="killed" if lineage.end_status(exc) == "KILLED" else "failed", config_hash=chash, error=f"{type(exc).__name__}: {exc}"[:2000],
            flow_name=context.flow_name, flow_run_id=context.flow_run_id, task_run_id=context.task_run_id,
            mlflow_run_id=mlflow_run_id, seconds=time.perf_counter() - t0))
        raise

    seconds = time.perf_counter() - t0
    rows: list[Any] = [
        catalog.artifact_row(manifest),
        catalog.StepRunRow(step=step, status="completed", config_hash=chash, artifact_uri=manifest.uri,
                           flow_name=context.flow_name, flow_run_id=context.flow_run_id,
                           task_run_id=context.task_run_id, mlflow_run_id=mlflow_run_id, seconds=seconds),
    ]
    for c in (own_cost, gpu_cost):  # one ledger row per kind: the step's own spend, its machine time
        if c is not None and (c.usd or c.tokens_in or c.tokens_out or c.gpu_seconds):
            rows.append(catalog.CostRow(flow_name=context.flow_name, flow_run_id=context.flow_run_id, step=step,
                                        provider=c.provider, kind="gpu" if c.gpu_seconds else "api", model=c.model,
                                        tokens_in=c.tokens_in, tokens_out=c.tokens_out,
                                        gpu_seconds=c.gpu_seconds, usd=c.usd))
    catalog.add(*rows)
    return result
