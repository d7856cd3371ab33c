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


# ---------------------------------------------------------------- budgets over flow-run trees, GPU time per step


class PaidStepConfig(NexusModel):
    """Config of a fake step that pays an API bill and takes some wall time."""

    usd: float = Field(default=0.0, description="API dollars the step reports")
    sleep_s: float = Field(default=0.0, description="Wall time the step takes")
    tag: str = Field(default="", description="Changes the config (so the step is not reused)")


class PaidStepResult(StepResult):
    """Result of the fake paid step."""


@step(area="train")
def run_paid_step(cfg: PaidStepConfig, *, inputs, out_uri: str, ctx: StepContext) -> PaidStepResult:
    """Sleeps, writes one file, reports an API cost."""
    import time

    time.sleep(cfg.sleep_s)
    (Path(out_uri) / "note.txt").write_text(cfg.tag)
    return PaidStepResult(cost=Cost(usd=cfg.usd, tokens_in=10, tokens_out=5, provider="openai", model="gpt-x"))


@step(area="train")
def run_estimated_step(cfg: PaidStepConfig, *, inputs, out_uri: str, ctx: StepContext) -> PaidStepResult:
    """Same as run_paid_step under another step name (its own ledger history)."""
    (Path(out_uri) / "note.txt").write_text(cfg.tag)
    return PaidStepResult(cost=Cost(usd=cfg.usd, provider="openai", model="gpt-x"))


@pytest.fixture
def price_table(tmp_path, monkeypatch):
    """A price table where one runpod A100 costs $1 per second and a lambda instance $7200/h."""
    path = tmp_path / "prices.yaml"
    path.write_text("prices:\n"
                    "  - {provider: runpod, gpu: NVIDIA A100 80GB PCIe, usd_per_hour: 3600, date: 2020-01-01}\n"
                    "  - {provider: lambda, gpu: gpu_8x_h100_sxm5, usd_per_hour: 7200, unit: instance, "
                    "date: 2020-01-01}\n")
    monkeypatch.setenv("NEXUS_PRICES", str(path))
    return path


def test_machine_from_the_env_the_gpu_workers_set(monkeypatch, price_table):
    for var in ("NEXUS_PROVIDER", "NEXUS_GPU_TYPE", "NEXUS_GPU_COUNT", "NEXUS_GPUS_PER_NODE", "NEXUS_NNODES"):
        monkeypatch.delenv(var, raising=False)
    assert costs.machine() is None
    monkeypatch.setenv("NEXUS_PROVIDER", "lambda")
    monkeypatch.setenv("NEXUS_GPU_TYPE", "gpu_8x_h100_sxm5")
    monkeypatch.setenv("NEXUS_GPU_COUNT", "8")
    m = costs.machine()
    assert m is not None and (m.provider, m.gpu, m.gpus, m.nodes) == ("lambda", "gpu_8x_h100_sxm5", 8, 1)
    c = m.cost(1.0)  # an instance price counts the machine once, GPU-seconds count every GPU
    assert c.usd == pytest.approx(2.0) and c.gpu_seconds == 8.0 and c.provider == "lambda"
    # CoreWeave's template: GPUs per node × nodes, priced per GPU
    monkeypatch.setenv("NEXUS_PROVIDER", "runpod")
    monkeypatch.setenv("NEXUS_GPU_TYPE", "NVIDIA A100 80GB PCIe")
    monkeypatch.delenv("NEXUS_GPU_COUNT")
    monkeypatch.setenv("NEXUS_GPUS_PER_NODE", "4")
    monkeypatch.setenv("NEXUS_NNODES", "2")
    m = costs.machine()
    assert m is not None and m.gpus == 8 and m.cost(0.5).usd == pytest.approx(4.0)


