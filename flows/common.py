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
from nexus_core.settings import configure_environment

C = TypeVar("C", bound=BaseModel)


@contextmanager
def flow_lineage(cfg: BaseModel) -> Iterator[str]:
    """Open the MLflow run of this flow run (its steps nest under it); marks it failed on error.

    Every flow opens this first, so it also sets Nexus's environment defaults (MLflow store, litellm's
    offline price map, ...) for the steps: a deployment run imports the flow module under a Prefect
    worker, which no Nexus entry point has prepared.
    """
    configure_environment()
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


def prepare_process() -> None:
    """First thing an entry point does: set Nexus's environment (:func:`configure_environment`).

    ``python -m flows.X`` has imported Prefect before this runs, and Prefect reads its settings
    (``PREFECT_HOME``, ...) at import, so they are reloaded here to pick up Nexus's defaults.
    """
    configure_environment()
    if "prefect.context" in sys.modules:
        from prefect.context import refresh_global_settings_context

        refresh_global_settings_context()


def main(flow_fn: Callable[[Any], Any], model: type[BaseModel], argv: list[str] | None = None) -> int:
    """``python -m flows.<name> CONFIG [key=value ...] [--debug]``: run the flow and print its result.

    A failure prints one ``error:`` line and exits non-zero; ``--debug`` adds the traceback.
    """
    from flows.report import print_result, quiet_console_tracebacks, report_failure

    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    if not args or args[0] in {"-h", "--help"}:
        print(f"usage: python -m {flow_fn.__module__} CONFIG.yaml [key=value ...] [--debug]")
        return 0 if args else 2
    prepare_process()
    if not debug:
        quiet_console_tracebacks()
    try:
        cfg = load_flow_config(model, args[0], args[1:])
        result = flow_fn(cfg)
    except (Exception, KeyboardInterrupt) as exc:
        return report_failure(exc, debug)
    print_result(result)
    return 0
