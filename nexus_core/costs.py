"""Costs: GPU prices, per-step GPU and API cost, flow budgets, and the ledger report.

- Prices come from ``infra/prices.yaml`` (``NEXUS_PRICES`` overrides the path): one row per
  provider and GPU (or instance type) with ``usd_per_hour`` and the ``date`` the price was read.
  For a provider/GPU listed more than once, the newest row dated on or before the day asked wins.
- ``gpu_cost`` = hours × price × units; ``api_cost`` asks litellm's local price map.
- The ledger is :class:`nexus_core.catalog.CostRow` (written by ``run_step`` from each step's
  :class:`~nexus_core.runner.Cost`, and by the GPU workers for instance time).
- ``check_budget`` raises :class:`BudgetExceededError` BEFORE a step whose estimate would take a
  flow run past its budget, so nothing is spent that the budget does not allow.
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


_flow_budgets: dict[str, float] = {}  # prefect flow run id -> budget in USD, set by the flow


def set_flow_budget(flow_run_id: str | None, budget_usd: float | None) -> None:
    """Record a flow run's budget; every step of that run checks it before starting."""
    if flow_run_id and budget_usd is not None:
        _flow_budgets[flow_run_id] = budget_usd


def flow_budget(flow_run_id: str | None) -> float | None:
    """The budget recorded for a flow run, or None (no limit)."""
    return _flow_budgets.get(flow_run_id) if flow_run_id else None


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


def spent(flow_run_id: str | None = None, flow_name: str | None = None) -> float:
    """USD already in the ledger for one flow run (or every run of one flow)."""
    from sqlalchemy import func
    from sqlmodel import Session, select

    from nexus_core import catalog

    with Session(catalog.engine()) as session:
        query = select(func.coalesce(func.sum(catalog.CostRow.usd), 0.0))
        if flow_run_id:
            query = query.where(catalog.CostRow.flow_run_id == flow_run_id)
        if flow_name:
            query = query.where(catalog.CostRow.flow_name == flow_name)
        return float(session.exec(query).one())


def check_budget(budget_usd: float | None, *, estimate_usd: float, step: str,
                 flow_run_id: str | None = None, flow_name: str | None = None) -> float:
    """Raise BudgetExceededError if ``spent + estimate`` would pass ``budget_usd``; return what is left.

    ``budget_usd=None`` means no limit. Call it before a step starts: GPU steps estimate with
    :func:`gpu_cost` of their expected seconds, API steps with tokens × price.
    """
    if budget_usd is None:
        return float("inf")
    already = spent(flow_run_id=flow_run_id, flow_name=None if flow_run_id else flow_name)
    left = budget_usd - already
    if estimate_usd > left + 1e-9 or left <= 0:
        who = f"flow run {flow_run_id}" if flow_run_id else f"flow {flow_name or '(unnamed)'}"
        raise BudgetExceededError(
            f"{who}: step {step} is estimated at ${estimate_usd:.2f} but only ${max(left, 0):.2f} of the "
            f"${budget_usd:.2f} budget is left (${already:.2f} spent); the step was not started. "
            "Raise budget_usd or lower the step's size.")
    return left - estimate_usd


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
