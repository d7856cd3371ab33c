"""The tags that Prefect's tag concurrency limits (``infra/concurrency.yaml``) count, on Nexus task runs.

- ``gpu``: a task that uses the accelerator (training, prediction, benchmarks) on a shared machine, so
  flows that share one box take turns. A per-run cloud machine (``NEXUS_PROVIDER`` set by the GPU
  workers) has its GPUs to itself: the tag is left off there, or one global limit would serialise
  every cloud machine.
- ``teacher:<provider>``: a task that calls a teacher model through litellm, so parallel flows share
  one provider's rate budget. ``<provider>`` is ``local`` for a server on loopback (``nexus serve``),
  else litellm's provider prefix of the model (``openai``, ``anthropic``, ``openrouter``, ...). An
  offline teacher (recorded responses only) calls nothing and carries no tag.
- ``judge``: a task that calls an LLM judge.

Tags that depend on the run (its config, its machine) are computed when the task is called, from its
``cfg`` argument; Prefect acquires the tag limits' slots for exactly the tags a task run carries.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import urlparse

from prefect import Task, tags
from prefect.utilities.annotations import BaseAnnotation

from nexus_core.llm.client import LLMConfig

TagsFn = Callable[[Any], Iterable[str]]
"""The tags one call of a task needs, from its ``cfg`` argument."""

LOOPBACK = {"127.0.0.1", "localhost", "::1", "0.0.0.0"}


def llm_provider(cfg: LLMConfig) -> str:
    """Who a litellm model config calls: ``local`` (a server on loopback) or the model's provider prefix."""
    host = urlparse(cfg.api_base).hostname if cfg.api_base else None
    if host in LOOPBACK:
        return "local"
    return cfg.model.split("/", 1)[0] if "/" in cfg.model else "openai"


def teacher_tags(teacher: LLMConfig) -> set[str]:
    """``teacher:<provider>`` unless the teacher is offline (served from recorded responses only)."""
    return set() if teacher.offline else {f"teacher:{llm_provider(teacher)}"}


def on_shared_machine() -> bool:
    """True unless this process runs on a per-run cloud GPU machine (``NEXUS_PROVIDER`` other than local)."""
    return os.environ.get("NEXUS_PROVIDER", "local").strip() in {"", "local"}


class NexusTask(Task):
    """A Prefect task whose runs also carry tags computed when it is called (``call_tags(cfg)``) and,
    for a GPU task on a shared machine, ``gpu``."""

    def __init__(self, *args: Any, call_tags: TagsFn | None = None, gpu: bool = False, **kwargs: Any):
        # Task() defaults log_prints to False where @task defaults it to None (inherit the flow's):
        # a flow's log_prints=True must still route this task's prints into its run log
        kwargs.setdefault("log_prints", None)
        super().__init__(*args, **kwargs)
        self.call_tags = call_tags
        self.gpu = gpu

    def run_tags(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> set[str]:
        """The run-dependent tags of one call (its ``cfg`` is the first argument or ``cfg=``)."""
        out = {"gpu"} if self.gpu and on_shared_machine() else set()
        cfg = kwargs.get("cfg", args[0] if args else None)
        if isinstance(cfg, BaseAnnotation):  # unmapped(cfg) in a .map call
            cfg = cfg.unwrap()
        if self.call_tags is not None and cfg is not None:
            out |= set(self.call_tags(cfg))
        return out

    def with_options(self, **kwargs: Any) -> Any:
        """Prefect's ``with_options`` (it builds a plain Task), keeping the run-dependent tags."""
        new = super().with_options(**kwargs)
        new.__class__ = type(self)
        new.call_tags, new.gpu = self.call_tags, self.gpu
        return new

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with tags(*self.run_tags(args, kwargs)):
            return super().__call__(*args, **kwargs)

    def submit(self, *args: Any, **kwargs: Any) -> Any:
        with tags(*self.run_tags(args, kwargs)):
            return super().submit(*args, **kwargs)

    def map(self, *args: Any, **kwargs: Any) -> Any:
        with tags(*self.run_tags(args, kwargs)):
            return super().map(*args, **kwargs)
