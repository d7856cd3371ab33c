"""The evaluate flow: score a model on a validation set, judge it on the rubric, decide the gates.

    (dataset file ─► ingest) ─► predict ─► score ─► judge ─► gates ─► report (+ leaderboard) ─► feedback
                             └► harness (optional: lm-evaluation-harness tasks) ──┘

``model`` and ``dataset`` come from an upstream flow (the lifecycle passes ArtifactRefs) or from the
config (a path, an artifact directory, or ``[area/]name[@vN]``). With no model at all, the offline
preset builds a tiny one on the validation text so the whole flow runs anywhere.
"""

from __future__ import annotations

from prefect import flow
from pydantic import Field

from flows.common import flow_lineage, main
from flows.results import EvaluateResult
from nexus_core.artifacts import ArtifactRef
from nexus_core.config import FlowConfig, PathOrName, config_hash
from nexus_core.contract import check_plan, columns_of
from nexus_core.corpus.ingest import IngestConfig
from nexus_core.errors import ConfigError
from nexus_core.evaluate.feedback import FeedbackConfig, run_feedback
from nexus_core.evaluate.gates import GatesConfig, rubric_problems, run_gates
from nexus_core.evaluate.harness import HarnessConfig, harness_problems, run_harness
from nexus_core.evaluate.judge import JudgeConfig, run_judge
from nexus_core.evaluate.predict import PredictConfig, run_predict
from nexus_core.evaluate.records import eval_run_id
from nexus_core.evaluate.report import ReportConfig, run_report
from nexus_core.evaluate.rubric import load_rubric
from nexus_core.evaluate.score import ScoreConfig, run_score
from nexus_core.evaluate.vqa import is_vqa, vqa_problems
from nexus_core.io import resolve_ref
from nexus_core.models.io import resolve_model
from nexus_core.train.base_model import BaseModelConfig
from tasks.base_model import base_model
from tasks.evaluate_feedback import evaluate_feedback
from tasks.evaluate_gates import evaluate_gates
from tasks.evaluate_harness import evaluate_harness
from tasks.evaluate_judge import evaluate_judge
from tasks.evaluate_predict import evaluate_predict
from tasks.evaluate_report import evaluate_report
from tasks.evaluate_score import evaluate_score
from tasks.ingest import ingest


class EvaluateConfig(FlowConfig):
    """Config of the evaluate flow: where the model and data come from, and one section per step."""

    name: str = Field(default="eval", description="Evaluation name; artifact names derive from it")
    model: PathOrName | None = Field(default=None, description="Model: HF dir, artifact dir or name[@vN] (ignored when the "
                                                "flow is given a model ref); null builds `tiny_model`")
    dataset: PathOrName | None = Field(default=None, description="Validation set with input/output: table file, artifact dir "
                                                  "or [area/]name[@vN] (ignored when given a dataset ref)")
    tiny_model: BaseModelConfig = Field(
        default_factory=lambda: BaseModelConfig(source="tiny", text_column="input"),
        description="Offline fallback model built on the validation inputs when no model is named")
    predict: PredictConfig = Field(default_factory=PredictConfig, description="Prediction settings")
    score: ScoreConfig = Field(default_factory=ScoreConfig, description="Metrics to compute")
    judge: JudgeConfig = Field(default_factory=JudgeConfig, description="Rubric judge (llm or heuristic)")
    gates: GatesConfig = Field(default_factory=GatesConfig, description="Quality gates")
    harness: HarnessConfig | None = Field(default=None, description="lm-evaluation-harness tasks from local task "
                                          "files, reported beside the rubric; null (default) skips them")
    report: ReportConfig = Field(default_factory=ReportConfig, description="Report settings")
    feedback: FeedbackConfig | None = Field(default_factory=FeedbackConfig,
                                            description="Failed samples → teacher inputs; null disables")


