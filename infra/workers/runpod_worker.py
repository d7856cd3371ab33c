"""Prefect worker type ``nexus-runpod``: runs each flow run in its own RunPod pod.

    export RUNPOD_API_KEY=...            # in the worker's environment only
    prefect work-pool create gpu-runpod --type nexus-runpod
    prefect worker start --pool gpu-runpod --type nexus-runpod
"""

from __future__ import annotations

from pydantic import Field

from infra.providers.base import LaunchSpec, api_key_from_env
from infra.providers.runpod import DEFAULT_GRAPHQL_URL, DEFAULT_URL, RunPod
from infra.workers.gpu import GPUCloudWorker, GPUJobConfiguration, GPUVariables, GPUWorkerResult


class RunPodJobConfiguration(GPUJobConfiguration):
    """RunPod job configuration: GPU type ids, data centres, cloud type, volume."""

    cloud_type: str = Field(default="SECURE", pattern="^(SECURE|COMMUNITY)$", description="SECURE or COMMUNITY cloud")
    volume_gb: int = Field(default=0, ge=0, description="Pod volume (persists across restarts) in GB")
    graphql_url: str | None = Field(default=None, description="RunPod GraphQL URL (GPU type list)")


class RunPodVariables(GPUVariables):
    """Base job template variables of a ``nexus-runpod`` work pool."""

    gpu_types: list[str] = Field(default=["NVIDIA H100 80GB HBM3", "NVIDIA A100 80GB PCIe"], min_length=1,
                                 description="RunPod GPU type ids to try, in order")
    regions: list[str] = Field(default_factory=list,
                               description="RunPod data centre ids to try, in order (empty: any)")
    api_key_env: str = Field(default="RUNPOD_API_KEY", description="Worker env variable holding the RunPod API key")
    cloud_type: str = Field(default="SECURE", pattern="^(SECURE|COMMUNITY)$", description="SECURE or COMMUNITY cloud")
    volume_gb: int = Field(default=0, ge=0, description="Pod volume (persists across restarts) in GB")
    graphql_url: str | None = Field(default=None, description="RunPod GraphQL URL (tests point it at a local server)")


class RunPodWorker(GPUCloudWorker):
    """Creates a RunPod pod per flow run and deletes it when the run ends."""

    type = "nexus-runpod"
    provider = "runpod"
    job_configuration = RunPodJobConfiguration
    job_configuration_variables = RunPodVariables
    _description = "Run each flow run in a RunPod GPU pod (Nexus)."
    _documentation_url = "https://docs.runpod.io/api-reference"

    def make_cloud(self, configuration: RunPodJobConfiguration) -> RunPod:
        """A RunPod client with the key from the worker's environment."""
        key = api_key_from_env(configuration.api_key_env, "runpod")
        return RunPod(key, configuration.api_url or DEFAULT_URL, configuration.graphql_url or DEFAULT_GRAPHQL_URL,
                      cloud_type=configuration.cloud_type)

    def launch_spec(self, configuration: RunPodJobConfiguration, flow_run_id: str, gpu: str,
                    region: str | None, attempt: int = 1) -> LaunchSpec:
        """Pod spec: the base spec plus the pod volume size."""
        spec = super().launch_spec(configuration, flow_run_id, gpu, region, attempt)
        spec.extra["volume_gb"] = configuration.volume_gb
        return spec


__all__ = ["RunPodWorker", "RunPodJobConfiguration", "RunPodVariables", "GPUWorkerResult"]
