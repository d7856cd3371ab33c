"""Task: turn failed samples into teacher inputs for the next distillation run."""

from __future__ import annotations

from nexus_core.artifacts import ArtifactRef
from nexus_core.evaluate.feedback import FeedbackConfig, FeedbackResult, run_feedback
from nexus_core.runner import run_step
from tasks.common import nexus_task, run_context


@nexus_task(run_feedback, name="evaluate-feedback", tags=["evaluate"])
def evaluate_feedback(cfg: FeedbackConfig, judged: ArtifactRef, name: str = "eval") -> FeedbackResult:
    """Failed samples → ``evaluate/<name>_feedback_vN/teacher_inputs.jsonl`` (title, abstract, domain, text)."""
    return run_step(run_feedback, cfg, name=f"{name}_feedback", inputs={"judged": judged},
                    context=run_context())