def check_evaluate(cfg: EvaluateConfig, model: ArtifactRef | None, dataset: ArtifactRef) -> list[str]:
    """Check the model, the validation set and the files every step reads before anything runs; the plan."""
    planned = [(run_predict, cfg.predict, {"model": model, "dataset": dataset}, "predict"),
               *([(run_harness, cfg.harness, {"model": model}, "harness")] if cfg.harness is not None else []),
               (run_score, cfg.score, {}, "score"), (run_judge, cfg.judge, {}, "judge"),
               (run_gates, cfg.gates, {}, "gates"), (run_report, cfg.report, {}, "report"),
               *([(run_feedback, cfg.feedback, {}, "feedback")] if cfg.feedback is not None else [])]
    check_plan(planned)
    rubric = load_rubric(cfg.judge.rubric)
    problems = rubric_problems(cfg.gates, rubric.names, f"{rubric.name!r} ({cfg.judge.rubric})")
    problems += harness_problems(cfg.harness)
    if is_vqa(columns_of(dataset)):  # image rows: a model that sees, no text-only predict features
        problems += vqa_problems(model, cfg.predict.perplexity, cfg.predict.labels)
    if problems:
        raise ConfigError(problems)
    return [label for _, _, _, label in planned]


@flow(name="evaluate", log_prints=True)
def evaluate(cfg: EvaluateConfig, model: ArtifactRef | None = None,
             dataset: ArtifactRef | None = None) -> EvaluateResult:
    """Evaluate ``model`` on ``dataset``; the result's ``gate_passed`` is the promote/reject verdict."""
    with flow_lineage(cfg) as mlflow_run_id:
        steps = {}
        if dataset is None:
            if not cfg.dataset:
                raise ConfigError(["dataset: required when the flow is not given a dataset ref"])
            dataset = resolve_ref(cfg.dataset, "dataset")
        if model is None and cfg.model:
            model = resolve_model(cfg.model, "model")
        plan = check_evaluate(cfg, model, dataset)
        if cfg.dry_run:
            print("evaluate plan: " + " → ".join(plan))
            return EvaluateResult.planned("evaluate", plan, mlflow_run_id)
        # a plain table file: version it first (a VQA set is read in place: its images are relative to it)
        if dataset.kind == "raw" and dataset.path.is_file() and not is_vqa(columns_of(dataset)):
            steps["dataset"] = ingest(
                IngestConfig(sources=[cfg.dataset or dataset.uri], required_columns=["input", "output"],
                             dedupe_on=None), {"validation": dataset}, name=f"{cfg.name}_validation")
            dataset = steps["dataset"].ref
        if model is None:
            steps["model"] = base_model(cfg.tiny_model, dataset, name=f"{cfg.name}_tiny_model")
            model = steps["model"].ref
        # Predictions are named by what makes them (so a gates-only change reuses them); the report by everything.
        pred_id = eval_run_id(model, dataset, config_hash(cfg.predict))
        run_id = eval_run_id(model, dataset, config_hash(cfg, exclude={"model", "dataset", "extends", "overrides",
                                                                         "dry_run"}))
        preds = steps["predict"] = evaluate_predict(cfg.predict.model_copy(update={"run_id": pred_id}), model,
                                                    dataset, name=cfg.name)
        harness = None
        if cfg.harness is not None:  # standard tasks on the same model, kept apart from the rubric scores
            harness = steps["harness"] = evaluate_harness(cfg.harness, model, name=cfg.name)
        scores = steps["score"] = evaluate_score(cfg.score, preds.ref, name=cfg.name)
        judged = steps["judge"] = evaluate_judge(cfg.judge, preds.ref, name=cfg.name)
        gates = steps["gates"] = evaluate_gates(cfg.gates, judged.ref, scores.ref, name=cfg.name)
        report = steps["report"] = evaluate_report(cfg.report.model_copy(update={"run_id": run_id}), preds.ref,
                                                   scores.ref, judged.ref, gates.ref,
                                                   harness=harness.ref if harness else None, name=cfg.name)
        if cfg.feedback is not None:
            steps["feedback"] = evaluate_feedback(cfg.feedback, judged.ref, name=cfg.name)
    return EvaluateResult.from_steps(
        "evaluate", steps, mlflow_run_id, gate_passed=gates.passed, failed_gates=gates.failed_gates,
        gate_values=gates.values, run_id=run_id, judge=judged.label, judge_kind=judged.judge_kind,
        score=report.score, coverage=judged.coverage, unparseable=judged.unparseable, metrics=scores.values, report=f"{report.ref.uri}/{report.report_file}",
        feedback_samples=steps["feedback"].failed_samples if "feedback" in steps else 0,
        harness=harness.tasks if harness else {})


if __name__ == "__main__":
    raise SystemExit(main(evaluate, EvaluateConfig))
