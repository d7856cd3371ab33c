"""Prefect conventions every task shares: cache policy, persisted results, run context.

The cache key is our own policy, never Prefect's DEFAULT (which includes the run id):
task inputs + the *step module's* source (Prefect's TASK_SOURCE only sees the thin wrapper)
+ extra sources such as prompt templates + the data root (a cached result points at files there).
Parameters named in ``runtime`` (worker counts, log intervals) are left out of the key.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from prefect import task
from prefect.cache_policies import INPUTS, CachePolicy
from prefect.context import TaskRunContext
from prefect.runtime import flow_run, task_run

from nexus_core.artifacts import data_root_id, source_hash
from nexus_core.runner import RunContext, step_code_hash
from nexus_core.settings import data_root


@dataclass
class StepSource(CachePolicy):
    """Cache key part: the step module's source, any extra texts it depends on, and the data root's
    path and id (a deleted and re-created data root misses, instead of returning refs to nothing)."""

    step_fn: Callable[..., Any] | None = None
    extra_sources: Callable[[dict[str, Any]], Iterable[str]] | None = field(default=None, repr=False)

    def compute_key(self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any],
                    **kwargs: Any) -> str | None:
        extra = tuple(self.extra_sources(inputs)) if self.extra_sources else ()
        return source_hash(step_code_hash(self.step_fn, *extra), str(data_root()), data_root_id())


def step_cache_policy(step_fn: Callable[..., Any], runtime: Iterable[str] = (),
                      extra_sources: Callable[[dict[str, Any]], Iterable[str]] | None = None) -> CachePolicy:
    """INPUTS (minus runtime knobs) + the step module's source + extra sources + data root."""
    inputs_policy = INPUTS
    for name in runtime:
        inputs_policy = inputs_policy - name
    return inputs_policy + StepSource(step_fn=step_fn, extra_sources=extra_sources)


def nexus_task(step_fn: Callable[..., Any], *, runtime: Iterable[str] = (),
               extra_sources: Callable[[dict[str, Any]], Iterable[str]] | None = None,
               **task_kwargs: Any) -> Callable[[Callable[..., Any]], Any]:
    """``@task`` with Nexus's cache policy, persisted results and a ``nexus`` tag.

    ``step_fn`` is the ``run_<step>`` function the wrapper calls; its module's source joins the key.
    """
    tags = {"nexus", *task_kwargs.pop("tags", ())}
    return task(
        cache_policy=step_cache_policy(step_fn, runtime, extra_sources),
        persist_result=True,
        tags=tags,
        **task_kwargs,
    )


def run_context() -> RunContext:
    """Prefect ids of the current flow and task run, for manifests, catalog and MLflow tags."""
    return RunContext(
        flow_name=flow_run.get_flow_name(),
        flow_run_id=flow_run.get_id(),
        task_run_id=task_run.get_id(),
    )
