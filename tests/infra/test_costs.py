"""Cost arithmetic on known inputs, the price table, budgets that stop a step, and `nexus costs`."""

from __future__ import annotations

import datetime as dt
import uuid
from pathlib import Path

import pytest
from pydantic import Field

from nexus_core import catalog, costs
from nexus_core.config import NexusModel, load_config
from nexus_core.context import StepContext
from nexus_core.contract import step
from nexus_core.errors import ConfigError
from nexus_core.runner import Cost, StepResult, run_step

REPO = Path(__file__).resolve().parents[2]
TABLE = costs.PriceTable.model_validate({"prices": [
    {"provider": "lambda", "gpu": "gpu_1x_h100_pcie", "usd_per_hour": 2.00, "unit": "instance", "date": "2025-01-01"},
    {"provider": "lambda", "gpu": "gpu_1x_h100_pcie", "usd_per_hour": 2.49, "unit": "instance", "date": "2026-06-01"},
    {"provider": "runpod", "gpu": "NVIDIA A100 80GB PCIe", "usd_per_hour": 1.64, "date": "2026-06-01"},
]})


def test_gpu_cost_arithmetic_and_dated_prices():
    on = dt.date(2026, 7, 1)
    assert costs.gpu_cost("lambda", "gpu_1x_h100_pcie", 1800, table=TABLE, on=on) == pytest.approx(1.245)
    # The price in force on an older day is the older row.
    assert costs.gpu_cost("lambda", "gpu_1x_h100_pcie", 3600, table=TABLE, on=dt.date(2025, 5, 1)) == 2.0
    # Per-GPU prices scale with the GPU count: 90 min × 4 × 1.64.
    assert costs.gpu_cost("runpod", "NVIDIA A100 80GB PCIe", 5400, 4, table=TABLE, on=on) == pytest.approx(9.84)
    c = costs.gpu_step_cost("runpod", "NVIDIA A100 80GB PCIe", 60, 2, table=TABLE, on=on)
    assert c.gpu_seconds == 120 and c.usd == pytest.approx(60 / 3600 * 1.64 * 2, abs=1e-6) and c.provider == "runpod"
    with pytest.raises(ValueError):
        costs.gpu_cost("lambda", "gpu_1x_h100_pcie", -1, table=TABLE)


def test_unknown_gpu_price_names_provider_and_known_types():
    with pytest.raises(ConfigError, match=r"gpu='gpu_9x_b900'.*known for lambda: gpu_1x_h100_pcie"):
        costs.price("lambda", "gpu_9x_b900", table=TABLE)


def test_add_costs_sums_gpu_and_api():
    total = costs.add_costs(Cost(usd=1.0, gpu_seconds=10, provider="lambda"),
                            Cost(usd=0.25, tokens_in=100, tokens_out=20, provider="openai", model="gpt-4o-mini"))
    assert (total.usd, total.gpu_seconds, total.tokens_in, total.provider) == (1.25, 10, 100, "mixed")


def test_api_cost_uses_litellm_price_map():
    assert costs.api_cost("gpt-4o-mini", 1_000_000, 0) > 0
    assert costs.api_cost("no-such-model-xyz", 1000, 1000) == 0.0


def test_repo_price_table_validates_and_prices_worker_defaults():
    from infra.workers.lambda_worker import LambdaVariables
    from infra.workers.runpod_worker import RunPodVariables

    table = costs.load_prices(REPO / "infra" / "prices.yaml")
    assert {p.provider for p in table.prices} >= {"lambda", "runpod", "coreweave"}
    for provider, variables in (("lambda", LambdaVariables), ("runpod", RunPodVariables)):
        for gpu in variables.model_fields["gpu_types"].default:
            assert costs.price(provider, gpu, table=table).usd_per_hour > 0


def test_bad_price_table_is_one_clear_error(tmp_path):
    bad = tmp_path / "prices.yaml"
    bad.write_text("prices:\n  - {provider: lambda, gpu: x, usd_per_hour: -1, date: 2026-01-01}\n"
                   "  - {provider: lambda, gpu: y, usd_per_hour: 1, date: someday}\n")
    with pytest.raises(ConfigError) as err:
        costs.load_prices(bad)
    assert "prices.0.usd_per_hour" in str(err.value) and "prices.1.date" in str(err.value)


class GpuStepConfig(NexusModel):
    """Config of a fake GPU step used to exercise the ledger."""

    seconds: float = Field(description="GPU seconds the step claims")


class GpuStepResult(StepResult):
    """Result of the fake GPU step."""


@step(area="train")
def run_gpu_step(cfg: GpuStepConfig, *, inputs, out_uri: str, ctx: StepContext) -> GpuStepResult:
    """Writes one file and reports GPU time priced from the table."""
    (Path(out_uri) / "note.txt").write_text("trained")
    return GpuStepResult(cost=costs.gpu_step_cost("lambda", "gpu_1x_h100_pcie", cfg.seconds, table=TABLE,
                                                  on=dt.date(2026, 7, 1)))


