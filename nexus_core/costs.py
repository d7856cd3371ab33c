"""Costs: GPU prices, per-step GPU and API cost, flow budgets, and the ledger report.

- Prices come from ``infra/prices.yaml`` (``NEXUS_PRICES`` overrides the path): one row per
  provider and GPU (or instance type) with ``usd_per_hour`` and the ``date`` the price was read.
  For a provider/GPU listed more than once, the newest row dated on or before the day asked wins.
- ``gpu_cost`` = hours × price × units; ``api_cost`` asks litellm's local price map.
- The ledger is :class:`nexus_core.catalog.CostRow` (written by ``run_step`` from each step's
  :class:`~nexus_core.runner.Cost`, and by the GPU workers for instance time).
- A step that runs on a paid GPU machine (the GPU workers set ``NEXUS_PROVIDER``, ``NEXUS_GPU_TYPE``
  and ``NEXUS_GPU_COUNT`` there: :func:`machine`) is charged its wall time × the machine's price.
- Budgets bind over flow-run trees: every flow registers its run, the runs enclosing it and its
  ``budget_usd`` in the catalog (:func:`register_flow_run`), so the spend of a run is its ledger rows
  plus those of every subflow, in-process or started with ``run_deployment`` on another machine
  (when ``NEXUS_CATALOG_URL`` points every machine at one catalog). Before a step starts,
  :func:`check_flow_budgets` checks every budget above it (its own flow's, its parent's, ... the
  root's) against that spend plus the step's estimate (:func:`estimate_step_usd`: what the same step
  cost the last time it ran) and raises :class:`BudgetExceededError`, so nothing is started that a
  budget does not allow. A running step can still overrun by its own spend (in-step caps such as
  ``teacher.max_cost_usd`` bound that); steps running at the same time are each checked alone.
- ``cost_report`` groups the ledger by flow, step and provider (``nexus costs`` prints it).
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterable, Sequence
from functools import cache
from pathlib import Path

import yaml
from pydantic import Field, ValidationError

from nexus_core.config import NexusModel
from nexus_core.errors import ConfigError, StepError


class Cost(NexusModel):
    """What one step execution spent (a step result's ``cost``; the runner writes it to the ledger)."""

    usd: float = Field(default=0.0, description="Dollars spent")
    tokens_in: int = Field(default=0, description="API prompt tokens")
    tokens_out: int = Field(default=0, description="API completion tokens")
    gpu_seconds: float = Field(default=0.0, description="GPU time, seconds × GPUs")
    provider: str = Field(default="local", description="Who was paid: openai, lambda, runpod, local, ...")
    model: str | None = Field(default=None, description="API model or GPU type")


REPO = Path(__file__).resolve().parent.parent
DEFAULT_PRICES = REPO / "infra" / "prices.yaml"
GROUP_KEYS = ("flow_name", "flow_run_id", "step", "provider", "kind", "model")


class Price(NexusModel):
    """One row of the price table."""

    provider: str = Field(description="Provider name as used in work pools and the ledger (lambda, runpod, ...)")
    gpu: str = Field(description="GPU type or instance type id exactly as the provider API names it")
    usd_per_hour: float = Field(ge=0, description="On-demand price in USD per hour for one unit")
    unit: str = Field(default="gpu", description="What one unit is: 'gpu' (price per GPU) or 'instance' (whole machine)")
    date: dt.date = Field(description="Day the price was read from the provider's pricing page")
    source: str | None = Field(default=None, description="Where the price was read (URL)")


class PriceTable(NexusModel):
    """The whole ``prices.yaml``."""

    currency: str = Field(default="USD", description="Currency of every price (only USD is supported)")
    prices: list[Price] = Field(description="Price rows")


class BudgetExceededError(StepError):
    """A step would take its flow run past the flow's budget; raised before the step runs."""


def prices_path() -> Path:
    """The price table in use: ``NEXUS_PRICES`` or ``infra/prices.yaml``."""
    return Path(os.environ.get("NEXUS_PRICES") or DEFAULT_PRICES)


@cache
def _load(path: str, mtime: float) -> PriceTable:
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError([f"cannot read price table: {exc}"], path) from None
    try:
        return PriceTable.model_validate(data)
    except ValidationError as exc:
        problems = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        raise ConfigError(problems, path) from None


def load_prices(path: str | Path | None = None) -> PriceTable:
    """Load and validate the price table (cached until the file changes)."""
    p = Path(path) if path else prices_path()
    if not p.is_file():
        raise ConfigError(["price table not found"], str(p))
    return _load(str(p), p.stat().st_mtime)


def price(provider: str, gpu: str, *, on: dt.date | None = None, table: PriceTable | None = None) -> Price:
    """The price row for ``provider``/``gpu`` valid on day ``on`` (default today)."""
    table = table or load_prices()
    on = on or dt.date.today()
    rows = [p for p in table.prices if p.provider == provider and p.gpu == gpu]
    if not rows:
        known = sorted(p.gpu for p in table.prices if p.provider == provider)
        hint = f"known for {provider}: {', '.join(known)}" if known else \
            f"known providers: {', '.join(sorted({p.provider for p in table.prices}))}"
        raise ConfigError([f"no price for provider={provider!r} gpu={gpu!r} ({hint})"], str(prices_path()))
    dated = [p for p in rows if p.date <= on]
    # A price newer than the day asked cannot apply; fall back to the oldest known one.
    return max(dated, key=lambda p: p.date) if dated else min(rows, key=lambda p: p.date)


def gpu_cost(provider: str, gpu: str, seconds: float, units: int = 1, *, on: dt.date | None = None,
             table: PriceTable | None = None) -> float:
    """USD for ``seconds`` of ``units`` GPUs (or instances, per the price row's unit)."""
    if seconds < 0 or units < 0:
        raise ValueError(f"seconds and units must be >= 0, got {seconds}, {units}")
    return round(seconds / 3600.0 * price(provider, gpu, on=on, table=table).usd_per_hour * units, 6)


def gpu_step_cost(provider: str, gpu: str, seconds: float, units: int = 1, **kw) -> Cost:  # noqa: ANN003
    """A step's :class:`Cost` for GPU time (``gpu_seconds`` counts GPU-seconds, i.e. × units)."""
    return Cost(usd=gpu_cost(provider, gpu, seconds, units, **kw), gpu_seconds=seconds * units,
                provider=provider, model=gpu)


def api_cost(model: str, tokens_in: int, tokens_out: int) -> float:
    """USD for one API call from litellm's local price map; 0.0 for models it does not price."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    try:
        p_in, p_out = litellm.cost_per_token(model=model, prompt_tokens=tokens_in, completion_tokens=tokens_out)
    except Exception:  # noqa: BLE001 - litellm raises plain Exception for unmapped models
        return 0.0
    return float(p_in + p_out)


def add_costs(*costs: Cost) -> Cost:
    """Sum several costs (e.g. GPU time plus judge API calls of one step) into one."""
    if not costs:
        return Cost()
    providers = {c.provider for c in costs if c.usd or c.gpu_seconds or c.tokens_in}
    models = {c.model for c in costs if c.model}
    return Cost(usd=round(sum(c.usd for c in costs), 6), tokens_in=sum(c.tokens_in for c in costs),
                tokens_out=sum(c.tokens_out for c in costs), gpu_seconds=sum(c.gpu_seconds for c in costs),
                provider=providers.pop() if len(providers) == 1 else ("mixed" if providers else "local"),
                model=models.pop() if len(models) == 1 else None)


def _usd(x: float) -> str:
    """Dollars for messages: cents when exact, else four decimals (small API spends)."""
    return f"${x:,.2f}" if abs(x - round(x, 2)) < 5e-7 else f"${x:,.4f}"


def _tree_runs(flow_run_id: str):  # noqa: ANN202 - a sqlalchemy select
    """Select of the flow-run ids in the tree under ``flow_run_id`` (itself included)."""
    from sqlmodel import col, or_, select

    from nexus_core import catalog

    below = select(catalog.FlowRunRow.flow_run_id).where(col(catalog.FlowRunRow.ancestors).contains(flow_run_id))
    return or_(catalog.CostRow.flow_run_id == flow_run_id, col(catalog.CostRow.flow_run_id).in_(below))


def spent(flow_run_id: str | None = None, flow_name: str | None = None, *, subflows: bool = True) -> float:
    """USD already in the ledger for one flow run and (``subflows``) every run under it, or for every
    run of one flow."""
    from sqlalchemy import func
    from sqlmodel import Session, select

    from nexus_core import catalog

    with Session(catalog.engine()) as session:
        query = select(func.coalesce(func.sum(catalog.CostRow.usd), 0.0))
        if flow_run_id:
            query = query.where(_tree_runs(flow_run_id) if subflows else catalog.CostRow.flow_run_id == flow_run_id)
        if flow_name:
            query = query.where(catalog.CostRow.flow_name == flow_name)
        return float(session.exec(query).one())


def check_budget(budget_usd: float | None, *, estimate_usd: float, step: str,
                 flow_run_id: str | None = None, flow_name: str | None = None, basis: str = "") -> float:
    """Raise BudgetExceededError if ``spent + estimate`` would pass ``budget_usd``; return what is left.

    ``budget_usd=None`` means no limit. The spend of a flow run includes its subflows'. Call it before
    a step starts: GPU steps estimate with :func:`gpu_cost` of their expected seconds, API steps with
    tokens × price, or use :func:`estimate_step_usd`; ``basis`` says where the estimate came from.
    """
    if budget_usd is None:
        return float("inf")
    already = spent(flow_run_id=flow_run_id, flow_name=None if flow_run_id else flow_name)
    left = budget_usd - already
    if estimate_usd > left + 1e-9 or left <= 0:
        who = f"flow run {flow_run_id}" + (f" ({flow_name})" if flow_name else "") if flow_run_id else \
            f"flow {flow_name or '(unnamed)'}"
        raise BudgetExceededError(
            f"{who}: step {step} is estimated at {_usd(estimate_usd)}{f' ({basis})' if basis else ''} but only "
            f"{_usd(max(left, 0))} of the {_usd(budget_usd)} budget is left ({_usd(already)} spent by the run"
            f"{' and its subflows' if flow_run_id else 's'}); the step was not started. "
            "Raise budget_usd or lower the step's size.")
    return left - estimate_usd


# ---------------------------------------------------------------- budgets over flow-run trees


def register_flow_run(flow_run_id: str, *, flow_name: str | None = None, budget_usd: float | None = None,
                      ancestors: Sequence[str] = (), only_if_missing: bool = False) -> None:
    """Record a flow run, the runs enclosing it (``ancestors``, root first) and its budget in the catalog.

    A run registered again (a resumed or retried run) is updated; ``only_if_missing`` leaves an
    existing row alone (an ancestor registered on its behalf by a subflow).
    """
    from sqlalchemy.exc import IntegrityError
    from sqlmodel import Session, select

    from nexus_core import catalog

    ancestors = [a for a in ancestors if a and a != flow_run_id]
    with Session(catalog.engine()) as session:
        row = session.exec(select(catalog.FlowRunRow).where(catalog.FlowRunRow.flow_run_id == flow_run_id)).first()
        if row is not None and only_if_missing:
            return
        row = row or catalog.FlowRunRow(flow_run_id=flow_run_id, root_flow_run_id=flow_run_id)
        row.flow_name = flow_name or row.flow_name
        row.budget_usd = budget_usd
        row.ancestors = " ".join(ancestors)
        row.parent_flow_run_id = ancestors[-1] if ancestors else None
        row.root_flow_run_id = ancestors[0] if ancestors else flow_run_id
        session.add(row)
        try:
            session.commit()
        except IntegrityError:  # registered by another process a moment ago
            session.rollback()
            if not only_if_missing:
                raise


def flow_ancestors(flow_run_id: str) -> list[str] | None:
    """Ids of the runs enclosing a registered flow run, root first; None when it is not registered."""
    from sqlmodel import Session, select

    from nexus_core import catalog

    with Session(catalog.engine()) as session:
        row = session.exec(select(catalog.FlowRunRow).where(catalog.FlowRunRow.flow_run_id == flow_run_id)).first()
    return None if row is None else row.ancestors.split()


def flow_budget(flow_run_id: str | None) -> float | None:
    """The budget registered for a flow run itself, or None (no limit of its own)."""
    chain = [row for row in budget_chain(flow_run_id) if row.flow_run_id == flow_run_id] if flow_run_id else []
    return chain[0].budget_usd if chain else None


def budget_chain(flow_run_id: str | None) -> list:  # list[catalog.FlowRunRow]
    """The registered runs at and above ``flow_run_id`` that have a budget, nearest first."""
    from sqlmodel import Session, col, select

    from nexus_core import catalog

    if not flow_run_id:
        return []
    with Session(catalog.engine()) as session:
        row = session.exec(select(catalog.FlowRunRow).where(catalog.FlowRunRow.flow_run_id == flow_run_id)).first()
        if row is None:
            return []
        ids = [flow_run_id, *reversed(row.ancestors.split())]
        rows = {r.flow_run_id: r for r in session.exec(select(catalog.FlowRunRow).where(
            col(catalog.FlowRunRow.flow_run_id).in_(ids), col(catalog.FlowRunRow.budget_usd).is_not(None)))}
    return [rows[i] for i in ids if i in rows]


def check_flow_budgets(flow_run_id: str | None, *, estimate_usd: float, step: str, basis: str = "") -> float:
    """Check every budget at and above a flow run (its own, its parent's, ... the root's), each against
    the spend of its whole tree plus ``estimate_usd``; raise BudgetExceededError naming the first that
    would be passed. Returns the least that is left (inf without any budget)."""
    left = float("inf")
    for row in budget_chain(flow_run_id):
        left = min(left, check_budget(row.budget_usd, estimate_usd=estimate_usd, step=step,
                                      flow_run_id=row.flow_run_id, flow_name=row.flow_name, basis=basis))
    return left


def estimate_step_usd(step: str, config_hash: str | None = None,
                      on: Machine | None = None) -> tuple[float, str]:
    """What the next execution of ``step`` is expected to cost, and the basis, from the ledger:

    - API spend: what the step's last execution paid (its newest ``api`` ledger row);
    - GPU time: on a priced machine ``on``, the step's last run time (the newest completed run with
      the same config hash, else any) × this machine's price; elsewhere its newest ``gpu`` row.

    A step never run before is estimated at 0 (it can still be stopped by a budget already spent).
    """
    from sqlmodel import Session, col, select

    from nexus_core import catalog

    with Session(catalog.engine()) as session:
        def newest(kind: str) -> float:
            row = session.exec(select(catalog.CostRow).where(catalog.CostRow.step == step, catalog.CostRow.kind == kind)
                               .order_by(col(catalog.CostRow.id).desc())).first()
            return row.usd if row else 0.0

        api = newest("api")
        gpu = 0.0
        if on is not None:
            runs = list(session.exec(select(catalog.StepRunRow).where(
                catalog.StepRunRow.step == step, catalog.StepRunRow.status == "completed")
                .order_by(col(catalog.StepRunRow.id).desc()).limit(50)))
            same = [r for r in runs if config_hash and r.config_hash == config_hash]
            last = (same or runs or [None])[0]
            gpu = on.cost(last.seconds).usd if last is not None else 0.0
        else:
            gpu = newest("gpu")
    total = round(api + gpu, 6)
    return total, ("its last run" if total else "")


# ---------------------------------------------------------------- the machine a step runs on


class Machine(NexusModel):
    """The paid GPU machine this process runs on, from the environment the GPU workers set."""

    provider: str = Field(description="Provider as in prices.yaml (lambda, runpod, coreweave, local)")
    gpu: str = Field(description="GPU or instance type as in prices.yaml")
    gpus: int = Field(default=1, ge=1, description="GPUs on the machine(s), all nodes together")
    nodes: int = Field(default=1, ge=1, description="Machines (nodes) of the run")

    def cost(self, seconds: float, *, on: dt.date | None = None, table: PriceTable | None = None) -> Cost:
        """What ``seconds`` of wall time on this machine cost (kind gpu): an ``instance`` price counts
        whole machines (× nodes), a ``gpu`` price counts GPUs."""
        row = price(self.provider, self.gpu, on=on, table=table)
        units = self.nodes if row.unit == "instance" else self.gpus
        return Cost(usd=round(seconds / 3600.0 * row.usd_per_hour * units, 6), gpu_seconds=seconds * self.gpus,
                    provider=self.provider, model=self.gpu)


def machine() -> Machine | None:
    """The priced machine this process runs on: ``NEXUS_PROVIDER`` and ``NEXUS_GPU_TYPE`` (set by the
    Lambda/RunPod workers and the CoreWeave job template), ``NEXUS_GPU_COUNT`` (or
    ``NEXUS_GPUS_PER_NODE``) GPUs per node, ``NEXUS_NNODES`` nodes. None when not on one."""
    provider, gpu = os.environ.get("NEXUS_PROVIDER", "").strip(), os.environ.get("NEXUS_GPU_TYPE", "").strip()
    if not provider or not gpu:
        return None
    try:
        per_node = int(os.environ.get("NEXUS_GPU_COUNT") or os.environ.get("NEXUS_GPUS_PER_NODE") or 1)
        nodes = int(os.environ.get("NEXUS_NNODES") or 1)
    except ValueError as exc:
        raise ConfigError([f"NEXUS_GPU_COUNT / NEXUS_GPUS_PER_NODE / NEXUS_NNODES: not a number ({exc})"],
                          "environment") from None
    return Machine(provider=provider, gpu=gpu, gpus=max(per_node, 1) * max(nodes, 1), nodes=max(nodes, 1))


def step_gpu_usd(flow_run_id: str, provider: str | None = None) -> float:
    """USD of GPU time the runner already charged to steps of a flow run and its subflows (optionally
    of one provider). A worker that records a machine's whole time subtracts this, so the machine's
    own row holds only the time no step used (start-up, image pull, idle) and nothing is counted twice."""
    from sqlalchemy import func
    from sqlmodel import Session, col, select

    from nexus_core import catalog

    with Session(catalog.engine()) as session:
        query = select(func.coalesce(func.sum(catalog.CostRow.usd), 0.0)).where(
            _tree_runs(flow_run_id), catalog.CostRow.kind == "gpu", col(catalog.CostRow.step).not_like("infra.%"))
        if provider:
            query = query.where(catalog.CostRow.provider == provider)
        return float(session.exec(query).one())


def cost_report(rows: Iterable | None = None, by: Sequence[str] = ("flow_name", "step", "provider"), *,
                flow_name: str | None = None, flow_run_id: str | None = None,
                since: dt.datetime | None = None) -> list[dict]:
    """Ledger rows grouped by ``by`` with usd, GPU hours, tokens and count, most expensive first."""
    from nexus_core import catalog

    bad = [k for k in by if k not in GROUP_KEYS]
    if bad:
        raise ConfigError([f"by: unknown key {k!r} (use {', '.join(GROUP_KEYS)})" for k in bad], "nexus costs")
    rows = catalog.costs() if rows is None else list(rows)
    groups: dict[tuple, dict] = {}
    for r in rows:
        if (flow_name and r.flow_name != flow_name) or (flow_run_id and r.flow_run_id != flow_run_id):
            continue
        if since and r.created_at and r.created_at.replace(tzinfo=since.tzinfo) < since:
            continue
        key = tuple(getattr(r, k) or "-" for k in by)
        g = groups.setdefault(key, {**dict(zip(by, key, strict=True)), "usd": 0.0, "gpu_hours": 0.0,
                                    "tokens_in": 0, "tokens_out": 0, "entries": 0})
        g["usd"] += r.usd
        g["gpu_hours"] += r.gpu_seconds / 3600.0
        g["tokens_in"] += r.tokens_in
        g["tokens_out"] += r.tokens_out
        g["entries"] += 1
    return sorted(groups.values(), key=lambda g: (-g["usd"], tuple(str(g[k]) for k in by)))


def format_report(lines: list[dict], by: Sequence[str] = ("flow_name", "step", "provider")) -> str:
    """A plain-text table of :func:`cost_report` lines with a total row."""
    if not lines:
        return "no costs recorded yet"
    widths = {k: max(len(k), *(len(str(line[k])) for line in lines)) for k in by}
    head = "  ".join(f"{k:<{widths[k]}}" for k in by) + f"  {'usd':>10}  {'gpu_h':>8}  {'tok_in':>9}  {'tok_out':>9}  n"
    out = [head, "-" * len(head)]
    for line in lines:
        keys = "  ".join(f"{str(line[k]):<{widths[k]}}" for k in by)
        out.append(f"{keys}  {line['usd']:>10.4f}  {line['gpu_hours']:>8.3f}  {line['tokens_in']:>9}  "
                   f"{line['tokens_out']:>9}  {line['entries']}")
    total = sum(line["usd"] for line in lines)
    gpu_h = sum(line["gpu_hours"] for line in lines)
    out.append("-" * len(head))
    pad = sum(widths.values()) + 2 * (len(by) - 1)
    out.append(f"{'total':<{pad}}  {total:>10.4f}  {gpu_h:>8.3f}")
    return "\n".join(out)
