"""Typed flow results: what each flow returns, as fields (no digging through dicts for a URI).

Every flow returns a :class:`FlowResult` subclass: the artifacts it produced (in order), which were
reused, its Prefect and MLflow run ids, and its own typed fields (the SFT dataset, the final model,
the gate verdict, ...). ``summary`` lists those fields for printing.
"""

from __future__ import annotations

from typing import Any, Self

from pydantic import BaseModel, Field

from nexus_core.artifacts import ArtifactRef


class FlowResult(BaseModel):
    """What every flow returns: the artifacts it produced (in order) and its run ids."""

    flow: str
    artifacts: dict[str, ArtifactRef] = Field(default_factory=dict)
    reused: list[str] = Field(default_factory=list)
    flow_run_id: str | None = None
    mlflow_run_id: str | None = None
    dry_run: bool = Field(default=False, description="True when the flow only checked and planned its stages")
    plan: list[str] = Field(default_factory=list, description="The stages a dry run would run, in order")

    @property
    def summary(self) -> dict[str, Any]:
        """The flow's own fields (those a subclass adds), for printing."""
        own = set(type(self).model_fields) - set(FlowResult.model_fields)
        return {k: v for k, v in self.model_dump(mode="json").items() if k in own}

    @classmethod
    def from_steps(cls, flow: str, steps: dict[str, Any], mlflow_run_id: str | None,
                   extra: dict[str, ArtifactRef] | None = None, **fields: Any) -> Self:
        """The result of a flow whose step results (``.ref``, ``.reused``) are ``steps``, in order.

        ``extra`` adds refs the flow was given or made without a step (listed first); ``fields`` are
        the subclass's own fields.
        """
        from prefect.runtime import flow_run

        return cls(flow=flow, artifacts={**(extra or {}), **{k: r.ref for k, r in steps.items()}},
                   reused=[k for k, r in steps.items() if r.reused], flow_run_id=flow_run.get_id(),
                   mlflow_run_id=mlflow_run_id, **fields)

    @classmethod
    def planned(cls, flow: str, plan: list[str], mlflow_run_id: str | None = None, **fields: Any) -> Self:
        """The result of a dry run: nothing produced, the plan checked."""
        from prefect.runtime import flow_run

        return cls(flow=flow, dry_run=True, plan=plan, flow_run_id=flow_run.get_id(),
                   mlflow_run_id=mlflow_run_id, **fields)


class DistillResult(FlowResult):
    """The distill flow: the SFT dataset and what each stage kept."""

    sft: ArtifactRef | None = Field(default=None, description="The SFT dataset")
    collected_ok: int = 0
    collected_failed: int = 0
    offline_misses: int = 0
    filter_kept: int = 0
    gates_passed: bool | None = None
    review_accepted: int = 0
    regenerated_rescued: int = 0
    sft_rows: int | None = None
    teacher_usd: float = 0.0


class LLMTrainResult(FlowResult):
    """The llm_train flow: the model the queue ended with, each stage's registry entry and final loss."""

    final_model: ArtifactRef | None = Field(default=None, description="The last causal-LM stage's model")
    registered: dict[str, str] = Field(default_factory=dict, description="stage → registered name/version")
    losses: dict[str, float] = Field(default_factory=dict, description="stage → final training loss")
    base_model: dict[str, Any] | None = Field(default=None, description="Dry run: the base model's description")


class EvaluateResult(FlowResult):
    """The evaluate flow: the gate verdict and the numbers behind it."""

    gate_passed: bool | None = Field(default=None, description="The promote/reject verdict (None: dry run)")
    failed_gates: list[str] = Field(default_factory=list)
    gate_values: dict[str, Any] = Field(default_factory=dict)
    run_id: str | None = None
    judge: str | None = None
    judge_kind: str | None = None
    score: float | None = None
    coverage: float | None = Field(default=None, description="Rows the judge scored / rows")
    unparseable: int = Field(default=0, description="Unusable first verdicts (before the re-ask recovered any)")
    metrics: dict[str, Any] = Field(default_factory=dict)
    report: str | None = Field(default=None, description="Path of the report JSON")
    feedback_samples: int = 0
    harness: dict[str, dict[str, float | None]] = Field(default_factory=dict, description="lm-evaluation-harness "
                                                        "task → metric → value (beside the rubric, not in score)")


class CompressResult(FlowResult):
    """The compress flow: the benchmark table and the released variant, if any."""

    benchmark: ArtifactRef | None = None
    variants: list[str] = Field(default_factory=list)
    ratios: dict[str, dict[str, Any]] = Field(default_factory=dict, description="model → size/latency/perplexity "
                                                                                "ratios against the base")
    released: dict[str, Any] | None = Field(default=None, description="variant and registry entry of the release")


class FluxResult(FlowResult):
    """The flux flow: the trained transformer (or LoRA) and its validation images."""

    model: ArtifactRef | None = None
    global_step: int = 0
    validation_images: int = 0
    final_loss: float | None = None
    weights: str | None = Field(default=None, description="What was trained and saved: lora or full")
    exported: list[str] = Field(default_factory=list, description="Files copied to output_dir")


class LifecycleResult(FlowResult):
    """The lifecycle flow: the model it ended with, the verdict, and each stage flow's result."""

    model: ArtifactRef | None = None
    verdict: str = "not evaluated"
    base_model_parameters: int | None = None
    stages: dict[str, dict[str, Any]] = Field(default_factory=dict, description="stage → its flow's summary")
    feedback_source: str | None = Field(default=None, description="The previous evaluation's feedback artifact "
                                                                  "distill took (feedback.use), if any")
    omni_model: ArtifactRef | None = Field(default=None, description="The multimodal model of the omni section, "
                                                                    "if any")