def test_gpu_seconds_are_priced_per_step_into_ledger_and_manifest(monkeypatch, price_table, data_root):
    """On a machine a GPU worker started (its env set here, on CPU), a step's wall time × the machine's
    price is the step's GPU cost: its own ledger row (kind gpu) next to its API row, and in the manifest."""
    from nexus_core.artifacts import read_manifest
    from nexus_core.runner import RunContext

    monkeypatch.setenv("NEXUS_PROVIDER", "runpod")
    monkeypatch.setenv("NEXUS_GPU_TYPE", "NVIDIA A100 80GB PCIe")
    monkeypatch.setenv("NEXUS_GPU_COUNT", "2")
    run_id = str(uuid.uuid4())
    res = run_step(run_paid_step, PaidStepConfig(usd=0.25, sleep_s=0.3, tag=run_id), name="gpu_priced",
                   context=RunContext(flow_name="llm_train", flow_run_id=run_id))
    rows = {r.kind: r for r in catalog.costs() if r.flow_run_id == run_id}
    assert set(rows) == {"api", "gpu"}
    gpu = rows["gpu"]
    assert (gpu.provider, gpu.model) == ("runpod", "NVIDIA A100 80GB PCIe")
    wall = gpu.gpu_seconds / 2
    assert 0.3 <= wall < 30 and gpu.usd == pytest.approx(wall * 2 * 1.0, rel=1e-3)  # 2 GPUs at $1/s each
    assert rows["api"].usd == 0.25 and rows["api"].provider == "openai"
    step_run = next(r for r in catalog.step_runs(run_id) if r.status == "completed")
    assert step_run.seconds >= wall
    manifest = read_manifest(res.ref.uri)
    assert manifest.cost["usd"] == pytest.approx(0.25 + gpu.usd) and manifest.cost["gpu_seconds"] == gpu.gpu_seconds
    assert res.cost.usd == pytest.approx(manifest.cost["usd"])
    # what a worker's machine row must leave out so the machine's time is not counted twice
    assert costs.step_gpu_usd(run_id, "runpod") == pytest.approx(gpu.usd)
    # and the worker's own row for the machine (10 s up, 2 GPUs) holds only the time no step charged
    import logging
    import types

    from infra.workers.runpod_worker import RunPodWorker

    cfg = RunPodWorker.job_configuration.model_validate({
        "image": "nexus-gpu:test", "gpu_types": ["NVIDIA A100 80GB PCIe"], "gpu_count": 2, "api_key_env": "X"})
    RunPodWorker(work_pool_name="p")._record_cost(types.SimpleNamespace(id=run_id), "NVIDIA A100 80GB PCIe", cfg,
                                                  10.0, logging.getLogger("test"))
    machine_row = next(r for r in catalog.costs() if r.flow_run_id == run_id and r.step == "infra.runpod.machine")
    assert machine_row.usd == pytest.approx(20.0 - gpu.usd, rel=1e-3)
    assert machine_row.gpu_seconds == pytest.approx(20.0 - gpu.gpu_seconds, rel=1e-3)
    assert sum(r.usd for r in catalog.costs() if r.flow_run_id == run_id and r.kind == "gpu") == pytest.approx(20.0)
    # the next run of the step is estimated from this one: its whole last run time (publishing included)
    # × this machine's price, plus its API bill
    estimate, basis = costs.estimate_step_usd("tests.infra.test_costs.run_paid_step", on=costs.machine())
    assert estimate == pytest.approx(0.25 + step_run.seconds * 2 * 1.0, rel=1e-3) and basis == "its last run"


def test_a_step_whose_estimate_would_pass_the_budget_does_not_start(data_root):
    """The estimate is the step's last run: three $0.30 runs fit a $1.00 budget, the fourth does not
    start (only $0.10 left), and nothing of it is written."""
    from nexus_core.runner import RunContext

    run_id = str(uuid.uuid4())
    costs.register_flow_run(run_id, flow_name="paid", budget_usd=1.0)
    ctx = RunContext(flow_name="paid", flow_run_id=run_id)
    for i in range(3):
        run_step(run_estimated_step, PaidStepConfig(usd=0.30, tag=f"{run_id}-{i}"), name="estimated", context=ctx)
    assert costs.spent(run_id) == pytest.approx(0.90)
    with pytest.raises(costs.BudgetExceededError) as err:
        run_step(run_estimated_step, PaidStepConfig(usd=0.30, tag=f"{run_id}-3"), name="estimated", context=ctx)
    msg = str(err.value)
    assert "estimated at $0.30 (its last run)" in msg and "$0.10 of the $1.00 budget" in msg and "$0.90 spent" in msg
    assert len([r for r in catalog.step_runs(run_id) if r.status == "completed"]) == 3
    assert costs.spent(run_id) == pytest.approx(0.90)


