"""Task: review decisions (auto, or from the labels a human submitted through the review app)."""

from __future__ import annotations

from nexus_core.artifacts import ArtifactRef
from nexus_core.distill.review import ReviewConfig, ReviewResult, run_review
from nexus_core.runner import run_step
from tasks.common import nexus_task, run_context


# The submission (labels digest) is part of cfg, so a new batch of labels misses the cache.
@nexus_task(run_review, name="distill-review")
def review(cfg: ReviewConfig, filtered: ArtifactRef, name: str = "reviewed") -> ReviewResult:
    """Decide every filtered row into ``distill/<name>_vN`` with label exports."""
    return run_step(run_review, cfg, name=name, inputs={"filtered": filtered},
                    context=run_context())
