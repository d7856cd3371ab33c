"""Prefect conventions every task shares: cache policy, persisted results, run context, progress.

A task wrapper names the step it runs; its cache key is the spine's (:func:`nexus_core.cachekey.step_key`)
over the task's parameters: the ``cfg`` parameter is the step config, every ``ArtifactRef`` parameter
an input, and the remaining parameters (an artifact name) join as plain values. The data root's id
joins too (a deleted and re-created data root misses, instead of returning refs to nothing).
Never Prefect's DEFAULT, which includes the run id. Wrappers list nothing by hand.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any

from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext
from prefect.runtime import flow_run, task_run

from nexus_core.artifacts import ArtifactRef, data_root_id
from nexus_core.cachekey import step_key
from nexus_core.runner import RunContext
from tasks.tags import NexusTask, TagsFn
from tasks.ui import progress_reporter, step_artifact_hook


@dataclass
class StepKey(CachePolicy):
    """Cache key of a task that runs one step: the spine's key over the task's parameters."""

    step_fn: Callable[..., Any] | None = None
    runtime: tuple[str, ...] = ()

    def compute_key(self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any],
                    **kwargs: Any) -> str | None:
        assert self.step_fn is not None
        refs, others = {}, {}
        for k, v in inputs.items():
            if k in self.runtime:  # a knob of how the task runs (worker count), not of what it makes
                continue
            if isinstance(v, ArtifactRef):
                refs[k] = v
            elif isinstance(v, dict) and v and all(isinstance(r, ArtifactRef) for r in v.values()):
                refs.update({f"{k}.{kk}": r for kk, r in v.items()})  # a named set of inputs
            elif k != "cfg" and v is not None:
                others[k] = v
        return step_key(self.step_fn, inputs.get("cfg"), refs,
                        extra={"params": others, "data_root": data_root_id()})


def nexus_task(step_fn: Callable[..., Any], runtime: Iterable[str] = (), *, gpu: bool = False,
               call_tags: TagsFn | None = None, **task_kwargs: Any) -> Callable[[Callable[..., Any]], Any]:
    """``@task`` with the spine's cache key, persisted results and a ``nexus`` tag.

    ``step_fn`` is the ``run_<step>`` function the wrapper calls; parameters named in ``runtime``
    (worker counts) stay out of the key. The tags concurrency limits count (:mod:`tasks.tags`):
    ``gpu=True`` for a task that uses the accelerator, ``call_tags(cfg)`` for those its config decides
    (the teacher or judge API it calls).
    """
    tags = {"nexus", *task_kwargs.pop("tags", ())}
    hooks = [step_artifact_hook(step_fn), *task_kwargs.pop("on_completion", ())]  # the step's summary in the UI
    return partial(NexusTask, cache_policy=StepKey(step_fn=step_fn, runtime=tuple(runtime)), persist_result=True,
                   tags=tags, on_completion=hooks, gpu=gpu, call_tags=call_tags, **task_kwargs)


def run_context() -> RunContext:
    """Prefect ids of the current flow and task run (for manifests, catalog, MLflow tags) and a
    progress reporter that shows long steps' progress in the Prefect UI."""
    return RunContext(
        flow_name=flow_run.get_flow_name(),
        flow_run_id=flow_run.get_id(),
        task_run_id=task_run.get_id(),
        progress=progress_reporter(task_run.get_id(), flow_run.get_id()),
    )
