"""Set work-pool and tag concurrency limits from ``infra/concurrency.yaml`` on the Prefect API.

    python -m infra.concurrency [infra/concurrency.yaml]

Work-pool limits cap how many flow runs (hence paid machines) a GPU pool runs at once; tag limits
cap concurrent task runs that call one teacher/judge API. Idempotent: re-running updates limits.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from pydantic import Field

from nexus_core.config import NexusModel, load_config

REPO = Path(__file__).resolve().parent.parent
DEFAULT = REPO / "infra" / "concurrency.yaml"


class PoolLimit(NexusModel):
    """One work pool: its worker type and how many flow runs it may run at once."""

    type: str = Field(description="Worker type: process, nexus-lambda, nexus-runpod, kubernetes")
    limit: int = Field(ge=1, description="Most flow runs (machines) at once")
    base_job_template: str | None = Field(default=None, description="JSON template file (repo-relative) for new pools")


class LimitsConfig(NexusModel):
    """The whole ``concurrency.yaml``."""

    work_pools: dict[str, PoolLimit] = Field(default_factory=dict, description="Pool name → limit")
    tags: dict[str, int] = Field(default_factory=dict, description="Task tag → most concurrent task runs")


def _template(pool: PoolLimit) -> dict:
    if pool.base_job_template:
        return json.loads((REPO / pool.base_job_template).read_text(encoding="utf-8"))
    from prefect.workers.base import BaseWorker

    import infra.workers  # noqa: F401 - registers the nexus worker types

    worker = BaseWorker.get_worker_class_from_type(pool.type)
    return worker.get_default_base_job_template() if worker else {}


async def apply_limits(cfg: LimitsConfig) -> dict[str, int]:
    """Create missing pools, set every limit; return what was set (``pool:<name>`` / ``tag:<name>``)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectNotFound

    done: dict[str, int] = {}
    async with get_client() as client:
        for name, pool in cfg.work_pools.items():
            try:
                await client.read_work_pool(name)
                await client.update_work_pool(name, WorkPoolUpdate(concurrency_limit=pool.limit))
            except ObjectNotFound:
                await client.create_work_pool(WorkPoolCreate(name=name, type=pool.type, concurrency_limit=pool.limit,
                                                             base_job_template=_template(pool)))
            done[f"pool:{name}"] = pool.limit
        for tag, limit in cfg.tags.items():
            await client.create_concurrency_limit(tag=tag, concurrency_limit=limit)  # upsert by tag
            done[f"tag:{tag}"] = limit
    return done


def main(argv: list[str] | None = None) -> int:
    """CLI entry: apply the limits file and print them."""
    from nexus_core.settings import configure_environment

    configure_environment()
    args = sys.argv[1:] if argv is None else argv
    cfg = load_config(args[0] if args else DEFAULT, LimitsConfig)
    for key, value in asyncio.run(apply_limits(cfg)).items():
        print(f"{key:<32} {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
