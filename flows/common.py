"""What every flow shares: MLflow flow runs, config loading, and the ``python -m flows.X`` entry point."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from prefect.runtime import flow_run
from pydantic import BaseModel

from nexus_core import lineage
from nexus_core.config import FlowConfig, config_dict, load_config
from nexus_core.errors import ConfigError
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
    recover_from_crashes()
    name = flow_run.get_flow_name() or "flow"
    register_budget(cfg)
    run_id = lineage.start_flow_run(name, flow_run.get_id(), config_dict(cfg),
                                    parent_prefect_flow_run_id=flow_run.get_parent_flow_run_id())
    try:
        yield run_id
    except BaseException:
        lineage.end_run(run_id, ok=False)
        raise
    lineage.end_run(run_id, ok=True)


def register_budget(cfg: BaseModel) -> None:
    """Record this flow run, the runs above it and its ``budget_usd`` in the catalog, so each step checks
    every budget above it against the spend of that budget's whole flow-run tree.

    The runs above come from Prefect (each flow run's parent task run), so a subflow started with
    ``run_deployment`` in another process finds its parent too; a parent that registered nothing in
    this catalog (not a Nexus flow, or another catalog) is registered here with the ``budget_usd``
    of its ``cfg`` parameter.
    """
    from nexus_core import costs

    run_id = flow_run.get_id()
    if not run_id:
        return
    parent = flow_run.get_parent_flow_run_id()
    ancestors: list[str] = []
    if parent:
        above = costs.flow_ancestors(parent)
        ancestors = [*above, parent] if above is not None else _register_ancestors(parent)
    budget = cfg.budget_usd if isinstance(cfg, FlowConfig) else None
    costs.register_flow_run(run_id, flow_name=flow_run.get_flow_name(), budget_usd=budget, ancestors=ancestors)


def _register_ancestors(parent: str) -> list[str]:
    """Walk the Prefect API from ``parent`` to the root run; register each unregistered run with the
    budget of its ``cfg`` parameter; the ids, root first."""
    from prefect.client.orchestration import get_client

    from nexus_core import costs

    chain: list[tuple[str, str | None, float | None]] = []
    with get_client(sync_client=True) as client:
        run_id: str | None = parent
        while run_id:
            run = client.read_flow_run(run_id)  # pyright: ignore[reportArgumentType]
            params = run.parameters.get("cfg")
            budget = params.get("budget_usd") if isinstance(params, dict) else None
            name = client.read_flow(run.flow_id).name
            chain.append((run_id, name, float(budget) if isinstance(budget, int | float) else None))
            run_id = str(client.read_task_run(run.parent_task_run_id).flow_run_id) if run.parent_task_run_id else None
    ids = [run_id for run_id, _, _ in reversed(chain)]
    for i, (run_id, name, budget) in enumerate(reversed(chain)):
        costs.register_flow_run(run_id, flow_name=name, budget_usd=budget, ancestors=ids[:i], only_if_missing=True)
    return ids


_recovered: set[str] = set()  # NEXUS_HOME values this process has already swept


def recover_from_crashes() -> None:
    """Clean up after runs that were killed, once per process and home (every flow start calls it):

    - MLflow runs left RUNNING by a dead process on this host are marked KILLED, and the Prefect flow
      runs they belong to are set to Crashed (a killed process could not report either);
    - staging directories of dead processes are deleted;
    - the catalog gets a row for every published artifact that lacks one (a kill between publishing
      an artifact and recording it).
    """
    from nexus_core import catalog
    from nexus_core.artifacts import remove_stale_staging
    from nexus_core.settings import nexus_home

    home = str(nexus_home())
    if home in _recovered:
        return
    _recovered.add(home)
    reaped = lineage.reap_crashed_runs()
    flow_runs = {r["prefect_flow_run_id"] for r in reaped if r["kind"] == "flow" and r["prefect_flow_run_id"]}
    if flow_runs:
        _mark_crashed(flow_runs)
    remove_stale_staging()
    catalog.repair()


def _mark_crashed(flow_run_ids: set[str]) -> None:
    """Set still-running Prefect flow runs to Crashed (their process is gone)."""
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    with get_client(sync_client=True) as client:
        for run_id in flow_run_ids:
            try:
                run = client.read_flow_run(run_id)
            except Exception:  # noqa: BLE001 - a run from another Prefect API (another home): nothing to mark
                continue
            if run.state is not None and not run.state.is_final():
                client.set_flow_run_state(run_id, Crashed(message="its process was killed (found at the next start)"),
                                          force=True)


def load_flow_config(model: type[C], path: str | None, overrides: list[str] | tuple[str, ...] = ()) -> C:
    """Load a flow's YAML config (with extends) plus ``key=value`` overrides into its model.

    The config becomes the flow run's parameters, which the Prefect API stores only up to
    ``server.api.max_parameter_size`` bytes: a bigger one is a ConfigError naming its biggest key,
    raised before Prefect is called (Prefect would answer with a 422 traceback).
    """
    cfg = load_config(path, model, overrides)
    check_parameter_size(cfg, str(path) if path else "command line")
    return cfg


def _largest_value(value: Any, where: str = "") -> tuple[int, str]:
    """(JSON size, dotted key) of the biggest leaf value under ``value``."""
    if isinstance(value, dict) and value:
        return max(_largest_value(v, f"{where}.{k}" if where else str(k)) for k, v in value.items())
    if isinstance(value, list) and value:
        return max(_largest_value(v, f"{where}[{i}]") for i, v in enumerate(value))
    return len(json.dumps(value, separators=(",", ":")).encode()), where or "(top level)"


def check_parameter_size(cfg: BaseModel, source: str = "config") -> None:
    """Raise ConfigError when ``cfg`` as flow parameters exceeds Prefect's parameter size limit."""
    from prefect.settings import get_current_settings

    limit = get_current_settings().server.api.max_parameter_size
    if not limit:
        return
    data = cfg.model_dump(mode="json")
    size = len(json.dumps({"cfg": data}, separators=(",", ":")).encode())
    if size <= limit:
        return
    biggest, key = _largest_value(data)
    raise ConfigError([f"{key}: {biggest:,} bytes as JSON; a flow's whole config must stay under {limit:,} bytes "
                       f"(Prefect's server.api.max_parameter_size; this one is {size:,}): put large values in a "
                       f"file the config names"], source)


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
