"""Where a lifecycle section runs: in the lifecycle's own process, or on a work pool as a deployment run.

A section (distill, train, evaluate, compress) named in the lifecycle's ``deployments`` runs with
``prefect.deployments.run_deployment``: a flow run of that deployment, linked to the lifecycle run as
a subflow (Prefect's UI nests it; budgets above it bind it), on the deployment's work pool. Its
parameters are the section config and the artifacts it takes (as JSON); the lifecycle waits for the
run to end and reads its typed result from Prefect's result storage, so the remote machine must
persist results where this process can read them (a shared ``PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK``,
or the same ``NEXUS_HOME`` for a pool on this machine) and the artifacts it names must live in a
store both can reach (``NEXUS_DATA``).

CPU-bound sections (teacher collection, review, API judging) belong on a CPU pool, training and
compression on GPU pools: ``infra/prefect.remote.yaml`` has a deployment per section.
"""

from __future__ import annotations

import typing
from typing import Any

from pydantic import BaseModel, Field, field_validator

from flows.common import check_parameter_size
from flows.results import FlowResult
from nexus_core.config import NexusModel, runtime_field
from nexus_core.errors import NexusError

SECTION_FLOWS = {"distill": "distill", "train": "llm_train", "evaluate": "evaluate", "compress": "compress",
                 "omni": "llm_train"}


class SectionDeployments(NexusModel):
    """The deployment (``flow/name``) that runs each lifecycle section; unset sections run in process."""

    distill: str | None = Field(default=None, description="Deployment of the distill flow, e.g. 'distill/cpu' "
                                "(teacher calls and review are CPU-bound); null: run in the lifecycle's process")
    train: str | None = Field(default=None, description="Deployment of the llm_train flow, e.g. "
                              "'llm_train/runpod-a100' (a GPU pool); null: run in the lifecycle's process")
    evaluate: str | None = Field(default=None, description="Deployment of the evaluate flow, e.g. "
                                 "'evaluate/runpod-a100' (predictions need the GPU; an API judge alone fits "
                                 "'evaluate/cpu'); null: run in the lifecycle's process")
    compress: str | None = Field(default=None, description="Deployment of the compress flow, e.g. "
                                 "'compress/runpod-a100'; null: run in the lifecycle's process")
    omni: str | None = Field(default=None, description="Deployment of the llm_train flow for the omni section, e.g. "
                             "'llm_train/runpod-a100'; null: run in the lifecycle's process")
    poll_interval_s: float = runtime_field(10.0, "Seconds between checks on a section's deployment run", gt=0)

    @field_validator("distill", "train", "evaluate", "compress", "omni")
    @classmethod
    def _flow_matches(cls, value: str | None, info: Any) -> str | None:
        flow = SECTION_FLOWS[info.field_name]
        if value is not None and not value.startswith(f"{flow}/"):
            raise ValueError(f"must name a deployment of the {flow} flow ('{flow}/<deployment>'), got {value!r}")
        return value


def _jsonable(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def run_section(flow_fn: Any, cfg: BaseModel, deployment: str | None, poll_interval_s: float = 10.0,
                **inputs: Any) -> Any:
    """``flow_fn(cfg, **inputs)`` as an in-process subflow, or, when ``deployment`` is set, as a run of
    that deployment (a subflow of the current run on the deployment's work pool); its typed result."""
    if not deployment:
        return flow_fn(cfg, **inputs)
    from prefect.deployments import run_deployment

    check_parameter_size(cfg, f"{deployment} parameters")
    parameters = {"cfg": cfg.model_dump(mode="json"),
                  **{k: _jsonable(v) for k, v in inputs.items() if v is not None}}
    run = run_deployment(deployment, parameters=parameters, poll_interval=poll_interval_s)
    state = run.state
    result_type = typing.get_type_hints(flow_fn.fn)["return"]
    if state is None or not state.is_final():
        raise NexusError(f"{deployment}: flow run {run.id} did not finish ({state.name if state else 'no state'})")
    if not state.is_completed():
        try:
            state.result()  # re-raises the run's own exception (a budget, a bad input) when it was stored
        except NexusError:
            raise
        except BaseException as exc:  # noqa: BLE001 - anything else: name the run and its state
            raise NexusError(f"{deployment}: flow run {run.id} ended {state.name}: {state.message or exc}") from exc
        raise NexusError(f"{deployment}: flow run {run.id} ended {state.name}: {state.message}")
    result = state.result()
    if not isinstance(result, FlowResult):
        raise NexusError(f"{deployment}: flow run {run.id} returned {type(result).__name__}, not a flow result")
    return result if isinstance(result, result_type) else result_type.model_validate(result.model_dump())
