"""The distill flow: raw scientific text → teacher inputs → teacher collection → filters →
human review (a real pause) → regeneration of rejects → (human mode) a second review of the
rescued rows → SFT dataset.

    nexus run distill configs/distill/tiny.yaml          # offline, recorded teacher, auto review
    nexus run distill configs/distill/scientific.yaml    # a real teacher through litellm
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.flow_runs import pause_flow_run, suspend_flow_run
from prefect.input import RunInput
from prefect.runtime import deployment, flow_run
from pydantic import Field

from flows.common import flow_lineage, main
from flows.results import DistillResult
from nexus_core.artifacts import ArtifactRef
from nexus_core.config import FlowConfig, PathOrName
from nexus_core.contract import check_plan
from nexus_core.distill.collect import CollectConfig, run_teacher_collect
from nexus_core.distill.filters import FiltersConfig, run_distill_filters
from nexus_core.distill.inputs import TeacherInputsConfig, run_teacher_inputs
from nexus_core.distill.package import PackageConfig, run_sft_package
from nexus_core.distill.prompts import TeacherConfig
from nexus_core.distill.recheck import RecheckConfig
from nexus_core.distill.regenerate import RegenerateConfig, run_regenerate
from nexus_core.distill.review import ReviewConfig, ReviewSubmission
from nexus_core.distill.review_store import open_request
from nexus_core.distill.rules import load_rules
from nexus_core.io import resolve_ref
from tasks.distill_collect import teacher_collect
from tasks.distill_filters import distill_filters
from tasks.distill_inputs import teacher_inputs
from tasks.distill_package import sft_package
from tasks.distill_recheck import recheck_queue
from tasks.distill_regenerate import regenerate
from tasks.distill_review import review


class DistillConfig(FlowConfig):
    """Config of the distill flow: one section per stage; ``teacher`` serves collection and regeneration."""

    name: str = Field(default="distill", description="Run name; artifact names derive from it")
    sources: list[PathOrName] = Field(default_factory=list, description="Raw JSONL / enhanced-prompt JSON files, or an "
                                      "evaluation's feedback artifact (evaluate/<name>_feedback@latest): the "
                                      "samples a model failed, asked of the teacher again")
    inputs: TeacherInputsConfig = Field(default_factory=TeacherInputsConfig, description="Prompt templates")
    teacher: TeacherConfig = Field(default_factory=TeacherConfig, description="Teacher model through litellm")
    batch_size: int = Field(default=256, ge=1, description="Rows per collection batch")
    filters: FiltersConfig = Field(default_factory=FiltersConfig, description="Filter rules")
    review: ReviewConfig = Field(default_factory=ReviewConfig, description="Review gate")
    regenerate: RegenerateConfig = Field(default_factory=RegenerateConfig, description="Regeneration of rejects")
    package: PackageConfig = Field(default_factory=PackageConfig, description="SFT packaging")


class ReviewInput(RunInput):
    """Typed input the review app sends with resume_flow_run."""

    reviewer: str
    labels_digest: str
    labels: int = 0


def review_gate(cfg: ReviewConfig, filtered: ArtifactRef) -> ReviewConfig:
    """Human mode: record a review request and pause until the review app resumes with its submission.

    A deployment run suspends (its process exits; it re-runs from cached tasks on resume); any other
    run pauses in process, since suspension needs a deployment to restart from.
    """
    if cfg.mode != "human":
        return cfg
    open_request(filtered.uri, flow_run.get_id(), flow_run.get_flow_name(), filtered.rows or 0)
    get_run_logger().info("waiting for review of %s: open the review app (streamlit run dashboards/app.py)",
                          filtered.uri)
    if deployment.id:  # prefect.runtime.flow_run has no deployment_id in 3.8
        answer = suspend_flow_run(wait_for_input=ReviewInput, timeout=cfg.timeout_s, key=f"review-{filtered.digest}")
    else:
        answer = pause_flow_run(wait_for_input=ReviewInput, timeout=cfg.timeout_s,
                                poll_interval=cfg.poll_interval_s, key=f"review-{filtered.digest}")
    return cfg.model_copy(update={"submission": ReviewSubmission(
        reviewer=answer.reviewer, labels_digest=answer.labels_digest, labels=answer.labels)})


def _regenerate_config(cfg: DistillConfig) -> RegenerateConfig:
    return cfg.regenerate.model_copy(update={"teacher": cfg.teacher, "rules": cfg.filters.rules})


def source_refs(cfg: DistillConfig) -> dict[str, ArtifactRef]:
    """``cfg.sources`` resolved: files by path, artifacts (a feedback artifact) by name, ``@latest`` or ``@vN``."""
    return {f"source_{i}": resolve_ref(s, f"distill.sources[{i}]") for i, s in enumerate(cfg.sources)}


def check_distill(cfg: DistillConfig, sources: dict[str, ArtifactRef]) -> list[str]:
    """Check what every stage reads before the first one runs (sources, templates, rules); the plan."""
    collect = CollectConfig(teacher=cfg.teacher, batch_size=cfg.batch_size)
    planned = [(run_teacher_inputs, cfg.inputs, dict(sources), "teacher_inputs"),
               (run_teacher_collect, collect, {}, "collect"), (run_distill_filters, cfg.filters, {}, "filters"),
               (run_regenerate, _regenerate_config(cfg), {}, "regenerate"), (run_sft_package, cfg.package, {}, "package")]
    check_plan(planned)
    load_rules(cfg.filters.rules)  # a malformed rules file fails here, before the first stage writes anything
    return [f"{label}: {fn.__name__.removeprefix('run_')}" for fn, _, _, label in planned]


@flow(name="distill", log_prints=True)
def distill(cfg: DistillConfig, sources: dict[str, ArtifactRef] | None = None) -> DistillResult:
    """Raw text to an SFT dataset; ``sources`` (refs from an upstream flow) replace ``cfg.sources``."""
    with flow_lineage(cfg) as mlflow_run_id:
        sources = sources or source_refs(cfg)
        plan = check_distill(cfg, sources)
        if cfg.dry_run:
            print("distill plan:\n  " + "\n  ".join(plan))
            return DistillResult.planned("distill", plan, mlflow_run_id)
        n = cfg.name
        inputs = teacher_inputs(cfg.inputs, sources, name=f"{n}_teacher_inputs")
        collected = teacher_collect(CollectConfig(teacher=cfg.teacher, batch_size=cfg.batch_size), inputs.ref,
                                    name=f"{n}_collected")
        filtered = distill_filters(cfg.filters, collected.ref, name=f"{n}_filtered")
        reviewed = review(review_gate(cfg.review, filtered.ref), filtered.ref, name=f"{n}_reviewed")
        regenerated = regenerate(_regenerate_config(cfg), reviewed.ref, name=f"{n}_regenerated")
        recheck = {}
        if cfg.review.mode == "human" and cfg.review.recheck_regenerated and regenerated.rescued:
            # a second gate: nobody has read the rescued answers yet
            queue = recheck_queue(RecheckConfig(), regenerated.ref, name=f"{n}_recheck")
            second = review(review_gate(cfg.review, queue.ref), queue.ref, name=f"{n}_rereviewed")
            recheck = {"recheck": queue, "rereviewed": second}
        sft = sft_package(cfg.package, regenerated.ref, rereviewed=recheck["rereviewed"].ref if recheck else None,
                          name=f"{n}_sft")
        steps = {"teacher_inputs": inputs, "collected": collected, "filtered": filtered, "reviewed": reviewed,
                 "regenerated": regenerated, **recheck, "sft": sft}
    return DistillResult.from_steps(
        "distill", steps, mlflow_run_id, sft=sft.ref, collected_ok=collected.ok, collected_failed=collected.failed,
        offline_misses=len(collected.offline_misses), filter_kept=filtered.kept, gates_passed=filtered.gates_passed,
        review_accepted=reviewed.accepted, regenerated_rescued=regenerated.rescued, sft_rows=sft.rows,
        teacher_usd=round(collected.cost.usd + regenerated.cost.usd, 6))


if __name__ == "__main__":
    raise SystemExit(main(distill, DistillConfig))
