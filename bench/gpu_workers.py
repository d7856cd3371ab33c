"""GPU worker and cost-ledger overheads, each next to a baseline.

    python -m bench.gpu_workers

1. Launch with capacity fallback: time for the worker to get a running machine when the first
   three (GPU type, region) candidates have no capacity, vs. a direct launch (baseline), against
   the loopback provider API (tests/infra/fake_clouds.py; machines come up on the first poll).
2. Orphan sweep: reaper time for N labelled machines vs. the bare list call it starts with.
3. `nexus costs`: grouping N ledger rows by flow/step/provider vs. reading them (baseline).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time

os.environ.setdefault("NEXUS_HOME", tempfile.mkdtemp(prefix="nexus-bench-"))
os.environ["PREFECT_LOGGING_LEVEL"] = "ERROR"

N_LAUNCH = 40
N_ORPHANS = 200
N_LEDGER = 20_000


def _worker_and_cfg(clouds, gpu_types, regions):
    from infra.workers import LambdaWorker
    from infra.workers.lambda_worker import LambdaJobConfiguration

    cfg = LambdaJobConfiguration(image="img", gpu_types=gpu_types, regions=regions, api_url=clouds.lambda_url,
                                 api_key_env="LAMBDA_API_KEY", poll_interval_s=0.001, launch_timeout_s=5)
    return LambdaWorker(work_pool_name="bench"), cfg


async def _launches(clouds, gpu_types, regions) -> list[float]:
    worker, cfg = _worker_and_cfg(clouds, gpu_types, regions)
    times = []
    for i in range(N_LAUNCH):
        cloud = worker.make_cloud(cfg)
        t0 = time.perf_counter()
        iid, _, _ = await worker.launch_with_fallback(cloud, cfg, f"run-{i}")
        times.append(time.perf_counter() - t0)
        await cloud.terminate(iid)
        await cloud.aclose()
    return times


async def _sweep(clouds) -> tuple[float, float]:
    """(list seconds, reap-decision seconds): the reaper without Prefect, deciding by run id."""
    from infra.providers.lambda_cloud import LambdaCloud

    cloud = LambdaCloud(clouds.api_key, clouds.lambda_url)
    t0 = time.perf_counter()
    await cloud.list()
    t_list = time.perf_counter() - t0
    t0 = time.perf_counter()
    for inst in await cloud.list():
        if inst.flow_run_id and inst.phase != "ended":
            await cloud.terminate(inst.id)
    t_reap = time.perf_counter() - t0
    await cloud.aclose()
    return t_list, t_reap


def main() -> int:
    """Run the three measurements and print figures with their ratio to the baseline."""
    from tests.infra.fake_clouds import FakeClouds

    os.environ["LAMBDA_API_KEY"] = "bench-key"
    with FakeClouds(api_key="bench-key") as clouds:
        clouds.boot_after = 0
        clouds.lambda_capacity = {("gpu_1x_a100_sxm4", "us-west-1")}
        direct = asyncio.run(_launches(clouds, ["gpu_1x_a100_sxm4"], ["us-west-1"]))
        fallback = asyncio.run(_launches(clouds, ["gpu_1x_h100_pcie", "gpu_1x_a100_sxm4"],
                                         ["us-east-1", "us-west-1"]))
        for i in range(N_ORPHANS):
            clouds.add_instance(f"nexus-{i:08d}")
        t_list, t_reap = asyncio.run(_sweep(clouds))
        assert not clouds.live()

    from nexus_core import catalog
    from nexus_core.costs import cost_report

    rows = [catalog.CostRow(flow_name=f"flow{i % 5}", step=f"step{i % 40}", provider=("lambda", "openai")[i % 2],
                            kind=("gpu", "api")[i % 2], gpu_seconds=(i % 7) * 60.0, usd=0.01 * (i % 13))
            for i in range(N_LEDGER)]
    catalog.add(*rows)
    t0 = time.perf_counter()
    read = catalog.costs()
    t_read = time.perf_counter() - t0
    t0 = time.perf_counter()
    lines = cost_report(read)
    t_group = time.perf_counter() - t0
    t0 = time.perf_counter()
    cost_report()
    t_cli = time.perf_counter() - t0

    d, f = statistics.median(direct) * 1e3, statistics.median(fallback) * 1e3
    print(f"{'measure':<44} {'value':>12} {'baseline':>12} {'ratio':>7}")
    print(f"{'launch, 3 capacity misses then ok (ms, median)':<44} {f:>12.2f} {d:>12.2f} {f / d:>7.2f}")
    print(f"{f'orphan sweep of {N_ORPHANS} machines (ms) vs list':<44} {t_reap * 1e3:>12.1f} {t_list * 1e3:>12.1f} "
          f"{t_reap / t_list:>7.1f}")
    print(f"{f'cost report group {N_LEDGER} rows (ms) vs read':<44} {t_group * 1e3:>12.1f} {t_read * 1e3:>12.1f} "
          f"{t_group / t_read:>7.2f}")
    print(f"{'nexus costs end to end (read+group, ms)':<44} {t_cli * 1e3:>12.1f} {t_read * 1e3:>12.1f} "
          f"{t_cli / t_read:>7.2f}")
    print(f"report lines: {len(lines)}; launches per mode: {N_LAUNCH}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
