"""StepContext: what the runner hands a step besides its config and inputs.

A step never searches for its MLflow run, work dir or progress bar; it gets them here:

- ``run``: the step's MLflow run (``None`` when the step is called directly, outside the runner);
- ``work_dir``: a stable directory for checkpoints and scratch files, keyed by the step's resume key
  (its cache key less resume-neutral fields such as ``max_steps``), so a killed run finds its
  checkpoints again; the runner deletes it once the artifact is published;
- ``log_metrics`` / ``log_file``: batched MLflow logging (no-ops without a run);
- ``progress(done, total, message)``: progress of a long step (a Prefect progress artifact under a
  flow, updated at most once a second; a log line at most every 5 s otherwise).
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nexus_core.lineage import StepRun

ProgressFn = Callable[[float, str], None]
log = logging.getLogger("nexus")
if log.level == logging.NOTSET:  # a step's info lines are the point of this logger, whatever the root's level
    log.setLevel(logging.INFO)


@dataclass
class StepContext:
    """Run-time handles of one step execution (see module docstring)."""

    step: str
    work_dir: Path
    run: StepRun | None = None
    on_progress: ProgressFn | None = None
    progress_every_s: float = 1.0  # with a reporter (the Prefect UI): at most one update a second
    log_progress_every_s: float = 5.0  # without one: a log line at most every 5 s
    _last_progress: float = field(default=0.0, repr=False)

    @classmethod
    def detached(cls, step: str = "step", work_dir: str | Path | None = None) -> StepContext:
        """A context for calling a step function directly (tests, benchmarks): no MLflow run, a
        temporary work dir unless one is given, progress written to the log."""
        path = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="nexus-work-"))
        path.mkdir(parents=True, exist_ok=True)
        return cls(step=step, work_dir=path)

    @property
    def run_id(self) -> str | None:
        """MLflow run id of this step execution, if it has one."""
        return self.run.run_id if self.run else None

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        """Log a batch of metrics to the step's MLflow run in one call."""
        if self.run is not None:
            self.run.log_metrics(metrics, step=step)

    def log_file(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file (a validation image, a sample table) to the step's MLflow run."""
        if self.run is not None:
            self.run.log_file(path, artifact_path)

    def info(self, message: str) -> None:
        """A line in the step's log (Prefect shows it under the task run)."""
        log.info("%s: %s", self.step.rsplit(".", 1)[-1], message)

    def progress(self, done: float, total: float, message: str = "", force: bool = False) -> None:
        """Report ``done`` of ``total`` units; throttled to one report per ``progress_every_s`` (per
        ``log_progress_every_s`` as log lines); the last report (``done >= total``) always goes through."""
        now = time.monotonic()
        every = self.progress_every_s if self.on_progress is not None else self.log_progress_every_s
        if not force and done < total and now - self._last_progress < every:
            return
        self._last_progress = now
        fraction = 0.0 if total <= 0 else min(1.0, done / total)
        text = message or f"{done:g}/{total:g}"
        if self.on_progress is not None:
            try:
                self.on_progress(fraction, text)
            except Exception as exc:  # noqa: BLE001 - progress is cosmetic; it must not fail the step
                log.debug("progress report failed: %s", exc)
        else:
            self.info(f"{fraction:.0%} {text}")

    def child(self, **changes: Any) -> StepContext:
        """A copy with some fields replaced (e.g. a sub-directory of the work dir)."""
        from dataclasses import replace

        return replace(self, **changes)