def test_every_budget_above_a_step_binds_on_its_whole_tree():
    """root ($1.00) ─ child (no budget) ─ grandchild ($0.50): spend anywhere below a budget counts
    against it, and the nearest budget that would be passed is the one named."""
    root, child, grand, other = (str(uuid.uuid4()) for _ in range(4))
    costs.register_flow_run(root, flow_name="lifecycle", budget_usd=1.0)
    costs.register_flow_run(child, flow_name="distill", ancestors=[root])
    costs.register_flow_run(grand, flow_name="inner", budget_usd=0.5, ancestors=[root, child])
    costs.register_flow_run(other, flow_name="lifecycle", budget_usd=1.0)  # another tree: never counted
    catalog.add(catalog.CostRow(flow_run_id=child, step="collect", usd=0.70),
                catalog.CostRow(flow_run_id=other, step="collect", usd=5.0))
    assert costs.spent(root) == pytest.approx(0.70) and costs.spent(child) == pytest.approx(0.70)
    assert costs.spent(root, subflows=False) == 0.0
    assert [r.flow_run_id for r in costs.budget_chain(grand)] == [grand, root]
    assert costs.check_flow_budgets(grand, estimate_usd=0.2, step="s") == pytest.approx(0.10)
    with pytest.raises(costs.BudgetExceededError, match=rf"flow run {root} \(lifecycle\).*\$1\.00 budget.*\$0\.70 spent"):
        costs.check_flow_budgets(grand, estimate_usd=0.4, step="s")
    catalog.add(catalog.CostRow(flow_run_id=grand, step="judge", usd=0.45))
    with pytest.raises(costs.BudgetExceededError, match=rf"flow run {grand} \(inner\).*\$0\.50 budget"):
        costs.check_flow_budgets(grand, estimate_usd=0.1, step="s")
    # registering again (a resumed run) keeps one row; an ancestor registered on a run's behalf is left alone
    costs.register_flow_run(grand, flow_name="inner", budget_usd=0.6, ancestors=[root, child])
    costs.register_flow_run(grand, flow_name="x", budget_usd=9.0, only_if_missing=True)
    assert costs.flow_budget(grand) == 0.6 and costs.flow_ancestors(grand) == [root, child]
    assert costs.flow_ancestors(str(uuid.uuid4())) is None


@pytest.mark.parametrize("worker", ["lambda", "runpod"])
def test_gpu_workers_tell_the_machine_what_it_costs(worker, monkeypatch, price_table):
    """The env a GPU worker launches its machine with is what the runner prices steps from."""
    from infra.workers.lambda_worker import LambdaWorker
    from infra.workers.runpod_worker import RunPodWorker

    cls = {"lambda": LambdaWorker, "runpod": RunPodWorker}[worker]
    gpu = {"lambda": "gpu_8x_h100_sxm5", "runpod": "NVIDIA A100 80GB PCIe"}[worker]
    cfg = cls.job_configuration.model_validate({
        "image": "nexus-gpu:test", "gpu_types": [gpu], "gpu_count": 2, "api_key_env": "X_KEY", "command": "run",
        "env": {"NEXUS_DATA": "s3://bucket/data"}})
    spec = cls(work_pool_name="p").launch_spec(cfg, str(uuid.uuid4()), gpu, None)
    assert spec.env["NEXUS_DATA"] == "s3://bucket/data"
    for key, value in spec.env.items():
        monkeypatch.setenv(key, value)
    m = costs.machine()
    assert m is not None and (m.provider, m.gpu, m.gpus) == (worker, gpu, 2)
    assert m.cost(1.0).usd == pytest.approx(2.0)  # lambda: the instance's $2/s; runpod: 2 GPUs × $1/s
