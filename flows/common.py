"""What every flow shares: MLflow flow runs, config loading, and the ``python -m flows.X`` entry point."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from prefect.runtime import flow_run
from pydantic import BaseModel

from nexus_core import lineage
from nexus_core.config import FlowConfig, config_dict, load_config
from nexus_core.costs import set_flow_budget
from nexus_core.errors import NexusError

C = TypeVar("C", bound=BaseModel)


@contextmanager
def flow_lineage(cfg: BaseModel) -> Iterator[str]:
    """Open the MLflow run of this flow run (its steps nest under it); marks it failed on error."""
    name = flow_run.get_flow_name() or "flow"
    if isinstance(cfg, FlowConfig):
        set_flow_budget(flow_run.get_id(), cfg.budget_usd)
    run_id = lineage.start_flow_run(name, flow_run.get_id(), config_dict(cfg),
                                    parent_prefect_flow_run_id=flow_run.get_parent_flow_run_id())
    try:
        yield run_id
    except BaseException:
        lineage.end_run(run_id, ok=False)
        raise
    lineage.end_run(run_id, ok=True)


def load_flow_config(model: type[C], path: str | None, overrides: list[str] | tuple[str, ...] = ()) -> C:
    """Load a flow's YAML config (with extends) plus ``key=value`` overrides into its model."""
    return load_config(path, model, overrides)


def main(flow_fn: Callable[[Any], Any], model: type[BaseModel], argv: list[str] | None = None) -> int:
    """``python -m flows.<name> CONFIG [key=value ...]``: run the flow, print its result, exit non-zero on error."""
    from flows.report import print_result

    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in {"-h", "--help"}:
        print(f"usage: python -m {flow_fn.__module__} CONFIG.yaml [key=value ...]")
        return 0 if args else 2
    try:
        cfg = load_flow_config(model, args[0], args[1:])
        result = flow_fn(cfg)
    except NexusError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print_result(result)
    return 0
