"""A flow that fails on purpose inside a task, for the tests of what a failing run prints.

    python -m tests.support.failing_flow CONFIG.yaml [error=nexus|unexpected] [--debug]
"""

from __future__ import annotations

from typing import Literal

from prefect import flow, task
from pydantic import Field

from flows.common import main
from nexus_core.config import FlowConfig
from nexus_core.errors import InputError


class FailingConfig(FlowConfig):
    """Which kind of failure the task raises."""

    error: Literal["nexus", "unexpected"] = Field(default="nexus", description="an InputError, or a plain bug")


@task
def fail(kind: str) -> None:
    """Raise a NexusError (a bad input the user can fix) or an unexpected exception (a bug)."""
    if kind == "nexus":
        raise InputError("/data/rows.jsonl:3: not valid JSON")
    {}["missing"]  # noqa: B018 - a KeyError, as a bug in a step would raise


@flow(name="failing")
def failing(cfg: FailingConfig) -> None:
    """Run the failing task."""
    fail(cfg.error)


if __name__ == "__main__":
    raise SystemExit(main(failing, FailingConfig))