def test_budget_stops_a_step_before_it_runs(data_root):
    from nexus_core.runner import RunContext

    run_id = str(uuid.uuid4())
    ctx = RunContext(flow_name="llm_train", flow_run_id=run_id)
    budget = 2.0
    # First step: 3600 s on an h100 at 2.49/h would exceed 2.0 → stopped before it runs.
    estimate = costs.gpu_cost("lambda", "gpu_1x_h100_pcie", 3600, table=TABLE, on=dt.date(2026, 7, 1))
    with pytest.raises(costs.BudgetExceededError, match=r"step train.*\$2\.49.*\$2\.00 of the \$2\.00"):
        costs.check_budget(budget, estimate_usd=estimate, step="train", flow_run_id=run_id)
    # A smaller step fits, runs through the spine, and lands in the ledger.
    left = costs.check_budget(budget, estimate_usd=1.245, step="train", flow_run_id=run_id)
    assert left == pytest.approx(0.755)
    run_step(run_gpu_step, GpuStepConfig(seconds=1800), name="budgeted", context=ctx)
    assert costs.spent(flow_run_id=run_id) == pytest.approx(1.245)
    rows = [r for r in catalog.costs() if r.flow_run_id == run_id]
    assert len(rows) == 1 and rows[0].kind == "gpu" and rows[0].gpu_seconds == 1800
    # The next step of the same size no longer fits: refused before any work, nothing new recorded.
    with pytest.raises(costs.BudgetExceededError):
        costs.check_budget(budget, estimate_usd=1.245, step="train2", flow_run_id=run_id)
    assert costs.check_budget(None, estimate_usd=1e9, step="x", flow_run_id=run_id) == float("inf")


def test_report_groups_by_flow_step_provider_and_cli_prints_it(capsys):
    from flows.cli import main

    flow = f"report-{uuid.uuid4().hex[:6]}"
    catalog.add(
        catalog.CostRow(flow_name=flow, step="teacher", provider="openai", tokens_in=1000,
                        tokens_out=200, usd=0.50),
        catalog.CostRow(flow_name=flow, step="teacher", provider="openai", tokens_in=500,
                        tokens_out=100, usd=0.25),
        catalog.CostRow(flow_name=flow, step="sft", provider="lambda", gpu_seconds=7200, usd=4.98),
    )
    lines = costs.cost_report(flow_name=flow)
    assert [(line["step"], line["provider"]) for line in lines] == [("sft", "lambda"), ("teacher", "openai")]
    assert lines[0]["gpu_hours"] == 2.0 and lines[1]["usd"] == 0.75 and lines[1]["tokens_in"] == 1500
    by_provider = costs.cost_report(by=["provider"], flow_name=flow)
    assert {line["provider"]: line["entries"] for line in by_provider} == {"lambda": 1, "openai": 2}

    assert main(["costs", "--flow", flow]) == 0
    out = capsys.readouterr().out
    assert "sft" in out and "4.9800" in out and "total" in out and "5.7300" in out
    assert main(["costs", "--by", "flavour"]) == 1
    assert "unknown key 'flavour'" in capsys.readouterr().err


def test_every_infra_config_yaml_loads():
    """YAML added by this area: concurrency limits and the remote prefect file parse and validate."""
    from infra.concurrency import LimitsConfig

    cfg = load_config(REPO / "infra" / "concurrency.yaml", LimitsConfig)
    assert cfg.work_pools and cfg.tags


def test_concurrency_limits_are_applied(prefect_harness):
    import asyncio

    from prefect.client.orchestration import get_client

    from infra.concurrency import LimitsConfig, PoolLimit, apply_limits

    cfg = LimitsConfig(work_pools={"gpu-lambda-t": PoolLimit(type="nexus-lambda", limit=2),
                                   "gpu-cw-t": PoolLimit(type="kubernetes", limit=3,
                                                         base_job_template="infra/coreweave/base_job_template.json")},
                       tags={"teacher:openai": 8})

    async def read():
        async with get_client() as client:
            lam = await client.read_work_pool("gpu-lambda-t")
            cw = await client.read_work_pool("gpu-cw-t")
            tag = await client.read_concurrency_limit_by_tag("teacher:openai")
            return lam, cw, tag

    assert asyncio.run(apply_limits(cfg))["pool:gpu-lambda-t"] == 2
    cfg.work_pools["gpu-lambda-t"].limit = 1          # re-applying updates in place
    asyncio.run(apply_limits(cfg))
    lam, cw, tag = asyncio.run(read())
    assert (lam.type, lam.concurrency_limit) == ("nexus-lambda", 1)
    assert "gpu_types" in lam.base_job_template["variables"]["properties"]
    assert cw.concurrency_limit == 3 and "job_manifest" in cw.base_job_template["job_configuration"]
    assert tag.concurrency_limit == 8
