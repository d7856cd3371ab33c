"""Task: the strict two-speaker script check (a filter: every row kept, with its verdict)."""

from __future__ import annotations

from nexus_core.artifacts import ArtifactRef
from nexus_core.podcast.check import ScriptCheckConfig, ScriptCheckResult, run_script_check
from nexus_core.runner import run_step
from tasks.common import nexus_task, run_context


@nexus_task(run_script_check, name="podcast-script-check")
def script_check(cfg: ScriptCheckConfig, rows: ArtifactRef, name: str = "scripts") -> ScriptCheckResult:
    """Check every row's script into ``podcast/<name>_vN``."""
    return run_step(run_script_check, cfg, name=name, inputs={"rows": rows}, context=run_context())
