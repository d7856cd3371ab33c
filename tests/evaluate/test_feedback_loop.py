"""The feedback loop closed in the lifecycle, opt-in: with ``feedback.use`` the next run's distill stage
also takes the newest ``evaluate/<name>_feedback`` artifact, pinned to its version when the run starts;
with nothing to feed back (no artifact yet, or the newest evaluation failed nothing) it says so and
distill runs on its own sources. Off by default."""

from __future__ import annotations

import polars as pl
import pytest

from flows.common import load_flow_config
from flows.distill import source_refs
from flows.lifecycle import FeedbackLoopConfig, LifecycleConfig, with_feedback
from nexus_core.artifacts import raw_ref
from nexus_core.errors import ConfigError
from nexus_core.evaluate.feedback import FeedbackConfig, run_feedback
from nexus_core.io import write_parquet
from nexus_core.runner import run_step


def _evaluation(tmp_path, name: str, scores: list[int]):
    """A real feedback artifact from a judged table whose rows scored ``scores`` (below 3 fails)."""
    judged = pl.DataFrame({"row_id": [f"r{i}" for i in range(len(scores))],
                           "input": [f"Title {i}. Abstract about soil {i}." for i in range(len(scores))],
                           "status": ["ok"] * len(scores), "plausibility": scores, "has_methodology": [True] * len(scores)})
    path = tmp_path / f"judged_{len(list(tmp_path.glob('judged_*')))}"
    write_parquet(judged, path / "data.parquet")
    return run_step(run_feedback, FeedbackConfig(), name=name, inputs={"judged": raw_ref(path)})


def test_the_next_run_takes_the_previous_evaluations_failures_when_asked(data_root, tmp_path, repo):
    cfg = load_flow_config(LifecycleConfig, str(repo / "configs/presets/tiny.yaml"), ["feedback.use=true"])
    assert LifecycleConfig.model_fields["feedback"].default_factory().use is False  # opt-in
    off = cfg.model_copy(update={"feedback": FeedbackLoopConfig()})
    assert with_feedback(off) == (off, None, None)

    same, ref, note = with_feedback(cfg)  # nothing evaluated yet
    assert same.distill == cfg.distill and ref is None
    assert note and "no evaluate/tiny_feedback artifact yet" in note

    v1 = _evaluation(tmp_path, "tiny_feedback", [1, 2, 5])
    assert v1.failed_samples == 2
    fed, ref, note = with_feedback(cfg)
    assert ref is not None and ref.uri == v1.ref.uri
    assert fed.distill is not None and cfg.distill is not None
    assert fed.distill.sources == [*cfg.distill.sources, v1.ref.uri]  # pinned: this run's evaluation cannot move it
    assert note and "evaluate/tiny_feedback@v1: 2 sample(s)" in note
    refs = source_refs(fed.distill)
    assert refs[f"source_{len(cfg.distill.sources)}"].digest == v1.ref.digest
    other = cfg.model_copy(update={"feedback": FeedbackLoopConfig(use=True, evaluation="nightly")})
    assert with_feedback(other)[1] is None  # another evaluation's name: its own artifact, none yet

    nothing = _evaluation(tmp_path, "tiny_feedback", [5, 4])  # the newest evaluation failed nothing
    assert nothing.failed_samples == 0 and nothing.ref.version == 2
    fed, ref, note = with_feedback(cfg)
    assert ref is None and fed.distill == cfg.distill  # older failures were another model's
    assert note and "evaluate/tiny_feedback@v2 holds no failed samples" in note

    named = cfg.model_copy(update={"distill": cfg.distill.model_copy(
        update={"sources": [*cfg.distill.sources, "evaluate/tiny_feedback@v1"]})})
    kept, ref, note = with_feedback(named)
    assert kept is named and ref is None and note and "already name evaluate/tiny_feedback@v1" in note


def test_feedback_use_needs_a_distill_stage_and_an_evaluation(repo):
    tiny = str(repo / "configs/presets/tiny.yaml")
    with pytest.raises(ConfigError, match="feedback.use needs a distill section"):
        load_flow_config(LifecycleConfig, tiny, ["feedback.use=true", "distill=null"])
    with pytest.raises(ConfigError, match="name the evaluation"):
        load_flow_config(LifecycleConfig, tiny, ["feedback.use=true", "evaluate=null"])
    assert load_flow_config(LifecycleConfig, tiny, ["feedback.use=true", "evaluate=null",
                                                    "feedback.evaluation=nightly"]).feedback.evaluation == "nightly"
