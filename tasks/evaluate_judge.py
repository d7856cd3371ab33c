"""Task: rubric judge (LLM through litellm, or the offline heuristic) over predictions."""

from __future__ import annotations

from nexus_core.artifacts import ArtifactRef
from nexus_core.evaluate.judge import JudgeConfig, JudgeResult, run_judge
from nexus_core.runner import run_step
from tasks.common import nexus_task, run_context


@nexus_task(run_judge, name="evaluate-judge", tags=["evaluate"], retries=1, retry_delay_seconds=5,
            call_tags=lambda cfg: {"judge"} if cfg.kind == "llm" else set())
def evaluate_judge(cfg: JudgeConfig, predictions: ArtifactRef, name: str = "eval") -> JudgeResult:
    """Verdict per prediction → ``evaluate/<name>_judged_vN``; heuristic verdicts are labelled as such."""
    return run_step(run_judge, cfg, name=f"{name}_judged", inputs={"predictions": predictions},
                    context=run_context())
