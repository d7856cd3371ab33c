"""A child process for the crash-consistency probes (tests/reliability/test_crash.py).

    python -m tests.support.crash_child hang READY_FILE   # a flow whose step hangs after writing a file
    python -m tests.support.crash_child quick NAME        # one tiny step through the runner, then exit
    python -m tests.support.crash_child term READY_FILE   # a step (no flow) that hangs; the parent SIGTERMs it

NEXUS_HOME, NEXUS_DATA, MLFLOW_TRACKING_URI and (for ``hang``) PREFECT_API_URL come from the environment.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from nexus_core.config import NexusModel
from nexus_core.contract import step
from nexus_core.runner import StepResult


class ProbeConfig(NexusModel):
    """What the probe step writes."""

    text: str = "probe"
    ready: str = ""


@step(area="probe")
def run_probe(cfg: ProbeConfig, *, inputs, out_uri: str, ctx) -> StepResult:  # noqa: ANN001
    """Write one file; with ``ready`` set, signal and hang (the parent kills us here)."""
    Path(out_uri, "data.txt").write_text(cfg.text)
    if cfg.ready:
        Path(cfg.ready).write_text("in the step")
        time.sleep(600)
    return StepResult(rows=1)


def main() -> None:
    from nexus_core.settings import configure_environment

    configure_environment()
    from nexus_core.runner import run_step

    mode, arg = sys.argv[1], sys.argv[2]
    if mode == "quick":
        run_step(run_probe, ProbeConfig(text=arg), name=arg)
        return
    if mode == "term":
        run_step(run_probe, ProbeConfig(ready=arg), name="termed")
        return
    from prefect import flow

    from flows.common import flow_lineage

    @flow(name="crash-probe")
    def crash_probe() -> None:
        with flow_lineage(ProbeConfig()):
            run_step(run_probe, ProbeConfig(ready=arg), name="hung")

    crash_probe()


if __name__ == "__main__":
    main()
