"""Task: rubric judge (LLM through litellm, or the offline heuristic) over predictions."""

from __future__ import annotations

from pathlib import Path

from nexus_core.artifacts import ArtifactRef
from nexus_core.runner import run_step
from nexus_core.steps.evaluate.judge import JudgeConfig, JudgeResult, run_judge
from tasks.common import nexus_task, run_context


def _rubric_text(params: dict) -> list[str]:
    """The rubric file's text joins the cache key: editing the rubric re-judges."""
    path = Path(params["cfg"].rubric)
    return [path.read_text(encoding="utf-8")] if path.is_file() else []


@nexus_task(run_judge, name="eval-judge", tags=["evaluate"], extra_sources=_rubric_text, retries=1,
            retry_delay_seconds=5)
def eval_judge(cfg: JudgeConfig, predictions: ArtifactRef, name: str = "eval") -> JudgeResult:
    """Verdict per prediction → ``evaluate/<name>_judged_vN``; heuristic verdicts are labelled as such."""
    return run_step(run_judge, cfg, area="evaluate", name=f"{name}_judged", inputs={"predictions": predictions},
                    context=run_context(), extra_sources=tuple(_rubric_text({"cfg": cfg})))
